#include "bundle.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "build_info.h"
#include "files.h"

namespace edgetl {

namespace {
constexpr const char* kFormat = "edgetl-bundle/1";
constexpr const char* kSeal = "manifest_sha256";
const std::string kSealKey = "  \"manifest_sha256\": \"";

// What the seal hashes (edgetl/exporter/bundle.py canonical_bytes): the manifest's tokens without the
// whitespace between them, every object's members sorted by key, the top-level seal left out. Numbers
// and strings are kept as the exporter wrote them (re-printing a float could change its digits).
class Canonical {
 public:
  explicit Canonical(const std::string& text) : s_(text) {}
  // Empty when the text is not one JSON value (nlohmann has parsed it already: not expected).
  std::string form() {
    std::string out;
    if (!value(out, true)) return "";
    skip_space();
    return i_ == s_.size() ? out : "";
  }

 private:
  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool at(char c) {
    skip_space();
    if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
    return false;
  }
  bool string(std::string& out) {
    const size_t begin = i_++;
    while (i_ < s_.size() && s_[i_] != '"') i_ += s_[i_] == '\\' ? 2 : 1;
    if (i_ >= s_.size()) return false;
    out.append(s_, begin, ++i_ - begin);
    return true;
  }
  bool value(std::string& out, bool top) {
    skip_space();
    if (i_ >= s_.size()) return false;
    if (at('{')) {
      std::vector<std::pair<std::string, std::string>> members;  // "key" (quoted), value
      if (!at('}')) {
        do {
          std::string key, val;
          if (!at('"')) return false;
          --i_;
          if (!string(key) || !at(':') || !value(val, false)) return false;
          if (!(top && key == std::string("\"") + kSeal + "\"")) members.emplace_back(std::move(key), std::move(val));
        } while (at(','));
        if (!at('}')) return false;
      }
      // by the key's characters, not its quotes: "a" before "a b", as Python's sort_keys orders them
      std::sort(members.begin(), members.end(),
                [](const auto& a, const auto& b) { return a.first.compare(1, a.first.size() - 2, b.first, 1, b.first.size() - 2) < 0; });
      out += '{';
      for (size_t k = 0; k < members.size(); ++k) out += (k ? "," : "") + members[k].first + ":" + members[k].second;
      out += '}';
      return true;
    }
    if (at('[')) {
      out += '[';
      if (!at(']')) {
        bool first = true;
        do {
          if (!first) out += ',';
          first = false;
          if (!value(out, false)) return false;
        } while (at(','));
        if (!at(']')) return false;
      }
      out += ']';
      return true;
    }
    if (s_[i_] == '"') return string(out);
    const size_t begin = i_;  // a number, true, false or null
    while (i_ < s_.size() && std::string(",:]} \n\r\t").find(s_[i_]) == std::string::npos) ++i_;
    out.append(s_, begin, i_ - begin);
    return i_ > begin;
  }

