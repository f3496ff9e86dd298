// edgetl's native kernels for the training program: NHWC depthwise convolution, forward and both
// backward products, registered with ExecuTorch's kernel registry as `edgetl_export::*.out`.
//
// Without them the exporter decomposes a k x k depthwise convolution into k*k slice / multiply /
// add (and pad, in backward) operators over full feature maps: most of a step's time and, in
// backward, full-size temporaries that set the program's memory peak. Here each is one pass with
// the channel loop innermost (NHWC: contiguous, vectorised for AVX2+FMA or NEON), spread over
// ExecuTorch's thread pool by output rows (forward, input gradient) or by channel groups (weight
// gradient), so that every output element is summed in the same order at any thread count.
//
// Built into libedgetl_kernels.so, which edgetl-device links and the exporter loads into the
// Python process (it links the same libexecutorch.so, whose registry the Python bindings use) so
// that an export verifies the very kernels the device runs.
#include <algorithm>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "checks.h"
#include "isa.h"
#include "threadpool.h"

namespace edgetl_kernels {

using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

struct Geometry {
  int64_t n, h, w, c, ho, wo, k, stride, pad;
};

// The C x 1 x k x k weight, taps-major (w[tap][c]): contiguous over channels for each tap.
std::vector<float> taps_major(const Tensor& weight, const Geometry& g) {
  const float* wp = weight.const_data_ptr<float>();
  std::vector<float> wt(g.k * g.k * g.c);
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t t = 0; t < g.k * g.k; ++t) wt[t * g.c + c] = wp[c * g.k * g.k + t];
  return wt;
}

// The output row r = (n, oy) of the forward: y[c] = sum over the taps inside the image of x[c] w[c]
// (zero padding contributes nothing).
EDGETL_CLONES void forward_row(const Geometry& g, const float* xp, const float* wt, float* yp, int64_t r) {
  const int64_t n = r / g.ho, oy = r % g.ho;
  for (int64_t ox = 0; ox < g.wo; ++ox) {
    float* y = yp + (r * g.wo + ox) * g.c;
    for (int64_t c = 0; c < g.c; ++c) y[c] = 0.0f;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t iy = oy * g.stride + i - g.pad;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t ix = ox * g.stride + j - g.pad;
        if (ix < 0 || ix >= g.w) continue;
        const float* xr = xp + ((n * g.h + iy) * g.w + ix) * g.c;
        const float* wr = wt + (i * g.k + j) * g.c;
        for (int64_t c = 0; c < g.c; ++c) y[c] += xr[c] * wr[c];
      }
    }
  }
}

// The input row r = (n, iy) of dL/dx: every output pixel whose window covers the input pixel.
EDGETL_CLONES void grad_input_row(const Geometry& g, const float* dyp, const float* wt, float* dx, int64_t r) {
  const int64_t n = r / g.h, iy = r % g.h;
  for (int64_t ix = 0; ix < g.w; ++ix) {
    float* d = dx + (r * g.w + ix) * g.c;
    for (int64_t c = 0; c < g.c; ++c) d[c] = 0.0f;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t ty = iy + g.pad - i;  // = oy * stride
      if (ty < 0 || ty % g.stride) continue;
      const int64_t oy = ty / g.stride;
      if (oy >= g.ho) continue;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t tx = ix + g.pad - j;
        if (tx < 0 || tx % g.stride) continue;
        const int64_t ox = tx / g.stride;
        if (ox >= g.wo) continue;
        const float* dr = dyp + ((n * g.ho + oy) * g.wo + ox) * g.c;
        const float* wr = wt + (i * g.k + j) * g.c;
        for (int64_t c = 0; c < g.c; ++c) d[c] += dr[c] * wr[c];
      }
    }
  }
}

