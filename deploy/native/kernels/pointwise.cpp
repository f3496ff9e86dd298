// edgetl's native kernels for the 1x1 convolutions of the training program (NHWC: a 1x1
// convolution is a matrix product over pixels x channels), registered as `edgetl_export::*.out`:
//
//   forward         y[M x Cout]  = x[M x Cin]   w^T   (w: Cout x Cin x 1 x 1, or Cout x Cin: a linear layer)
//   input gradient  dx[M x Cin]  = dy[M x Cout] w
//   weight gradient dw[Cout x Cin] = dy^T x
//
// Each is one call of edgetl's GEMM with the transposed operand read in place: no permute_copy
// of the activations and no squeeze copy of the weight, which ExecuTorch's mm would need.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "checks.h"
#include "gemm.h"

namespace edgetl_kernels {

using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

// Cout x Cin x 1 x 1 or Cout x Cin: read as Cout x Cin either way
bool is_pointwise_weight(const Tensor& w) { return w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1); }

}  // namespace

Tensor& pointwise_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, Tensor& out) {
  if (!check(ctx, x.dim() == 2 && is_pointwise_weight(weight) && x.size(1) == weight.size(1) && out.dim() == 2 &&
                      out.size(0) == x.size(0) && out.size(1) == weight.size(0)))
    return out;
  const int64_t m = x.size(0), cin = x.size(1), cout = weight.size(0);
  sgemm(m, cout, cin, {x.const_data_ptr<float>(), cin, false}, {weight.const_data_ptr<float>(), cin, true}, out.mutable_data_ptr<float>(),
        cout);
  return out;
}

Tensor& pointwise_grad_input_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& weight, Tensor& out) {
  if (!check(ctx, dy.dim() == 2 && is_pointwise_weight(weight) && dy.size(1) == weight.size(0) && out.dim() == 2 &&
                      out.size(0) == dy.size(0) && out.size(1) == weight.size(1)))
    return out;
  const int64_t m = dy.size(0), cout = weight.size(0), cin = weight.size(1);
  sgemm(m, cin, cout, {dy.const_data_ptr<float>(), cout, false}, {weight.const_data_ptr<float>(), cin, false},
        out.mutable_data_ptr<float>(), cin);
  return out;
}

Tensor& pointwise_grad_weight_out(KernelRuntimeContext& ctx, const Tensor& dy, const Tensor& x, int64_t rank, Tensor& out) {
  if (!check(ctx, dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0) && is_pointwise_weight(out) && out.dim() == rank &&
                      out.size(0) == dy.size(1) && out.size(1) == x.size(1)))
    return out;
  const int64_t m = dy.size(0), cout = dy.size(1), cin = x.size(1);
  sgemm(cout, cin, m, {dy.const_data_ptr<float>(), cout, true}, {x.const_data_ptr<float>(), cin, false}, out.mutable_data_ptr<float>(),
        cin);
  return out;
}

}  // namespace edgetl_kernels

EXECUTORCH_LIBRARY(edgetl_export, "pointwise_nhwc.out", edgetl_kernels::pointwise_out);
EXECUTORCH_LIBRARY(edgetl_export, "pointwise_grad_input.out", edgetl_kernels::pointwise_grad_input_out);
EXECUTORCH_LIBRARY(edgetl_export, "pointwise_grad_weight.out", edgetl_kernels::pointwise_grad_weight_out);
