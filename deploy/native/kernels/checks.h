// Argument checks shared by edgetl's kernels: a kernel given tensors it cannot handle fails its
// ExecuTorch context (the method returns an error) instead of reading out of bounds.
#pragma once

#include <executorch/runtime/kernel/kernel_includes.h>

namespace edgetl_kernels {

// `ok`, after failing `ctx` with InvalidArgument when it is false
inline bool check(executorch::runtime::KernelRuntimeContext& ctx, bool ok) {
  if (!ok) ctx.fail(executorch::runtime::Error::InvalidArgument);
  return ok;
}

inline bool same_shape(const executorch::aten::Tensor& a, const executorch::aten::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (ssize_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

}  // namespace edgetl_kernels
