// edgetl-preprocess: decode + preprocess one image exactly as edgetl-device does, dump raw floats
// (what tests hold against the Python transforms; also handy to inspect a device image).
//
//   edgetl-preprocess IMAGE SIZE SHORT bilinear|bicubic m0 m1 m2 s0 s1 s2 OUT.bin
//
// Writes 3*SIZE*SIZE float32 (CHW, native byte order) to OUT.bin; on a decode error prints the
// error line to stderr and exits 1. Built by build.sh beside edgetl-device; driven by
// tests/native_preprocess_compare.py.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "image.h"

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s IMAGE SIZE SHORT bilinear|bicubic m0 m1 m2 s0 s1 s2 OUT.bin\n", argv[0]);
    return 2;
  }
  edgetl::InputSpec spec{};
  spec.image_size = std::atoi(argv[2]);
  spec.resize_short_side = std::atoi(argv[3]);
  if (std::strcmp(argv[4], "bilinear") == 0) {
    spec.interpolation = edgetl::Interpolation::Bilinear;
  } else if (std::strcmp(argv[4], "bicubic") == 0) {
    spec.interpolation = edgetl::Interpolation::Bicubic;
  } else {
    std::fprintf(stderr, "unknown interpolation: %s\n", argv[4]);
    return 2;
  }
  for (int c = 0; c < 3; ++c) {
    spec.mean[c] = static_cast<float>(std::strtod(argv[5 + c], nullptr));  // double -> float, as torch.as_tensor
    spec.std[c] = static_cast<float>(std::strtod(argv[8 + c], nullptr));
  }
  if (spec.image_size < 1 || spec.resize_short_side < 1) {
    std::fprintf(stderr, "SIZE and SHORT must be positive\n");
    return 2;
  }
  std::vector<float> out(3 * static_cast<size_t>(spec.image_size) * spec.image_size);
  try {
    edgetl::load_image(argv[1], spec, out.data());
  } catch (const edgetl::DeviceError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  std::FILE* f = std::fopen(argv[11], "wb");
  if (f == nullptr || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) {
    std::fprintf(stderr, "cannot write %s\n", argv[11]);
    if (f != nullptr) std::fclose(f);
    return 1;
  }
  std::fclose(f);
  return 0;
}
