// edgetl-gemm-bench THREADS M N K [TA TB]: GFLOP/s of edgetl's GEMM (deploy/native/kernels/gemm.cpp)
// on one shape, best of several runs, on ExecuTorch's thread pool sized to THREADS: the machine's
// sgemm peak beside which benchmarks/device_step.py reports a training step's achieved GFLOP/s.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../kernels/gemm.h"
#include "../kernels/threadpool.h"

int main(int argc, char** argv) {
  if (argc != 5 && argc != 7) {
    std::fprintf(stderr, "usage: %s THREADS M N K [TA TB]\n", argv[0]);
    return 2;
  }
  const long threads = std::atol(argv[1]), m = std::atol(argv[2]), n = std::atol(argv[3]), k = std::atol(argv[4]);
  const bool ta = argc == 7 && std::atoi(argv[5]), tb = argc == 7 && std::atoi(argv[6]);
  if (threads < 1 || m < 1 || n < 1 || k < 1) {
    std::fprintf(stderr, "THREADS M N K must be positive\n");
    return 2;
  }
  executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));
  std::vector<float> a(m * k), b(k * n), c(m * n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 7) * 0.25f - 0.5f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i % 5) * 0.5f - 1.0f;
  const edgetl_kernels::MatrixRef ar{a.data(), ta ? m : k, ta}, br{b.data(), tb ? k : n, tb};
  const double flop = 2.0 * m * n * k;
  double best = 1e30;
  int runs = 0;
  for (double spent = 0; runs < 3 || (spent < 1.0 && runs < 1000); ++runs) {
    const auto t0 = std::chrono::steady_clock::now();
    edgetl_kernels::sgemm(m, n, k, ar, br, c.data(), n);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    spent += s;
    if (s < best) best = s;
  }
  std::printf("%.2f GFLOP/s  (%ld x %ld x %ld, %s%s, %ld threads, best of %d)\n", flop / best * 1e-9, m, n, k, ta ? "A^T" : "A",
              tb ? " B^T" : " B", threads, runs);
  return 0;
}
