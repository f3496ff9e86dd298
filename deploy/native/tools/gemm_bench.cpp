// edgetl-gemm-bench THREADS SECONDS M N K TA TB [M N K TA TB ...]: edgetl's GEMM
// (deploy/native/kernels/gemm.cpp) on each shape, c = a b with a (b) read transposed when TA (TB)
// is 1, on ExecuTorch's thread pool sized to THREADS. Prints one line per shape: M N K TA TB and
// the best seconds of the runs made within SECONDS (at least 3). benchmarks/device_step.py times a
// training step's GEMMs and the machine's sgemm peak with it.
//
// edgetl-gemm-bench THREADS SECONDS copy MIB: the best seconds of copying MIB MiB on the pool
// (the memory bandwidth a device profile's `memory_gbps` records).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../kernels/gemm.h"
#include "../kernels/threadpool.h"

namespace {

template <typename F>
double best_seconds(double budget, F run) {
  double best = 1e30, spent = 0;
  for (int runs = 0; runs < 3 || spent < budget; ++runs) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    spent += t;
    best = std::min(best, t);
  }
  return best;
}

int copy_bandwidth(double budget, long mib) {
  const size_t n = static_cast<size_t>(mib) << 20, chunk = size_t{1} << 20;
  std::vector<char> from(n, 1), to(n);
  const double s = best_seconds(budget, [&] {
    edgetl_kernels::parallel_for(n / chunk, [&](size_t i) { std::memcpy(to.data() + i * chunk, from.data() + i * chunk, chunk); });
  });
  std::printf("copy %zu %.9f\n", n, s);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[3]) == "copy" && std::atol(argv[1]) > 0 && std::atol(argv[4]) > 0) {
    edgetl_kernels::set_thread_count(static_cast<uint32_t>(std::atol(argv[1])));
    return copy_bandwidth(std::atof(argv[2]), std::atol(argv[4]));
  }
  if (argc < 8 || (argc - 3) % 5) {
    std::fprintf(stderr, "usage: %s THREADS SECONDS M N K TA TB [M N K TA TB ...] | THREADS SECONDS copy MIB\n", argv[0]);
    return 2;
  }
  const long threads = std::atol(argv[1]);
  const double budget = std::atof(argv[2]);
  if (threads < 1 || !(budget > 0)) {
    std::fprintf(stderr, "THREADS and SECONDS must be positive\n");
    return 2;
  }
  edgetl_kernels::set_thread_count(static_cast<uint32_t>(threads));
  for (int s = 3; s < argc; s += 5) {
    const long m = std::atol(argv[s]), n = std::atol(argv[s + 1]), k = std::atol(argv[s + 2]);
    const bool ta = std::atoi(argv[s + 3]), tb = std::atoi(argv[s + 4]);
    if (m < 1 || n < 1 || k < 1) {
      std::fprintf(stderr, "M N K must be positive\n");
      return 2;
    }
    std::vector<float> a(m * k), b(k * n), c(m * n);
    for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 7) * 0.25f - 0.5f;
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i % 5) * 0.5f - 1.0f;
    const edgetl_kernels::MatrixRef ar{a.data(), ta ? m : k, ta}, br{b.data(), tb ? k : n, tb};
    const double best = best_seconds(budget, [&] { edgetl_kernels::sgemm(m, n, k, ar, br, c.data(), n); });
    std::printf("%ld %ld %ld %d %d %.9f\n", m, n, k, ta, tb, best);
  }
  return 0;
}
