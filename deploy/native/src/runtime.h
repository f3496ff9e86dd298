// The one module that touches ExecuTorch's C++ API (written against the 1.5 wheel's runtime).
//
// A training program's joint method returns [user outputs..., gradients..., parameters...]; the
// parameters are the live weights in the method's memory, so an optimizer updating them in place
// trains the program. The layout is read from the program's metadata methods
// (__et_training_fqn_<method>) and the method's output count, as ExecuTorch's TrainingModule
// does, but derived from the count (edgetl's exporter corrects ExecuTorch 1.5's off-by-N index
// metadata; the derivation is right for either).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace edgetl {

// A tensor in a program's memory: a view, valid until the method that returned it runs again.
struct TensorView {
  std::string name;
  void* data = nullptr;
  size_t nbytes = 0;
  size_t numel = 0;
  std::string dtype;  // numpy spelling: "float32", "int64", ...
  float* f32() const { return static_cast<float*>(data); }
};

// Routes ExecuTorch's log lines to stderr only when `verbose` (our own errors say what failed).
void init_runtime(bool verbose);
// Threads of ExecuTorch's shared pool (XNNPACK, the optimized kernels and edgetl's kernels).
void set_threads(unsigned n);
// DeviceError naming the operators of `program` that no kernel linked into this runner implements
// (a bundle exported by an edgetl whose kernels this build lacks), before anything runs.
void require_kernels(const std::vector<std::string>& operators, const std::string& program);

class Program {
 public:
  // Loads `pte` (memory-mapped) and, if given, its external data `ptd`.
  explicit Program(const std::string& pte, const std::string& ptd = "");
  ~Program();
  Program(const Program&) = delete;
  Program& operator=(const Program&) = delete;

  // Runs `method` on one float32 input of `shape`; returns output 0 (copied).
  std::vector<float> run(const std::string& method, float* input, const std::vector<int64_t>& shape);
  // Loads `method` (done by run() otherwise): where a mismatched weights file is found.
  void load_method(const std::string& method);

 private:
  friend class TrainingSession;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class TrainingSession {
 public:
  TrainingSession(const std::string& pte, const std::string& ptd, const std::vector<std::string>& buffer_names,
                  const std::string& method = "forward");
  ~TrainingSession();

  // One forward and backward pass on a batch; returns the loss, fills `logits` (batch x classes).
  float step(float* features, const std::vector<int64_t>& feature_shape, int64_t* labels, std::vector<float>* logits);
  // After the first step: the live parameters (in the program's order), the last step's
  // gradients, and the running statistics after it (named by `buffer_names`).
  const std::vector<TensorView>& parameters() const { return params_; }
  const std::vector<TensorView>& gradients() const { return grads_; }
  const std::vector<TensorView>& buffers() const { return buffers_; }
  const std::vector<std::string>& parameter_names() const { return names_; }

 private:
  Program program_;
  std::string method_;
  std::vector<std::string> names_, buffer_names_;
  size_t num_user_outputs_ = 0;
  std::vector<TensorView> params_, grads_, buffers_;
};

}  // namespace edgetl
