// The bundle's replay set (edgetl/exporter/replay.py writes replay.bin): bottom features of the
// known classes' training images, int8 with one float32 scale per channel, which fine-tuning mixes
// into its batches so the device does not forget what the workstation taught.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "bundle.h"

namespace edgetl {

// --replay-ratio's default when the bundle has a replay set (benchmarks/replay.py measures it).
constexpr double kDefaultReplayRatio = 0.5;

class ReplaySet {
 public:
  ReplaySet() = default;  // none
  static bool in(const Bundle& bundle) { return bundle.manifest.contains("replay"); }
  // The manifest's "replay" section and its file (whose sha256 the Bundle has checked), checked
  // against each other and the training program's feature shape; empty when the bundle has none.
  explicit ReplaySet(const Bundle& bundle);

  bool empty() const { return rows_ == 0; }
  size_t rows() const { return rows_; }
  int64_t label(size_t i) const { return labels_[i]; }
  size_t row_floats() const { return channels_ * plane_; }
  // Row `i` dequantized (q * scale of its channel, float32) into `out` (C x H x W floats).
  void row(size_t i, float* out) const;
  // Bytes held in memory (the file's): the fine-tune's memory need counts them.
  static int64_t bytes_of(const Bundle& bundle);

 private:
  size_t rows_ = 0, channels_ = 0, plane_ = 0;
  std::vector<float> scales_;
  std::vector<int64_t> labels_;
  std::string data_;  // the file; values start at values_
  size_t values_ = 0;
};

// Replay rows in a batch of `batch` at `ratio`: floor(batch * ratio + 0.5). DeviceError when ratio
// is outside [0, 1), when it is above 0 and the bundle has no replay set, or when no data row is left.
size_t replay_rows_per_batch(size_t batch, double ratio, const ReplaySet& replay);

// Which replay rows each step uses: per epoch, a Fisher-Yates order of the rows driven by
// splitmix64 seeded with (seed * 1000003 + epoch) ^ kReplayStream, taken in turn, r per step
// (step s uses order[(s * r + i) % rows], i < r): a function of (seed, epoch, step), so a resumed
// run repeats it, and every row is used about as often as any other.
class ReplayDraw {
 public:
  static constexpr uint64_t kReplayStream = 0x7265706C6179ULL;  // "replay"
  ReplayDraw(const ReplaySet& replay, size_t per_step, uint64_t seed, int epoch);
  // Writes step `step`'s rows into `features` (per_step x C x H x W) and their labels into `labels`.
  void fill(size_t step, float* features, int64_t* labels) const;

 private:
  const ReplaySet& replay_;
  size_t per_step_;
  std::vector<size_t> order_;
};

}  // namespace edgetl
