// The on-device optimizers: torch.optim.SGD's rule (momentum, dampening, Nesterov) and
// torch.optim.AdamW's (decoupled decay, bias corrections, eps outside the square root, no
// amsgrad), behind one interface. Their state (SGD's momentum; AdamW's exp_avg, exp_avg_sq and
// step count) is exposed so it is saved with the weights and a resumed run continues exactly.
// Weight decay applies to the parameters the manifest lists (optimizer.weight_decay_parameters),
// never guessed from shapes here.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "bundle.h"
#include "runtime.h"

namespace edgetl {

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // Updates each parameter in place from its gradient (same order, same sizes as the names the
  // optimizer was built with); the gradients may be overwritten.
  virtual void step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads) = 0;
  // The state saved with the weights: buffers in a fixed order (each one parameter's size;
  // buffer i belongs to parameter i % parameters), empty while there is none.
  virtual const std::vector<std::vector<float>>& buffers() const = 0;
  // Restores saved buffers and the number of steps taken (empty buffers: a fresh state).
  virtual void restore(std::vector<std::vector<float>> buffers, int64_t steps) = 0;
  // Buffers per parameter in buffers(): SGD 1 with momentum (0 without), AdamW 2.
  virtual int buffers_per_parameter() const = 0;
  // state.json's key (and file stem) of the buffers file.
  virtual const char* state_key() const = 0;
  int64_t steps() const { return steps_; }
  const OptimizerOptions& options() const { return options_; }

 protected:
  Optimizer(const OptimizerOptions& options, const std::vector<std::string>& names);
  void check(const std::vector<TensorView>& params, const std::vector<TensorView>& grads) const;
  OptimizerOptions options_;
  std::vector<bool> decays_;  // per parameter, from options_.weight_decay_parameters
  int64_t steps_ = 0;
};

// DeviceError (one line) when `o` is not a usable setting: unknown name, lr <= 0, momentum or
// betas outside [0, 1), eps <= 0, negative weight decay, a decayed parameter the program lacks.
void check_options(const OptimizerOptions& o, const std::vector<std::string>& parameter_names);
// The optimizer `o` names over the program's parameters `names` (in the program's order).
std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& o, const std::vector<std::string>& names);

}  // namespace edgetl
