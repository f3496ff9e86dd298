// Image decoding and the edgetl evaluation transform; see image.h for the reference pipeline.
//
// Everything here is written to reproduce, bit for bit on x86_64, what the Python side computes:
//
//  * Decoding follows Pillow 13 (Image.open + .convert("RGB")): libjpeg-turbo with its defaults
//    (ISLOW IDCT, fancy upsampling), libpng without gamma or colour management, and Pillow's rules
//    for turning each PNG/JPEG pixel format into RGB (documented at decode_png / decode_jpeg).
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

#include "image.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

namespace edgetl {
namespace {

// The largest image decoded, checked from the header before any pixel memory is asked for (a
// 244-byte PNG can claim 170000 x 1): each side at most 65535, at most 2^26 pixels (64 MP, 192 MiB
// of RGB), the longer side at most 64 times the shorter (the resize to the input size would grow a
// one-pixel strip by its whole length). edgetl/data/limits.py refuses by the same numbers.
constexpr long long kMaxSide = 65535;
constexpr long long kMaxPixels = 1LL << 26;
constexpr long long kMaxAspect = 64;

// True (with the reason in `message`) when a width x height image is above the limit (the ratio
// is the decoded image's: its resize may round past it). No std::string: the decoders call it in
// frames a longjmp may leave.
bool too_large(long long width, long long height, char* message, size_t size, bool check_ratio = true) {
  if (width <= kMaxSide && height <= kMaxSide && width * height <= kMaxPixels &&
      (!check_ratio || std::max(width, height) <= kMaxAspect * std::min(width, height)))
    return false;
  std::snprintf(message, size, "image too large (%lldx%lld; the limit is %lld per side, %lld pixels and %lld:1)", width, height, kMaxSide,
                kMaxPixels, kMaxAspect);
  return true;
}

void set_error(std::string* error, const std::string& message) {
  if (error != nullptr) *error = message;
}

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
// File reading and format sniffing
// ------------------------------------------------------------------------------------------------

bool read_file(const std::string& path, std::vector<unsigned char>* data, std::string* error) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    set_error(error, "cannot open " + path + ": " + std::strerror(errno));
    return false;
  }
  bool ok = true;
  unsigned char buffer[1 << 16];
  for (;;) {
    size_t n = std::fread(buffer, 1, sizeof(buffer), f);
    if (n > 0) data->insert(data->end(), buffer, buffer + n);
    if (n < sizeof(buffer)) {
      if (std::ferror(f)) {
        set_error(error, "cannot read " + path + ": " + std::strerror(errno));
        ok = false;
      }
      break;
    }
  }
  std::fclose(f);
  return ok;
}

enum class Format { Jpeg, Png, Unknown };

Format sniff(const std::vector<unsigned char>& d, std::string* what) {
  auto starts = [&](const char* magic, size_t n) {
    return d.size() >= n && std::memcmp(d.data(), magic, n) == 0;
  };
  if (starts("\xFF\xD8\xFF", 3)) return Format::Jpeg;
  if (starts("\x89PNG\r\n\x1A\n", 8)) return Format::Png;
  if (d.empty()) *what = "empty file";
  else if (starts("GIF8", 4)) *what = "GIF";
  else if (starts("BM", 2)) *what = "BMP";
  else if (starts("II*\0", 4) || starts("MM\0*", 4)) *what = "TIFF";
  else if (d.size() >= 12 && std::memcmp(d.data(), "RIFF", 4) == 0 && std::memcmp(d.data() + 8, "WEBP", 4) == 0)
    *what = "WebP";
  else if (d.size() >= 12 && std::memcmp(d.data() + 4, "ftyp", 4) == 0) *what = "HEIF/AVIF/MP4";
  else *what = "unrecognised content";
  return Format::Unknown;
}

