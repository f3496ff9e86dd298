#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <numeric>

#include "commands.h"
#include "files.h"
#include "memory.h"
#include "new_classes.h"
#include "optimizer.h"
#include "random.h"
#include "replay.h"
#include "runtime.h"
#include "state.h"

namespace edgetl {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The order of epoch `epoch` (0-based): Fisher-Yates driven by splitmix64 seeded with
// seed * 1000003 + epoch, so it depends on (seed, epoch) only and a resumed run repeats it.
std::vector<size_t> epoch_order(size_t n, uint64_t seed, int epoch) {
  SplitMix64 rng{seed * 1000003ULL + static_cast<uint64_t>(epoch)};
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  for (size_t i = n; i > 1; --i) std::swap(order[i - 1], order[rng.next() % i]);
  return order;
}

// Bottom features of every training image, computed once: in memory within the budget, else in
// a file mapped read-only (its pages are file-backed, so the kernel can drop and re-read them
// under memory pressure instead of the process being killed).
class FeatureStore {
 public:
  FeatureStore(size_t count, size_t per_feature, int64_t budget, const std::string& dir) : per_(per_feature) {
    size_t bytes = count * per_feature * sizeof(float);
    if (static_cast<int64_t>(bytes) <= budget) {
      memory_.resize(count * per_feature);
      data_ = memory_.data();
      return;
    }
    path_ = join(dir, ".features.cache");
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd_ < 0) throw DeviceError("cannot create the feature cache " + path_ + ": " + std::strerror(errno));
    // Reserve every block now: a sparse file's pages would fail when first written on a full
    // disk, and a mapped page that cannot be backed is SIGBUS (a "Bus error"), not an error line.
    if (int err = ::posix_fallocate(fd_, 0, static_cast<off_t>(bytes)); err != 0)
      fail("cannot reserve " + std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB for the feature cache " + path_ + ": " +
           std::strerror(err) + " (free disk space, or raise --feature-budget to keep the features in memory)");
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (p == MAP_FAILED) fail("cannot map the feature cache " + path_ + ": " + std::strerror(errno));
    data_ = static_cast<float*>(p);
    mapped_ = bytes;
  }
  ~FeatureStore() {
    if (mapped_) ::munmap(data_, mapped_);
    if (fd_ >= 0) ::close(fd_);
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  float* row(size_t i) { return data_ + i * per_; }
  bool on_disk() const { return mapped_ != 0; }

 private:
  // A constructor that throws runs no destructor: close and remove the file here.
  [[noreturn]] void fail(const std::string& message) {
    ::close(fd_);
    ::unlink(path_.c_str());
    throw DeviceError(message);
  }
  size_t per_;
  std::vector<float> memory_;
  float* data_ = nullptr;
  std::string path_;
  int fd_ = -1;
  size_t mapped_ = 0;
};

struct Dataset {
  std::vector<std::string> paths;
  std::vector<int64_t> labels;
};

Dataset read_folder(const std::string& dir, const std::vector<std::string>& classes, const char* what) {
  if (!is_dir(dir)) throw DeviceError(std::string(what) + " folder " + dir + " does not exist");
  Dataset d;
  for (const auto& sub : subdirectories(dir)) {
    auto it = std::find(classes.begin(), classes.end(), sub);
    if (it == classes.end()) {
      std::string known;
      for (const auto& c : classes) known += (known.empty() ? "" : ", ") + c;
      throw DeviceError("folder " + join(dir, sub) + " is not one of the bundle's classes (" + known + ")");
    }
    for (const auto& p : list_images(join(dir, sub))) {
      d.paths.push_back(p);
      d.labels.push_back(it - classes.begin());
    }
  }
  if (d.paths.empty()) throw DeviceError(std::string("no images in ") + dir + " (expected one subfolder per class)");
  return d;
}

// A field of /proc/self/status in bytes (Linux; 0 elsewhere), e.g. "VmHWM:", the peak RSS.
uint64_t proc_status_bytes(const char* key) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(key, 0) == 0) return static_cast<uint64_t>(std::atoll(line.c_str() + std::strlen(key))) * 1024;
  return 0;
}

}  // namespace

