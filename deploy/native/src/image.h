// Image decoding (JPEG, PNG: image_decode.cpp) and the evaluation transform of edgetl (resize, crop,
// normalise: image_resize.cpp), bit-exact with the Python side.
//
// The reference is what the Python loaders do with a file (torchvision's ImageFolder loader and
// deploy/edgetl_device.py both open it with PIL and call .convert("RGB")), followed by
// edgetl.transforms_for(name, image_size=..., train=False):
//
//   v2.ToImage, v2.RGB, v2.Resize(resize_short_side, interpolation, antialias=True),
//   v2.CenterCrop(image_size), v2.ToDtype(float32, scale=True), v2.Normalize(mean, std)
//
// with torch 2.13 / torchvision 0.28 / Pillow 13 on x86_64. See image_resize.cpp for which reference
// each rounding rule is taken from, and image_decode.cpp for the handling of the less common pixel
// formats.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "errors.h"

namespace edgetl {

enum class Interpolation { Bilinear, Bicubic };

struct InputSpec {
  int image_size;         // side of the square output (centre crop)
  int resize_short_side;  // the short side is resized to this before the crop
  Interpolation interpolation;
  float mean[3];
  float std[3];
};

struct RgbImage {
  int width = 0, height = 0;
  std::vector<unsigned char> pixels;  // HWC RGB uint8, row-major, no padding
};

// Decodes a JPEG or PNG (by content, not suffix). A file that cannot be read or decoded (unsupported
// format, truncated or corrupt data, too large, out of memory) is a DeviceError naming the reason and
// the file. Never aborts, never prints.
RgbImage decode_image(const std::string& path);

// The evaluation transform: writes 3*image_size*image_size floats (CHW) to out.
void preprocess(const RgbImage& image, const InputSpec& spec, float* out);

// decode_image + preprocess; a DeviceError also when the resized image would be too large.
void load_image(const std::string& path, const InputSpec& spec, float* out);

// True (with the reason in `message`, a C string: the decoders call it in frames a longjmp may leave)
// when a width x height image is above the limits edgetl/data/limits.py states too; the ratio is
// checked on decoded images only (a resize may round past it).
bool image_too_large(long long width, long long height, char* message, size_t size, bool check_ratio = true);

}  // namespace edgetl