// dL/dw's terms of output row r = (n, oy) for channels [c0, c0 + cn): row[tap][c] = sum over the
// row's pixels of dy[c] x[c], in pixel order.
EDGETL_CLONES void grad_weight_row(const Geometry& g, const float* dyp, const float* xp, int64_t c0, int64_t cn, int64_t r, float* row) {
  const int64_t n = r / g.ho, oy = r % g.ho;
  for (int64_t i = 0; i < g.k * g.k * cn; ++i) row[i] = 0.0f;
  for (int64_t ox = 0; ox < g.wo; ++ox) {
    const float* dr = dyp + (r * g.wo + ox) * g.c + c0;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t iy = oy * g.stride + i - g.pad;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t ix = ox * g.stride + j - g.pad;
        if (ix < 0 || ix >= g.w) continue;
        const float* xr = xp + ((n * g.h + iy) * g.w + ix) * g.c + c0;
        float* acc = row + (i * g.k + j) * cn;
        for (int64_t c = 0; c < cn; ++c) acc[c] += dr[c] * xr[c];
      }
    }
  }
}

}  // namespace

// y[n, oy, ox, c] = sum_ij x[n, oy*s + i - p, ox*s + j - p, c] * w[c, 0, i, j]
Tensor& depthwise_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, int64_t stride, int64_t padding, Tensor& out) {
  if (!check(ctx, x.dim() == 4 && weight.dim() == 4 && out.dim() == 4)) return out;
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), out.size(1), out.size(2), weight.size(3), stride, padding};
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  const std::vector<float> wt = taps_major(weight, g);
  parallel_for(static_cast<size_t>(g.n * g.ho), [&](size_t row) { forward_row(g, xp, wt.data(), yp, static_cast<int64_t>(row)); });
  return out;
}

// dx[n, iy, ix, c] = sum over the (oy, ox, i, j) with oy*s + i - p = iy, ox*s + j - p = ix of dy * w
Tensor& depthwise_grad_input_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& weight, int64_t h, int64_t w, int64_t stride,
                                 int64_t padding, Tensor& out) {
  if (!check(ctx, dy.dim() == 4 && out.dim() == 4 && out.size(1) == h && out.size(2) == w)) return out;
  const Geometry g{dy.size(0), h, w, dy.size(3), dy.size(1), dy.size(2), weight.size(3), stride, padding};
  const float* dyp = dy.const_data_ptr<float>();
  float* dx = out.mutable_data_ptr<float>();
  const std::vector<float> wt = taps_major(weight, g);
  parallel_for(static_cast<size_t>(g.n * g.h), [&](size_t row) { grad_input_row(g, dyp, wt.data(), dx, static_cast<int64_t>(row)); });
  return out;
}

// dw[c, 0, i, j] = sum_{n, oy, ox} dy[n, oy, ox, c] * x[n, oy*s + i - p, ox*s + j - p, c]
Tensor& depthwise_grad_weight_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& x, int64_t k, int64_t stride, int64_t padding,
                                  Tensor& out) {
  if (!check(ctx, dy.dim() == 4 && x.dim() == 4 && out.dim() == 4 && out.size(3) == k)) return out;
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), dy.size(1), dy.size(2), k, stride, padding};
  const float* dyp = dy.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  float* dw = out.mutable_data_ptr<float>();
  // One task per group of channels: it sums every pixel for its channels, in pixel order. Each
  // output row's terms are summed in float (vectorised), rows into double (many terms).
  constexpr int64_t kGroup = 128;
  parallel_for(static_cast<size_t>((g.c + kGroup - 1) / kGroup), [&](size_t group) {
    const int64_t c0 = static_cast<int64_t>(group) * kGroup, cn = std::min(kGroup, g.c - c0);
    std::vector<double> acc(g.k * g.k * cn, 0.0);
    std::vector<float> row(g.k * g.k * cn);
    for (int64_t r = 0; r < g.n * g.ho; ++r) {
      grad_weight_row(g, dyp, xp, c0, cn, r, row.data());
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += static_cast<double>(row[i]);
    }
    for (int64_t c = 0; c < cn; ++c)
      for (int64_t t = 0; t < g.k * g.k; ++t) dw[(c0 + c) * g.k * g.k + t] = static_cast<float>(acc[t * cn + c]);
  });
  return out;
}

}  // namespace edgetl_kernels

EXECUTORCH_LIBRARY(edgetl_export, "depthwise_nhwc.out", edgetl_kernels::depthwise_out);
EXECUTORCH_LIBRARY(edgetl_export, "depthwise_grad_input.out", edgetl_kernels::depthwise_grad_input_out);
EXECUTORCH_LIBRARY(edgetl_export, "depthwise_grad_weight.out", edgetl_kernels::depthwise_grad_weight_out);