void log_memory(bool on, const char* phase) {
  if (!on) return;
  std::fprintf(stderr, "memory after %s: rss %.1f MiB, peak %.1f MiB\n", phase, proc_status_bytes("VmRSS:") / 1048576.0,
               proc_status_bytes("VmHWM:") / 1048576.0);
}

namespace {

// Keeps the entries of `d` at `kept` (the readable images), in order.
void keep(Dataset& d, const std::vector<size_t>& kept) {
  Dataset out;
  for (size_t i : kept) out.paths.push_back(d.paths[i]), out.labels.push_back(d.labels[i]);
  d = std::move(out);
}

void flip_horizontally(float* image, int size) {
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < size; ++y) std::reverse(image + (c * size + y) * size, image + (c * size + y + 1) * size);
}

// Top-1 accuracy of the weights in `weights` on cached features (train.pte's predict method).
double accuracy_of(const Bundle& bundle, const std::string& weights, std::vector<float>& features, const std::vector<int64_t>& labels) {
  const auto& t = bundle.training();
  Program top(bundle.file(t.pte), weights);
  const size_t batch = t.batch_size, classes = t.outputs, per = numel_per_item(t.feature_shape);
  size_t correct = 0;
  for (size_t start = 0; start < labels.size(); start += batch) {
    auto logits = top.run("predict", features.data() + start * per, t.feature_shape);
    for (size_t i = 0; i < std::min(batch, labels.size() - start); ++i) {
      const float* z = logits.data() + i * classes;
      correct += static_cast<int64_t>(std::max_element(z, z + classes) - z) == labels[start + i];
    }
  }
  return static_cast<double>(correct) / labels.size();
}

// Gives each new class (labels known, known + 1, ...) its output, imprinted from its readable
// images in `train`, and commits the classes and their rows to the state directory.
void add_classes(Program& bottom, const Bundle& bundle, StateDir& state, const Dataset& train, size_t known,
                 const std::vector<std::string>& added) {
  const TrainingSpec& t = bundle.training();
  const size_t per = numel_per_item(t.feature_shape), batch = t.batch_size;
  std::vector<float> features;
  std::vector<size_t> first, count, outputs;
  for (size_t c = 0; c < added.size(); ++c) {
    std::vector<std::string> paths;
    for (size_t i = 0; i < train.paths.size(); ++i)
      if (train.labels[i] == static_cast<int64_t>(known + c)) paths.push_back(train.paths[i]);
    if (paths.empty()) throw DeviceError("new class " + added[c] + " has no readable image; nothing was written");
    const size_t base = features.size();
    features.resize(base + ((paths.size() + batch - 1) / batch) * batch * per);
    const size_t kept =
        bottom_features(bottom, paths, bundle.input, t.feature_shape, [&](size_t k) { return features.data() + base + k * per; }).size();
    features.resize(base + kept * per);
    first.push_back(base / per);
    count.push_back(kept);
    outputs.push_back(known + c);
  }
  std::vector<std::vector<char>> storage;
  state.add_classes(added, count, imprint(bundle, state.weights_path(), features, first, count, outputs, storage));
  for (size_t c = 0; c < added.size(); ++c)
    std::cout << "new class " << added[c] << ": output " << outputs[c] << ", imprinted from " << count[c] << " images" << std::endl;
}

}  // namespace

