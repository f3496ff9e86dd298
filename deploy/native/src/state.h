// The state directory of an on-device fine-tuning run: what is saved after every epoch, how a run
// resumes, and which weights `classify --trained` uses.
//
//   state.json             epoch, history, the bundle it belongs to, the files below (the commit point)
//   weights-epochNNNN.ptd  a complete train.ptd: trainable parameters and running statistics
//   momentum-epochNNNN.bin SGD momentum buffers, float32, in the program's parameter order
//   adamw_moments-epochNNNN.bin  AdamW's exp_avg of every parameter, then its exp_avg_sq of every
//                          parameter, float32, in the program's parameter order
//   trained.ptd            the last weights under a stable name (a hard link)
//   weights-epochNNNN-classesMMMM.ptd  the weights after classes were added at epoch NNNN (M classes)
//   .edgetl.lock           held (flock) by the one process writing the directory; its pid inside
//
// state.json records the sha256 of the weights and optimizer files it names (weights_sha256,
// momentum_sha256, adamw_moments_sha256), checked before either is used, the optimizer that
// trained it (optimizer: a resume with another is refused) and its steps (optimizer_steps); its names are plain names inside the directory
// and its epoch lies in [0, kMaxEpochs]. Only the last epoch's files are kept (a device has little
// disk), so damaged weights have no earlier epoch to fall back to: the error says so.
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
#include "files.h"
#include "optimizer.h"
#include "runtime.h"

namespace edgetl {

// The most epochs a run may train (--epochs) and a state.json may record.
constexpr int kMaxEpochs = 1000000;

class StateDir {
 public:
  // Locks `dir` (DirLock) and reads `dir`/state.json when present; DeviceError if another process
  // writes it, if it belongs to another bundle or if its fields are invalid.
  StateDir(std::string dir, const Bundle& bundle);

  int epoch() const { return state_.value("epoch", 0); }
  // The weights to start from: the last saved epoch's (checked against weights_sha256), else the bundle's train.ptd.
  std::string weights_path() const;
  // The optimizer the saved epochs were trained with (states that name none were trained with SGD).
  std::string optimizer() const { return state_.value("optimizer", std::string("sgd")); }
  int64_t optimizer_steps() const { return state_.value("optimizer_steps", int64_t{0}); }
  // The optimizer buffers saved under `key` (Optimizer::state_key), one per name in `names`
  // (sized by its weights slot; a name may repeat), empty when none were saved.
  std::vector<std::vector<float>> optimizer_buffers(const std::string& key, const std::vector<std::string>& names) const;
  // Writes the weights and the optimizer's state of epoch `epoch`, then state.json with `row` appended to the history.
  void save_epoch(int epoch, const TrainingSession& session, const Optimizer& optimizer, const nlohmann::json& row);
  // Starts the run from `tensors` laid over the bundle's train.ptd, as epoch 0 (import-weights):
  // finetune then trains from them. DeviceError if the directory already holds weights.
  void start_from(const std::vector<TensorView>& tensors);
  // Adds `key` to the last history row (e.g. the validation accuracy measured with the saved weights).
  void annotate_last(const std::string& key, double value);
  // The device's classes: the bundle's, then those the device added (the outputs they own, in order).
  std::vector<std::string> classes() const { return state_["classes"].get<std::vector<std::string>>(); }
  // Records classes `added` (with the number of images each was imprinted from) and the weights
  // that hold their rows (`tensors` over the current weights), as one commit.
  void add_classes(const std::vector<std::string>& added, const std::vector<size_t>& images, const std::vector<TensorView>& tensors);

 private:
  // Names the written weights file `wname` in `next` (with its sha256), writes state.json (the
  // commit point) and links trained.ptd to it.
  void commit_weights(nlohmann::json next, const std::string& wname);

  std::string dir_;
  DirLock lock_;  // before anything reads or writes the directory
  const Bundle& bundle_;
  nlohmann::json state_;
  mutable std::string verified_;  // the weights file whose sha256 has been checked (or that this process wrote)
};

// The weights `classify --trained PATH` means: a .ptd file, or a state directory's last saved weights.
std::string trained_weights(const std::string& path, const Bundle& bundle);
// The class names of the weights `classify --trained PATH` means: its state.json's (with the
// classes the device added), else the bundle's.
std::vector<std::string> trained_classes(const std::string& path, const Bundle& bundle);
// The classes `dir`/state.json records (the bundle's when there is none), read without the lock:
// finetune's first look at its data, before it takes the directory.
std::vector<std::string> recorded_classes(const std::string& dir, const Bundle& bundle);

// The bytes of one tensor of a .ptd file.
std::vector<char> read_ptd_tensor(const std::string& ptd, const TensorSlot& slot);

// Atomically writes `path`: the .ptd `base` with the named tensors over their slots, streamed
// (the weights are never held twice in memory).
void write_ptd(const std::string& path, const std::string& base, const std::map<std::string, TensorSlot>& layout,
               const std::vector<TensorView>& tensors);

}  // namespace edgetl
