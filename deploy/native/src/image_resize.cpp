// The evaluation transform of a decoded image, bit for bit with the Python side on x86_64:
//
//  * Resize reproduces torch's native uint8 antialiased kernel (aten/src/ATen/native/cpu/
//    UpSampleKernel.cpp + UpSampleKernelAVXAntialias.h), which torchvision 0.28 uses on CPU for
//    uint8 images with both bilinear and bicubic (resize_image / _do_native_uint8_resize_on_cpu in
//    torchvision/transforms/v2/functional/_geometry.py): weights computed in double, converted to
//    int16 fixed point with a per-axis precision, horizontal pass then vertical pass, uint8 between.
//  * CenterCrop, ToDtype(scale=True) and Normalize follow torchvision's code and torch's float32
//    operation order.
//
// All floating-point work is in small set-up loops (weights, a 256-entry lookup table); every
// product there goes through round_product()/round_product_f() so that no compiler can fuse it
// into a fused multiply-add (GCC contracts across statements where FMA exists, e.g. on aarch64),
// which would change the last bit compared with torch on x86_64.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "image.h"

namespace edgetl {
namespace {

// A double (float) product rounded to double (float) before it is used: never fused into an FMA.
double round_product(double a, double b) {
  volatile double r = a * b;
  return r;
}
float round_product_f(float a, float b) {
  volatile float r = a * b;
  return r;
}

// ------------------------------------------------------------------------------------------------
// Resize: torch's uint8 antialiased separable resampling
// ------------------------------------------------------------------------------------------------

// torchvision's _compute_resized_output_size (transforms/functional.py) for an int size and
// max_size=None: short side = size, long side = int(size * long / short) (Python float division,
// truncated). Returns {height, width}.
void resized_size(int h, int w, int size, int* out_h, int* out_w) {
  const bool portrait = w <= h;
  const int short_side = portrait ? w : h;
  const int long_side = portrait ? h : w;
  const int new_long = static_cast<int>(static_cast<double>(static_cast<long long>(size) * long_side) / static_cast<double>(short_side));
  *out_w = portrait ? size : new_long;
  *out_h = portrait ? new_long : size;
}

// The antialias filters of UpSampleKernel.cpp: HelperInterpLinear::aa_filter (triangle) and
// HelperInterpCubic::aa_filter with a = -0.5 (Keys, as PIL) through cubic_convolution1/2 of
// UpSample.h, same operation order.
double filter_linear(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

double filter_cubic(double x) {
  const double a = -0.5;
  x = x < 0.0 ? -x : x;
  if (x < 1.0) {  // ((a + 2) * x - (a + 3)) * x * x + 1
    return round_product(round_product(round_product(a + 2, x) - (a + 3), x), x) + 1;
  }
  if (x < 2.0) {  // ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return round_product(round_product(round_product(a, x) - 5 * a, x) + 8 * a, x) - 4 * a;
  }
  return 0.0;
}

// Per output index: first input index, number of taps and int16 weights; one precision per axis.
struct AxisWeights {
  int taps = 0;                  // max_interp_size: stride of `weights`
  int precision = 0;             // weights are w * 2^precision
  std::vector<int> start;        // xmin
  std::vector<int> count;        // xsize
  std::vector<int16_t> weights;  // out_size * taps
};

// HelperInterpBase::_compute_index_ranges_weights (antialias=true, align_corners=false, no explicit
// scale) followed by _compute_index_ranges_int16_weights, reproduced with the same double
// expressions: scale = in / out, support = (interp_size / 2) * scale when downscaling,
// center = scale * (i + 0.5), xmin = max(int(center - support + 0.5), 0),
// xsize = min(int(center + support + 0.5), in) - xmin, w_j = filter((j + xmin - center + 0.5) * invscale)
// normalised by their sum; precision = the largest p < 22 with round(wt_max * 2^(p+1)) < 2^15;
// int16 weight = round-half-away-from-zero(w * 2^precision).
AxisWeights axis_weights(int in_size, int out_size, Interpolation interpolation) {
  const bool cubic = interpolation == Interpolation::Bicubic;
  const int interp_size = cubic ? 4 : 2;
  const double scale = static_cast<double>(in_size) / out_size;
  const double support = (scale >= 1.0) ? round_product(interp_size * 0.5, scale) : interp_size * 0.5;
  const int taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  const double invscale = (scale >= 1.0) ? 1.0 / scale : 1.0;

  AxisWeights aw;
  aw.taps = taps;
  aw.start.resize(out_size);
  aw.count.resize(out_size);
  std::vector<double> w(static_cast<size_t>(out_size) * taps, 0.0);
  double wt_max = 0.0;
  for (int i = 0; i < out_size; ++i) {
    const double center = round_product(scale, i + 0.5);
    const long long xmin = std::max(static_cast<long long>(center - support + 0.5), 0LL);
    long long xsize = std::min(static_cast<long long>(center + support + 0.5), static_cast<long long>(in_size)) - xmin;
    xsize = std::clamp(xsize, 0LL, static_cast<long long>(taps));
    double* wi = w.data() + static_cast<size_t>(i) * taps;
    double total = 0.0;
    for (long long j = 0; j < xsize; ++j) {
      const double arg = round_product(static_cast<double>(j + xmin) - center + 0.5, invscale);
      const double v = cubic ? filter_cubic(arg) : filter_linear(arg);
      wi[j] = v;
      total += v;
    }
    if (total != 0.0) {
      for (long long j = 0; j < xsize; ++j) {
        wi[j] /= total;
        wt_max = std::max(wt_max, wi[j]);
      }
    }
    aw.start[i] = static_cast<int>(xmin);
    aw.count[i] = static_cast<int>(xsize);
  }

  int precision = 0;
  for (precision = 0; precision < 22; ++precision) {
    const int next_value = static_cast<int>(0.5 + round_product(wt_max, static_cast<double>(1 << (precision + 1))));
    if (next_value >= (1 << 15)) break;
  }
  aw.precision = precision;
  aw.weights.resize(w.size());
  for (size_t k = 0; k < w.size(); ++k) {
    const double v = round_product(w[k], static_cast<double>(1 << precision));
    aw.weights[k] = static_cast<int16_t>((v < 0) ? static_cast<int>(-0.5 + v) : static_cast<int>(0.5 + v));
  }
  return aw;
}

// The fixed-point accumulation of the AVX2 kernels (ImagingResample{Horizontal,Vertical}Convolution8u):
// start from 2^(precision-1), add weight * sample in int32, shift right arithmetically, saturate
// to [0, 255] (packs_epi32 + packus_epi16).
inline unsigned char fixed_to_u8(int32_t acc, int precision) {
  if (acc < 0) return 0;
  acc >>= precision;
  return static_cast<unsigned char>(acc > 255 ? 255 : acc);
}

// Resizes `image` to out_h x out_w and returns only the rows [y0, y1) and columns [x0, x1) of the
// result (HWC RGB). Each output pixel depends only on its own weights, so computing a window is
// exactly the same as computing everything and cropping. Order as in torch: horizontal pass first
// (into a uint8 buffer), then the vertical pass; a pass is skipped when its size is unchanged.
std::vector<unsigned char> resize_window(const RgbImage& image, int out_h, int out_w, Interpolation interpolation, int y0, int y1, int x0,
                                         int x1) {
  const int in_w = image.width, in_h = image.height;
  const int nx = x1 - x0, ny = y1 - y0;
  const bool need_h = out_w != in_w, need_v = out_h != in_h;
  std::vector<unsigned char> result(static_cast<size_t>(nx) * ny * 3);
  if (nx <= 0 || ny <= 0) return result;

  AxisWeights vw;
  int row_lo = y0, row_hi = y1;  // input rows that the vertical pass reads
  if (need_v) {
    vw = axis_weights(in_h, out_h, interpolation);
    row_lo = in_h;
    row_hi = 0;
    for (int y = y0; y < y1; ++y) {
      row_lo = std::min(row_lo, vw.start[y]);
      row_hi = std::max(row_hi, vw.start[y] + vw.count[y]);
    }
    if (row_hi < row_lo) row_hi = row_lo;
  }

  // Horizontal pass over rows [row_lo, row_hi): tmp is (row_hi - row_lo) x nx x 3.
  const size_t tmp_stride = static_cast<size_t>(nx) * 3;
  std::vector<unsigned char> tmp(static_cast<size_t>(row_hi - row_lo) * tmp_stride);
  const size_t in_stride = static_cast<size_t>(in_w) * 3;
  if (need_h) {
    const AxisWeights hw = axis_weights(in_w, out_w, interpolation);
    const int32_t half = 1 << (hw.precision - 1);
    for (int y = row_lo; y < row_hi; ++y) {
      const unsigned char* in = image.pixels.data() + static_cast<size_t>(y) * in_stride;
      unsigned char* o = tmp.data() + static_cast<size_t>(y - row_lo) * tmp_stride;
      for (int x = x0; x < x1; ++x, o += 3) {
        const int16_t* k = hw.weights.data() + static_cast<size_t>(x) * hw.taps;
        const unsigned char* p = in + static_cast<size_t>(hw.start[x]) * 3;
        int32_t r = half, g = half, b = half;
        for (int j = 0, n = hw.count[x]; j < n; ++j, p += 3) {
          r += k[j] * p[0];
          g += k[j] * p[1];
          b += k[j] * p[2];
        }
        o[0] = fixed_to_u8(r, hw.precision);
        o[1] = fixed_to_u8(g, hw.precision);
        o[2] = fixed_to_u8(b, hw.precision);
      }
    }
  } else {
    for (int y = row_lo; y < row_hi; ++y)
      std::memcpy(tmp.data() + static_cast<size_t>(y - row_lo) * tmp_stride,
                  image.pixels.data() + static_cast<size_t>(y) * in_stride + static_cast<size_t>(x0) * 3, tmp_stride);
  }

  if (!need_v) {
    std::memcpy(result.data(), tmp.data(), result.size());
    return result;
  }
  const int32_t half = 1 << (vw.precision - 1);
  std::vector<int32_t> acc(tmp_stride);
  for (int y = y0; y < y1; ++y) {
    std::fill(acc.begin(), acc.end(), half);
    const int16_t* k = vw.weights.data() + static_cast<size_t>(y) * vw.taps;
    for (int j = 0, n = vw.count[y]; j < n; ++j) {
      const int32_t kj = k[j];
      const unsigned char* row = tmp.data() + static_cast<size_t>(vw.start[y] + j - row_lo) * tmp_stride;
      for (size_t i = 0; i < tmp_stride; ++i) acc[i] += kj * row[i];
    }
    unsigned char* o = result.data() + static_cast<size_t>(y - y0) * tmp_stride;
    for (size_t i = 0; i < tmp_stride; ++i) o[i] = fixed_to_u8(acc[i], vw.precision);
  }
  return result;
}

// Python's round() on a non-negative multiple of 0.5 (ties to even), as used by torchvision's
// _center_crop_compute_crop_anchor: int(round((size - crop) / 2.0)).
int round_half_even_div2(int d) {
  const int k = d / 2;
  if (d % 2 == 0) return k;
  return (k % 2 == 0) ? k : k + 1;
}

// CenterCrop along one axis (torchvision center_crop_image): when the crop is larger than the
// image the image is first zero-padded by ((crop - size) // 2, (crop - size + 1) // 2), after which
// the anchor is 0; otherwise the anchor is round((size - crop) / 2). Returns the source index of
// output index 0 (negative: padding).
int crop_offset(int size, int crop) {
  if (crop > size) return -((crop - size) / 2);
  return round_half_even_div2(size - crop);
}

}  // namespace

void preprocess(const RgbImage& image, const InputSpec& spec, float* out) {
  const int size = spec.image_size;
  const size_t plane = static_cast<size_t>(size) * size;

  // ToDtype(float32, scale=True) then Normalize: torch computes, in float32,
  //   x = float(v) * float(1.0 / 255)   (to_dtype_image: image.to(float32).mul_(1.0 / 255))
  //   x = (x - mean) / std              (normalize_image: sub_ then div_, true division)
  // For uint8 input there are only 256 values per channel: a lookup table.
  float table[3][256];
  const float inv255 = static_cast<float>(1.0 / 255.0);
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v) table[c][v] = (round_product_f(static_cast<float>(v), inv255) - spec.mean[c]) / spec.std[c];