// ------------------------------------------------------------------------------------------------
// JPEG (libjpeg-turbo)
// ------------------------------------------------------------------------------------------------
//
// Pillow decodes JPEG with libjpeg-turbo and the library defaults (JDCT_ISLOW, fancy upsampling,
// no scaling): 1 component -> mode "L", 3 -> "RGB" (libjpeg's own YCbCr/RGB guess), 4 -> "CMYK"
// read with rawmode "CMYK;I" (inverted, Adobe convention, always). convert("RGB") then replicates L
// and maps CMYK with Pillow's cmyk2rgb (libImaging/Convert.c). We request the same output colour
// spaces with the same defaults, so the pixels are identical.
//
// Errors: libjpeg's error_exit would exit(); ours longjmps back. Warnings that mean the pixel data
// is incomplete or garbled (premature end of file / data segment, bad Huffman or arithmetic code,
// lost sync) are errors, so a half file is rejected. Other warnings (unknown JFIF revision, odd
// Adobe transform code, bad ICC marker, extraneous bytes between markers) are tolerated: Pillow
// decodes those files silently and our pixels match it.

struct JpegErrorManager {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

[[noreturn]] void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void jpeg_on_error_exit(j_common_ptr cinfo) { jpeg_fail(cinfo); }

void jpeg_on_emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level >= 0) return;  // trace messages
  switch (cinfo->err->msg_code) {
    case JWRN_JPEG_EOF:
    case JWRN_HIT_MARKER:
    case JWRN_MUST_RESYNC:
    case JWRN_HUFF_BAD_CODE:
    case JWRN_ARITH_BAD_CODE:
      jpeg_fail(cinfo);
    default:
      cinfo->err->num_warnings++;
  }
}

void jpeg_on_output_message(j_common_ptr) {}  // never print

// Pillow's MULDIV255 and cmyk2rgb (libImaging/Convert.c), on inverted ("CMYK;I") samples.
inline unsigned char muldiv255(int a, int b) {
  int t = a * b + 128;
  return static_cast<unsigned char>(((t >> 8) + t) >> 8);
}
inline unsigned char clip8(int v) { return static_cast<unsigned char>(v < 0 ? 0 : (v > 255 ? 255 : v)); }

struct JpegJob {
  const std::vector<unsigned char>* data;
  RgbImage* out;
  std::vector<unsigned char> row;
  JpegErrorManager err;
  jpeg_decompress_struct cinfo;
  std::string error;
};

