// Classes the device learns on its own: class folders a bundle exported with --spare-classes does
// not know take its spare outputs, and each new output starts from weight imprinting.
//
// Imprinting (after Qi et al., "Low-Shot Learning with Imprinted Weights", CVPR 2018): a new
// class's direction u is the mean of its photos' L2-normalised embeddings (train.pte's embed
// method: the classifier's input, through the frozen bottom and the top as trained so far) taken
// from the known classes' mean embedding (the manifest's embedding_mean; 0 without one),
// normalised. Its row is the active rows' mean (the part every class shares) plus u scaled to the
// mean norm of their own parts, and its bias makes an image at the centre score like an average
// class: logit(e) = shared . e + scale * u . (e - centre) + mean bias. Measured from the centre,
// not from 0: the embeddings follow ReLU-type activations, all of them point into the same
// orthant, and an uncentred row scores every photo high (benchmarks/personalise.py). That is a
// classifier for the new class before any training step (finetune --epochs 0 stops there).
#pragma once
#include <string>
#include <vector>

#include "bundle.h"
#include "runtime.h"

namespace edgetl {

// The subfolders of `data_dir` that are not in `known`, in sorted order, checked: each a plain
// class name (no control characters, not starting with '.', at most kMaxClassName bytes), and no
// more of them than the bundle's spare outputs left. DeviceError otherwise (nothing written yet).
std::vector<std::string> new_class_folders(const std::string& data_dir, const std::vector<std::string>& known, const Bundle& bundle);

constexpr size_t kMaxClassName = 128;

// The classifier tensors after imprinting `count[i]` images of new class i, whose features
// (the bottom's, one row per image, class i's rows at `first[i]` ..) are in `features`:
// the weight, bias and active tensors of `weights` (a .ptd) with the new rows set at `outputs`
// (the output each new class takes). Views point into `storage`.
std::vector<TensorView> imprint(const Bundle& bundle, const std::string& weights, const std::vector<float>& features,
                                const std::vector<size_t>& first, const std::vector<size_t>& count, const std::vector<size_t>& outputs,
                                std::vector<std::vector<char>>& storage);

}  // namespace edgetl
