// edgetl's native kernels for per-channel maps and sums of the training program (NHWC: channels
// last): the norms and global average pooling, registered as `edgetl_export::*.out`:
//
//   channel_affine(x, a, b)  y = x * a + b      (a, b per channel)
//   channel_scale(dy, a)     dx = dy * a
//   channel_sum(dy)          db[c] = sum of dy over every pixel
//   channel_dot(dy, x)       da[c] = sum of dy * x over every pixel
//   channel_center(x)        y = x - mean of x over every pixel  (its own backward)
//   channel_sumsq(x)         s[c] = sum of x * x over every pixel
//   channel_gate(x, s)       y[n, y, x, c] = x[n, y, x, c] * s[n, c]   (squeeze-excitation)
//   channel_gate_grad(dy, x) ds[n, c] = sum over the pixels of image n of dy * x
//   spatial_mean(x)          m[n, c] = mean of x[n, :, :, c]      (global average pooling)
//   spatial_mean_grad(dm, h, w)  dx[n, y, x, c] = dm[n, c] / (h * w)
//
// One pass each. ExecuTorch's portable reduction over the leading axes walks the map with strided
// index arithmetic per element; here rows are contiguous and the channel loop vectorises. Sums run
// in double, one task per group of channels, in pixel order: the same bits at any thread count.
#include <algorithm>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "checks.h"
#include "threadpool.h"

namespace edgetl_kernels {

using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

int64_t channels(const Tensor& t) { return t.dim() ? t.size(t.dim() - 1) : 1; }

bool is_per_channel(const Tensor& v, const Tensor& map) { return v.dim() == 1 && v.size(0) == channels(map); }

// f(row) for every row (pixel) of a map with `c` channels, in chunks of rows spread over the pool
template <typename F>
void each_row(int64_t rows, int64_t c, F f) {
  parallel_ranges(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r);
  });
}

// out[c] = sum over rows of term(row, c), in double, one task per group of channels
template <typename Out, typename Term>
void channel_reduce(int64_t rows, int64_t c, Out* out, Term term) {
  constexpr int64_t kGroup = 64;
  parallel_for(static_cast<size_t>((c + kGroup - 1) / kGroup), [&](size_t g) {
    const int64_t c0 = static_cast<int64_t>(g) * kGroup, cn = std::min(kGroup, c - c0);
    double acc[kGroup] = {};
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cn; ++j) acc[j] += static_cast<double>(term(r * c + c0 + j));
    for (int64_t j = 0; j < cn; ++j) out[c0 + j] = static_cast<Out>(acc[j]);
  });
}

}  // namespace

Tensor& channel_affine_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& a, const Tensor& b, Tensor& out) {
  if (!check(ctx, same_shape(x, out) && is_per_channel(a, x) && is_per_channel(b, x))) return out;
  const int64_t c = channels(x);
  const float *xp = x.const_data_ptr<float>(), *ap = a.const_data_ptr<float>(), *bp = b.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  each_row(x.numel() / std::max<int64_t>(c, 1), c, [&](int64_t r) {
    const float* xr = xp + r * c;
    float* yr = yp + r * c;
    for (int64_t j = 0; j < c; ++j) yr[j] = xr[j] * ap[j] + bp[j];
  });
  return out;
}

Tensor& channel_scale_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& a, Tensor& out) {
  if (!check(ctx, same_shape(dy, out) && is_per_channel(a, dy))) return out;
  const int64_t c = channels(dy);
  const float *dyp = dy.const_data_ptr<float>(), *ap = a.const_data_ptr<float>();
  float* dx = out.mutable_data_ptr<float>();
  each_row(dy.numel() / std::max<int64_t>(c, 1), c, [&](int64_t r) {
    for (int64_t j = 0; j < c; ++j) dx[r * c + j] = dyp[r * c + j] * ap[j];
  });
  return out;
}

Tensor& channel_sum_out(KernelRuntimeContext& ctx, const Tensor& dy, Tensor& out) {
  if (!check(ctx, is_per_channel(out, dy))) return out;
  const int64_t c = channels(dy);
  const float* dyp = dy.const_data_ptr<float>();
  channel_reduce(dy.numel() / std::max<int64_t>(c, 1), c, out.mutable_data_ptr<float>(), [&](int64_t i) { return dyp[i]; });
  return out;
}

Tensor& channel_dot_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& x, Tensor& out) {
  if (!check(ctx, same_shape(dy, x) && is_per_channel(out, dy))) return out;
  const int64_t c = channels(dy);
  const float *dyp = dy.const_data_ptr<float>(), *xp = x.const_data_ptr<float>();
  channel_reduce(dy.numel() / std::max<int64_t>(c, 1), c, out.mutable_data_ptr<float>(), [&](int64_t i) { return dyp[i] * xp[i]; });
  return out;
}

Tensor& channel_center_out(KernelRuntimeContext& ctx, const Tensor& x, Tensor& out) {
  if (!check(ctx, same_shape(x, out))) return out;
  const int64_t c = channels(x), rows = x.numel() / std::max<int64_t>(c, 1);
  const float* xp = x.const_data_ptr<float>();
  std::vector<double> mean(static_cast<size_t>(c));
  channel_reduce(rows, c, mean.data(), [&](int64_t i) { return xp[i]; });
  for (double& m : mean) m /= static_cast<double>(std::max<int64_t>(rows, 1));
  float* yp = out.mutable_data_ptr<float>();
  each_row(rows, c, [&](int64_t r) {
    for (int64_t j = 0; j < c; ++j) yp[r * c + j] = static_cast<float>(xp[r * c + j] - mean[j]);
  });
  return out;
}

