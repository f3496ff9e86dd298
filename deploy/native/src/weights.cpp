// import-weights / export-weights: the training weights as one NAME.npy per tensor, NAME its
// state-dict name (as in train.ptd). That is how a fleet client exchanges weights with its server
// (Flower carries arrays as .npy bytes) without torch on the device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>

#include "commands.h"
#include "files.h"
#include "npy.h"
#include "state.h"

namespace edgetl {

namespace {
constexpr const char* kSuffix = ".npy";

std::vector<std::string> npy_files(const std::string& dir) {
  if (!is_dir(dir)) throw DeviceError(dir + " is not a directory");
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
    if (entry.is_regular_file() && entry.path().extension() == kSuffix) out.push_back(entry.path().filename().string());
  if (ec) throw DeviceError("cannot list " + dir + ": " + ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}
}  // namespace

int import_weights(const Bundle& bundle, const std::string& npy_dir, const std::string& state_dir) {
  const auto& layout = bundle.training().weights_layout;
  std::vector<NpyArray> arrays;  // owns the bytes the views below point into
  std::vector<TensorView> views;
  const auto files = npy_files(npy_dir);
  if (files.empty()) throw DeviceError("no .npy files in " + npy_dir);
  arrays.reserve(files.size());
  uint64_t bytes = 0;
  for (const auto& file : files) {
    const std::string name = file.substr(0, file.size() - std::strlen(kSuffix)), path = join(npy_dir, file);
    auto slot = layout.find(name);
    if (slot == layout.end()) throw DeviceError(path + ": the bundle's training weights have no tensor " + name);
    arrays.push_back(read_npy(path));
    const NpyArray& a = arrays.back();
    if (a.descr != npy_descr(slot->second.dtype))
      throw DeviceError(path + " has dtype '" + a.descr + "', the bundle's " + name + " is " + slot->second.dtype);
    if (a.shape != slot->second.shape)
      throw DeviceError(path + " has shape " + shape_text(a.shape) + ", the bundle's " + name + " " + shape_text(slot->second.shape));
    if (slot->second.dtype == "float32") {
      const float* v = reinterpret_cast<const float*>(a.data.data());
      for (size_t k = 0; k < a.data.size() / sizeof(float); ++k)
        if (!std::isfinite(v[k])) throw DeviceError(path + " holds a non-finite value at index " + std::to_string(k));
    }
    TensorView view;
    view.name = name;
    view.data = const_cast<char*>(a.data.data());
    view.nbytes = a.data.size();
    view.dtype = slot->second.dtype;
    views.push_back(view);
    bytes += a.data.size();
  }
  ensure_writable_dir(state_dir);
  StateDir state(state_dir, bundle);
  state.start_from(views);
  std::cout << "imported " << views.size() << " of the bundle's " << layout.size() << " training tensors (" << bytes << " bytes) into "
            << state_dir << std::endl;
  return 0;
}

int export_weights(const Bundle& bundle, const std::string& trained, const std::string& out_dir) {
  const auto& layout = bundle.training().weights_layout;
  const std::string ptd = trained_weights(trained, bundle);
  ensure_writable_dir(out_dir);
  for (const auto& [name, slot] : layout) {
    const std::vector<char> buf = read_ptd_tensor(ptd, slot);
    write_npy(join(out_dir, name + kSuffix), npy_descr(slot.dtype), slot.shape, buf.data(), buf.size());
  }
  std::cout << "exported " << layout.size() << " training tensors of " << ptd << " to " << out_dir << std::endl;
  return 0;
}

}  // namespace edgetl
