#include "state.h"

#include <cstdio>
#include <cstring>
#include <numeric>

#include "files.h"

namespace edgetl {

namespace {
constexpr const char* kState = "state.json";
constexpr const char* kTrained = "trained.ptd";

std::string numbered(const char* stem, int epoch, const char* suffix) {
  char name[64];
  std::snprintf(name, sizeof name, "%s-epoch%04d%s", stem, epoch, suffix);
  return name;
}

nlohmann::json read_state(const std::string& path) {
  try {
    return nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw DeviceError(path + " is damaged (" + e.what() + "); remove the state directory to start over");
  }
}
}  // namespace

std::string write_ptd(const std::string& base, const std::map<std::string, TensorSlot>& layout, const std::vector<TensorView>& tensors) {
  std::string out = base;
  for (const auto& t : tensors) {
    auto it = layout.find(t.name);
    if (it == layout.end()) throw DeviceError("the weights file has no slot for " + t.name);
    const TensorSlot& slot = it->second;
    if (slot.nbytes != t.nbytes || slot.dtype != t.dtype || slot.offset + slot.nbytes > out.size())
      throw DeviceError("tensor " + t.name + " does not fit its slot in the weights file");
    std::memcpy(&out[slot.offset], t.data, t.nbytes);
  }
  return out;
}

StateDir::StateDir(std::string dir, const Bundle& bundle) : dir_(std::move(dir)), bundle_(bundle) {
  std::string path = join(dir_, kState);
  if (is_file(path)) {
    state_ = read_state(path);
    if (state_.value("bundle_ptd_sha256", "") != bundle.ptd_sha256)
      throw DeviceError(dir_ + " holds training state of another bundle; use another --state directory");
  } else {
    state_ = {{"epoch", 0}, {"history", nlohmann::json::array()}, {"bundle_ptd_sha256", bundle.ptd_sha256}, {"weights", nullptr}};
  }
}

std::string StateDir::weights_path() const {
  if (state_.contains("weights") && state_["weights"].is_string()) {
    std::string p = join(dir_, state_["weights"].get<std::string>());
    if (!is_file(p)) throw DeviceError("state directory " + dir_ + " names " + p + ", which is missing");
    return p;
  }
  return bundle_.file(bundle_.training().ptd);
}

std::vector<std::vector<float>> StateDir::momentum(const std::vector<std::string>& names) const {
  if (!state_.contains("momentum") || !state_["momentum"].is_string()) return {};
  std::string path = join(dir_, state_["momentum"].get<std::string>());
  std::string bytes = read_file(path);
  if (sha256_file(path) != state_.value("momentum_sha256", "")) throw DeviceError(path + " is damaged (sha256 mismatch with state.json)");
  std::vector<std::vector<float>> out;
  size_t offset = 0;
  const auto& layout = bundle_.training().weights_layout;
  for (const auto& name : names) {
    auto it = layout.find(name);
    if (it == layout.end()) throw DeviceError("no weights slot for parameter " + name);
    size_t n = it->second.nbytes / sizeof(float);
    if (offset + n * sizeof(float) > bytes.size()) throw DeviceError(path + " is shorter than the parameters it should hold");
    std::vector<float> buf(n);
    std::memcpy(buf.data(), bytes.data() + offset, n * sizeof(float));
    offset += n * sizeof(float);
    out.push_back(std::move(buf));
  }
  if (offset != bytes.size()) throw DeviceError(path + " does not match the bundle's parameters");
  return out;
}

void StateDir::save_epoch(int epoch, const TrainingSession& session, const std::vector<std::vector<float>>& momentum,
                          const nlohmann::json& row) {
  const auto& t = bundle_.training();
  std::vector<TensorView> tensors = session.parameters();
  tensors.insert(tensors.end(), session.buffers().begin(), session.buffers().end());
  std::string weights = write_ptd(read_file(bundle_.file(t.ptd)), t.weights_layout, tensors);
  std::string wname = numbered("weights", epoch, ".ptd");
  atomic_write(join(dir_, wname), weights);

  nlohmann::json next = state_;
  if (!momentum.empty()) {
    std::string bytes;
    for (const auto& buf : momentum) bytes.append(reinterpret_cast<const char*>(buf.data()), buf.size() * sizeof(float));
    std::string mname = numbered("momentum", epoch, ".bin");
    atomic_write(join(dir_, mname), bytes);
    next["momentum"] = mname;
    next["momentum_sha256"] = sha256_file(join(dir_, mname));
  }
  std::vector<std::string> previous;
  for (const char* key : {"weights", "momentum"})
    if (state_.contains(key) && state_[key].is_string()) previous.push_back(state_[key].get<std::string>());
  next["epoch"] = epoch;
  next["weights"] = wname;
  next["history"].push_back(row);
  atomic_write(join(dir_, kState), next.dump(2) + "\n");  // the commit point
  state_ = std::move(next);
  atomic_write(join(dir_, kTrained), weights);
  for (const auto& name : previous)
    if (name != state_["weights"] && name != state_.value("momentum", "")) std::remove(join(dir_, name).c_str());
}

void StateDir::annotate_last(const std::string& key, double value) {
  nlohmann::json next = state_;
  next["history"].back()[key] = value;
  atomic_write(join(dir_, kState), next.dump(2) + "\n");
  state_ = std::move(next);
}

std::string trained_weights(const std::string& path, const Bundle& bundle) {
  if (is_file(path)) return path;
  if (!is_dir(path)) throw DeviceError("no trained weights at " + path + ": run finetune first");
  std::string state = join(path, kState);
  if (is_file(state)) {
    nlohmann::json s = read_state(state);
    if (s.value("bundle_ptd_sha256", "") != bundle.ptd_sha256)
      throw DeviceError(path + " holds weights trained from another bundle, not " + bundle.dir);
    if (s.contains("weights") && s["weights"].is_string()) return join(path, s["weights"].get<std::string>());
  }
  std::string trained = join(path, kTrained);
  if (!is_file(trained)) throw DeviceError("no trained weights in " + path + ": run finetune first");
  return trained;
}

}  // namespace edgetl
