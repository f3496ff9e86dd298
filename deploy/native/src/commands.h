// The runner's three commands, each over a verified bundle.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bundle.h"

namespace edgetl {

struct ClassifyOptions {
  std::vector<std::string> images;  // files or folders
  std::string trained;              // state directory or .ptd; empty: model.pte
  int top_k = 3;
  bool json = false;  // one JSON object per image, full-precision probabilities
};

struct FinetuneOptions {
  std::string data, state, val;
  int epochs = 5;
  std::optional<int> batch_size;  // must equal the program's (static shapes)
  std::optional<double> lr, momentum, weight_decay;
  uint64_t seed = 0;
  bool augment = false;
  int64_t feature_budget = int64_t{64} << 20;  // bytes of bottom features kept in memory; more go to a mapped file
};

void info(const Bundle& bundle);
int classify(const Bundle& bundle, const ClassifyOptions& options);
int finetune(const Bundle& bundle, const FinetuneOptions& options);

// Shared by both commands: images decoded and preprocessed, unreadable ones skipped with one warning each.
struct Images {
  std::vector<std::string> paths;
  std::vector<float> pixels;  // N x 3 x S x S
};
Images load_images(const std::vector<std::string>& paths, const InputSpec& spec);
// Bottom features of `n` preprocessed images, in batches of the program's static batch (last one zero-padded).
class Program;
void bottom_features(Program& bottom, const float* pixels, size_t n, const InputSpec& spec, const std::vector<int64_t>& feature_shape,
                     float* out);

}  // namespace edgetl
