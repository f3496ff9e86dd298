#include "bundle.h"

#include <cctype>
#include <cstdlib>
#include <utility>

#include "build_info.h"
#include "files.h"

namespace edgetl {

namespace {
constexpr const char* kFormat = "edgetl-bundle/1";
const std::string kSealKey = "  \"manifest_sha256\": \"";

// [begin, end) of the line `  "manifest_sha256": "<64 hex>",\n` at the top level of `text`; npos when absent.
std::pair<size_t, size_t> manifest_field(const std::string& text) {
  const size_t at = text.find("\n" + kSealKey);
  if (at == std::string::npos) return {std::string::npos, 0};
  const size_t begin = at + 1, end = begin + kSealKey.size() + 64;
  if (text.compare(end, 3, "\",\n") != 0) return {std::string::npos, 0};
  for (size_t i = begin + kSealKey.size(); i < end; ++i)
    if (!std::isxdigit(static_cast<unsigned char>(text[i]))) return {std::string::npos, 0};
  return {begin, end + 3};
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
// The exporter seals manifest.json: its "manifest_sha256" is the sha256 of the file's bytes without
// that line (edgetl/exporter/bundle.py manifest_bytes). A hand edit (two classes swapped) breaks it.
void check_seal(const std::string& mpath, const std::string& text) {
  const auto it = manifest_field(text);
  if (it.first == std::string::npos)
    throw DeviceError(mpath + " has no manifest_sha256 (exported by an older edgetl, or edited): export the bundle again");
  const std::string recorded = text.substr(it.first + kSealKey.size(), 64);
  const std::string unsealed = text.substr(0, it.first) + text.substr(it.second);
  if (sha256_bytes(unsealed) != recorded)
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
  check_seal(mpath, text);
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
    input.image_size = in.at("image_size").get<int>();
    input.resize_short_side = in.at("resize_short_side").get<int>();
    std::string interp = in.value("interpolation", "bilinear");
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
    training_.batch_size = t.at("batch_size").get<int>();
    training_.feature_shape = t.at("methods").at("forward").at("inputs").at(0).at("shape").get<std::vector<int64_t>>();
    training_.trainable_parameters = t.at("trainable_parameters").get<std::vector<std::string>>();
    training_.buffers = t.at("buffers").get<std::vector<std::string>>();
    for (const auto& [name, s] : t.at("weights_layout").items())  // export-weights writes NAME.npy
      training_.weights_layout[plain_name(name, mpath + ": programs.training.weights_layout")] = {s.at("offset").get<uint64_t>(), s.at("nbytes").get<uint64_t>(), s.at("dtype").get<std::string>(),
                                        s.at("shape").get<std::vector<int64_t>>()};
    const auto& o = t.at("optimizer");
    training_.optimizer = {o.at("lr").get<double>(), o.value("momentum", 0.0), o.value("dampening", 0.0), o.value("weight_decay", 0.0),
                           o.value("nesterov", false)};
    training_.custom_operators = t.value("custom_operators", std::vector<std::string>{});
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
