#include "replay.h"

#include <cmath>
#include <cstring>
#include <numeric>

#include "files.h"
#include "random.h"

namespace edgetl {

namespace {
constexpr char kMagic[8] = {'E', 'D', 'G', 'E', 'T', 'L', 'R', '1'};
constexpr size_t kHeader = 24;  // magic + 4 x uint32

uint32_t u32(const std::string& d, size_t at) {
  const auto* p = reinterpret_cast<const unsigned char*>(d.data() + at);
  return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
// float32 and int32 are read as stored: the runner's targets (x86-64, aarch64) are little-endian
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "replay.bin is little-endian");
}  // namespace

int64_t ReplaySet::bytes_of(const Bundle& bundle) {
  const auto& m = bundle.manifest;
  if (!m.contains("replay")) return 0;
  return m.at("files").at(m.at("replay").at("file").get<std::string>()).at("bytes").get<int64_t>();
}

ReplaySet::ReplaySet(const Bundle& bundle) {
  const auto& m = bundle.manifest;
  if (!m.contains("replay")) return;
  const std::string mpath = join(bundle.dir, "manifest.json");
  const auto& r = m.at("replay");
  std::string name;
  std::vector<int64_t> shape;
  int64_t count = 0;
  try {
    name = plain_name(r.at("file").get<std::string>(), mpath + ": replay.file");
    shape = r.at("feature_shape").get<std::vector<int64_t>>();
    count = r.at("count").get<int64_t>();
    if (r.at("dtype").get<std::string>() != "int8") throw DeviceError(mpath + ": replay.dtype is not int8");
  } catch (const nlohmann::json::exception& e) {
    throw DeviceError(mpath + " is not a valid edgetl manifest (replay: " + e.what() + ")");
  }
  if (!m.at("files").contains(name)) throw DeviceError(mpath + ": replay.file '" + name + "' is not listed in its files");
  const auto& t = bundle.training();
  const std::vector<int64_t> per_item(t.feature_shape.begin() + 1, t.feature_shape.end());
  if (shape != per_item || shape.size() != 3)
    throw DeviceError(mpath + ": replay.feature_shape does not match the training program's input");
  const std::string path = bundle.file(name);
  data_ = read_file(path);  // its sha256 was checked when the bundle was opened
  if (data_.size() < kHeader || std::memcmp(data_.data(), kMagic, sizeof kMagic) != 0)
    throw DeviceError(path + " is not a replay set (no EDGETLR1 header)");
  rows_ = u32(data_, 8), channels_ = u32(data_, 12);
  plane_ = static_cast<size_t>(u32(data_, 16)) * u32(data_, 20);
  if (static_cast<int64_t>(channels_) != shape[0] || static_cast<int64_t>(plane_) != shape[1] * shape[2] ||
      static_cast<int64_t>(rows_) != count || rows_ == 0)
    throw DeviceError(path + ": its header disagrees with the manifest's replay section");
  values_ = kHeader + 4 * channels_ + 4 * rows_;
  if (data_.size() != values_ + rows_ * channels_ * plane_)
    throw DeviceError(path + " holds " + std::to_string(data_.size()) + " bytes, its header says " +
                      std::to_string(values_ + rows_ * channels_ * plane_));
  scales_.resize(channels_);
  std::memcpy(scales_.data(), data_.data() + kHeader, 4 * channels_);
  for (float s : scales_)
    if (!(std::isfinite(s) && s >= 0)) throw DeviceError(path + " holds a scale that is negative or not finite");
  labels_.resize(rows_);
  for (size_t i = 0; i < rows_; ++i) {
    int32_t l;
    std::memcpy(&l, data_.data() + kHeader + 4 * channels_ + 4 * i, 4);
    if (l < 0 || static_cast<size_t>(l) >= bundle.classes.size())
      throw DeviceError(path + ": row " + std::to_string(i) + " has label " + std::to_string(l) + ", not one of the bundle's classes");
    labels_[i] = l;
  }
}

void ReplaySet::row(size_t i, float* out) const {
  const auto* q = reinterpret_cast<const int8_t*>(data_.data() + values_ + i * channels_ * plane_);
  for (size_t c = 0; c < channels_; ++c)
    for (size_t k = 0; k < plane_; ++k) out[c * plane_ + k] = static_cast<float>(q[c * plane_ + k]) * scales_[c];
}

size_t replay_rows_per_batch(size_t batch, double ratio, const ReplaySet& replay) {
  if (!(ratio >= 0 && ratio < 1)) throw DeviceError("--replay-ratio must be in [0, 1)");
  if (ratio > 0 && replay.empty())
    throw DeviceError("--replay-ratio needs a bundle with a replay set: export it with 'edgetl export --training --replay-per-class M'");
  const size_t r = static_cast<size_t>(std::floor(static_cast<double>(batch) * ratio + 0.5));
  if (r >= batch)
    throw DeviceError("--replay-ratio " + std::to_string(ratio) + " leaves no photo in a batch of " + std::to_string(batch) + " (" +
                      std::to_string(r) + " replay rows): lower it");
  return r;
}

ReplayDraw::ReplayDraw(const ReplaySet& replay, size_t per_step, uint64_t seed, int epoch)
    : replay_(replay), per_step_(per_step), order_(replay.rows()) {
  SplitMix64 rng{(seed * 1000003ULL + static_cast<uint64_t>(epoch)) ^ kReplayStream};
  std::iota(order_.begin(), order_.end(), 0);
  for (size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng.next() % i]);
}

void ReplayDraw::fill(size_t step, float* features, int64_t* labels) const {
  if (order_.empty()) return;
  const size_t per_row = replay_.row_floats();
  for (size_t i = 0; i < per_step_; ++i) {
    const size_t k = order_[(step * per_step_ + i) % order_.size()];
    replay_.row(k, features + i * per_row);
    labels[i] = replay_.label(k);
  }
}

}  // namespace edgetl
