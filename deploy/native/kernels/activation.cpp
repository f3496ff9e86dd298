// edgetl's native kernels for MobileTL's masked activations, registered as `edgetl_export::*.out`:
//
//   activation(x, code)         y = act(x), the exact forward
//   mask_grad(dy, y, code)      dx = dy where the 1-bit mask read off y is set, else 0
//                               (a squeeze-excitation gate: dy times its exact derivative from y)
//   packed_mask_grad(dy, bits)  dx = dy where the bit-packed mask is set (LSB first), else 0
//   exact_act(x, code)          y = act(x) outside MobileTL's blocks (the same forward)
//   exact_act_grad(dy, t, code) dx = dy act'(x), from the output t (ReLU, Sigmoid) or the input t,
//                               as PyTorch's derivative formulas
//
// Each is one pass over the map. ExecuTorch's portable kernels need several (compare, where,
// clamp, and hardswish's four), each converting dtypes element by element.
//
// `code` = 2 * kind + rule, in the order of edgetl/nn/ops.py: ACTIVATION_KINDS = (relu, relu6,
// hardswish, silu, hardsigmoid, sigmoid), GRAD_RULES = (sign, exact); the kernel tests hold every
// code against the Python operators.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "checks.h"
#include "threadpool.h"

namespace edgetl_kernels {

using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

enum Kind : int64_t { kRelu, kRelu6, kHardswish, kSilu, kHardsigmoid, kSigmoid, kKinds };

constexpr int64_t kChunk = 16384;  // elements per task (a multiple of 8: whole bytes of a packed mask)

template <typename F>
void map(const float* x, float* y, int64_t n, F f) {
  parallel_ranges(n, kChunk, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = f(x[i]);
  });
}

template <typename F>
void map2(const float* dy, const float* y, float* dx, int64_t n, F f) {
  parallel_ranges(n, kChunk, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dx[i] = f(dy[i], y[i]);
  });
}

inline float relu6(float v) { return std::min(std::max(v, 0.0f), 6.0f); }

}  // namespace

Tensor& activation_out(KernelRuntimeContext& ctx, const Tensor& x, int64_t code, Tensor& out) {
  if (!check(ctx, code >= 0 && code < 2 * kKinds && same_shape(x, out))) return out;
  const float* xp = x.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  const int64_t n = x.numel();
  switch (code / 2) {
    case kRelu: map(xp, yp, n, [](float v) { return v > 0.0f ? v : 0.0f; }); break;
    case kRelu6: map(xp, yp, n, [](float v) { return relu6(v); }); break;
    case kHardswish: map(xp, yp, n, [](float v) { return v * relu6(v + 3.0f) / 6.0f; }); break;
    case kSilu: map(xp, yp, n, [](float v) { return v / (1.0f + std::exp(-v)); }); break;
    case kHardsigmoid: map(xp, yp, n, [](float v) { return relu6(v + 3.0f) / 6.0f; }); break;
    default: map(xp, yp, n, [](float v) { return 1.0f / (1.0f + std::exp(-v)); }); break;
  }
  return out;
}

Tensor& mask_grad_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& y, int64_t code, Tensor& out) {
  if (!check(ctx, code >= 0 && code < 2 * kKinds && same_shape(dy, y) && same_shape(dy, out))) return out;
  const float* dyp = dy.const_data_ptr<float>();
  const float* yp = y.const_data_ptr<float>();
  float* dx = out.mutable_data_ptr<float>();
  const int64_t n = dy.numel();
  const bool exact = code % 2 == 1;
  switch (code / 2) {
    case kHardsigmoid: map2(dyp, yp, dx, n, [](float g, float v) { return v > 0.0f && v < 1.0f ? g / 6.0f : 0.0f; }); break;
    case kSigmoid: map2(dyp, yp, dx, n, [](float g, float v) { return g * v * (1.0f - v); }); break;
    case kRelu6:
      if (exact) {  // ReLU6's exact derivative: 1 on 0 < x < 6, i.e. 0 < y < 6
        map2(dyp, yp, dx, n, [](float g, float v) { return v > 0.0f && v < 6.0f ? g : 0.0f; });
        break;
      }
      [[fallthrough]];
    default: map2(dyp, yp, dx, n, [](float g, float v) { return v > 0.0f ? g : 0.0f; }); break;  // the sign rule
  }
  return out;
}

Tensor& packed_mask_grad_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& packed, Tensor& out) {
  const int64_t n = dy.numel();
  if (!check(ctx, same_shape(dy, out) && packed.numel() == (n + 7) / 8)) return out;
  const float* dyp = dy.const_data_ptr<float>();
  const uint8_t* bits = packed.const_data_ptr<uint8_t>();
  float* dx = out.mutable_data_ptr<float>();
  parallel_ranges(n, kChunk, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dx[i] = (bits[i >> 3] >> (i & 7)) & 1 ? dyp[i] : 0.0f;
  });
  return out;
}

Tensor& exact_act_grad_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& t, int64_t code, Tensor& out) {
  if (!check(ctx, code >= 0 && code < 2 * kKinds && same_shape(dy, t) && same_shape(dy, out))) return out;
  const float* dyp = dy.const_data_ptr<float>();
  const float* tp = t.const_data_ptr<float>();
  float* dx = out.mutable_data_ptr<float>();
  const int64_t n = dy.numel();
  switch (code / 2) {
    case kRelu: map2(dyp, tp, dx, n, [](float g, float y) { return y > 0.0f ? g : 0.0f; }); break;
    case kRelu6: map2(dyp, tp, dx, n, [](float g, float x) { return x > 0.0f && x < 6.0f ? g : 0.0f; }); break;
    case kHardswish: map2(dyp, tp, dx, n, [](float g, float x) { return x <= -3.0f ? 0.0f : x < 3.0f ? g * (x / 3.0f + 0.5f) : g; }); break;
    case kSilu:
      map2(dyp, tp, dx, n, [](float g, float x) {
        const float s = 1.0f / (1.0f + std::exp(-x));
        return g * (s * (1.0f + x * (1.0f - s)));
      });
      break;
    case kHardsigmoid: map2(dyp, tp, dx, n, [](float g, float x) { return x > -3.0f && x < 3.0f ? g / 6.0f : 0.0f; }); break;
    default: map2(dyp, tp, dx, n, [](float g, float y) { return g * y * (1.0f - y); }); break;
  }
  return out;
}

}  // namespace edgetl_kernels

EXECUTORCH_LIBRARY(edgetl_export, "activation.out", edgetl_kernels::activation_out);
EXECUTORCH_LIBRARY(edgetl_export, "exact_act.out", edgetl_kernels::activation_out);
EXECUTORCH_LIBRARY(edgetl_export, "exact_act_grad.out", edgetl_kernels::exact_act_grad_out);
EXECUTORCH_LIBRARY(edgetl_export, "mask_grad.out", edgetl_kernels::mask_grad_out);
EXECUTORCH_LIBRARY(edgetl_export, "packed_mask_grad.out", edgetl_kernels::packed_mask_grad_out);
