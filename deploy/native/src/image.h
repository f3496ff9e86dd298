// Image decoding (JPEG, PNG) and the evaluation transform of edgetl, bit-exact with the Python side.
//
// The reference is what the Python loaders do with a file (torchvision's ImageFolder loader and
// deploy/edgetl_device.py both open it with PIL and call .convert("RGB")), followed by
// edgetl.transforms_for(name, image_size=..., train=False):
//
//   v2.ToImage, v2.RGB, v2.Resize(resize_short_side, interpolation, antialias=True),
//   v2.CenterCrop(image_size), v2.ToDtype(float32, scale=True), v2.Normalize(mean, std)
//
// with torch 2.13 / torchvision 0.28 / Pillow 13 on x86_64. See image.cpp for which reference
// each rounding rule is taken from, and for the handling of the less common pixel formats.
#pragma once
#include <string>
#include <vector>

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

// Decodes a JPEG or PNG (by content, not suffix). On failure returns false and sets *error to one line
// naming the reason (unsupported format, truncated/corrupt data, ...). Never throws, never aborts, never prints.
bool decode_image(const std::string& path, RgbImage* out, std::string* error);

// The evaluation transform: writes 3*image_size*image_size floats (CHW) to out.
void preprocess(const RgbImage& image, const InputSpec& spec, float* out);

// Convenience: decode + preprocess.
bool load_image(const std::string& path, const InputSpec& spec, float* out, std::string* error);

}  // namespace edgetl
