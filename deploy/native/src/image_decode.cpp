// Reading and decoding images (JPEG, PNG) as Pillow 13 does (Image.open + .convert("RGB")):
// libjpeg-turbo with its defaults (ISLOW IDCT, fancy upsampling), libpng without gamma or colour
// management, and Pillow's rules for turning each PNG/JPEG pixel format into RGB (documented at
// decode_png / decode_jpeg). Resizing and normalising are in image_resize.cpp.
//
// libjpeg and libpng report errors by longjmp: the decoders below keep their errors as C strings in
// the frames a longjmp may leave, and decode_image turns them into one DeviceError.

#include <algorithm>
#include <cerrno>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "image.h"

namespace edgetl {

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
bool image_too_large(long long width, long long height, char* message, size_t size, bool check_ratio) {
  if (width <= kMaxSide && height <= kMaxSide && width * height <= kMaxPixels &&
      (!check_ratio || std::max(width, height) <= kMaxAspect * std::min(width, height)))
    return false;
  std::snprintf(message, size, "image too large (%lldx%lld; the limit is %lld per side, %lld pixels and %lld:1)", width, height, kMaxSide,
                kMaxPixels, kMaxAspect);
  return true;
}

namespace {

// ------------------------------------------------------------------------------------------------
// File reading and format sniffing
// ------------------------------------------------------------------------------------------------

std::vector<unsigned char> read_file(const std::string& path) {
  std::vector<unsigned char> data;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw DeviceError("cannot open " + path + ": " + std::strerror(errno));
  bool ok = true;
  unsigned char buffer[1 << 16];
  for (;;) {
    size_t n = std::fread(buffer, 1, sizeof(buffer), f);
    if (n > 0) data.insert(data.end(), buffer, buffer + n);
    if (n < sizeof(buffer)) {
      ok = !std::ferror(f);
      break;
    }
  }
  const int read_errno = errno;
  std::fclose(f);
  if (!ok) throw DeviceError("cannot read " + path + ": " + std::strerror(read_errno));
  return data;
}

enum class Format { Jpeg, Png, Unknown };

Format sniff(const std::vector<unsigned char>& d, std::string* what) {
  auto starts = [&](const char* magic, size_t n) { return d.size() >= n && std::memcmp(d.data(), magic, n) == 0; };
  if (starts("\xFF\xD8\xFF", 3)) return Format::Jpeg;
  if (starts("\x89PNG\r\n\x1A\n", 8)) return Format::Png;
  if (d.empty()) *what = "empty file";
  else if (starts("GIF8", 4)) *what = "GIF";
  else if (starts("BM", 2)) *what = "BMP";
  else if (starts("II*\0", 4) || starts("MM\0*", 4)) *what = "TIFF";
  else if (d.size() >= 12 && std::memcmp(d.data(), "RIFF", 4) == 0 && std::memcmp(d.data() + 8, "WEBP", 4) == 0) *what = "WebP";
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
    case JWRN_ARITH_BAD_CODE: jpeg_fail(cinfo);
    default: cinfo->err->num_warnings++;
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
  if (image_too_large(job->cinfo.image_width, job->cinfo.image_height, job->err.message, sizeof(job->err.message))) {
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

void decode_jpeg(const std::vector<unsigned char>& data, RgbImage* out, const std::string& path) {
  JpegJob job;
  job.data = &data;
  job.out = out;
  if (!decode_jpeg_protected(&job)) throw DeviceError(std::string("invalid or truncated JPEG: ") + job.err.message + ": " + path);
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
  if (image_too_large(width, height, job->state.message, sizeof(job->state.message))) {
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
      const int v = (in[0] << 8) | in[1];                       // PNG samples are big-endian
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

void decode_png(const std::vector<unsigned char>& data, RgbImage* out, const std::string& path) {
  PngJob job;
  job.state.data = &data;
  job.state.offset = 0;
  job.state.message[0] = '\0';
  job.out = out;
  job.png = nullptr;
  job.info = nullptr;
  if (!decode_png_protected(&job)) throw DeviceError(std::string("invalid or truncated PNG: ") + job.state.message + ": " + path);
}

}  // namespace

RgbImage decode_image(const std::string& path) {
  RgbImage out;
  try {
    const std::vector<unsigned char> data = read_file(path);
    std::string what;
    switch (sniff(data, &what)) {
      case Format::Jpeg: decode_jpeg(data, &out, path); break;
      case Format::Png: decode_png(data, &out, path); break;
      case Format::Unknown: throw DeviceError("unsupported image format (" + what + "): expected JPEG or PNG: " + path);
    }
  } catch (const std::bad_alloc&) {  // the file buffer (the pixels' own allocation is checked by the decoders)
    throw DeviceError("out of memory decoding " + path);
  }
  return out;
}

}  // namespace edgetl