int finetune(const Bundle& bundle, const FinetuneOptions& o) {
  const TrainingSpec& t = bundle.training();
  require_kernels(t.custom_operators, t.pte);
  if (o.epochs < 0) throw DeviceError("--epochs must be at least 0");
  if (o.batch_size && *o.batch_size != t.batch_size)
    throw DeviceError("the training program was exported for batch " + std::to_string(t.batch_size) +
                      " (static shapes); re-export with 'edgetl export --training --batch-size " + std::to_string(*o.batch_size) + "'");
  OptimizerOptions opt = t.optimizer;
  if (o.optimizer && *o.optimizer != opt.name) {  // another optimizer: its own defaults, the bundle's lr and decay
    opt = OptimizerOptions();
    opt.name = *o.optimizer, opt.lr = t.optimizer.lr;
    opt.weight_decay = t.optimizer.weight_decay;
    opt.weight_decay_parameters = t.optimizer.weight_decay_parameters;
  }
  if (o.lr) opt.lr = *o.lr;
  if (o.momentum) opt.momentum = *o.momentum;
  if (o.weight_decay) opt.weight_decay = *o.weight_decay;
  if (o.betas) opt.beta1 = o.betas->first, opt.beta2 = o.betas->second;
  if (o.eps) opt.eps = *o.eps;
  if (opt.name == "sgd" && (o.betas || o.eps)) throw DeviceError("--betas and --eps are AdamW's; this run uses SGD (--optimizer adamw)");
  if (opt.name == "adamw" && o.momentum) throw DeviceError("--momentum is SGD's; this run uses AdamW (--betas sets its moments)");
  check_options(opt, t.trainable_parameters);

  // replay rows of the known classes are mixed into every batch (replay.h); the data's own fill the rest
  const double ratio = o.replay_ratio.value_or(ReplaySet::in(bundle) ? kDefaultReplayRatio : 0.0);
  const ReplaySet replay = ratio > 0 && ReplaySet::in(bundle) ? ReplaySet(bundle) : ReplaySet();
  const size_t replay_rows = replay_rows_per_batch(t.batch_size, ratio, replay), data_rows = t.batch_size - replay_rows;

  // the device's classes so far (the bundle's and those it added), then the data's new ones
  const std::vector<std::string> known = recorded_classes(o.state, bundle);
  const std::vector<std::string> added = new_class_folders(o.data, known, bundle);
  if (o.epochs == 0 && added.empty())
    throw DeviceError("--epochs 0 only imprints new classes, and " + o.data +
                      " has none (every folder is a known class): give --epochs N to train");
  std::vector<std::string> classes = known;
  classes.insert(classes.end(), added.begin(), added.end());
  Dataset train = read_folder(o.data, classes, "data");
  Dataset val;
  if (!o.val.empty()) val = read_folder(o.val, classes, "validation");
  const std::optional<MemoryNeed> need =
      fine_tune_need(bundle, train.paths.size(), make_optimizer(opt, t.trainable_parameters)->buffers_per_parameter(), o.feature_budget,
                     replay_rows ? ReplaySet::bytes_of(bundle) : 0);
  const std::optional<MemoryLimit> limit = memory_limit(o.memory_limit);
  if (limit && need) check_fits(*need, *limit, train.paths.size());
  if (limit && !need && o.memory_limit)
    throw DeviceError("the bundle's manifest states no memory need (memory.native_runtime_bytes): export it again to check --memory-limit");
  if (o.verbose && need && limit)
    std::fprintf(stderr, "memory: fine-tuning needs %.2f MiB, limit %.2f MiB (%s)\n", need->total() / 1048576.0, limit->bytes / 1048576.0,
                 limit->source.c_str());
  else if (o.verbose && need) std::fprintf(stderr, "memory: fine-tuning needs %.2f MiB, no memory limit\n", need->total() / 1048576.0);
  ensure_writable_dir(o.state);
  StateDir state(o.state, bundle);
  if (state.classes() != known) throw DeviceError(o.state + " changed while finetune started (another process?): run it again");
  const int start = state.epoch();
  if (start > 0 && state.optimizer() != opt.name)
    throw DeviceError(o.state + " was trained with " + state.optimizer() + ", not " + opt.name + ": resume it with --optimizer " +
                      state.optimizer() + " or use another --state directory");
  if (start >= o.epochs && added.empty()) {
    std::cout << "already trained for " << start << " epoch(s); nothing to do (raise --epochs to continue)\n";
    return 0;
  }

  const size_t batch = t.batch_size, per_feature = numel_per_item(t.feature_shape);
  const size_t per_image = image_floats(bundle.input);
  log_memory(o.verbose, "start");
  auto bottom = std::make_unique<Program>(bundle.file(bundle.bottom_pte));

  auto t0 = Clock::now();
  std::unique_ptr<FeatureStore> cache;
  FeatureSeconds feature_seconds;
  if (!o.augment) {  // the bottom is frozen: one pass serves every epoch
    const size_t rows = ((train.paths.size() + batch - 1) / batch) * batch;
    cache = std::make_unique<FeatureStore>(rows, per_feature, o.feature_budget, o.state);
    keep(train, bottom_features(
                    *bottom, train.paths, bundle.input, t.feature_shape, [&](size_t k) { return cache->row(k); }, &feature_seconds));
  } else {  // features are recomputed every step: check once that every image decodes
    std::vector<float> pixels(per_image);
    std::vector<size_t> readable;
    for (size_t i = 0; i < train.paths.size(); ++i)
      if (read_image(train.paths[i], bundle.input, pixels.data())) readable.push_back(i);
    keep(train, readable);
  }
  const size_t n = train.paths.size();
  if (!added.empty()) {
    add_classes(*bottom, bundle, state, train, known.size(), added);
    if (start >= o.epochs) {
      log_memory(o.verbose, "imprinting");
      std::cout << "--epochs " << o.epochs << ": the new classes' imprinted outputs are the classifier (no training step) -> "
                << state.weights_path() << std::endl;
      return 0;
    }
  }
  if (n < data_rows)
    throw DeviceError(std::to_string(n) + " readable images is fewer than one training batch's " + std::to_string(data_rows) + " photos");
  if (cache)
    std::cout << "features of " << n << " images from bottom.pte in " << seconds_since(t0) << "s ("
              << (cache->on_disk() ? "memory-mapped file" : "in memory") << ")" << std::endl;
  std::vector<float> val_features;
  if (!o.val.empty()) {
    val_features.assign(((val.paths.size() + batch - 1) / batch) * batch * per_feature, 0.0f);
    keep(val, bottom_features(*bottom, val.paths, bundle.input, t.feature_shape,
                              [&](size_t k) { return val_features.data() + k * per_feature; }));
    if (val.paths.empty()) throw DeviceError("no readable validation images in " + o.val);
  }

  if (cache) {       // every feature is cached: free XNNPACK's packed weights and buffers before training,
    bottom.reset();  // and hand the freed heap back to the system (glibc keeps it otherwise)
#ifdef __GLIBC__
    malloc_trim(0);
#endif
  }
  log_memory(o.verbose, "bottom features");
  std::string weights = state.weights_path();
  if (start) std::cout << "resuming after epoch " << start << " from " << weights << std::endl;
  if (!val_features.empty() && start == 0) {  // what the fine-tune buys: the same measure before it
    char line[96];
    std::snprintf(line, sizeof line, "before fine-tuning: val_acc %.1f%% (%zu images)",
                  100.0 * accuracy_of(bundle, weights, val_features, val.labels), val.labels.size());
    std::cout << line << std::endl;
  }
  TrainingSession session(bundle.file(t.pte), weights, t.buffers);
  std::unique_ptr<Optimizer> optimizer = make_optimizer(opt, session.parameter_names());
  if (start > 0) {  // the saved state, its buffers one per parameter and per kind (state.h)
    std::vector<std::string> names;
    for (int k = 0; k < optimizer->buffers_per_parameter(); ++k)
      names.insert(names.end(), session.parameter_names().begin(), session.parameter_names().end());
    optimizer->restore(names.empty() ? std::vector<std::vector<float>>{} : state.optimizer_buffers(optimizer->state_key(), names),
                       state.optimizer_steps());
  }

  const size_t steps = n / data_rows;  // the last partial batch is dropped: batch norm trains on batch statistics
  const bool tty = ::isatty(STDERR_FILENO);
  const size_t every = std::max<size_t>(1, steps / 5);
  std::vector<float> feats(batch * per_feature), pixels(o.augment ? batch * per_image : 0), logits;
  std::vector<int64_t> labels(batch);
  const std::vector<int64_t> image_shape = {static_cast<int64_t>(batch), 3, bundle.input.image_size, bundle.input.image_size};
  for (int epoch = start; epoch < o.epochs; ++epoch) {
    auto order = epoch_order(n, o.seed, epoch);
    SplitMix64 flips{~(o.seed * 1000003ULL + static_cast<uint64_t>(epoch))};
    const ReplayDraw draw(replay, replay_rows, o.seed, epoch);
    auto e0 = Clock::now();
    double loss_sum = 0, step_seconds = 0, optimizer_seconds = 0;
    size_t correct = 0, seen = 0;
    for (size_t s = 0; s < steps; ++s) {
      for (size_t i = 0; i < data_rows; ++i) {
        size_t idx = order[s * data_rows + i];
        labels[i] = train.labels[idx];
        if (cache) {
          std::memcpy(feats.data() + i * per_feature, cache->row(idx), per_feature * sizeof(float));
        } else {
          if (!read_image(train.paths[idx], bundle.input, pixels.data() + i * per_image))
            throw DeviceError(train.paths[idx] + " became unreadable during training");
          if (flips.next() & 1) flip_horizontally(pixels.data() + i * per_image, bundle.input.image_size);
        }
      }
      if (!cache) feats = bottom->run("forward", pixels.data(), image_shape);
      draw.fill(s, feats.data() + data_rows * per_feature, labels.data() + data_rows);
      auto s0 = Clock::now();
      float loss = session.step(feats.data(), t.feature_shape, labels.data(), &logits);
      step_seconds += seconds_since(s0);
      if (!std::isfinite(loss))
        throw DeviceError("the loss became non-finite at epoch " + std::to_string(epoch + 1) + " step " + std::to_string(s + 1) +
                          " (learning rate too high?); the weights saved after epoch " + std::to_string(epoch) + " are kept");
      if (s == 0) log_memory(o.verbose, "first forward-backward");
      s0 = Clock::now();
      optimizer->step(session.parameters(), session.gradients());
      optimizer_seconds += seconds_since(s0);
      if (s == 0) log_memory(o.verbose, "first optimizer step");
      loss_sum += static_cast<double>(loss) * batch;
      for (size_t i = 0; i < batch; ++i) {
        const float* z = logits.data() + i * t.outputs;
        correct += (std::max_element(z, z + t.outputs) - z) == labels[i];
      }
      seen += batch;
      char line[160];
      std::snprintf(line, sizeof line, "epoch %d/%d step %zu/%zu loss %.4f", epoch + 1, o.epochs, s + 1, steps, loss_sum / seen);
      if (tty) std::fprintf(stderr, "\r%s", line);
      else if ((s + 1) % every == 0) std::fprintf(stderr, "%s\n", line);
    }
    if (tty) std::fprintf(stderr, "\n");
    for (const auto& p : session.parameters())
      for (size_t k = 0; k < p.numel; ++k)
        if (!std::isfinite(p.f32()[k]))
          throw DeviceError("weight " + p.name + " became non-finite in epoch " + std::to_string(epoch + 1) +
                            "; the weights saved after epoch " + std::to_string(epoch) + " are kept");
    double secs = seconds_since(e0);
    nlohmann::json row = {{"epoch", epoch + 1},
                          {"loss", loss_sum / seen},
                          {"accuracy", static_cast<double>(correct) / seen},
                          {"images", n},
                          {"peak_rss_bytes", proc_status_bytes("VmHWM:")},
                          {"seconds", secs},
                          {"images_per_s", seen / secs},
                          // where the epoch's time goes: forward-backward (the program) and the optimizer
                          {"step_seconds", step_seconds},
                          {"optimizer_seconds", optimizer_seconds}};
    if (ReplaySet::in(bundle)) row["replay"] = {{"ratio", ratio}, {"rows", steps * replay_rows}};
    if (epoch == start && cache)  // the feature pass before this process's first epoch
      row["features_seconds"] = {{"decode", feature_seconds.decode}, {"bottom", feature_seconds.bottom}};
    state.save_epoch(epoch + 1, session, *optimizer, row);
    log_memory(o.verbose, "saving the epoch");
    char line[256];
    std::snprintf(line, sizeof line, "epoch %d/%d loss %.4f train_acc %.1f%% %.1f images/s", epoch + 1, o.epochs, loss_sum / seen,
                  100.0 * correct / seen, seen / secs);
    std::cout << line;
    if (!val_features.empty()) {
      double acc = accuracy_of(bundle, state.weights_path(), val_features, val.labels);
      state.annotate_last("val_accuracy", acc);
      std::snprintf(line, sizeof line, " val_acc %.1f%%", 100.0 * acc);
      std::cout << line;
    }
    std::cout << " -> " << state.weights_path() << std::endl;
  }
  return 0;
}

}  // namespace edgetl