  if (image.width <= 0 || image.height <= 0 || image.pixels.size() < static_cast<size_t>(image.width) * image.height * 3) {
    // Nothing to resize (decode_image never returns this): all padding, i.e. black.
    for (int c = 0; c < 3; ++c) std::fill(out + c * plane, out + (c + 1) * plane, table[c][0]);
    return;
  }

  int rh = 0, rw = 0;
  resized_size(image.height, image.width, spec.resize_short_side, &rh, &rw);
  // Output pixel (oy, ox) is resized pixel (oy + top, ox + left), or zero padding outside it.
  const int top = crop_offset(rh, size), left = crop_offset(rw, size);
  const int y0 = std::max(top, 0), y1 = std::min(top + size, rh);
  const int x0 = std::max(left, 0), x1 = std::min(left + size, rw);

  std::vector<unsigned char> window;
  const unsigned char* src;
  size_t src_stride;
  if (rh == image.height && rw == image.width) {  // resize_image returns the image unchanged
    src = image.pixels.data() + (static_cast<size_t>(y0) * image.width + x0) * 3;
    src_stride = static_cast<size_t>(image.width) * 3;
  } else {
    window = resize_window(image, rh, rw, spec.interpolation, y0, y1, x0, x1);
    src = window.data();
    src_stride = static_cast<size_t>(x1 - x0) * 3;
  }

