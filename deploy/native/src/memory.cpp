#include "memory.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "errors.h"

namespace edgetl {

namespace {
// Above this a cgroup limit means "none" (v1 writes LLONG_MAX rounded down to a page).
constexpr int64_t kUnlimited = int64_t{1} << 60;

std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

// The first line of `path` as a byte count; nullopt when absent, "max" or unlimited.
std::optional<int64_t> read_limit(const std::string& path) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word) || word == "max") return std::nullopt;
  char* end = nullptr;
  const long long v = std::strtoll(word.c_str(), &end, 10);
  if (end == word.c_str() || *end || v <= 0 || v >= kUnlimited) return std::nullopt;
  return v;
}
}  // namespace

std::optional<MemoryNeed> fine_tune_need(const Bundle& bundle, size_t images, int optimizer_floats, int64_t feature_budget,
                                         int64_t replay_bytes) {
  const auto& m = bundle.manifest;
  if (!m.contains("memory") || !m.at("memory").contains("native_runtime_bytes")) return std::nullopt;
  const auto& mem = m.at("memory");
  const TrainingSpec& t = bundle.training();
  MemoryNeed need;
  need.runtime = mem.at("native_runtime_bytes").get<int64_t>();
  need.arena = mem.at("planned_arena_bytes").at("forward").get<int64_t>();
  need.weights_file = m.at("files").at(t.ptd).at("bytes").get<int64_t>();
  need.optimizer_state = optimizer_floats * mem.at("trainable_parameter_bytes").get<int64_t>();
  int64_t per_image = 4;  // one float32 feature map
  for (size_t i = 1; i < t.feature_shape.size(); ++i) per_image *= t.feature_shape[i];
  const int64_t features = static_cast<int64_t>(images) * per_image;
  need.features = features <= feature_budget ? features : 0;  // beyond the budget: a mapped file
  need.replay = replay_bytes;
  return need;
}

std::optional<MemoryLimit> memory_limit(std::optional<int64_t> flag) {
  if (flag) return MemoryLimit{*flag, "--memory-limit"};
  std::optional<MemoryLimit> best;
  std::ifstream cgroups("/proc/self/cgroup");
  std::string line;
  while (std::getline(cgroups, line)) {  // "ID:CONTROLLERS:PATH"; v2 is "0::PATH"
    const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    std::string path = line.substr(b + 1);
    std::string root, file;
    if (controllers.empty()) {
      root = "/sys/fs/cgroup", file = "memory.max";
    } else {
      bool memory = false;
      std::stringstream list(controllers);
      for (std::string c; std::getline(list, c, ',');) memory |= c == "memory";
      if (!memory) continue;
      root = "/sys/fs/cgroup/memory", file = "memory.limit_in_bytes";
    }
    // the cgroup and each ancestor: the tightest limit holds
    while (true) {
      const std::string p = root + (path == "/" ? "" : path) + "/" + file;
      if (auto v = read_limit(p); v && (!best || *v < best->bytes)) best = MemoryLimit{*v, p};
      if (path.empty() || path == "/") break;
      const size_t slash = path.rfind('/');
      path = slash == 0 ? "/" : path.substr(0, slash);
    }
  }
  return best;
}

void check_fits(const MemoryNeed& need, const MemoryLimit& limit, size_t images) {
  if (need.total() <= limit.bytes) return;
  throw DeviceError("fine-tuning needs " + mib(need.total()) + " (runtime " + mib(need.runtime) + ", weights " + mib(need.weights_file) +
                    ", arena " + mib(need.arena) + ", optimizer state " + mib(need.optimizer_state) +
                    (need.replay ? ", replay set " + mib(need.replay) : "") + ", features of " + std::to_string(images) + " images " +
                    mib(need.features) + "), more than the memory limit of " + mib(limit.bytes) + " (" + limit.source +
                    "): raise the limit, or export fewer blocks or a smaller batch (edgetl plan --runtime native)");
}

}  // namespace edgetl
