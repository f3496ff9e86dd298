#include "sgd.h"

#include "../kernels/threadpool.h"
#include "files.h"

namespace edgetl {

namespace {
// out = a + alpha * b, alpha applied in double: the arithmetic of ExecuTorch's add kernel with a
// double Scalar, which is what its SGD calls (matches it bit for bit).
inline float add_scaled(float a, double alpha, float b) { return static_cast<float>(a + alpha * b); }
}  // namespace

void Sgd::step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads) {
  if (params.size() != grads.size()) throw DeviceError("SGD: parameters and gradients differ in number");
  const auto& o = options_;
  const bool first = o.momentum != 0.0 && momentum_.empty();
  if (first) momentum_.resize(params.size());
  if (o.momentum != 0.0 && momentum_.size() != params.size()) throw DeviceError("SGD: momentum state does not match the parameters");
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel != grads[i].numel || params[i].dtype != "float32" || grads[i].dtype != "float32")
      throw DeviceError("SGD: parameter " + params[i].name + " and its gradient do not match");
    float* p = params[i].f32();
    float* d = grads[i].f32();
    const size_t n = params[i].numel;
    float* m = nullptr;
    bool seed = false;  // the first step seeds the momentum buffer with the gradient
    if (o.momentum != 0.0) {
      auto& buf = momentum_[i];
      seed = buf.empty();
      if (seed) buf.resize(n);
      if (buf.size() != n) throw DeviceError("SGD: momentum buffer of " + params[i].name + " has the wrong size");
      m = buf.data();
    }
    // In chunks over the thread pool, each chunk's passes in cache: every element's arithmetic is
    // torch.optim.SGD's, in its order, whatever the chunking; each loop vectorises.
    edgetl_kernels::parallel_ranges(static_cast<int64_t>(n), 16384, [&](int64_t b, int64_t e) {
      const float* u = d;  // the update direction
      if (o.weight_decay != 0.0)
        for (int64_t k = b; k < e; ++k) d[k] = add_scaled(d[k], o.weight_decay, p[k]);
      if (m != nullptr) {
        if (seed)
          for (int64_t k = b; k < e; ++k) m[k] = d[k];
        else
          for (int64_t k = b; k < e; ++k) m[k] = add_scaled(static_cast<float>(m[k] * o.momentum), 1.0 - o.dampening, d[k]);
        if (o.nesterov)
          for (int64_t k = b; k < e; ++k) d[k] = add_scaled(d[k], o.momentum, m[k]);
        else u = m;
      }
      for (int64_t k = b; k < e; ++k) p[k] = add_scaled(p[k], -o.lr, u[k]);
    });
  }
}

}  // namespace edgetl
