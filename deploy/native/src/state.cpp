#include "state.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "files.h"

namespace fs = std::filesystem;

namespace edgetl {

namespace {
constexpr const char* kState = "state.json";
constexpr const char* kTrained = "trained.ptd";
// state.json's keys naming a file (each with its KEY_sha256): the weights and each optimizer's buffers
constexpr const char* kFileKeys[] = {"weights", "momentum", "adamw_moments"};

std::string numbered(const char* stem, int epoch, const char* suffix) {
  char name[64];
  std::snprintf(name, sizeof name, "%s-epoch%04d%s", stem, epoch, suffix);
  return name;
}

// A state directory belongs to the bundle whose manifest (classes, model, optimizer, every file's
// sha256) it was trained from: another export of the same network (other classes, another --lr)
// has another manifest_sha256 even when its train.ptd is the same.
void check_bound(const nlohmann::json& s, const Bundle& bundle, const std::string& what, const std::string& hint) {
  const nlohmann::json recorded = s.is_object() ? s.value("bundle_manifest_sha256", nlohmann::json()) : nlohmann::json();
  const std::string id = recorded.is_string() ? recorded.get<std::string>() : "";
  if (id == bundle.manifest_sha256) return;
  std::string why;
  if (id.empty()) why = " (its state.json names no bundle_manifest_sha256: written by an older edgetl-device)";
  else if (s.contains("classes") && s["classes"] != nlohmann::json(bundle.classes))
    why = " (classes " + s["classes"].dump() + ", the bundle's " + nlohmann::json(bundle.classes).dump() + ")";
  throw DeviceError(what + why + hint);
}

// The fields the runner acts on: file names stay inside the directory, the epoch is in range, and
// every file named has the sha256 it is checked against.
void check_fields(const nlohmann::json& s, const std::string& path) {
  const std::string fix = "; remove the state directory to start over";
  const auto& epoch = s.contains("epoch") ? s["epoch"] : nlohmann::json();
  if (!epoch.is_number_integer() || epoch.get<int64_t>() < 0 || epoch.get<int64_t>() > kMaxEpochs)
    throw DeviceError(path + ": epoch " + epoch.dump() + " is not an integer in [0, " + std::to_string(kMaxEpochs) + "]" + fix);
  for (const char* key : kFileKeys) {
    if (!s.contains(key) || s[key].is_null()) continue;
    if (!s[key].is_string()) throw DeviceError(path + ": " + key + " is " + s[key].dump() + ", not a file name" + fix);
    plain_name(s[key].get<std::string>(), path + ": " + key);
    const std::string sha = std::string(key) + "_sha256";
    if (!s.contains(sha) || !s[sha].is_string())
      throw DeviceError(path + " names " + key + " without its " + sha + " (written by an older edgetl-device)" + fix);
  }
  // the rest of deploy/schema/state.schema.json's required keys: the exporter and the fleet read them
  if (!s.contains("history")) throw DeviceError(path + ": history is missing" + fix);
  if (!s["history"].is_array()) throw DeviceError(path + ": history is not a list" + fix);
  for (const char* key : {"model", "bundle_ptd_sha256"})
    if (!s.contains(key) || !s[key].is_string()) throw DeviceError(path + ": " + key + " is missing or not a string" + fix);
  const auto& classes = s.contains("classes") ? s["classes"] : nlohmann::json();
  if (!classes.is_array() || !std::all_of(classes.begin(), classes.end(), [](const auto& c) { return c.is_string(); }))
    throw DeviceError(path + ": classes is missing or not a list of names" + fix);
  if (!s.contains("weights")) throw DeviceError(path + ": weights is missing" + fix);
  if (s.contains("optimizer") && !(s["optimizer"] == "sgd" || s["optimizer"] == "adamw"))
    throw DeviceError(path + ": optimizer " + s["optimizer"].dump() + " is not sgd or adamw" + fix);
  if (s.contains("optimizer_steps") && !(s["optimizer_steps"].is_number_integer() && s["optimizer_steps"].get<int64_t>() >= 0))
    throw DeviceError(path + ": optimizer_steps " + s["optimizer_steps"].dump() + " is not an integer >= 0" + fix);
  if (epoch.get<int64_t>() > 0 && !(s.contains("weights") && s["weights"].is_string()))
    throw DeviceError(path + ": epoch " + epoch.dump() + " but no weights" + fix);
}

nlohmann::json read_state(const std::string& path, const Bundle& bundle, const std::string& what, const std::string& hint) {
  nlohmann::json s;
  try {
    s = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw DeviceError(path + " is damaged (" + e.what() + "); remove the state directory to start over");
  }
  check_bound(s, bundle, what, hint);
  check_fields(s, path);
  // the bundle's classes, then at most as many added ones as it has spare outputs, each once
  const auto names = s["classes"].get<std::vector<std::string>>();
  const bool extends = names.size() >= bundle.classes.size() && std::equal(bundle.classes.begin(), bundle.classes.end(), names.begin());
  const bool fits = names.size() <= bundle.classes.size() + static_cast<size_t>(bundle.training().spare.count);
  if (!extends || !fits || std::set<std::string>(names.begin(), names.end()).size() != names.size())
    throw DeviceError(path + ": classes " + s["classes"].dump() + " are not the bundle's followed by at most " +
                      std::to_string(bundle.training().spare.count) + " added ones; remove the state directory to start over");
  return s;
}

// `dir`/`name` (default: the weights s names) after checking it against s["weights_sha256"].
std::string checked_weights(const std::string& dir, const nlohmann::json& s, const std::string& name = "") {
  const std::string p = join(dir, name.empty() ? s["weights"].get<std::string>() : name);
  if (!is_file(p)) throw DeviceError("state directory " + dir + " names " + p + ", which is missing");
  if (sha256_file(p) != s["weights_sha256"].get<std::string>())
    throw DeviceError(p + " is damaged (sha256 mismatch with state.json); no earlier epoch is kept: remove " + dir + " to start over");
  return p;
}
}  // namespace

void write_ptd(const std::string& path, const std::string& base, const std::map<std::string, TensorSlot>& layout,
               const std::vector<TensorView>& tensors) {
  std::vector<std::pair<const TensorSlot*, const TensorView*>> patches;
  for (const auto& t : tensors) {
    auto it = layout.find(t.name);
    if (it == layout.end()) throw DeviceError("the weights file has no slot for " + t.name);
    if (it->second.nbytes != t.nbytes || it->second.dtype != t.dtype)
      throw DeviceError("tensor " + t.name + " does not fit its slot in the weights file");
    patches.emplace_back(&it->second, &t);
  }
  std::ifstream in(base, std::ios::binary);
  if (!in) throw DeviceError("cannot read " + base);
  atomic_write(path, [&](const ByteSink& sink) {
    std::vector<char> chunk(1 << 20);
    uint64_t at = 0, used = 0;
    while (in) {
      in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
      const uint64_t n = static_cast<uint64_t>(in.gcount());
      for (const auto& [slot, view] : patches) {  // copy the part of each tensor that falls in this chunk
        uint64_t lo = std::max(at, slot->offset), hi = std::min(at + n, slot->offset + slot->nbytes);
        if (lo < hi) {
          std::memcpy(chunk.data() + (lo - at), static_cast<const char*>(view->data) + (lo - slot->offset), hi - lo);
          used += hi - lo;
        }
      }
      sink(chunk.data(), n);
      at += n;
    }
    uint64_t want = 0;
    for (const auto& p : patches) want += p.first->nbytes;
    if (used != want) throw DeviceError(base + " is shorter than its layout says");
  });
}

StateDir::StateDir(std::string dir, const Bundle& bundle) : dir_(std::move(dir)), lock_(dir_), bundle_(bundle) {
  remove_stale_temporaries(dir_, {"weights-epoch", "momentum-epoch", "adamw_moments-epoch", kState, kTrained});
  std::string path = join(dir_, kState);
  if (is_file(path)) {
    state_ = read_state(path, bundle, dir_ + " holds training state of another bundle", "; use another --state directory");
  } else {
    // the bundle's identity and what the exporter checks a checkpoint against (edgetl export --device-weights)
    state_ = {{"epoch", 0},
              {"history", nlohmann::json::array()},
              {"bundle_manifest_sha256", bundle.manifest_sha256},
              {"bundle_ptd_sha256", bundle.ptd_sha256},
              {"model", bundle.model_name},
              {"classes", bundle.classes},
              {"weights", nullptr}};
  }
}

std::string StateDir::weights_path() const {
  if (state_.contains("weights") && state_["weights"].is_string()) {
    const std::string p = join(dir_, state_["weights"].get<std::string>());
    if (p != verified_) verified_ = checked_weights(dir_, state_);
    return p;
  }
  return bundle_.file(bundle_.training().ptd);
}

std::vector<std::vector<float>> StateDir::optimizer_buffers(const std::string& key, const std::vector<std::string>& names) const {
  if (!state_.contains(key) || !state_[key].is_string()) return {};
  std::string path = join(dir_, state_[key].get<std::string>());
  if (!is_file(path) || sha256_file(path) != state_.value(key + "_sha256", ""))
    throw DeviceError(path + " is missing or damaged (sha256 mismatch with state.json)");
  std::ifstream in(path, std::ios::binary);
  std::vector<std::vector<float>> out;
  const auto& layout = bundle_.training().weights_layout;
  for (const auto& name : names) {
    auto it = layout.find(name);
    if (it == layout.end()) throw DeviceError("no weights slot for parameter " + name);
    std::vector<float> buf(it->second.nbytes / sizeof(float));
    in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(it->second.nbytes));
    if (static_cast<uint64_t>(in.gcount()) != it->second.nbytes) throw DeviceError(path + " is shorter than the parameters it should hold");
    out.push_back(std::move(buf));
  }
  if (in.peek() != std::char_traits<char>::eof()) throw DeviceError(path + " does not match the bundle's parameters");
  return out;
}