// Only trivially destructible locals here: longjmp lands in this frame.
bool decode_jpeg_protected(JpegJob* job) {
  std::memset(&job->cinfo, 0, sizeof(job->cinfo));
  job->cinfo.err = jpeg_std_error(&job->err.pub);
  job->err.pub.error_exit = jpeg_on_error_exit;
  job->err.pub.emit_message = jpeg_on_emit_message;
  job->err.pub.output_message = jpeg_on_output_message;
  job->err.message[0] = '\0';
  if (setjmp(job->err.jump)) {
    jpeg_destroy_decompress(&job->cinfo);
    return false;
  }
  jpeg_create_decompress(&job->cinfo);
  jpeg_mem_src(&job->cinfo, job->data->data(), static_cast<unsigned long>(job->data->size()));
  jpeg_read_header(&job->cinfo, TRUE);

  const int components = job->cinfo.num_components;
  if (components == 1) job->cinfo.out_color_space = JCS_GRAYSCALE;
  else if (components == 3) job->cinfo.out_color_space = JCS_RGB;
  else if (components == 4) job->cinfo.out_color_space = JCS_CMYK;
  else {
    std::snprintf(job->err.message, sizeof(job->err.message), "cannot handle %d-component JPEG", components);
    jpeg_destroy_decompress(&job->cinfo);
    return false;
  }
  if (too_large(job->cinfo.image_width, job->cinfo.image_height, job->err.message, sizeof(job->err.message))) {
    jpeg_destroy_decompress(&job->cinfo);
    return false;
  }
  jpeg_start_decompress(&job->cinfo);

  const int width = static_cast<int>(job->cinfo.output_width);
  const int height = static_cast<int>(job->cinfo.output_height);
  const int channels = job->cinfo.output_components;
  try {
    job->row.resize(static_cast<size_t>(width) * channels);
    job->out->pixels.resize(static_cast<size_t>(width) * height * 3);
  } catch (const std::bad_alloc&) {
    std::snprintf(job->err.message, sizeof(job->err.message), "out of memory");
    jpeg_destroy_decompress(&job->cinfo);
    return false;
  }
  job->out->width = width;
  job->out->height = height;

  while (job->cinfo.output_scanline < job->cinfo.output_height) {
    const int y = static_cast<int>(job->cinfo.output_scanline);
    JSAMPROW rows[1] = {job->row.data()};
    if (jpeg_read_scanlines(&job->cinfo, rows, 1) != 1) {
      std::snprintf(job->err.message, sizeof(job->err.message), "decoder stopped at row %d", y);
      jpeg_destroy_decompress(&job->cinfo);
      return false;
    }
    const unsigned char* in = job->row.data();
    unsigned char* o = job->out->pixels.data() + static_cast<size_t>(y) * width * 3;
    if (channels == 3) {
      std::memcpy(o, in, static_cast<size_t>(width) * 3);
    } else if (channels == 1) {
      for (int x = 0; x < width; ++x, o += 3) o[0] = o[1] = o[2] = in[x];
    } else {  // CMYK: Pillow inverts ("CMYK;I") then cmyk2rgb
      for (int x = 0; x < width; ++x, o += 3, in += 4) {
        // Pillow's samples are the inverted ones: C' = 255 - C, K' = 255 - K, so nk = 255 - K' = K.
        const int nk = in[3];
        for (int c = 0; c < 3; ++c) o[c] = clip8(nk - muldiv255(255 - in[c], nk));
      }
    }
  }
  // Not calling jpeg_finish_decompress: every pixel has been read; a file that only lacks its
  // trailing EOI marker is accepted, as Pillow accepts it.
  jpeg_destroy_decompress(&job->cinfo);
  return true;
}

