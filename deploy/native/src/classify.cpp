#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <numeric>

#include "build_info.h"
#include "commands.h"
#include "files.h"
#include "runtime.h"
#include "state.h"

namespace edgetl {

void info(const Bundle& bundle) {
  const auto& m = bundle.manifest;
  nlohmann::json programs = nlohmann::json::array();
  for (const auto& [name, _] : m.at("programs").items()) programs.push_back(name);
  nlohmann::json out = {{"runner", {{"arch", kArch}, {"executorch", kExecutorchVersion}}},
                        {"model", m.at("model")},
                        {"input", m.at("input")},
                        {"programs", programs},
                        {"created", m.value("created", nlohmann::json())},
                        {"verification", m.value("verification", nlohmann::json())}};
  // int8 bundles: the scheme, calibration set and accuracy checks (the programs still take and return float32)
  if (m.contains("quantization")) out["quantization"] = m.at("quantization");
  if (m.contains("replay")) {  // the replay set fine-tuning mixes in, without its per-row image names
    out["replay"] = m.at("replay");
    out["replay"].erase("items");
  }
  std::cout << out.dump(2) << "\n";
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
  // model.pte has the bundle's classes; train.pte's predict also the spare outputs, named by the
  // state directory as the device assigned them (an inactive one never ranks: its probability is 0)
  std::vector<std::string> names = o.trained.empty() ? bundle.classes : trained_classes(o.trained, bundle);
  const size_t classes = o.trained.empty() ? bundle.classes.size() : bundle.training().outputs;
  std::vector<std::string> kept;
  std::vector<float> logits;
  if (o.trained.empty()) {  // model.pte, one image at a time
    Program model(bundle.file(bundle.inference_pte));
    const std::vector<int64_t> shape = {1, 3, bundle.input.image_size, bundle.input.image_size};
    std::vector<float> pixels(image_floats(bundle.input));
    for (const auto& p : paths) {
      if (!read_image(p, bundle.input, pixels.data())) continue;
      auto out = model.run("forward", pixels.data(), shape);
      logits.insert(logits.end(), out.begin(), out.end());
      kept.push_back(p);
    }
  } else {  // bottom.pte + train.pte's predict over the trained weights
    const auto& t = bundle.training();
    require_kernels(t.custom_operators, t.pte);
    std::string weights = trained_weights(o.trained, bundle);
    Program bottom(bundle.file(bundle.bottom_pte));
    Program top(bundle.file(t.pte), weights);
    const size_t batch = static_cast<size_t>(t.batch_size), per_feature = numel_per_item(t.feature_shape);
    std::vector<float> features(((paths.size() + batch - 1) / batch) * batch * per_feature, 0.0f);
    for (size_t i :
         bottom_features(bottom, paths, bundle.input, t.feature_shape, [&](size_t k) { return features.data() + k * per_feature; }))
      kept.push_back(paths[i]);
    for (size_t start = 0; start < kept.size(); start += batch) {
      auto out = top.run("predict", features.data() + start * per_feature, t.feature_shape);
      logits.insert(logits.end(), out.begin(), out.begin() + std::min(batch, kept.size() - start) * classes);
    }
  }
  if (kept.empty()) throw DeviceError("none of the images could be read");
  const size_t n = kept.size();
  if (logits.size() != n * classes)
    throw DeviceError("the program returned logits for a different number of classes than the manifest lists");
  for (float v : logits)
    if (!std::isfinite(v)) throw DeviceError("the weights produce non-finite logits; they are unusable (retrain from the last good epoch)");
  const size_t k = std::min<size_t>(static_cast<size_t>(o.top_k), names.size());
  // an output a bare .ptd switched on without its state directory has no name: its number
  const auto label = [&](size_t c) { return c < names.size() ? names[c] : "output-" + std::to_string(c); };
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
      for (size_t j = 0; j < k; ++j) top.push_back({{"label", label(order[j])}, {"prob", p[order[j]] / sum}});
      std::cout << nlohmann::json{{"path", kept[i]}, {"top", top}}.dump() << "\n";
      continue;
    }
    std::cout << kept[i] << ":";
    for (size_t j = 0; j < k; ++j) {
      char prob[32];
      std::snprintf(prob, sizeof prob, "%.3f", p[order[j]] / sum);
      std::cout << (j ? ", " : " ") << label(order[j]) << " " << prob;
    }
    std::cout << "\n";
  }
  return 0;
}

}  // namespace edgetl