  const std::string& s_;
  size_t i_ = 0;
};

// The seal of bundles exported before the canonical form: the sha256 of the file's bytes without the
// line `  "manifest_sha256": "<64 hex>",\n`; empty when the file has no such line.
std::string line_sealed(const std::string& text) {
  const size_t at = text.find("\n" + kSealKey);
  if (at == std::string::npos) return "";
  const size_t begin = at + 1, end = begin + kSealKey.size() + 64;
  if (text.compare(end, 3, "\",\n") != 0) return "";
  return sha256_bytes(text.substr(0, begin) + text.substr(end + 3));
}

// nlohmann's exceptions name a JSON pointer, not the file: say which manifest is malformed.
template <typename F>
auto field(const std::string& manifest_path, const char* what, F get) -> decltype(get()) {
  try {
    return get();
  } catch (const nlohmann::json::exception& e) {
    throw DeviceError(manifest_path + " is not a valid edgetl manifest (" + what + ": " + e.what() + ")");
  }
}
// nlohmann converts 4.5 to 4 for get<int>(): a size must be written as an integer.
int integer(const nlohmann::json& j, const std::string& mpath, const char* key) {
  if (!j.is_number_integer())
    throw DeviceError(mpath + " is not a valid edgetl manifest (" + key + " is " + j.dump() + ", not an integer)");
  return j.get<int>();
}

// The exporter seals manifest.json: its "manifest_sha256" is the sha256 of its canonical form
// (Canonical above). A hand edit (two classes swapped) breaks it; reindenting the file does not.
void check_seal(const std::string& mpath, const std::string& text, const nlohmann::json& manifest) {
  if (!manifest.contains(kSeal) || !manifest[kSeal].is_string())
    throw DeviceError(mpath + " has no manifest_sha256 (exported by an older edgetl, or edited): export the bundle again");
  const std::string recorded = manifest[kSeal].get<std::string>();
  if (sha256_bytes(Canonical(text).form()) != recorded && line_sealed(text) != recorded)
    throw DeviceError(mpath + " was modified after export (it does not match its manifest_sha256): export the bundle again");
}
}  // namespace

// A program's file: a plain name the manifest lists under "files" (so its sha256 has been checked).
std::string Bundle::listed_file(const std::string& mpath, const std::string& name, const char* key) const {
  plain_name(name, mpath + ": " + key);
  if (!manifest.at("files").contains(name)) throw DeviceError(mpath + ": " + key + " '" + name + "' is not listed in its files");
  return name;
}

Bundle::Bundle(const std::string& path) : dir(path) {
  std::string mpath = join(dir, "manifest.json");
  if (!is_dir(dir)) throw DeviceError(dir + " is not a directory (expected an edgetl bundle)");
  if (!is_file(mpath)) throw DeviceError(dir + " is not an edgetl bundle (no manifest.json)");
  const std::string text = read_file(mpath);
  try {
    manifest = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw DeviceError(mpath + " is not valid JSON: " + e.what());
  }
  if (!manifest.is_object() || manifest.value("format", "") != kFormat)
    throw DeviceError(mpath + " has format '" + (manifest.is_object() ? manifest.value("format", "") : "") + "', this runner reads '" +
                      kFormat + "'");
  check_seal(mpath, text, manifest);
  field(mpath, "runtime", [&] {
    check_runtime_series(manifest.at("runtime").at("executorch_series").get<std::string>(), mpath);
    return 0;
  });
  field(mpath, "files", [&] {
    for (const auto& [name, meta] : manifest.at("files").items()) {
      std::string p = join(dir, plain_name(name, mpath + ": files"));
      if (!is_file(p)) throw DeviceError("bundle file " + p + " is missing");
      if (sha256_file(p) != meta.at("sha256").get<std::string>())
        throw DeviceError("bundle file " + p + " is damaged (sha256 mismatch with manifest.json)");
    }
    return 0;
  });
  field(mpath, "model/input", [&] {
    classes = manifest.at("model").at("classes").get<std::vector<std::string>>();
    model_name = manifest.at("model").at("name").get<std::string>();
    manifest_sha256 = manifest.at("manifest_sha256").get<std::string>();
    const auto& in = manifest.at("input");
    input.image_size = integer(in.at("image_size"), mpath, "input.image_size");
    input.resize_short_side = integer(in.at("resize_short_side"), mpath, "input.resize_short_side");
    const std::string interp = in.at("interpolation").get<std::string>();  // required: the exporter always states it
    if (interp != "bilinear" && interp != "bicubic") throw DeviceError("unsupported interpolation '" + interp + "' in " + mpath);
    input.interpolation = interp == "bicubic" ? Interpolation::Bicubic : Interpolation::Bilinear;
    for (int c = 0; c < 3; ++c) {
      input.mean[c] = in.at("mean").at(c).get<float>();
      input.std[c] = in.at("std").at(c).get<float>();
    }
    inference_pte = listed_file(mpath, manifest.at("programs").at("inference").at("file").get<std::string>(), "programs.inference.file");
    return 0;
  });
  const auto& programs = manifest["programs"];
  has_training_ = programs.contains("training") && programs.contains("bottom");
  if (!has_training_) return;
  field(mpath, "programs/training", [&] {
    bottom_pte = listed_file(mpath, programs.at("bottom").at("file").get<std::string>(), "programs.bottom.file");
    const auto& t = programs.at("training");
    training_.pte = listed_file(mpath, t.at("file").get<std::string>(), "programs.training.file");
    training_.ptd = listed_file(mpath, t.at("data").get<std::string>(), "programs.training.data");
    training_.batch_size = integer(t.at("batch_size"), mpath, "programs.training.batch_size");
    training_.feature_shape = t.at("methods").at("forward").at("inputs").at(0).at("shape").get<std::vector<int64_t>>();
    training_.trainable_parameters = t.at("trainable_parameters").get<std::vector<std::string>>();
    training_.buffers = t.at("buffers").get<std::vector<std::string>>();
    for (const auto& [name, s] : t.at("weights_layout").items())  // export-weights writes NAME.npy
      training_.weights_layout[plain_name(name, mpath + ": programs.training.weights_layout")] = {
          s.at("offset").get<uint64_t>(), s.at("nbytes").get<uint64_t>(), s.at("dtype").get<std::string>(),
          s.at("shape").get<std::vector<int64_t>>()};
    const auto& o = t.at("optimizer");
    OptimizerOptions& opt = training_.optimizer;
    opt.name = o.value("name", std::string("sgd"));
    opt.lr = o.at("lr").get<double>();
    opt.momentum = o.value("momentum", 0.0), opt.dampening = o.value("dampening", 0.0);
    opt.weight_decay = o.value("weight_decay", 0.0), opt.nesterov = o.value("nesterov", false);
    if (o.contains("betas")) {
      const auto betas = o.at("betas").get<std::vector<double>>();
      if (betas.size() != 2) throw DeviceError(mpath + ": programs.training.optimizer.betas is not a pair");
      opt.beta1 = betas[0], opt.beta2 = betas[1];
    }
    opt.eps = o.value("eps", 1e-8);
    // bundles that list none decay every parameter (the rule they were verified with)
    opt.weight_decay_parameters = o.value("weight_decay_parameters", training_.trainable_parameters);
    training_.custom_operators = t.value("custom_operators", std::vector<std::string>{});
    training_.outputs = classes.size();
    if (t.contains("spare_classes")) {
      const auto& sp = t.at("spare_classes");
      auto& spare = training_.spare;
      spare.count = integer(sp.at("count"), mpath, "programs.training.spare_classes.count");
      spare.weight = sp.at("weight").get<std::string>();
      spare.bias = sp.at("bias").is_null() ? "" : sp.at("bias").get<std::string>();
      spare.active = sp.at("active").get<std::string>();
      spare.embedding_size = integer(sp.at("embedding_size"), mpath, "programs.training.spare_classes.embedding_size");
      if (spare.count < 1 || spare.embedding_size < 1) throw DeviceError(mpath + ": programs.training.spare_classes has a size below 1");
      if (sp.contains("embedding_mean") && !sp.at("embedding_mean").is_null())
        spare.embedding_mean = sp.at("embedding_mean").get<std::vector<float>>();
      if (!spare.embedding_mean.empty() && spare.embedding_mean.size() != static_cast<size_t>(spare.embedding_size))
        throw DeviceError(mpath + ": programs.training.spare_classes.embedding_mean does not have embedding_size values");
      for (const auto* name : {&spare.weight, &spare.bias, &spare.active})
        if (!name->empty() && !training_.weights_layout.count(*name))
          throw DeviceError(mpath + ": spare class tensor " + *name + " is not in programs.training.weights_layout");
      training_.outputs += static_cast<size_t>(spare.count);
    }
    ptd_sha256 = manifest.at("files").at(training_.ptd).at("sha256").get<std::string>();
    return 0;
  });
}

namespace {
// "MAJOR.MINOR[.PATCH...]" -> {MAJOR, MINOR}; {-1, -1} when it does not start so
std::pair<long, long> major_minor(const std::string& v) {
  char* end = nullptr;
  const long major = std::strtol(v.c_str(), &end, 10);
  if (end == v.c_str() || *end != '.') return {-1, -1};
  const char* start = end + 1;
  const long minor = std::strtol(start, &end, 10);
  if (end == start) return {-1, -1};
  return {major, minor};
}
}  // namespace

void check_runtime_series(const std::string& series, const std::string& mpath) {
  const auto wanted = major_minor(series), have = major_minor(kExecutorchVersion);
  if (wanted.first < 0) throw DeviceError(mpath + ": runtime.executorch_series '" + series + "' is not MAJOR.MINOR");
  if (wanted > have)
    throw DeviceError(mpath + " needs ExecuTorch " + series + " (runtime.executorch_series), this edgetl-device is built against " +
                      kExecutorchVersion + ": install a newer edgetl-device");
}

std::string Bundle::file(const std::string& name) const { return join(dir, name); }

const TrainingSpec& Bundle::training() const {
  if (!has_training_) throw DeviceError(dir + " has no training program: export it with 'edgetl export --training'");
  return training_;
}

}  // namespace edgetl
