// The state directory of an on-device fine-tuning run: what is saved after every epoch, how a run
// resumes, and which weights `classify --trained` uses.
//
//   state.json             epoch, history, the bundle it belongs to, the files below (the commit point)
//   weights-epochNNNN.ptd  a complete train.ptd: trainable parameters and running statistics
//   momentum-epochNNNN.bin SGD momentum buffers, float32, in the program's parameter order
//   trained.ptd            the last weights under a stable name (a hard link)
//
// `import-weights` starts a directory at epoch 0 with given weights (weights-epoch0000.ptd): a
// fleet client trains each round from the server's tensors that way.
//
// Every file is written atomically (temporary file, fsync, rename); state.json is written after
// the files it names, so a crash at any point leaves the previous epoch's state intact.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bundle.h"
#include "runtime.h"

namespace edgetl {

class StateDir {
 public:
  // Reads `dir`/state.json when present; DeviceError if it belongs to another bundle.
  StateDir(std::string dir, const Bundle& bundle);

  int epoch() const { return state_.value("epoch", 0); }
  // The weights to start from: the last saved epoch's, else the bundle's train.ptd.
  std::string weights_path() const;
  // Saved momentum buffers (empty when none were saved: the run starts with zero momentum).
  std::vector<std::vector<float>> momentum(const std::vector<std::string>& parameter_names) const;
  // Writes the weights and momentum of epoch `epoch`, then state.json with `row` appended to the history.
  void save_epoch(int epoch, const TrainingSession& session, const std::vector<std::vector<float>>& momentum, const nlohmann::json& row);
  // Starts the run from `tensors` laid over the bundle's train.ptd, as epoch 0 (import-weights):
  // finetune then trains from them. DeviceError if the directory already holds weights.
  void start_from(const std::vector<TensorView>& tensors);
  // Adds `key` to the last history row (e.g. the validation accuracy measured with the saved weights).
  void annotate_last(const std::string& key, double value);

 private:
  std::string dir_;
  const Bundle& bundle_;
  nlohmann::json state_;
};

// The weights `classify --trained PATH` means: a .ptd file, or a state directory's last saved weights.
std::string trained_weights(const std::string& path, const Bundle& bundle);

// Atomically writes `path`: the .ptd `base` with the named tensors over their slots, streamed
// (the weights are never held twice in memory).
void write_ptd(const std::string& path, const std::string& base, const std::map<std::string, TensorSlot>& layout,
               const std::vector<TensorView>& tensors);

}  // namespace edgetl
