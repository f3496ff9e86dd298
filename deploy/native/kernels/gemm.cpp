// A blocked float32 GEMM (the BLIS scheme: packed panels of A and B, a register-tiled micro-kernel)
// for the 1x1 convolutions of the training program, forward and both gradients.
//
// Why not ExecuTorch's mm: its portable GEMM is unblocked and single-threaded, and a transposed
// operand costs a permute_copy first. Here either operand may be transposed (the packing reads it
// in place), and the C blocks are spread over ExecuTorch's thread pool.
//
// The micro-kernel is written with GCC vector extensions (8 floats), so one source compiles to
// AVX2+FMA on x86-64 (a clone chosen at load time; plain SSE2 elsewhere) and to NEON on aarch64.
#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "isa.h"
#include "threadpool.h"

// The vector helpers below are always inlined into the clones: the ABI GCC warns about (a 32-byte
// vector passed by value without AVX) is never used at a call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace edgetl_kernels {

namespace {

constexpr int64_t MR = 6;    // rows of a micro-tile
constexpr int64_t NR = 16;   // columns of a micro-tile: two 8-float vectors
constexpr int64_t KC = 256;  // depth of a packed block: a B panel (KC x NR, 16 KiB) stays in L1
constexpr int64_t MC = 96;   // rows of a packed A block (96 KiB, L2)
constexpr int64_t NC = 256;  // columns of a packed B block (256 KiB, L2)

typedef float v8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// c[mr x nr] (+)= a_panel b_panel over kc: a_panel is kc x MR (a[p * MR + i]), b_panel kc x NR.
__attribute__((always_inline)) inline void micro_tile(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mr,
                                                      int64_t nr, bool accumulate) {
  v8 acc[MR][2];
  for (int64_t i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = v8{};
  for (int64_t p = 0; p < kc; ++p) {
    const v8 b0 = load8(b + p * NR), b1 = load8(b + p * NR + 8);
    for (int64_t i = 0; i < MR; ++i) {
      const float ai = a[p * MR + i];
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
  if (mr == MR && nr == NR) {
    for (int64_t i = 0; i < MR; ++i) {
      float* row = c + i * ldc;
      if (accumulate) {
        store8(row, load8(row) + acc[i][0]);
        store8(row + 8, load8(row + 8) + acc[i][1]);
      } else {
        store8(row, acc[i][0]);
        store8(row + 8, acc[i][1]);
      }
    }
    return;
  }
  float tile[MR][NR];
  std::memcpy(tile, acc, sizeof tile);
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i][j] : tile[i][j];
}

// c[mc x nc] (+)= packed A block (mc x kc) times packed B block (kc x nc); the micro-kernel is
// inlined into each clone, so it is compiled for that clone's instruction set.
EDGETL_CLONES void block_product(int64_t mc, int64_t nc, int64_t kc, const float* pa, const float* pb, float* c, int64_t ldc,
                                 bool accumulate) {
  for (int64_t j = 0; j < nc; j += NR)
    for (int64_t i = 0; i < mc; i += MR)
      micro_tile(kc, pa + i * kc, pb + j * kc, c + i * ldc + j, ldc, std::min(MR, mc - i), std::min(NR, nc - j), accumulate);
}

// A[i0 : i0 + mc, p0 : p0 + kc] as MR-row panels, kc x MR each, zero-padded to whole panels.
void pack_a(const MatrixRef& a, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* pa) {
  for (int64_t i = 0; i < mc; i += MR) {
    float* dst = pa + i * kc;
    const int64_t rows = std::min(MR, mc - i);
    if (a.transposed) {
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = a.data + (p0 + p) * a.ld + i0 + i;
        for (int64_t r = 0; r < MR; ++r) dst[p * MR + r] = r < rows ? src[r] : 0.0f;
      }
    } else {
      for (int64_t r = 0; r < MR; ++r) {
        if (r < rows) {
          const float* src = a.data + (i0 + i + r) * a.ld + p0;
          for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = src[p];
        } else {
          for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = 0.0f;
        }
      }
    }
  }
}

// B[p0 : p0 + kc, j0 : j0 + nc] as NR-column panels, kc x NR each, zero-padded to whole panels.
void pack_b(const MatrixRef& b, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* pb) {
  for (int64_t j = 0; j < nc; j += NR) {
    float* dst = pb + j * kc;
    const int64_t cols = std::min(NR, nc - j);
    if (b.transposed) {
      for (int64_t q = 0; q < NR; ++q) {
        if (q < cols) {
          const float* src = b.data + (j0 + j + q) * b.ld + p0;
          for (int64_t p = 0; p < kc; ++p) dst[p * NR + q] = src[p];
        } else {
          for (int64_t p = 0; p < kc; ++p) dst[p * NR + q] = 0.0f;
        }
      }
    } else {
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = b.data + (p0 + p) * b.ld + j0 + j;
        for (int64_t q = 0; q < NR; ++q) dst[p * NR + q] = q < cols ? src[q] : 0.0f;
      }
    }
  }
}

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

}  // namespace

void sgemm(int64_t m, int64_t n, int64_t k, MatrixRef a, MatrixRef b, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  // One task per mc x nc block of c: it owns those elements and sums all of k for them in order,
  // so the blocking (narrower blocks when a product has too few for the pool's threads) never
  // changes a result.
  const int64_t row_blocks = (m + MC - 1) / MC, threads = static_cast<int64_t>(thread_count());
  const int64_t want_columns = std::max<int64_t>(1, (4 * threads + row_blocks - 1) / row_blocks);
  const int64_t nc_max = std::min(NC, std::max(NR, round_up((n + want_columns - 1) / want_columns, NR)));
  const int64_t column_blocks = (n + nc_max - 1) / nc_max;
  parallel_for(static_cast<size_t>(row_blocks * column_blocks), [&](size_t task) {
    const int64_t i0 = static_cast<int64_t>(task) % row_blocks * MC, j0 = static_cast<int64_t>(task) / row_blocks * nc_max;
    const int64_t mc = std::min(MC, m - i0), nc = std::min(nc_max, n - j0);
    // per pool thread, reused from call to call (at most MC x KC + NC x KC floats each)
    thread_local std::vector<float> pa, pb;
    pa.resize(static_cast<size_t>(round_up(mc, MR) * KC));
    pb.resize(static_cast<size_t>(round_up(nc, NR) * KC));
    for (int64_t p0 = 0; p0 < k; p0 += KC) {
      const int64_t kc = std::min(KC, k - p0);
      pack_a(a, i0, mc, p0, kc, pa.data());
      pack_b(b, p0, kc, j0, nc, pb.data());
      block_product(mc, nc, kc, pa.data(), pb.data(), c + i0 * ldc + j0, ldc, p0 > 0);
    }
  });
}

}  // namespace edgetl_kernels