  for (int oy = 0; oy < size; ++oy) {
    const int ry = oy + top;
    float* o0 = out + static_cast<size_t>(oy) * size;
    float* o1 = o0 + plane;
    float* o2 = o1 + plane;
    if (ry < y0 || ry >= y1) {
      std::fill(o0, o0 + size, table[0][0]);
      std::fill(o1, o1 + size, table[1][0]);
      std::fill(o2, o2 + size, table[2][0]);
      continue;
    }
    const unsigned char* row = src + static_cast<size_t>(ry - y0) * src_stride;
    for (int ox = 0; ox < size; ++ox) {
      const int rx = ox + left;
      if (rx < x0 || rx >= x1) {
        o0[ox] = table[0][0];
        o1[ox] = table[1][0];
        o2[ox] = table[2][0];
      } else {
        const unsigned char* p = row + static_cast<size_t>(rx - x0) * 3;
        o0[ox] = table[0][p[0]];
        o1[ox] = table[1][p[1]];
        o2[ox] = table[2][p[2]];
      }
    }
  }
}

void load_image(const std::string& path, const InputSpec& spec, float* out) {
  const RgbImage image = decode_image(path);
  // The resize's working image grows with the short side asked for (a 64:1 image resized to a
  // short side of 2000 is 128000 x 2000): bounded by the same limits as a decoded image.
  int rh = 0, rw = 0;
  resized_size(image.height, image.width, spec.resize_short_side, &rh, &rw);
  char message[160];
  if (image_too_large(rw, rh, message, sizeof message, false))
    throw DeviceError(std::string(message) + " after resizing " + std::to_string(image.width) + "x" + std::to_string(image.height) +
                      " to a short side of " + std::to_string(spec.resize_short_side) + ": " + path);
  try {
    preprocess(image, spec, out);
  } catch (const std::bad_alloc&) {
    throw DeviceError("out of memory preprocessing " + path);
  }
}

}  // namespace edgetl
