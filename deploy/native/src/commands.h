// The runner's commands, each over a verified bundle.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
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
  std::optional<std::string> optimizer;            // sgd or adamw; default: the bundle's
  std::optional<std::pair<double, double>> betas;  // AdamW's
  std::optional<double> eps;                       // AdamW's
  uint64_t seed = 0;
  bool augment = false;
  int64_t feature_budget = int64_t{64} << 20;  // bytes of bottom features kept in memory; more go to a mapped file
  bool verbose = false;                        // also log the process's memory after each phase
  std::optional<int64_t> memory_limit;         // bytes; default: the cgroup's limit (memory.h)
  std::optional<double> replay_ratio;          // share of each batch from the replay set; default: replay.h
};

void info(const Bundle& bundle);
int classify(const Bundle& bundle, const ClassifyOptions& options);
int finetune(const Bundle& bundle, const FinetuneOptions& options);
// Starts `state_dir` at epoch 0 with the tensors of `npy_dir`/NAME.npy over the bundle's train.ptd.
int import_weights(const Bundle& bundle, const std::string& npy_dir, const std::string& state_dir);
// Writes every training tensor of `trained` (a state directory or .ptd) as `out_dir`/NAME.npy.
int export_weights(const Bundle& bundle, const std::string& trained, const std::string& out_dir);

class Program;
// Runs the frozen bottom over `paths`, streaming: images are decoded and preprocessed one batch
// at a time (the program's static batch; the last one zero-padded), so memory holds one batch of
// pixels, never the data set. The features of the k-th readable image go to `row(k)`; unreadable
// images are skipped with one warning each. Returns the indices into `paths` of the images kept.
// With `seconds`: adds the time spent decoding (and preprocessing) and running the bottom.
struct FeatureSeconds {
  double decode = 0, bottom = 0;
};
std::vector<size_t> bottom_features(Program& bottom, const std::vector<std::string>& paths, const InputSpec& spec,
                                    const std::vector<int64_t>& feature_shape, const std::function<float*(size_t)>& row,
                                    FeatureSeconds* seconds = nullptr);
// Decodes and preprocesses one image into `out`; false (after one warning naming it) if unreadable.
bool read_image(const std::string& path, const InputSpec& spec, float* out);
size_t numel_per_item(const std::vector<int64_t>& shape);  // product of all dims but the first
size_t image_floats(const InputSpec& spec);                // 3 x S x S
// With `on`: "memory after PHASE: rss X MiB, peak Y MiB" on stderr (Linux /proc/self/status).
void log_memory(bool on, const char* phase);

}  // namespace edgetl