void StateDir::save_epoch(int epoch, const TrainingSession& session, const Optimizer& optimizer, const nlohmann::json& row) {
  const auto& t = bundle_.training();
  std::vector<TensorView> tensors = session.parameters();
  tensors.insert(tensors.end(), session.buffers().begin(), session.buffers().end());
  std::string wname = numbered("weights", epoch, ".ptd");
  // over the weights the epoch started from: they hold what training does not change (the classes
  // the device added switched on)
  write_ptd(join(dir_, wname), weights_path(), t.weights_layout, tensors);

  nlohmann::json next = state_;
  const std::string key = optimizer.state_key();
  const auto& buffers = optimizer.buffers();
  if (!buffers.empty()) {
    std::string mname = numbered(key.c_str(), epoch, ".bin");
    atomic_write(join(dir_, mname), [&](const ByteSink& sink) {
      for (const auto& buf : buffers) sink(buf.data(), buf.size() * sizeof(float));
    });
    next[key] = mname;
    next[key + "_sha256"] = sha256_file(join(dir_, mname));
  }
  next["optimizer"] = optimizer.options().name;
  next["optimizer_steps"] = optimizer.steps();
  std::vector<std::string> previous;
  for (const char* k : kFileKeys)
    if (state_.contains(k) && state_[k].is_string()) previous.push_back(state_[k].get<std::string>());
  next["epoch"] = epoch;
  next["weights"] = wname;
  next["weights_sha256"] = sha256_file(join(dir_, wname));
  next["history"].push_back(row);
  atomic_write(join(dir_, kState), next.dump(2) + "\n");  // the commit point
  state_ = std::move(next);
  verified_ = join(dir_, wname);
  atomic_link(join(dir_, wname), join(dir_, kTrained));
  for (const auto& name : previous)
    if (name != state_["weights"] && name != state_.value(key, "")) std::remove(join(dir_, name).c_str());
}