bool decode_jpeg(const std::vector<unsigned char>& data, RgbImage* out, std::string* error) {
  JpegJob job;
  job.data = &data;
  job.out = out;
  if (!decode_jpeg_protected(&job)) {
    set_error(error, std::string("invalid or truncated JPEG: ") + job.err.message);
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// PNG (libpng)
// ------------------------------------------------------------------------------------------------
//
// Pillow (PngImagePlugin._MODES) + convert("RGB"), and what we do to get the same bytes:
//   grey 1/2/4 bit  -> "1"/"L" scaled (0/255, x*85, x*17)      png_set_expand_gray_1_2_4_to_8
//   grey 8          -> "L", replicated                            as is
//   grey 16         -> "I;16"; edgetl's loader scales: v >> 8     png_set_strip_16 (see below)
//   grey+alpha 8/16 -> "LA"/"RGBA" from the high byte, alpha dropped   png_set_strip_16, drop alpha
//   RGB 8/16        -> "RGB", high byte of 16-bit samples          png_set_strip_16
//   RGBA 8/16       -> "RGBA", alpha dropped (no compositing)       png_set_strip_16, drop alpha
//   palette 1..8    -> "P"; convert("RGB") looks up the palette    png_set_palette_to_rgb
// tRNS, gAMA, cHRM, sRGB, iCCP and sBIT are ignored by Pillow's convert("RGB") and here.
//
// 16-bit greyscale: Pillow's own I;16 -> RGB conversion saturates at 255 (a nearly white image), so
// edgetl's Python loader (edgetl/data/folder.py load_image) scales such an image to 8 bits by
// value >> 8 before replicating it to RGB; the high byte of each big-endian sample is exactly that,
// and a device image must be transformed exactly as the training images were.

struct PngState {
  const std::vector<unsigned char>* data;
  size_t offset;
  char message[200];
};

[[noreturn]] void png_on_error(png_structp png, png_const_charp msg) {
  auto* state = static_cast<PngState*>(png_get_error_ptr(png));
  std::snprintf(state->message, sizeof(state->message), "%s", msg != nullptr ? msg : "libpng error");
  png_longjmp(png, 1);
}

void png_on_warning(png_structp, png_const_charp) {}  // never print; warnings are harmless

void png_on_read(png_structp png, png_bytep dst, png_size_t length) {
  auto* state = static_cast<PngState*>(png_get_io_ptr(png));
  if (state->data->size() - state->offset < length) png_error(png, "unexpected end of file");
  std::memcpy(dst, state->data->data() + state->offset, length);
  state->offset += length;
}

struct PngJob {
  PngState state;
  RgbImage* out;
  std::vector<unsigned char> buffer;
  std::vector<png_bytep> rows;
  png_structp png;
  png_infop info;
};

bool decode_png_protected(PngJob* job) {
  job->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &job->state, png_on_error, png_on_warning);
  if (job->png == nullptr) {
    std::snprintf(job->state.message, sizeof(job->state.message), "cannot initialise libpng");
    return false;
  }
  job->info = png_create_info_struct(job->png);
  if (job->info == nullptr) {
    png_destroy_read_struct(&job->png, nullptr, nullptr);
    std::snprintf(job->state.message, sizeof(job->state.message), "cannot initialise libpng");
    return false;
  }
  if (setjmp(png_jmpbuf(job->png))) {
    png_destroy_read_struct(&job->png, &job->info, nullptr);
    return false;
  }
  png_set_read_fn(job->png, &job->state, png_on_read);
  png_read_info(job->png, job->info);

  const png_uint_32 width = png_get_image_width(job->png, job->info);
  const png_uint_32 height = png_get_image_height(job->png, job->info);
  const int bit_depth = png_get_bit_depth(job->png, job->info);
  const int color_type = png_get_color_type(job->png, job->info);
  if (too_large(width, height, job->state.message, sizeof(job->state.message))) {
    png_destroy_read_struct(&job->png, &job->info, nullptr);
    return false;
  }
  const bool grey16 = color_type == PNG_COLOR_TYPE_GRAY && bit_depth == 16;
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(job->png);
  if (color_type == PNG_COLOR_TYPE_GRAY && bit_depth < 8) png_set_expand_gray_1_2_4_to_8(job->png);
  if (bit_depth == 16 && !grey16) png_set_strip_16(job->png);  // keeps the high byte, like Pillow
  png_set_interlace_handling(job->png);
  png_read_update_info(job->png, job->info);

  const int channels = png_get_channels(job->png, job->info);  // 1..4 after the transforms
  const size_t row_bytes = png_get_rowbytes(job->png, job->info);
  const size_t sample_bytes = grey16 ? 2 : 1;
  if (row_bytes != static_cast<size_t>(width) * channels * sample_bytes) {
    std::snprintf(job->state.message, sizeof(job->state.message), "unexpected PNG row layout");
    png_destroy_read_struct(&job->png, &job->info, nullptr);
    return false;
  }
  try {
    job->buffer.resize(row_bytes * height);
    job->rows.resize(height);
    job->out->pixels.resize(static_cast<size_t>(width) * height * 3);
  } catch (const std::bad_alloc&) {
    std::snprintf(job->state.message, sizeof(job->state.message), "out of memory");
    png_destroy_read_struct(&job->png, &job->info, nullptr);
    return false;
  }
  for (png_uint_32 y = 0; y < height; ++y) job->rows[y] = job->buffer.data() + y * row_bytes;
  png_read_image(job->png, job->rows.data());
  // png_read_end is not called: all pixels are in; a missing IEND is accepted (Pillow does too).
  png_destroy_read_struct(&job->png, &job->info, nullptr);

  job->out->width = static_cast<int>(width);
  job->out->height = static_cast<int>(height);
  unsigned char* o = job->out->pixels.data();
  const unsigned char* in = job->buffer.data();
  const size_t n = static_cast<size_t>(width) * height;
  if (grey16) {
    for (size_t i = 0; i < n; ++i, o += 3, in += 2) {
      const int v = (in[0] << 8) | in[1];  // PNG samples are big-endian
      o[0] = o[1] = o[2] = static_cast<unsigned char>(v >> 8);  // edgetl's loader: I;16 -> 8 bit by >> 8
    }
  } else if (channels == 1 || channels == 2) {  // grey, grey + alpha
    for (size_t i = 0; i < n; ++i, o += 3, in += channels) o[0] = o[1] = o[2] = in[0];
  } else {  // RGB, RGBA
    for (size_t i = 0; i < n; ++i, o += 3, in += channels) {
      o[0] = in[0];
      o[1] = in[1];
      o[2] = in[2];
    }
  }
  return true;
}

bool decode_png(const std::vector<unsigned char>& data, RgbImage* out, std::string* error) {
  PngJob job;
  job.state.data = &data;
  job.state.offset = 0;
  job.state.message[0] = '\0';
  job.out = out;
  job.png = nullptr;
  job.info = nullptr;
  if (!decode_png_protected(&job)) {
    set_error(error, std::string("invalid or truncated PNG: ") + job.state.message);
    return false;
  }
  return true;
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
  const int new_long = static_cast<int>(static_cast<double>(static_cast<long long>(size) * long_side) /
                                        static_cast<double>(short_side));
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
  int taps = 0;                 // max_interp_size: stride of `weights`
  int precision = 0;            // weights are w * 2^precision
  std::vector<int> start;       // xmin
  std::vector<int> count;       // xsize
  std::vector<int16_t> weights; // out_size * taps
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
std::vector<unsigned char> resize_window(const RgbImage& image, int out_h, int out_w, Interpolation interpolation,
                                         int y0, int y1, int x0, int x1) {
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

// ------------------------------------------------------------------------------------------------
// Public API
// ------------------------------------------------------------------------------------------------

bool decode_image(const std::string& path, RgbImage* out, std::string* error) {
  try {
    if (out == nullptr) {
      set_error(error, "no output image given");
      return false;
    }
    *out = RgbImage();
    std::vector<unsigned char> data;
    if (!read_file(path, &data, error)) return false;
    std::string what;
    bool ok = false;
    switch (sniff(data, &what)) {
      case Format::Jpeg: ok = decode_jpeg(data, out, error); break;
      case Format::Png: ok = decode_png(data, out, error); break;
      case Format::Unknown:
        set_error(error, "unsupported image format (" + what + "): expected JPEG or PNG: " + path);
        return false;
    }
    if (!ok) {
      *out = RgbImage();
      if (error != nullptr) *error += ": " + path;
    }
    return ok;
  } catch (...) {  // std::bad_alloc from the file buffer or string handling
    if (out != nullptr) *out = RgbImage();
    set_error(error, "out of memory decoding " + path);
    return false;
  }
}

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
    for (int v = 0; v < 256; ++v)
      table[c][v] = (round_product_f(static_cast<float>(v), inv255) - spec.mean[c]) / spec.std[c];

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

bool load_image(const std::string& path, const InputSpec& spec, float* out, std::string* error) {
  RgbImage image;
  if (!decode_image(path, &image, error)) return false;
  // The resize's working image grows with the short side asked for (a 64:1 image resized to a
  // short side of 2000 is 128000 x 2000): bounded by the same limits as a decoded image.
  int rh = 0, rw = 0;
  resized_size(image.height, image.width, spec.resize_short_side, &rh, &rw);
  char message[160];
  if (too_large(rw, rh, message, sizeof message, false)) {
    set_error(error, std::string(message) + " after resizing " + std::to_string(image.width) + "x" + std::to_string(image.height) +
                         " to a short side of " + std::to_string(spec.resize_short_side) + ": " + path);
    return false;
  }
  try {
    preprocess(image, spec, out);
  } catch (...) {
    set_error(error, "out of memory preprocessing " + path);
    return false;
  }
  return true;
}

}  // namespace edgetl
