// SGD with momentum, dampening, weight decay and Nesterov: the rule of torch.optim.SGD and of
// ExecuTorch's extension/training SGD (which the wheel does not ship), with its momentum buffers
// exposed so they are saved with the weights and a resumed run continues exactly.
#pragma once
#include <string>
#include <vector>

#include "bundle.h"
#include "runtime.h"

namespace edgetl {

class Sgd {
 public:
  explicit Sgd(const SgdOptions& options) : options_(options) {}
  // Updates each parameter in place from its gradient (same order, same sizes); the gradients are
  // overwritten (weight decay is added into them, as ExecuTorch's SGD does).
  void step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads);
  // One buffer per parameter once momentum is in use; empty before the first step.
  const std::vector<std::vector<float>>& momentum_buffers() const { return momentum_; }
  void set_momentum_buffers(std::vector<std::vector<float>> buffers) { momentum_ = std::move(buffers); }

 private:
  SgdOptions options_;
  std::vector<std::vector<float>> momentum_;
};

}  // namespace edgetl
