// An export bundle as the device sees it: the manifest's fields this runner needs (mirrored from
// edgetl/exporter, not shared code), with every file checked against its sha256 before use.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "image.h"

namespace edgetl {

// Where one named tensor's bytes are in train.ptd.
struct TensorSlot {
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  std::string dtype;
  std::vector<int64_t> shape;
};

// The manifest's programs.training.optimizer: SGD's or AdamW's settings (each reads its own).
struct OptimizerOptions {
  std::string name = "sgd";  // "sgd" or "adamw"
  double lr = 0.0, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::vector<std::string> weight_decay_parameters;  // the parameters weight decay applies to
};

struct TrainingSpec {
  std::string pte, ptd;  // file names inside the bundle
  int batch_size = 0;
  std::vector<int64_t> feature_shape;             // N x C x H x W, N = batch_size
  std::vector<std::string> trainable_parameters;  // in the program's order
  std::vector<std::string> buffers;               // running statistics, in forward's output order
  std::map<std::string, TensorSlot> weights_layout;
  OptimizerOptions optimizer;
  std::vector<std::string> custom_operators;  // edgetl kernels the program calls (edgetl_export::*.out)
  // Outputs beyond the known classes (edgetl export --spare-classes), assigned by the device to
  // classes it learns: the classifier's rows (`weight`, `bias`) and the 0/1 `active` vector in the
  // weights file; `embed` returns `embedding_size` floats per image. count 0: none.
  struct Spare {
    int count = 0;
    std::string weight, bias, active;
    int64_t embedding_size = 0;
    std::vector<float> embedding_mean;  // the known classes' mean embedding (empty: imprint from 0)
  } spare;
  size_t outputs = 0;  // the logits' width: the known classes and the spare outputs
};

class Bundle {
 public:
  // Reads `dir`/manifest.json, checks it against its own manifest_sha256 (written by the exporter:
  // the sha256 of the file without its "manifest_sha256" line) and every listed file against its sha256.
  explicit Bundle(const std::string& dir);

  std::string file(const std::string& name) const;  // path of a bundle file
  const TrainingSpec& training() const;             // DeviceError when the bundle has no training program

  std::string dir;
  nlohmann::json manifest;
  std::vector<std::string> classes;
  InputSpec input{};
  std::string inference_pte, bottom_pte;
  std::string ptd_sha256;  // of train.ptd
  // The bundle's identity: manifest.json's own checksum, which covers every file's sha256, the
  // classes, the model and the optimizer. A state directory is bound to it.
  std::string manifest_sha256;
  std::string model_name;

 private:
  std::string listed_file(const std::string& mpath, const std::string& name, const char* key) const;
  bool has_training_ = false;
  TrainingSpec training_;
};

}  // namespace edgetl
