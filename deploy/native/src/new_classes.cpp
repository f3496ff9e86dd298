#include "new_classes.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "commands.h"
#include "files.h"
#include "state.h"

namespace edgetl {

namespace {

void check_class_name(const std::string& name, const std::string& dir) {
  const auto control = [](unsigned char c) { return c < 0x20 || c == 0x7f; };
  std::string why;
  if (name.empty() || name[0] == '.') why = "starts with '.'";
  else if (name.size() > kMaxClassName) why = "is longer than " + std::to_string(kMaxClassName) + " bytes";
  else if (std::any_of(name.begin(), name.end(), control)) why = "holds a control character";
  if (!why.empty()) {
    std::string shown;
    for (unsigned char c : name.substr(0, 64)) shown += control(c) ? '?' : static_cast<char>(c);
    throw DeviceError("class folder '" + shown + "' in " + dir + " " + why + ": a class name must be a plain folder name");
  }
}

TensorView view_of(const std::string& name, std::vector<char>& bytes, const std::string& dtype) {
  TensorView v;
  v.name = name;
  v.data = bytes.data();
  v.nbytes = bytes.size();
  v.numel = bytes.size() / sizeof(float);
  v.dtype = dtype;
  return v;
}

}  // namespace

std::vector<std::string> new_class_folders(const std::string& data_dir, const std::vector<std::string>& known, const Bundle& bundle) {
  if (!is_dir(data_dir)) return {};  // read_folder says so
  std::vector<std::string> added;
  for (const auto& sub : subdirectories(data_dir))
    if (std::find(known.begin(), known.end(), sub) == known.end()) added.push_back(sub);
  if (added.empty()) return added;
  std::string names;
  for (const auto& c : added) names += (names.empty() ? "" : ", ") + c;
  const auto& t = bundle.training();
  if (t.spare.count == 0) {
    std::string listed;
    for (const auto& c : known) listed += (listed.empty() ? "" : ", ") + c;
    throw DeviceError("folder(s) " + names + " in " + data_dir + " are not among the bundle's classes (" + listed +
                      "); to learn new classes on the device, export with 'edgetl export --training --spare-classes N'");
  }
  for (const auto& c : added) check_class_name(c, data_dir);
  const size_t left = bundle.classes.size() + static_cast<size_t>(t.spare.count) - known.size();
  if (added.size() > left)
    throw DeviceError(std::to_string(added.size()) + " new classes in " + data_dir + " (" + names + ") but only " + std::to_string(left) +
                      " of the bundle's " + std::to_string(t.spare.count) +
                      " spare outputs are left; export with a larger --spare-classes, or train fewer new classes");
  return added;
}

std::vector<TensorView> imprint(const Bundle& bundle, const std::string& weights, const std::vector<float>& features,
                                const std::vector<size_t>& first, const std::vector<size_t>& count, const std::vector<size_t>& outputs,
                                std::vector<std::vector<char>>& storage) {
  const auto& t = bundle.training();
  const auto& sp = t.spare;
  const size_t batch = static_cast<size_t>(t.batch_size), per = numel_per_item(t.feature_shape);
  const size_t dim = static_cast<size_t>(sp.embedding_size), rows = t.outputs;
  const auto& layout = t.weights_layout;
  storage.clear();
  storage.push_back(read_ptd_tensor(weights, layout.at(sp.weight)));
  storage.push_back(read_ptd_tensor(weights, layout.at(sp.active)));
  if (!sp.bias.empty()) storage.push_back(read_ptd_tensor(weights, layout.at(sp.bias)));
  if (storage[0].size() != rows * dim * sizeof(float) || storage[1].size() != rows * sizeof(float) ||
      (!sp.bias.empty() && storage[2].size() != rows * sizeof(float)))
    throw DeviceError("the bundle's spare class tensors do not have " + std::to_string(rows) + " rows of " + std::to_string(dim));
  float* w = reinterpret_cast<float*>(storage[0].data());
  float* active = reinterpret_cast<float*>(storage[1].data());
  float* bias = sp.bias.empty() ? nullptr : reinterpret_cast<float*>(storage[2].data());

  // The rows that classify today: their mean row (the part every class shares, which softmax
  // ignores), the mean norm of their own parts, their mean bias.
  std::vector<double> shared(dim, 0.0);
  double bias_sum = 0;
  size_t live = 0;
  for (size_t r = 0; r < rows; ++r) {
    if (active[r] != 1.0f) continue;
    for (size_t k = 0; k < dim; ++k) shared[k] += w[r * dim + k];
    bias_sum += bias ? bias[r] : 0.0;
    ++live;
  }
  if (live == 0) throw DeviceError("the weights have no active class to scale a new class's row by");
  for (double& v : shared) v /= static_cast<double>(live);
  double norm_sum = 0;
  for (size_t r = 0; r < rows; ++r) {
    if (active[r] != 1.0f) continue;
    double sq = 0;
    for (size_t k = 0; k < dim; ++k) sq += (w[r * dim + k] - shared[k]) * (w[r * dim + k] - shared[k]);
    norm_sum += std::sqrt(sq);
  }
  const double scale = norm_sum / static_cast<double>(live), mean_bias = bias_sum / static_cast<double>(live);
  const std::vector<float> zero(dim, 0.0f);
  const std::vector<float>& centre = sp.embedding_mean.empty() ? zero : sp.embedding_mean;

  Program top(bundle.file(t.pte), weights);
  std::vector<float> in(batch * per);
  for (size_t c = 0; c < first.size(); ++c) {
    std::vector<double> direction(dim, 0.0);
    size_t used = 0;
    for (size_t start = 0; start < count[c]; start += batch) {
      const size_t n = std::min(batch, count[c] - start);
      std::fill(in.begin(), in.end(), 0.0f);
      std::memcpy(in.data(), features.data() + (first[c] + start) * per, n * per * sizeof(float));
      const std::vector<float> e = top.run("embed", in.data(), t.feature_shape);
      if (e.size() != batch * dim) throw DeviceError("train.pte's embed method returned an unexpected size");
      for (size_t i = 0; i < n; ++i) {
        const float* v = e.data() + i * dim;
        double sq = 0;
        for (size_t k = 0; k < dim; ++k) sq += (v[k] - static_cast<double>(centre[k])) * (v[k] - static_cast<double>(centre[k]));
        if (!(sq > 0) || !std::isfinite(sq)) continue;  // an embedding at the centre (or broken) has no direction
        const double inv = 1.0 / std::sqrt(sq);
        for (size_t k = 0; k < dim; ++k) direction[k] += (v[k] - static_cast<double>(centre[k])) * inv;
        ++used;
      }
    }
    double sq = 0;
    for (double m : direction) sq += m * m;
    if (used == 0 || !(sq > 0)) throw DeviceError("no image of the new class has a usable embedding: cannot imprint its output");
    // logit(e) = shared . e + scale * u . (e - centre) + mean_bias: an average class's strength,
    // pointing from the known classes' centre towards the new class's photos
    const double unit = 1.0 / std::sqrt(sq);
    double offset = 0;
    const size_t r = outputs[c];
    for (size_t k = 0; k < dim; ++k) {
      const double u = direction[k] * unit;
      w[r * dim + k] = static_cast<float>(shared[k] + scale * u);
      offset += scale * u * centre[k];
    }
    if (bias) bias[r] = static_cast<float>(mean_bias - offset);
    active[r] = 1.0f;
  }
  std::vector<TensorView> out = {view_of(sp.weight, storage[0], layout.at(sp.weight).dtype),
                                 view_of(sp.active, storage[1], layout.at(sp.active).dtype)};
  if (bias) out.push_back(view_of(sp.bias, storage[2], layout.at(sp.bias).dtype));
  return out;
}

}  // namespace edgetl