void StateDir::start_from(const std::vector<TensorView>& tensors) {
  if (state_.contains("weights") && state_["weights"].is_string())
    throw DeviceError(dir_ + " already holds weights (epoch " + std::to_string(epoch()) + "); import into a new state directory");
  const auto& t = bundle_.training();
  std::string wname = numbered("weights", 0, ".ptd");
  write_ptd(join(dir_, wname), bundle_.file(t.ptd), t.weights_layout, tensors);
  commit_weights(state_, wname);
}

void StateDir::commit_weights(nlohmann::json next, const std::string& wname) {
  next["weights"] = wname;
  next["weights_sha256"] = sha256_file(join(dir_, wname));
  atomic_write(join(dir_, kState), next.dump(2) + "\n");  // the commit point
  state_ = std::move(next);
  verified_ = join(dir_, wname);
  atomic_link(join(dir_, wname), join(dir_, kTrained));
}

void StateDir::add_classes(const std::vector<std::string>& added, const std::vector<size_t>& images,
                           const std::vector<TensorView>& tensors) {
  const auto& t = bundle_.training();
  nlohmann::json next = state_;
  for (size_t i = 0; i < added.size(); ++i) {
    next["classes"].push_back(added[i]);
    next["added_classes"].push_back({{"name", added[i]}, {"images", images[i]}, {"epoch", epoch()}});
  }
  // a name of its own: the epoch's weights file stays intact until state.json names the new one
  char suffix[32];
  std::snprintf(suffix, sizeof suffix, "-classes%04zu.ptd", next["classes"].size());
  const std::string wname = numbered("weights", epoch(), suffix);
  write_ptd(join(dir_, wname), weights_path(), t.weights_layout, tensors);
  const std::string previous = state_["weights"].is_string() ? state_["weights"].get<std::string>() : "";
  commit_weights(std::move(next), wname);
  if (!previous.empty() && previous != wname) std::remove(join(dir_, previous).c_str());
}

