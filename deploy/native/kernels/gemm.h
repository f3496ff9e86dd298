// C = A B (or C += A B) in float32, for the 1x1 convolutions of the training program.
#pragma once

#include <cstdint>

namespace edgetl_kernels {

// A row-major matrix view: element (i, j) at data[i * ld + j], or at data[j * ld + i] when
// transposed (a matrix stored as its transpose, read without a copy).
struct MatrixRef {
  const float* data;
  int64_t ld;
  bool transposed;
  float at(int64_t i, int64_t j) const { return transposed ? data[j * ld + i] : data[i * ld + j]; }
};

// c[m x n] (row-major, leading dimension ldc) = a[m x k] b[k x n], on the shared thread pool.
// Each element of c is one thread's sum over k in a fixed order: the same bits at any thread count.
void sgemm(int64_t m, int64_t n, int64_t k, MatrixRef a, MatrixRef b, float* c, int64_t ldc);

}  // namespace edgetl_kernels
