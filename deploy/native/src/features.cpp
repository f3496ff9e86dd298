// The bottom's features, shared by classify --trained and finetune: images decoded and run
// through bottom.pte one batch at a time.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <numeric>

#include "commands.h"
#include "files.h"
#include "runtime.h"

namespace edgetl {

size_t image_floats(const InputSpec& spec) { return size_t{3} * spec.image_size * spec.image_size; }

size_t numel_per_item(const std::vector<int64_t>& shape) {
  return std::accumulate(shape.begin() + 1, shape.end(), size_t{1}, std::multiplies<size_t>());
}

bool read_image(const std::string& path, const InputSpec& spec, float* out) {
  try {
    load_image(path, spec, out);
    return true;
  } catch (const DeviceError& e) {  // one unreadable image is skipped, not the whole data set
    std::fprintf(stderr, "edgetl-device: warning: skipping %s: %s\n", path.c_str(), e.what());
    return false;
  }
}

std::vector<size_t> bottom_features(Program& bottom, const std::vector<std::string>& paths, const InputSpec& spec,
                                    const std::vector<int64_t>& feature_shape, const std::function<float*(size_t)>& row,
                                    FeatureSeconds* seconds) {
  using Clock = std::chrono::steady_clock;
  auto add = [&](double FeatureSeconds::*field, Clock::time_point t0) {
    if (seconds) seconds->*field += std::chrono::duration<double>(Clock::now() - t0).count();
  };
  const size_t batch = static_cast<size_t>(feature_shape[0]), per_image = image_floats(spec), per_feature = numel_per_item(feature_shape);
  const std::vector<int64_t> shape = {feature_shape[0], 3, spec.image_size, spec.image_size};
  std::vector<float> pixels(batch * per_image);
  std::vector<size_t> kept, pending;
  auto flush = [&] {
    std::fill(pixels.begin() + pending.size() * per_image, pixels.end(), 0.0f);
    const auto t0 = Clock::now();
    std::vector<float> f = bottom.run("forward", pixels.data(), shape);
    add(&FeatureSeconds::bottom, t0);
    if (f.size() != batch * per_feature) throw DeviceError("bottom.pte returned features of an unexpected size");
    for (size_t i = 0; i < pending.size(); ++i) {
      std::copy(f.begin() + i * per_feature, f.begin() + (i + 1) * per_feature, row(kept.size()));
      kept.push_back(pending[i]);
    }
    pending.clear();
  };
  for (size_t i = 0; i < paths.size(); ++i) {
    const auto t0 = Clock::now();
    const bool readable = read_image(paths[i], spec, pixels.data() + pending.size() * per_image);
    add(&FeatureSeconds::decode, t0);
    if (!readable) continue;
    pending.push_back(i);
    if (pending.size() == batch) flush();
  }
  if (!pending.empty()) flush();
  return kept;
}

}  // namespace edgetl
