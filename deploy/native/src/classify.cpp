#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <numeric>

#include "commands.h"
#include "files.h"
#include "runtime.h"
#include "state.h"

namespace edgetl {

namespace {
size_t image_floats(const InputSpec& spec) { return size_t{3} * spec.image_size * spec.image_size; }
}  // namespace

void info(const Bundle& bundle) {
  const auto& m = bundle.manifest;
  nlohmann::json programs = nlohmann::json::array();
  for (const auto& [name, _] : m.at("programs").items()) programs.push_back(name);
  nlohmann::json out = {{"model", m.at("model")}, {"input", m.at("input")}, {"programs", programs},
                        {"created", m.value("created", nlohmann::json())}, {"verification", m.value("verification", nlohmann::json())}};
  std::cout << out.dump(2) << "\n";
}

Images load_images(const std::vector<std::string>& paths, const InputSpec& spec) {
  Images out;
  const size_t n = image_floats(spec);
  std::vector<float> one(n);
  std::string error;
  for (const auto& p : paths) {
    if (!load_image(p, spec, one.data(), &error)) {
      std::fprintf(stderr, "edgetl-device: warning: skipping %s: %s\n", p.c_str(), error.c_str());
      continue;
    }
    out.paths.push_back(p);
    out.pixels.insert(out.pixels.end(), one.begin(), one.end());
  }
  return out;
}

void bottom_features(Program& bottom, const float* pixels, size_t n, const InputSpec& spec, const std::vector<int64_t>& feature_shape,
                     float* out) {
  const size_t batch = static_cast<size_t>(feature_shape[0]), per_image = image_floats(spec);
  const size_t per_feature = std::accumulate(feature_shape.begin() + 1, feature_shape.end(), size_t{1}, std::multiplies<size_t>());
  const std::vector<int64_t> shape = {feature_shape[0], 3, spec.image_size, spec.image_size};
  std::vector<float> chunk(batch * per_image);
  for (size_t start = 0; start < n; start += batch) {
    size_t valid = std::min(batch, n - start);
    std::fill(chunk.begin(), chunk.end(), 0.0f);
    std::copy(pixels + start * per_image, pixels + (start + valid) * per_image, chunk.begin());
    std::vector<float> f = bottom.run("forward", chunk.data(), shape);
    if (f.size() != batch * per_feature) throw DeviceError("bottom.pte returned features of an unexpected size");
    std::copy(f.begin(), f.begin() + valid * per_feature, out + start * per_feature);
  }
}

int classify(const Bundle& bundle, const ClassifyOptions& o) {
  std::vector<std::string> paths;
  for (const auto& item : o.images) {
    if (is_dir(item)) {
      auto found = list_images(item);
      paths.insert(paths.end(), found.begin(), found.end());
    } else {
      paths.push_back(item);
    }
  }
  if (paths.empty()) throw DeviceError("no images given");
  Images images = load_images(paths, bundle.input);
  if (images.paths.empty()) throw DeviceError("none of the images could be read");
  const size_t n = images.paths.size(), per_image = image_floats(bundle.input), classes = bundle.classes.size();
  std::vector<float> logits;
  if (o.trained.empty()) {
    Program model(bundle.file(bundle.inference_pte));
    const std::vector<int64_t> shape = {1, 3, bundle.input.image_size, bundle.input.image_size};
    for (size_t i = 0; i < n; ++i) {
      auto out = model.run("forward", images.pixels.data() + i * per_image, shape);
      logits.insert(logits.end(), out.begin(), out.end());
    }
  } else {
    const auto& t = bundle.training();
    std::string weights = trained_weights(o.trained, bundle);
    Program bottom(bundle.file(bundle.bottom_pte));
    Program top(bundle.file(t.pte), weights);
    const size_t batch = static_cast<size_t>(t.batch_size);
    const size_t per_feature = std::accumulate(t.feature_shape.begin() + 1, t.feature_shape.end(), size_t{1}, std::multiplies<size_t>());
    std::vector<float> features(((n + batch - 1) / batch) * batch * per_feature, 0.0f);
    bottom_features(bottom, images.pixels.data(), n, bundle.input, t.feature_shape, features.data());
    for (size_t start = 0; start < n; start += batch) {
      auto out = top.run("predict", features.data() + start * per_feature, t.feature_shape);
      size_t valid = std::min(batch, n - start);
      logits.insert(logits.end(), out.begin(), out.begin() + valid * classes);
    }
  }
  if (logits.size() != n * classes) throw DeviceError("the program returned logits for a different number of classes than the manifest lists");
  for (float v : logits)
    if (!std::isfinite(v)) throw DeviceError("the weights produce non-finite logits; they are unusable (retrain from the last good epoch)");
  const size_t k = std::min<size_t>(static_cast<size_t>(o.top_k), classes);
  for (size_t i = 0; i < n; ++i) {
    const float* z = logits.data() + i * classes;
    float mx = *std::max_element(z, z + classes);
    std::vector<double> p(classes);
    double sum = 0;
    for (size_t c = 0; c < classes; ++c) sum += p[c] = std::exp(static_cast<double>(z[c]) - mx);
    std::vector<size_t> order(classes);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
    if (o.json) {
      nlohmann::json top = nlohmann::json::array();
      for (size_t j = 0; j < k; ++j) top.push_back({{"label", bundle.classes[order[j]]}, {"prob", p[order[j]] / sum}});
      std::cout << nlohmann::json{{"path", images.paths[i]}, {"top", top}}.dump() << "\n";
      continue;
    }
    std::cout << images.paths[i] << ":";
    for (size_t j = 0; j < k; ++j) {
      char prob[32];
      std::snprintf(prob, sizeof prob, "%.3f", p[order[j]] / sum);
      std::cout << (j ? ", " : " ") << bundle.classes[order[j]] << " " << prob;
    }
    std::cout << "\n";
  }
  return 0;
}

}  // namespace edgetl
