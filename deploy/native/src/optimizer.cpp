#include "optimizer.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "../kernels/threadpool.h"
#include "files.h"

namespace edgetl {

namespace {
// out = a + alpha * b, alpha applied in double: the arithmetic of ExecuTorch's add kernel with a
// double Scalar, which is what its SGD calls (matches it bit for bit).
inline float add_scaled(float a, double alpha, float b) { return static_cast<float>(a + alpha * b); }

constexpr int64_t kChunk = 16384;  // elements per pool task: each chunk's passes stay in cache

class Sgd final : public Optimizer {
 public:
  Sgd(const OptimizerOptions& o, const std::vector<std::string>& names) : Optimizer(o, names) {}

  void step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads) override {
    check(params, grads);
    const auto& o = options_;
    if (o.momentum != 0.0 && momentum_.empty()) momentum_.resize(params.size());
    if (o.momentum != 0.0 && momentum_.size() != params.size()) throw DeviceError("SGD: momentum state does not match the parameters");
    for (size_t i = 0; i < params.size(); ++i) {
      float* p = params[i].f32();
      float* d = grads[i].f32();
      const size_t n = params[i].numel;
      const double wd = decays_[i] ? o.weight_decay : 0.0;
      float* m = nullptr;
      bool seed = false;  // the first step seeds the momentum buffer with the gradient
      if (o.momentum != 0.0) {
        auto& buf = momentum_[i];
        seed = buf.empty();
        if (seed) buf.resize(n);
        if (buf.size() != n) throw DeviceError("SGD: momentum buffer of " + params[i].name + " has the wrong size");
        m = buf.data();
      }
      // every element's arithmetic is torch.optim.SGD's, in its order, whatever the chunking
      edgetl_kernels::parallel_ranges(static_cast<int64_t>(n), kChunk, [&](int64_t b, int64_t e) {
        const float* u = d;  // the update direction
        if (wd != 0.0)
          for (int64_t k = b; k < e; ++k) d[k] = add_scaled(d[k], wd, p[k]);
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
    ++steps_;
  }
  const std::vector<std::vector<float>>& buffers() const override { return momentum_; }
  void restore(std::vector<std::vector<float>> buffers, int64_t steps) override {
    momentum_ = std::move(buffers);
    steps_ = steps;
  }
  int buffers_per_parameter() const override { return options_.momentum != 0.0 ? 1 : 0; }
  const char* state_key() const override { return "momentum"; }

 private:
  std::vector<std::vector<float>> momentum_;
};

// torch.optim.AdamW's single-tensor step, its scalars computed in double and applied in float
// as its float32 kernels do: p *= 1 - lr*wd; m += (1-b1)(g - m); v = v*b2 + (1-b2) g^2;
// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
class AdamW final : public Optimizer {
 public:
  AdamW(const OptimizerOptions& o, const std::vector<std::string>& names) : Optimizer(o, names) {}

  void step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads) override {
    check(params, grads);
    const auto& o = options_;
    const size_t np = params.size();
    if (state_.empty()) {
      state_.resize(2 * np);
      for (size_t i = 0; i < np; ++i) state_[i].assign(params[i].numel, 0.0f), state_[np + i].assign(params[i].numel, 0.0f);
    }
    if (state_.size() != 2 * np) throw DeviceError("AdamW: its state does not match the parameters");
    const int64_t t = steps_ + 1;
    const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(t));
    const float neg_step = static_cast<float>(-(o.lr / bc1)), bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    const float one_b1 = static_cast<float>(1.0 - o.beta1), b2 = static_cast<float>(o.beta2), one_b2 = static_cast<float>(1.0 - o.beta2);
    const float eps = static_cast<float>(o.eps);
    for (size_t i = 0; i < np; ++i) {
      float* p = params[i].f32();
      const float* g = grads[i].f32();
      const size_t n = params[i].numel;
      if (state_[i].size() != n || state_[np + i].size() != n)
        throw DeviceError("AdamW: state of " + params[i].name + " has the wrong size");
      float* m = state_[i].data();
      float* v = state_[np + i].data();
      const float decay = static_cast<float>(1.0 - o.lr * (decays_[i] ? o.weight_decay : 0.0));
      edgetl_kernels::parallel_ranges(static_cast<int64_t>(n), kChunk, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const float pk = p[k] * decay;
          const float mk = m[k] + one_b1 * (g[k] - m[k]);
          const float vk = v[k] * b2 + one_b2 * g[k] * g[k];
          m[k] = mk, v[k] = vk;
          p[k] = pk + neg_step * (mk / (std::sqrt(vk) / bc2_sqrt + eps));
        }
      });
    }
    ++steps_;
  }
  const std::vector<std::vector<float>>& buffers() const override { return state_; }
  void restore(std::vector<std::vector<float>> buffers, int64_t steps) override {
    state_ = std::move(buffers);
    steps_ = steps;
  }
  int buffers_per_parameter() const override { return 2; }
  const char* state_key() const override { return "adamw_moments"; }

 private:
  std::vector<std::vector<float>> state_;  // exp_avg of every parameter, then exp_avg_sq of every parameter
};

bool unit_interval(double x) { return std::isfinite(x) && x >= 0 && x < 1; }
}  // namespace

Optimizer::Optimizer(const OptimizerOptions& options, const std::vector<std::string>& names) : options_(options) {
  check_options(options, names);
  const std::set<std::string> decayed(options.weight_decay_parameters.begin(), options.weight_decay_parameters.end());
  for (const auto& name : names) decays_.push_back(decayed.count(name) > 0);
}

void Optimizer::check(const std::vector<TensorView>& params, const std::vector<TensorView>& grads) const {
  if (params.size() != grads.size() || params.size() != decays_.size())
    throw DeviceError(options_.name + ": parameters and gradients differ in number");
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].numel != grads[i].numel || params[i].dtype != "float32" || grads[i].dtype != "float32")
      throw DeviceError(options_.name + ": parameter " + params[i].name + " and its gradient do not match");
}

void check_options(const OptimizerOptions& o, const std::vector<std::string>& names) {
  if (o.name != "sgd" && o.name != "adamw") throw DeviceError("unknown optimizer '" + o.name + "'; expected sgd or adamw");
  if (!(o.lr > 0 && std::isfinite(o.lr))) throw DeviceError("--lr must be a positive number");
  if (!(o.weight_decay >= 0 && std::isfinite(o.weight_decay))) throw DeviceError("--weight-decay must be >= 0");
  if (o.name == "sgd" && !unit_interval(o.momentum)) throw DeviceError("--momentum must be in [0, 1)");
  if (o.name == "adamw" && !(unit_interval(o.beta1) && unit_interval(o.beta2))) throw DeviceError("--betas must both be in [0, 1)");
  if (o.name == "adamw" && !(o.eps > 0 && std::isfinite(o.eps))) throw DeviceError("--eps must be a positive number");
  for (const auto& name : o.weight_decay_parameters)
    if (std::find(names.begin(), names.end(), name) == names.end())
      throw DeviceError("optimizer.weight_decay_parameters names " + name + ", which the training program does not train");
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& o, const std::vector<std::string>& names) {
  if (o.name == "adamw") return std::make_unique<AdamW>(o, names);
  if (o.name == "sgd") return std::make_unique<Sgd>(o, names);
  check_options(o, names);  // throws: unknown name
  return nullptr;
}

}  // namespace edgetl