Tensor& channel_sumsq_out(KernelRuntimeContext& ctx, const Tensor& x, Tensor& out) {
  if (!check(ctx, is_per_channel(out, x))) return out;
  const int64_t c = channels(x);
  const float* xp = x.const_data_ptr<float>();
  channel_reduce(x.numel() / std::max<int64_t>(c, 1), c, out.mutable_data_ptr<float>(),
                 [&](int64_t i) { return static_cast<double>(xp[i]) * xp[i]; });
  return out;
}

// a per-image, per-channel N x 1 x 1 x C tensor for the N x H x W x C map `x`
bool is_per_image_channel(const Tensor& v, const Tensor& x) {
  return x.dim() == 4 && v.dim() == 4 && v.size(0) == x.size(0) && v.size(1) == 1 && v.size(2) == 1 && v.size(3) == x.size(3);
}

Tensor& channel_gate_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& s, Tensor& out) {
  if (!check(ctx, same_shape(x, out) && is_per_image_channel(s, x))) return out;
  const int64_t c = x.size(3), hw = x.size(1) * x.size(2);
  const float *xp = x.const_data_ptr<float>(), *sp = s.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  each_row(x.size(0) * hw, c, [&](int64_t r) {
    const float* g = sp + (r / hw) * c;
    for (int64_t j = 0; j < c; ++j) yp[r * c + j] = xp[r * c + j] * g[j];
  });
  return out;
}

Tensor& channel_gate_grad_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& x, Tensor& out) {
  if (!check(ctx, same_shape(dy, x) && is_per_image_channel(out, x))) return out;
  const int64_t c = x.size(3), hw = x.size(1) * x.size(2);
  const float *dyp = dy.const_data_ptr<float>(), *xp = x.const_data_ptr<float>();
  float* sp = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < x.size(0); ++i) {
    const int64_t base = i * hw * c;
    channel_reduce(hw, c, sp + i * c, [&](int64_t k) { return dyp[base + k] * xp[base + k]; });
  }
  return out;
}

Tensor& spatial_mean_out(KernelRuntimeContext& ctx, const Tensor& x, Tensor& out) {
  if (!check(ctx, x.dim() == 4 && out.dim() == 4 && out.size(0) == x.size(0) && out.size(1) == 1 && out.size(2) == 1 &&
                      out.size(3) == x.size(3)))
    return out;
  const int64_t n = x.size(0), hw = x.size(1) * x.size(2), c = x.size(3);
  const float* xp = x.const_data_ptr<float>();
  float* mp = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {  // each image's pixels are a rows x c map of its own
    channel_reduce(hw, c, mp + i * c, [&](int64_t k) { return xp[i * hw * c + k]; });
    for (int64_t j = 0; j < c; ++j) mp[i * c + j] /= static_cast<float>(hw);
  }
  return out;
}

Tensor& spatial_mean_grad_out(KernelRuntimeContext& ctx, const Tensor& dy, int64_t h, int64_t w, Tensor& out) {
  if (!check(ctx, dy.dim() == 4 && out.dim() == 4 && out.size(0) == dy.size(0) && out.size(1) == h && out.size(2) == w &&
                      out.size(3) == dy.size(3)))
    return out;
  const int64_t c = dy.size(3), hw = h * w;
  const float* dyp = dy.const_data_ptr<float>();
  float* dx = out.mutable_data_ptr<float>();
  each_row(dy.size(0) * hw, c, [&](int64_t r) {
    const float* g = dyp + (r / hw) * c;
    for (int64_t j = 0; j < c; ++j) dx[r * c + j] = g[j] / static_cast<float>(hw);
  });
  return out;
}

}  // namespace edgetl_kernels

EXECUTORCH_LIBRARY(edgetl_export, "channel_gate.out", edgetl_kernels::channel_gate_out);
EXECUTORCH_LIBRARY(edgetl_export, "channel_gate_grad.out", edgetl_kernels::channel_gate_grad_out);
EXECUTORCH_LIBRARY(edgetl_export, "spatial_mean.out", edgetl_kernels::spatial_mean_out);
EXECUTORCH_LIBRARY(edgetl_export, "spatial_mean_grad.out", edgetl_kernels::spatial_mean_grad_out);
EXECUTORCH_LIBRARY(edgetl_export, "channel_affine.out", edgetl_kernels::channel_affine_out);
EXECUTORCH_LIBRARY(edgetl_export, "channel_scale.out", edgetl_kernels::channel_scale_out);
EXECUTORCH_LIBRARY(edgetl_export, "channel_sum.out", edgetl_kernels::channel_sum_out);
EXECUTORCH_LIBRARY(edgetl_export, "channel_dot.out", edgetl_kernels::channel_dot_out);
EXECUTORCH_LIBRARY(edgetl_export, "channel_center.out", edgetl_kernels::channel_center_out);
EXECUTORCH_LIBRARY(edgetl_export, "channel_sumsq.out", edgetl_kernels::channel_sumsq_out);