void StateDir::annotate_last(const std::string& key, double value) {
  nlohmann::json next = state_;
  next["history"].back()[key] = value;
  atomic_write(join(dir_, kState), next.dump(2) + "\n");
  state_ = std::move(next);
}

std::vector<char> read_ptd_tensor(const std::string& ptd, const TensorSlot& slot) {
  std::ifstream in(ptd, std::ios::binary);
  if (!in) throw DeviceError("cannot read " + ptd);
  std::vector<char> buf(slot.nbytes);
  in.seekg(static_cast<std::streamoff>(slot.offset));
  in.read(buf.data(), static_cast<std::streamsize>(slot.nbytes));
  if (static_cast<uint64_t>(in.gcount()) != slot.nbytes) throw DeviceError(ptd + " is shorter than the bundle's weights layout");
  return buf;
}

std::vector<std::string> recorded_classes(const std::string& dir, const Bundle& bundle) {
  const std::string path = join(dir, kState);
  if (!is_file(path)) return bundle.classes;
  return read_state(path, bundle, dir + " holds training state of another bundle", "; use another --state directory")["classes"]
      .get<std::vector<std::string>>();
}

std::vector<std::string> trained_classes(const std::string& path, const Bundle& bundle) {
  const std::string dir = is_dir(path) ? path : (fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string());
  if (!is_file(join(dir, kState))) return bundle.classes;
  return read_state(join(dir, kState), bundle, path + " is in the state directory of another bundle, not " + bundle.dir, "")["classes"]
      .get<std::vector<std::string>>();
}

std::string trained_weights(const std::string& path, const Bundle& bundle) {
  if (is_file(path)) {  // a state directory's weights or trained.ptd (a link to them) is checked against its state.json
    const std::string dir = fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string();
    const std::string name = fs::path(path).filename().string();
    if (!is_file(join(dir, kState))) return path;
    nlohmann::json s = read_state(join(dir, kState), bundle, path + " is in the state directory of another bundle, not " + bundle.dir, "");
    if (s["weights"].is_string() && (name == s["weights"].get<std::string>() || name == kTrained)) checked_weights(dir, s, name);
    return path;
  }
  if (!is_dir(path)) throw DeviceError("no trained weights at " + path + ": run finetune first");
  std::string state = join(path, kState);
  if (is_file(state)) {
    nlohmann::json s = read_state(state, bundle, path + " holds weights trained from another bundle, not " + bundle.dir, "");
    if (s.contains("weights") && s["weights"].is_string()) return checked_weights(path, s);
  }
  std::string trained = join(path, kTrained);
  if (!is_file(trained)) throw DeviceError("no trained weights in " + path + ": run finetune first");
  return trained;
}

}  // namespace edgetl
