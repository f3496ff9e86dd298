// Fine-tuning's memory need against the process's memory limit, checked before any work: a run
// that cannot fit is refused with one line instead of being OOM-killed halfway.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "bundle.h"

namespace edgetl {

// What the fine-tune holds at its peak: edgetl.profiler.native's sum (native_peak_of_bundle),
// from the same manifest figures (memory.native_runtime_bytes, memory.planned_arena_bytes.forward,
// the weights file's bytes, memory.trainable_parameter_bytes) and the same feature rule.
struct MemoryNeed {
  int64_t runtime = 0, features = 0, weights_file = 0, arena = 0, optimizer_state = 0;
  int64_t replay = 0;  // the replay set's file, held when fine-tuning mixes it in (replay.h)
  int64_t total() const { return runtime + features + weights_file + arena + optimizer_state + replay; }
};
// nullopt for a bundle whose manifest carries no runtime figure (exported by an older edgetl).
// optimizer_floats: the optimizer's state per trainable parameter (SGD 1 with momentum, AdamW 2).
std::optional<MemoryNeed> fine_tune_need(const Bundle& bundle, size_t images, int optimizer_floats, int64_t feature_budget,
                                         int64_t replay_bytes = 0);

struct MemoryLimit {
  int64_t bytes = 0;
  std::string source;  // "--memory-limit", or the cgroup file it was read from
};
// `flag` (bytes) when given, else the tightest memory limit of the process's cgroup and its
// ancestors (v2 memory.max, v1 memory.limit_in_bytes); nullopt when nothing limits it.
std::optional<MemoryLimit> memory_limit(std::optional<int64_t> flag);

// DeviceError naming both figures when `need` exceeds `limit`.
void check_fits(const MemoryNeed& need, const MemoryLimit& limit, size_t images);

}  // namespace edgetl
