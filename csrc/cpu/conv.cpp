// CPU int8_conv2d (schema in csrc/ops.cpp): channels-last input, im2col rows ordered (kh, kw, c) per group produced
// by the int8 GEMM of gemm_core as it needs them (or, on AVX-512, the direct conv of gemm_core for uint8 inputs of a
// multiple of 4 channels and full weight panels; for other uint8 convs with up to two weight panels, window rows read
// in place by conv_u8s8_in_place; depthwise convs, and grouped ones of 2 to 32 channels a group: the direct kernels
// below), and the GEMM's epilogue writing the channels-last output directly.
#include "cpu/simd.h"  // first: see there
#include "check.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cpu/gemm_core.h"
#include "cpu/gemm_ops.h"
#include "cpu/isa.h"
#include "output_memory.h"

namespace torchquant::gemm {
namespace {

// What the im2col RowFiller reads: the channels-last input and how to turn it into GEMM rows.
struct Im2colSource {
  const uint8_t* x;
  ConvGeometry g;
  uint8_t pad_byte;  // taps outside the image read the zero point
  uint8_t flip;      // XOR of every byte (int8 -> shifted uint8)
  int64_t run_stride;  // bytes per kernel row: its kw * channels values, zero filled to run_stride
  int64_t k4;          // bytes per row: kh * run_stride, zero filled to a multiple of 4
};

// dst[i] = src[i] ^ flip for i < n with whole-vector moves only: a run of n >= 16 bytes ends with a 16-byte move
// that overlaps the previous one, a shorter run is two overlapping moves of 8, 4 or 1 bytes. The runs of an
// im2col row are short (21 bytes for a 7x7 window of 3 channels), where a byte loop for the tail (copy_flip's
// without AVX-512) cost as much as the GEMM's multiplies.
inline void copy_run(uint8_t* dst, const uint8_t* src, int64_t n, uint8_t flip) {
  if (n >= 16) {
    const __m128i f = _mm_set1_epi8(static_cast<char>(flip));
    const auto move = [&](int64_t i) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)), f));
    };
    for (int64_t i = 0; i + 16 < n; i += 16) move(i);
    move(n - 16);
    return;
  }
  const auto move = [&](auto word, int64_t i) {
    using Word = decltype(word);
    Word v;
    std::memcpy(&v, src + i, sizeof(Word));
    v ^= static_cast<Word>(0x0101010101010101ull * flip);
    std::memcpy(dst + i, &v, sizeof(Word));
  };
  if (n >= 8) {
    move(uint64_t{}, 0);
    move(uint64_t{}, n - 8);
  } else if (n >= 4) {
    move(uint32_t{}, 0);
    move(uint32_t{}, n - 4);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] ^ flip;
  }
}

// dst[i] = byte for i < n: copy_run of zero bytes flipped to `byte` (the padding of an im2col row is a few bytes
// per tap for few channels, where a memset call per tap cost more than the copies).
inline void fill_run(uint8_t* dst, uint8_t byte, int64_t n) {
  static constexpr uint8_t kZeros[256] = {};
  for (int64_t i = 0; i < n; i += sizeof(kZeros))
    copy_run(dst + i, kZeros, std::min<int64_t>(sizeof(kZeros), n - i), byte);
}

// RowFiller of int8_conv2d: row (b, oh, ow) of group grp holds that output pixel's window values, k = (kh, kw, c).
void fill_im2col_rows(const void* context, int64_t grp, int64_t row0, int64_t rows, uint8_t* dst) {
  const Im2colSource& src = *static_cast<const Im2colSource*>(context);
  // local copies: the byte stores below may alias any object, so fields read through `src` would be loaded again
  // after every store (a third of a 7x7 stem's fill time)
  const ConvGeometry g = src.g;
  const uint8_t* const x = src.x;
  const uint8_t flip = src.flip, pad_byte = src.pad_byte;
  const int64_t k4 = src.k4, run_stride = src.run_stride;
  const int64_t cg = g.channels / g.groups;
  const int64_t pixel_row = g.width * g.channels;  // bytes between input rows
  // undilated kernel rows of an ungrouped conv read consecutive channels-last pixels: kw * channels bytes, one
  // copy (what makes im2col cheap for few channels, where per-tap copies of a few bytes dominate)
  const bool whole_pixels = g.dil_w == 1 && g.groups == 1;
  const int64_t run = g.kw * cg;
  // (b, oh, ow) of the row, stepped rather than divided out per row (three divisions per row were a fifth of a
  // small conv's im2col time)
  int64_t b = row0 / (g.out_h * g.out_w), oh = (row0 / g.out_w) % g.out_h, ow = row0 % g.out_w - 1;
  for (int64_t row = 0; row < rows; ++row) {
    if (++ow == g.out_w) {
      ow = 0;
      if (++oh == g.out_h) {
        oh = 0;
        ++b;
      }
    }
    uint8_t* out = dst + row * k4;
    const int64_t ih0 = oh * g.stride_h - g.pad_h, iw0 = ow * g.stride_w - g.pad_w;
    const int64_t pixel = g.pixel_offset(b, ih0, iw0);  // tap (0, 0)'s offset, maybe outside
    if (whole_pixels && ih0 >= 0 && ih0 + (g.kh - 1) * g.dil_h < g.height && iw0 >= 0 && iw0 + g.kw <= g.width) {
      for (int64_t i = 0; i < g.kh; ++i, out += run_stride) {
        copy_run(out, x + pixel + i * g.dil_h * pixel_row, run, flip);
        for (int64_t j = run; j < run_stride; ++j) out[j] = 0;
      }
    } else {
      // taps [lo, hi) of an undilated kernel row lie inside the input columns
      const int64_t lo = std::clamp<int64_t>(-iw0, 0, g.kw), hi = std::clamp<int64_t>(g.width - iw0, lo, g.kw);
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = ih0 + i * g.dil_h;
        const int64_t in_row = pixel + i * g.dil_h * pixel_row;
        if (ih < 0 || ih >= g.height) {
          fill_run(out, pad_byte, run);
        } else if (whole_pixels) {  // one run inside, the padding byte on either side
          fill_run(out, pad_byte, lo * cg);
          copy_run(out + lo * cg, x + in_row + lo * cg, (hi - lo) * cg, flip);
          fill_run(out + hi * cg, pad_byte, (g.kw - hi) * cg);
        } else {
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t iw = iw0 + j * g.dil_w;
            if (iw < 0 || iw >= g.width) fill_run(out + j * cg, pad_byte, cg);
            else copy_run(out + j * cg, x + in_row + j * g.dil_w * g.channels + grp * cg, cg, flip);
          }
        }
        for (int64_t j = run; j < run_stride; ++j) out[j] = 0;
        out += run_stride;
      }
    }
    for (int64_t i = g.kh * run_stride; i < k4; ++i) *out++ = 0;
  }
}

// Interleaves n pixels of 3 channel planes into channels-last bytes.
void interleave3(const uint8_t* c0, const uint8_t* c1, const uint8_t* c2, int64_t n, uint8_t* out) {
  for (int64_t p = 0; p < n; ++p) {
    out[3 * p] = c0[p];
    out[3 * p + 1] = c1[p];
    out[3 * p + 2] = c2[p];
  }
}

// interleave3, 16 pixels (48 output bytes) per step: output vector v takes byte (16 v + i) from pixel
// (16 v + i) / 3 of channel (16 v + i) % 3, three byte shuffles ORed.
__attribute__((target("ssse3"))) void interleave3_ssse3(const uint8_t* c0, const uint8_t* c1, const uint8_t* c2,
                                                        int64_t n, uint8_t* out) {
  alignas(16) uint8_t index[3][3][16];
  for (int v = 0; v < 3; ++v)
    for (int c = 0; c < 3; ++c)
      for (int i = 0; i < 16; ++i) index[v][c][i] = (16 * v + i) % 3 == c ? (16 * v + i) / 3 : 0x80;
  __m128i mask[3][3];
  for (int v = 0; v < 3; ++v)
    for (int c = 0; c < 3; ++c) mask[v][c] = _mm_load_si128(reinterpret_cast<const __m128i*>(index[v][c]));
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c0 + p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c1 + p));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c2 + p));
    for (int v = 0; v < 3; ++v)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * p + 16 * v),
                       _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, mask[v][0]), _mm_shuffle_epi8(b, mask[v][1])),
                                    _mm_shuffle_epi8(c, mask[v][2])));
  }
  interleave3(c0 + p, c1 + p, c2 + p, n - p, out + 3 * p);
}

// The transpose of a tile of 16 bytes x 16 / E elements of E bytes (row i at src + i * src_row bytes) into
// dst (row j at dst + j * dst_row bytes): rounds that interleave pairs of vectors at E, 2E, ... 8 bytes leave
// column bit_reversed(j) in vector j.
template <int E>
inline void transpose_tile(const uint8_t* src, int64_t src_row, uint8_t* dst, int64_t dst_row) {
  constexpr int kRows = 16 / E, kHalf = kRows / 2;
  __m128i r[kRows], t[kRows];
  for (int i = 0; i < kRows; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * src_row));
  const auto round = [&](auto unpack_lo, auto unpack_hi) {
    for (int i = 0; i < kHalf; ++i) {
      t[i] = unpack_lo(r[2 * i], r[2 * i + 1]);
      t[i + kHalf] = unpack_hi(r[2 * i], r[2 * i + 1]);
    }
    std::copy(t, t + kRows, r);
  };
  if constexpr (E == 1) round([](__m128i a, __m128i b) { return _mm_unpacklo_epi8(a, b); },
                              [](__m128i a, __m128i b) { return _mm_unpackhi_epi8(a, b); });
  if constexpr (E <= 2) round([](__m128i a, __m128i b) { return _mm_unpacklo_epi16(a, b); },
                              [](__m128i a, __m128i b) { return _mm_unpackhi_epi16(a, b); });
  round([](__m128i a, __m128i b) { return _mm_unpacklo_epi32(a, b); },
        [](__m128i a, __m128i b) { return _mm_unpackhi_epi32(a, b); });
  round([](__m128i a, __m128i b) { return _mm_unpacklo_epi64(a, b); },
        [](__m128i a, __m128i b) { return _mm_unpackhi_epi64(a, b); });
  for (int j = 0; j < kRows; ++j) {
    int reversed = 0;
    for (int bit = 1, mirror = kHalf; bit < kRows; bit <<= 1, mirror >>= 1) reversed |= (j & bit) ? mirror : 0;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + reversed * dst_row), r[j]);
  }
}

// dst[j][i] = src[i][j] for an m x n matrix of E-byte elements (row strides in elements): whole tiles, then
// element by element for the rows and columns past them.
template <int E>
void transpose_block(const uint8_t* src, int64_t src_row, uint8_t* dst, int64_t dst_row, int64_t m, int64_t n) {
  constexpr int64_t kTile = 16 / E;
  const int64_t full_m = m - m % kTile, full_n = n - n % kTile;
  for (int64_t j = 0; j < full_n; j += kTile)
    for (int64_t i = 0; i < full_m; i += kTile)
      transpose_tile<E>(src + (i * src_row + j) * E, src_row * E, dst + (j * dst_row + i) * E, dst_row * E);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = j < full_n ? full_m : 0; i < m; ++i)
      std::memcpy(dst + (j * dst_row + i) * E, src + (i * src_row + j) * E, E);
}

// Pixels [p0, p0 + n) of each image between the NCHW and NHWC orders of E-byte elements, in either direction.
template <int E>
void transpose_pixels(const uint8_t* src, uint8_t* dst, int64_t channels, int64_t pixels, int64_t p0, int64_t n,
                      bool to_channels_last) {
  if (to_channels_last)
    transpose_block<E>(src + p0 * E, pixels, dst + p0 * channels * E, channels, channels, n);
  else
    transpose_block<E>(src + p0 * channels * E, channels, dst + p0 * E, pixels, n, channels);
}

// Every image of x (images x channels x pixels elements of `element` bytes) from NCHW to NHWC order or back, in
// parallel tasks of 256 pixels (a task's rows stay in L1/L2 while its tiles read them).
void transpose_images(const uint8_t* x, uint8_t* out, int64_t element, int64_t images, int64_t channels,
                      int64_t pixels, bool to_channels_last) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (pixels + kBlock - 1) / kBlock, image = channels * pixels * element;
  at::parallel_for(0, images * blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, p0 = (i % blocks) * kBlock, n = std::min(kBlock, pixels - p0);
      const uint8_t* src = x + b * image;
      uint8_t* dst = out + b * image;
      if (element == 1) transpose_pixels<1>(src, dst, channels, pixels, p0, n, to_channels_last);
      else if (element == 2) transpose_pixels<2>(src, dst, channels, pixels, p0, n, to_channels_last);
      else transpose_pixels<4>(src, dst, channels, pixels, p0, n, to_channels_last);
    }
  });
}

// x_q's bytes in channels-last order: a channels-last input as it is; a contiguous one of 16 or more channels
// transposed here into the calling thread's scratch buffer (torch's copy ran at 1-7 GB/s, as long as the conv itself
// for some layers; 3 channels, an image network's first conv, interleaved by byte shuffles); other layouts copied by
// torch (kept alive by `copy`).
const uint8_t* channels_last_bytes(const at::Tensor& x_q, at::Tensor& copy) {
  // (under 16 channels but 3, the tiles' byte-by-byte remainder was no faster than torch's copy)
  if (x_q.is_contiguous(at::MemoryFormat::ChannelsLast) || !x_q.is_contiguous() ||
      (x_q.size(1) < 16 && x_q.size(1) != 3)) {
    copy = x_q.contiguous(at::MemoryFormat::ChannelsLast);
    return static_cast<const uint8_t*>(copy.data_ptr());
  }
  const uint8_t* x = static_cast<const uint8_t*>(x_q.data_ptr());
  const int64_t channels = x_q.size(1), pixels = x_q.size(2) * x_q.size(3);
  uint8_t* out = scratch_buffer(Scratch::Activations, x_q.numel());
  if (channels != 3) {
    transpose_images(x, out, 1, x_q.size(0), channels, pixels, true);
    return out;
  }
  const bool simd = cpu_isa() != CpuIsa::Scalar;  // SSSE3 comes with every AVX2 CPU
  constexpr int64_t kBlock = 4096;  // pixels per task
  const int64_t blocks = (pixels + kBlock - 1) / kBlock;
  at::parallel_for(0, x_q.size(0) * blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, p0 = (i % blocks) * kBlock, n = std::min(kBlock, pixels - p0);
      const uint8_t* c0 = x + 3 * b * pixels + p0;
      (simd ? interleave3_ssse3 : interleave3)(c0, c0 + pixels, c0 + 2 * pixels, n, out + 3 * (b * pixels + p0));
    }
  });
  return out;
}

}  // namespace

at::Tensor contiguous_from_channels_last(const at::Tensor& y) {
  const int64_t element = y.element_size();
  // (under one tile of channels, 4 float32 or 8 half, the element-by-element remainder is no faster than torch)
  if (!y.is_cpu() || y.dim() != 4 || y.is_contiguous() || !y.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      !y.is_floating_point() || (element != 2 && element != 4) || y.size(1) < 16 / element)
    return y.contiguous();
  at::Tensor out = empty_output(y.sizes(), y.options());
  transpose_images(static_cast<const uint8_t*>(y.data_ptr()), static_cast<uint8_t*>(out.data_ptr()), element,
                   y.size(0), y.size(1), y.size(2) * y.size(3), false);
  return out;
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Depthwise conv (groups == channels == out_channels): output channel c sums the taps of input channel c only, so
// there is no reduction over channels for the GEMM to vectorize (it ran a 64-column weight panel per channel for
// one valid column, over 15x slower than float on MobileNet-style blocks). Here channels are the vector lanes: 64
// channels of an output pixel (a tile row) are acc[c] = sum over taps of x_u8[tap pixel][c] * w[c][tap], taps
// outside the input reading the zero point, the same sums the GEMM forms; the GEMM's epilogue then finishes them.
//
// A grouped conv of G channels in and out per group (G = 2, 4 or 8; ResNeXt's and RegNet's 3x3 convs) where the
// dword and pair kernels below do not take it (2 a group; int8 inputs on AVX-512; the scalar path) runs as
// G such passes summed in the tile: pass i gives output channel c the taps of input channel (c & -G) + i, the byte
// of its group picked within 16-byte lanes as each input row is loaded, against weight w[c][i][tap]. The GEMM ran a
// 64-column panel for each group's G columns (16x the multiplies at G = 4: 0.27x float on a ResNeXt block).
// ---------------------------------------------------------------------------------------------------------------

struct DepthwiseSource {
  const uint8_t* x;        // channels-last input bytes
  ConvGeometry g;
  const int8_t* w;         // [tap][channel], the pass's weights (packed with the weight, or derived per call)
  const int8_t* w_quads;   // the AVX-512 path's weights (weight_quads), or nullptr
  const int8_t* w_pairs;   // the AVX2 path's weights (weight_pairs), or nullptr
  uint8_t pad_byte;        // the zero point, as the flipped byte
  int64_t group_channels;  // G of a grouped conv's passes, 1 for a depthwise conv
  int64_t pass;            // the pass: the input channel of its group each lane reads
  bool accumulate;         // whether the sums add to the tile's (passes after the first) rather than replace them
  alignas(16) uint8_t pick[16];  // byte b of a 16-byte lane takes byte pick[b]: (b & -G) + pass
};

// The source of pass `pass` of a grouped conv's group_channels passes (1: a depthwise conv's only pass).
DepthwiseSource depthwise_source(const uint8_t* x, const ConvGeometry& g, const int8_t* w, const int8_t* w_quads,
                                 const int8_t* w_pairs, uint8_t pad_byte, int64_t group_channels, int64_t pass) {
  DepthwiseSource s{x, g, w, w_quads, w_pairs, pad_byte, group_channels, pass, pass > 0, {}};
  for (int b = 0; b < 16; ++b) s.pick[b] = static_cast<uint8_t>((b & -group_channels) + pass);
  return s;
}

constexpr int64_t kDepthwiseChannels = kPackAlign;  // the channels of a tile row (one epilogue panel)
constexpr int64_t kDepthwisePixels = 64;            // tile rows (output pixels along an output row) per work item
constexpr int64_t kMaxSegmentColumns = 256;         // input columns a work item lays out, where the geometry allows

// The input columns that `rows` consecutive output pixels of a row read.
int64_t segment_columns(const ConvGeometry& g, int64_t rows) {
  return (rows - 1) * g.stride_w + (g.kw - 1) * g.dil_w + 1;
}

struct RowSplit {
  int64_t segments, segment_len;
};

// An output row in segments of as equal lengths as it divides into, of at most kDepthwisePixels pixels that read at
// most max_columns input columns (where strides or dilations spread the windows; at least one pixel a segment).
RowSplit split_row(const ConvGeometry& g, int64_t max_columns) {
  int64_t len = std::min<int64_t>(kDepthwisePixels, g.out_w);
  if (segment_columns(g, len) > max_columns)
    len = std::max<int64_t>(1, (max_columns - (g.kw - 1) * g.dil_w - 1) / g.stride_w + 1);
  const int64_t segments = (g.out_w + len - 1) / len;
  return {segments, (g.out_w + segments - 1) / segments};
}

// The sums of one output pixel (b, oh, ow) for channels c0..c0+ncols, portable: wrapping uint32 arithmetic, the
// accumulators' behaviour on every path (the compiler vectorizes it over the channels).
template <bool FLIP>
void depthwise_pixel_scalar(const DepthwiseSource& s, int64_t b, int64_t oh, int64_t ow, int64_t c0, int64_t ncols,
                            int32_t* tile_row) {
  const ConvGeometry& g = s.g;
  uint32_t acc[kDepthwiseChannels] = {};
  const int64_t ih0 = oh * g.stride_h - g.pad_h, iw0 = ow * g.stride_w - g.pad_w;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = ih0 + i * g.dil_h;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw = iw0 + j * g.dil_w;
      const int8_t* w = s.w + (i * g.kw + j) * g.channels + c0;
      if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width) {
        const uint8_t* p = s.x + g.pixel_offset(b, ih, iw) + c0;
        if (s.group_channels == 1) {  // (a loop the compiler vectorizes; the picked bytes' is not)
          for (int64_t c = 0; c < ncols; ++c)
            acc[c] += static_cast<uint32_t>(FLIP ? p[c] ^ 0x80 : p[c]) * static_cast<uint32_t>(w[c]);
        } else {
          for (int64_t c = 0; c < ncols; ++c) {
            const uint8_t byte = p[(c & -s.group_channels) + s.pass];
            acc[c] += static_cast<uint32_t>(FLIP ? byte ^ 0x80 : byte) * static_cast<uint32_t>(w[c]);
          }
        }
      } else {
        for (int64_t c = 0; c < ncols; ++c) acc[c] += s.pad_byte * static_cast<uint32_t>(w[c]);
      }
    }
  }
  for (int64_t c = 0; c < ncols; ++c)
    tile_row[c] = static_cast<int32_t>(s.accumulate ? acc[c] + static_cast<uint32_t>(tile_row[c]) : acc[c]);
}

// AVX2: vpmaddwd on two kernel rows of 16 channels at once, widened to int16 (x * w fits: 255 * 128 < 2^15). As on
// the AVX-512 path, a work item first lays out the input columns its output pixels read: for each column and each
// pair of kernel rows (2q, 2q + 1), the two input rows' bytes of 16 channels widened and interleaved per channel
// (unpacks within 128-bit lanes: channels 0-3 and 8-11 in one vector, 4-7 and 12-15 in the other). Every output
// pixel whose window covers the column reads them as they are against weight_pairs, which hold the weights in that
// order, so the widening and interleaving happen once per column rather than for each tap of every pixel, and 4
// pixels share each weight vector with their sums in registers.
constexpr int64_t kPairChannels = 16;
constexpr int64_t kPairValues = 2 * kPairChannels;  // int16 values of one column's row pair: 2 vectors
constexpr int kPairPixels = 4;                      // pixels per call: 8 accumulators and 2 weight vectors

int64_t pair_row_groups(int64_t kh) { return (kh + 1) / 2; }

// The AVX2 weights: [16-channel block][kernel column][row pair][2 vectors of 8 (channel, row 2q, row 2q + 1)] bytes
// (the kernel widens them), zero past the channels and the kernel's last row.
int64_t weight_pairs_bytes(int64_t channels, int64_t kh, int64_t kw) {
  return (channels + kPairChannels - 1) / kPairChannels * kw * pair_row_groups(kh) * kPairValues;
}

// The pairs at `pairs` (weight_pairs_bytes of them) of w [tap][channel].
void weight_pairs(int64_t channels, int64_t kh, int64_t kw, const int8_t* w, int8_t* pairs) {
  const int64_t groups = pair_row_groups(kh);
  std::memset(pairs, 0, weight_pairs_bytes(channels, kh, kw));
  for (int64_t c = 0; c < channels; ++c) {
    // channel lane l of a block sits in vector (l / 4) % 2, at pair (l / 8) * 4 + l % 4 (the unpacks' order)
    const int64_t lane = c % kPairChannels;
    const int64_t at = ((lane / 4) % 2) * kPairChannels + 2 * ((lane / 8) * 4 + lane % 4);
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j)
        pairs[((c / kPairChannels * kw + j) * groups + i / 2) * kPairValues + at + i % 2] =
            w[(i * kw + j) * channels + c];
  }
}

// The 16 bytes of an input pixel from p on, picked (pass of a grouped conv), widened; read through a buffer where
// the input ends before them (the bytes past the input's last channel meet zero weights).
template <bool FLIP>
TQ_TARGET_AVX2 inline __attribute__((always_inline)) __m256i widened_pixel_bytes(const uint8_t* p,
                                                                                 const uint8_t* x_end,
                                                                                 const DepthwiseSource& s) {
  __m128i bytes;
  if (x_end - p >= kPairChannels) {
    bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint8_t buffer[kPairChannels] = {};
    std::memcpy(buffer, p, x_end - p);
    bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(buffer));
  }
  if (s.group_channels > 1) bytes = _mm_shuffle_epi8(bytes, _mm_load_si128(reinterpret_cast<const __m128i*>(s.pick)));
  if (FLIP) bytes = _mm_xor_si128(bytes, _mm_set1_epi8(static_cast<char>(0x80)));
  return _mm256_cvtepu8_epi16(bytes);
}

// Two rows' widened bytes interleaved per channel (the unpacks' order) at out (32-byte aligned).
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void store_pair(__m256i r0, __m256i r1, int16_t* out) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm256_unpacklo_epi16(r0, r1));
  _mm256_store_si256(reinterpret_cast<__m256i*>(out) + 1, _mm256_unpackhi_epi16(r0, r1));
}

// The row pairs [column][row pair] (kPairValues values each) of input columns iw_first.. for output row oh, the 16
// channels from c on; the padding byte outside the input.
template <bool FLIP>
TQ_TARGET_AVX2 void build_pairs(const DepthwiseSource& s, int64_t b, int64_t oh, int64_t iw_first, int64_t columns,
                                int64_t c, int16_t* pairs) {
  const ConvGeometry& g = s.g;
  const int64_t groups = pair_row_groups(g.kh);
  const uint8_t* x_end = s.x + g.batch * g.height * g.width * g.channels;
  const __m256i pad = _mm256_set1_epi16(s.pad_byte);
  const int64_t ih0 = oh * g.stride_h - g.pad_h;
  // columns [lo, hi) lie inside the input
  const int64_t lo = std::clamp<int64_t>(-iw_first, 0, columns), hi = std::clamp<int64_t>(g.width - iw_first, lo, columns);
  for (int64_t q = 0; q < groups; ++q) {
    const uint8_t* rows[2];  // the rows' pixels at column lo; nullptr: outside the input or kernel, no column inside
    for (int k = 0; k < 2; ++k) {
      const int64_t i = 2 * q + k;
      const int64_t ih = i < g.kh ? ih0 + i * g.dil_h : -1;  // a row past the kernel meets zero weights
      rows[k] = lo < hi && ih >= 0 && ih < g.height
                    ? s.x + g.pixel_offset(b, ih, iw_first + lo) + c
                    : nullptr;
    }
    int16_t* out = pairs + q * kPairValues;
    const int64_t step = groups * kPairValues;  // from one column's pairs to the next
    for (int64_t p = 0; p < lo; ++p) store_pair(pad, pad, out + p * step);
    const uint8_t *p0 = rows[0], *p1 = rows[1];
    for (int64_t p = lo; p < hi; ++p) {
      store_pair(p0 != nullptr ? widened_pixel_bytes<FLIP>(p0, x_end, s) : pad,
                 p1 != nullptr ? widened_pixel_bytes<FLIP>(p1, x_end, s) : pad, out + p * step);
      if (p0 != nullptr) p0 += g.channels;
      if (p1 != nullptr) p1 += g.channels;
    }
    for (int64_t p = hi; p < columns; ++p) store_pair(pad, pad, out + p * step);
  }
}

// The sums of P consecutive output pixels for a 16-channel block, the first pixel's window from pairs' column 0 on,
// from the block's weight pairs w; into (accumulate: added to) tile rows kPackAlign apart, in channel order.
template <int P>
TQ_TARGET_AVX2 void depthwise_pair_pixels(const ConvGeometry& g, const int16_t* pairs, const int8_t* w,
                                          bool accumulate, int32_t* tile) {
  const int64_t groups = pair_row_groups(g.kh), pixel_step = g.stride_w * groups * kPairValues;
  __m256i lo[P], hi[P];
  for (int r = 0; r < P; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  for (int64_t j = 0; j < g.kw; ++j)
    for (int64_t q = 0; q < groups; ++q) {
      const __m128i* wv = reinterpret_cast<const __m128i*>(w + (j * groups + q) * kPairValues);
      const __m256i w_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(wv)), w_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(wv + 1));
      const int16_t* column = pairs + (j * g.dil_w * groups + q) * kPairValues;
      for (int r = 0; r < P; ++r) {
        const __m256i* v = reinterpret_cast<const __m256i*>(column + r * pixel_step);
        lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(_mm256_loadu_si256(v), w_lo));
        hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(_mm256_loadu_si256(v + 1), w_hi));
      }
    }
  for (int r = 0; r < P; ++r) {  // back to channel order
    __m256i* dst = reinterpret_cast<__m256i*>(tile + r * kPackAlign);
    __m256i first = _mm256_permute2x128_si256(lo[r], hi[r], 0x20);
    __m256i second = _mm256_permute2x128_si256(lo[r], hi[r], 0x31);
    if (accumulate) {
      first = _mm256_add_epi32(first, _mm256_loadu_si256(dst));
      second = _mm256_add_epi32(second, _mm256_loadu_si256(dst + 1));
    }
    _mm256_storeu_si256(dst, first);
    _mm256_storeu_si256(dst + 1, second);
  }
}

// A segment of `rows` output pixels from (b, oh, ow0) on, channels c0..c0+ncols, 16 at a time: the block's row pairs
// into `pairs` (segment_columns(g, rows) columns), then its pixels 4 at a time.
template <bool FLIP>
TQ_TARGET_AVX2 void depthwise_segment_avx2(const DepthwiseSource& s, int64_t b, int64_t oh, int64_t ow0, int64_t rows,
                                           int64_t c0, int64_t ncols, int32_t* tile, int16_t* pairs) {
  const ConvGeometry& g = s.g;
  const int64_t groups = pair_row_groups(g.kh), pixel_step = g.stride_w * groups * kPairValues;
  for (int64_t c = c0; c < c0 + ncols; c += kPairChannels) {
    build_pairs<FLIP>(s, b, oh, ow0 * g.stride_w - g.pad_w, segment_columns(g, rows), c, pairs);
    const int8_t* w = s.w_pairs + c / kPairChannels * g.kw * groups * kPairValues;
    int32_t* block_tile = tile + (c - c0);
    int64_t r = 0;
    for (; r + kPairPixels <= rows; r += kPairPixels)
      depthwise_pair_pixels<kPairPixels>(g, pairs + r * pixel_step, w, s.accumulate, block_tile + r * kPackAlign);
    switch (rows - r) {  // the last 1-3 pixels in one call
      case 3: depthwise_pair_pixels<3>(g, pairs + r * pixel_step, w, s.accumulate, block_tile + r * kPackAlign); break;
      case 2: depthwise_pair_pixels<2>(g, pairs + r * pixel_step, w, s.accumulate, block_tile + r * kPackAlign); break;
      case 1: depthwise_pair_pixels<1>(g, pairs + r * pixel_step, w, s.accumulate, block_tile + r * kPackAlign); break;
    }
  }
}

// AVX-512 VNNI. vpdpbusd sums 4 byte products into each int32 lane: here the 4 bytes of a channel's lane are 4
// kernel rows of one input column (a column quad: 4 vectors of a channel block, in channel order), so one
// instruction adds 4 taps of 16 channels (8 in a ymm). A work item builds the quads of the input columns its output
// pixels read once (taps outside the input read the zero point), and each quad serves every pixel whose window
// covers its column. Blocks of up to 32 channels (16- and 32-channel layers, the rest of 96) use ymm vectors: the
// same instructions at half the width, rather than zmm vectors half empty.
constexpr int64_t kQuadBytes = 4 * kDepthwiseChannels;  // a column quad of a 64-channel block: 4 vectors
constexpr int64_t kMaxQuadRowGroups = 2;                // kernels of up to 8 rows

int64_t quad_row_groups(int64_t kh) { return (kh + 3) / 4; }
int64_t quad_row_groups(const ConvGeometry& g) { return quad_row_groups(g.kh); }

// The input columns of a segment of `rows` output pixels, or -1 beyond what the quad path takes.
int64_t quad_columns(const ConvGeometry& g, int64_t rows) {
  if (quad_row_groups(g) > kMaxQuadRowGroups || g.stride_w > kMaxSegmentColumns || g.kw > kMaxSegmentColumns ||
      g.dil_w > kMaxSegmentColumns)
    return -1;
  const int64_t columns = segment_columns(g, rows);
  return columns <= kMaxSegmentColumns ? columns : -1;
}

// The channels (bytes) of a quad vector: 64 (zmm) or 32 (ymm) for blocks of up to 32 channels.
int64_t quad_width(int64_t ncols) { return ncols <= 32 ? 32 : 64; }

// The instructions of the quad path for W-byte vectors (one table per width: the intrinsics differ). The byte
// unpacks interleave within 128-bit lanes, so vector m of their result takes dword m of each lane: row_order moves
// dword 4 L + m of a row to the place that ends up in vector m, which then holds channels (W / 4) m .. (W / 4)
// (m + 1) - 1.
template <int W>
struct QuadOps;

template <>
struct QuadOps<64> {
  using V = __m512i;
  using Mask = __mmask64;
  static TQ_TARGET_VNNI V zero() { return _mm512_setzero_si512(); }
  static TQ_TARGET_VNNI V bytes(uint8_t b) { return _mm512_set1_epi8(static_cast<char>(b)); }
  static TQ_TARGET_VNNI V load(const void* p) { return _mm512_loadu_si512(p); }
  static TQ_TARGET_VNNI void store(void* p, V v) { _mm512_storeu_si512(p, v); }
  static TQ_TARGET_VNNI V load_row(Mask mask, const uint8_t* p) { return _mm512_maskz_loadu_epi8(mask, p); }
  static TQ_TARGET_VNNI V pick(V v, const uint8_t* control) {
    return _mm512_shuffle_epi8(v, _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(control))));
  }
  static TQ_TARGET_VNNI V row_order(V v) {
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v);
  }
  static TQ_TARGET_VNNI V add(V a, V b) { return _mm512_add_epi32(a, b); }
  static TQ_TARGET_VNNI V xor_(V a, V b) { return _mm512_xor_si512(a, b); }
  static TQ_TARGET_VNNI V lo8(V a, V b) { return _mm512_unpacklo_epi8(a, b); }
  static TQ_TARGET_VNNI V hi8(V a, V b) { return _mm512_unpackhi_epi8(a, b); }
  static TQ_TARGET_VNNI V lo16(V a, V b) { return _mm512_unpacklo_epi16(a, b); }
  static TQ_TARGET_VNNI V hi16(V a, V b) { return _mm512_unpackhi_epi16(a, b); }
  static TQ_TARGET_VNNI V dot(V acc, V x, V w) { return _mm512_dpbusd_epi32(acc, x, w); }
};

template <>
struct QuadOps<32> {
  using V = __m256i;
  using Mask = __mmask32;
  static TQ_TARGET_VNNI V zero() { return _mm256_setzero_si256(); }
  static TQ_TARGET_VNNI V bytes(uint8_t b) { return _mm256_set1_epi8(static_cast<char>(b)); }
  static TQ_TARGET_VNNI V load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static TQ_TARGET_VNNI void store(void* p, V v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static TQ_TARGET_VNNI V load_row(Mask mask, const uint8_t* p) { return _mm256_maskz_loadu_epi8(mask, p); }
  static TQ_TARGET_VNNI V pick(V v, const uint8_t* control) {
    const __m128i lane = _mm_load_si128(reinterpret_cast<const __m128i*>(control));
    return _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(lane));
  }
  static TQ_TARGET_VNNI V row_order(V v) {
    return _mm256_permutexvar_epi32(_mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7), v);
  }
  static TQ_TARGET_VNNI V add(V a, V b) { return _mm256_add_epi32(a, b); }
  static TQ_TARGET_VNNI V xor_(V a, V b) { return _mm256_xor_si256(a, b); }
  static TQ_TARGET_VNNI V lo8(V a, V b) { return _mm256_unpacklo_epi8(a, b); }
  static TQ_TARGET_VNNI V hi8(V a, V b) { return _mm256_unpackhi_epi8(a, b); }
  static TQ_TARGET_VNNI V lo16(V a, V b) { return _mm256_unpacklo_epi16(a, b); }
  static TQ_TARGET_VNNI V hi16(V a, V b) { return _mm256_unpackhi_epi16(a, b); }
  static TQ_TARGET_VNNI V dot(V acc, V x, V w) { return _mm256_dpbusd_epi32(acc, x, w); }
};

// The quads [column][row group] of input columns iw_first.. for output row oh, channels c0.. (mask).
template <int W, bool FLIP>
TQ_TARGET_VNNI void build_quads(const DepthwiseSource& s, int64_t b, int64_t oh, int64_t iw_first, int64_t columns,
                                int64_t c0, typename QuadOps<W>::Mask mask, uint8_t* quads) {
  using Op = QuadOps<W>;
  const ConvGeometry& g = s.g;
  const int64_t groups = quad_row_groups(g);
  const auto pad = Op::bytes(s.pad_byte), flip = Op::bytes(0x80);
  const int64_t ih0 = oh * g.stride_h - g.pad_h;
  for (int64_t q = 0; q < groups; ++q) {
    const uint8_t* rows[4];  // the kernel rows' input rows at column 0; nullptr: outside the input or the kernel
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * q + k;
      const int64_t ih = i < g.kh ? ih0 + i * g.dil_h : -1;  // rows past the kernel: no product that may overflow
      rows[k] = ih >= 0 && ih < g.height ? s.x + g.pixel_offset(b, ih, 0) + c0 : nullptr;
    }
    for (int64_t p = 0; p < columns; ++p) {
      const int64_t iw = iw_first + p;
      uint8_t* out = quads + (p * groups + q) * 4 * W;
      if (iw < 0 || iw >= g.width) {
        for (int m = 0; m < 4; ++m) Op::store(out + m * W, pad);
        continue;
      }
      typename Op::V r[4];
      for (int k = 0; k < 4; ++k) {
        r[k] = pad;
        if (rows[k] != nullptr) {
          r[k] = Op::load_row(mask, rows[k] + iw * g.channels);
          if (s.group_channels > 1) r[k] = Op::pick(r[k], s.pick);
          r[k] = Op::row_order(r[k]);
          if (FLIP) r[k] = Op::xor_(r[k], flip);
        }
      }
      const auto lo01 = Op::lo8(r[0], r[1]), hi01 = Op::hi8(r[0], r[1]);
      const auto lo23 = Op::lo8(r[2], r[3]), hi23 = Op::hi8(r[2], r[3]);
      Op::store(out, Op::lo16(lo01, lo23));
      Op::store(out + W, Op::hi16(lo01, lo23));
      Op::store(out + 2 * W, Op::lo16(hi01, hi23));
      Op::store(out + 3 * W, Op::hi16(hi01, hi23));
    }
  }
}

// The sums of `blocks` blocks of R consecutive output pixels, the first pixel reading quad column 0, from the
// channel block's weight quads; into (accumulate: added to) the tile.
template <int W, int R>
TQ_TARGET_VNNI void depthwise_quad_pixels(const ConvGeometry& g, const uint8_t* quads, int64_t blocks,
                                          const int8_t* w_quads, bool accumulate, int32_t* tile) {
  using Op = QuadOps<W>;
  const int64_t groups = quad_row_groups(g);
  for (int64_t block = 0; block < blocks; ++block) {
    const uint8_t* block_quads = quads + block * R * g.stride_w * groups * 4 * W;
    typename Op::V acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < 4; ++m) acc[r][m] = Op::zero();
    for (int64_t j = 0; j < g.kw; ++j) {
      for (int64_t q = 0; q < groups; ++q) {
        const int8_t* wq = w_quads + (j * groups + q) * 4 * W;
        typename Op::V w[4];
        for (int m = 0; m < 4; ++m) w[m] = Op::load(wq + m * W);
        for (int r = 0; r < R; ++r) {
          const uint8_t* quad = block_quads + ((r * g.stride_w + j * g.dil_w) * groups + q) * 4 * W;
          for (int m = 0; m < 4; ++m) acc[r][m] = Op::dot(acc[r][m], Op::load(quad + m * W), w[m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < 4; ++m) {
        int32_t* dst = tile + (block * R + r) * kPackAlign + W / 4 * m;
        Op::store(dst, accumulate ? Op::add(acc[r][m], Op::load(dst)) : acc[r][m]);
      }
  }
}

constexpr int kDepthwiseRows = 4;  // pixels per block: 16 accumulators and 4 weight vectors

template <int W, bool FLIP>
TQ_TARGET_VNNI void depthwise_segment_avx512(const DepthwiseSource& s, int64_t b, int64_t oh, int64_t ow0,
                                             int64_t rows, int64_t c0, int64_t ncols, int32_t* tile, uint8_t* quads) {
  const ConvGeometry& g = s.g;
  const auto mask = static_cast<typename QuadOps<W>::Mask>(ncols == 64 ? ~uint64_t{0} : (uint64_t{1} << ncols) - 1);
  build_quads<W, FLIP>(s, b, oh, ow0 * g.stride_w - g.pad_w, quad_columns(g, rows), c0, mask, quads);
  const int8_t* w_quads = s.w_quads + (c0 / kDepthwiseChannels) * g.kw * quad_row_groups(g) * kQuadBytes;
  const int64_t full = rows / kDepthwiseRows * kDepthwiseRows;
  depthwise_quad_pixels<W, kDepthwiseRows>(g, quads, full / kDepthwiseRows, w_quads, s.accumulate, tile);
  depthwise_quad_pixels<W, 1>(g, quads + full * g.stride_w * quad_row_groups(g) * 4 * W, rows - full, w_quads,
                              s.accumulate, tile + full * kPackAlign);
}

// The weight quads of the AVX-512 path: [block][kernel column][row group][channel of the block][4 bytes], kernel
// row 4 q + k of the group at byte k; zero past the kernel and the channels. Blocks are kQuadBytes * kw * groups
// apart; the quads of a block of W = 32 channels take the first half of that. Empty for kernels of more rows than
// the quads take.
int64_t weight_quads_bytes(int64_t channels, int64_t kh, int64_t kw) {
  if (quad_row_groups(kh) > kMaxQuadRowGroups) return 0;
  return (channels + kDepthwiseChannels - 1) / kDepthwiseChannels * kw * quad_row_groups(kh) * kQuadBytes;
}

// The quads at `quads` (weight_quads_bytes of them: none past the quads' kernel rows) of w [tap][channel].
void weight_quads(int64_t channels, int64_t kh, int64_t kw, const int8_t* w, int8_t* quads) {
  const int64_t groups = quad_row_groups(kh);
  if (groups > kMaxQuadRowGroups) return;
  std::memset(quads, 0, weight_quads_bytes(channels, kh, kw));
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t block = c / kDepthwiseChannels;
    const int64_t width = quad_width(std::min(kDepthwiseChannels, channels - block * kDepthwiseChannels));
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j)
        quads[block * kw * groups * kQuadBytes + (j * groups + i / 4) * 4 * width + (c % width) * 4 + i % 4] =
            w[(i * kw + j) * channels + c];
  }
}

// columns: the segment's quads (AVX-512) or row pairs (AVX2), built there
template <bool FLIP>
void depthwise_segment(const DepthwiseSource& s, int64_t b, int64_t oh, int64_t ow0, int64_t rows, int64_t c0,
                       int64_t ncols, int32_t* tile, void* columns, CpuIsa isa) {
  if (s.w_quads != nullptr) {
    uint8_t* quads = static_cast<uint8_t*>(columns);
    if (quad_width(ncols) == 32) return depthwise_segment_avx512<32, FLIP>(s, b, oh, ow0, rows, c0, ncols, tile, quads);
    return depthwise_segment_avx512<64, FLIP>(s, b, oh, ow0, rows, c0, ncols, tile, quads);
  }
  // AVX-512 machines take the AVX2 code for kernels too wide or tall for column quads
  if (isa != CpuIsa::Scalar)
    return depthwise_segment_avx2<FLIP>(s, b, oh, ow0, rows, c0, ncols, tile, static_cast<int16_t*>(columns));
  for (int64_t r = 0; r < rows; ++r) depthwise_pixel_scalar<FLIP>(s, b, oh, ow0 + r, c0, ncols, tile + r * kPackAlign);
}

// The passes of the depthwise kernel for a conv of groups of cg input and ocg output channels: 1 for a depthwise
// conv, cg for a grouped conv it takes, 0 for the others (the GEMM's).
int64_t depthwise_passes(int64_t groups, int64_t cg, int64_t ocg) {
  if (cg == 1 && ocg == 1) return 1;
  // groups within 16-byte lanes; at 16 channels the passes measured 1.1x (AVX-512) to 1.7x (AVX2) slower than the
  // GEMM, whose panel then holds 16 of its 64 columns
  const bool few_passes = cg == 2 || cg == 4 || cg == 8;
  return groups > 1 && ocg == cg && few_passes ? cg : 0;
}

// The depthwise weight as the kernels read it, pass after pass (one for a depthwise conv, G for a grouped conv's):
// [tap][channel], the quads and the pairs, each pass's depthwise_extra_bytes.
struct DepthwiseWeight {
  const int8_t* layouts;
  int64_t passes;
  std::vector<int8_t> derived;  // for a weight packed without them (as a matrix viewed as the conv weight)
};

// The bytes of a depthwise weight's kernel layouts for one pass: taps, quads, pairs.
int64_t depthwise_extra_bytes(int64_t channels, int64_t kh, int64_t kw) {
  return kh * kw * channels + weight_quads_bytes(channels, kh, kw) + weight_pairs_bytes(channels, kh, kw);
}

// The quads and pairs after the taps [tap][channel] at w.
void depthwise_layouts(int64_t channels, int64_t kh, int64_t kw, int8_t* w) {
  int8_t* quads = w + kh * kw * channels;
  weight_quads(channels, kh, kw, w, quads);
  weight_pairs(channels, kh, kw, w, quads + weight_quads_bytes(channels, kh, kw));
}

// The layouts of `passes` passes at dst (depthwise_extra_bytes each) from weight(c, t, i): output channel c's weight
// of input channel i of its group at tap t (pass i's taps).
template <class Weight>
void depthwise_pass_layouts(int64_t channels, int64_t kh, int64_t kw, int64_t passes, const Weight& weight,
                            int8_t* dst) {
  for (int64_t i = 0; i < passes; ++i) {
    int8_t* taps = dst + i * depthwise_extra_bytes(channels, kh, kw);
    for (int64_t t = 0; t < kh * kw; ++t)
      for (int64_t c = 0; c < channels; ++c) taps[t * channels + c] = weight(c, t, i);
    depthwise_layouts(channels, kh, kw, taps);
  }
}

// A grouped conv weight of cg input channels per group read from its GEMM panels (a weight packed without the
// kernels' layouts, as a matrix viewed as the conv weight): (c, t, i) is k = t * cg + i of group c / cg's column
// c % cg.
struct PanelWeight {
  const int8_t* w_packed;
  int64_t group_bytes, cg;
  int8_t operator()(int64_t c, int64_t t, int64_t i) const {
    return w_packed[c / cg * group_bytes + panel_byte(t * cg + i, c % cg)];
  }
};

// The weight of `passes` passes. extras: the packed weight's (conv_weight_extras), or nullptr.
DepthwiseWeight depthwise_weight(const ConvGeometry& g, int64_t passes, const int8_t* w_packed, int64_t group_bytes,
                                 const int8_t* extras) {
  DepthwiseWeight w{extras, passes, {}};
  if (extras == nullptr) {
    w.derived.resize(passes * depthwise_extra_bytes(g.channels, g.kh, g.kw));
    depthwise_pass_layouts(g.channels, g.kh, g.kw, passes, PanelWeight{w_packed, group_bytes, passes},
                           w.derived.data());
    w.layouts = w.derived.data();
  }
  return w;
}

// The work items of the depthwise and grouped kernels: segments of up to kDepthwisePixels output pixels of one
// output row (segments per row, segment_len pixels each), each for one 64-channel block; column_bytes of 64-byte
// aligned scratch per thread for a segment's laid-out input (0: none). depth: the products in a sum (the epilogue
// bounds the sums by it, and may skip clamps by the bound).
struct SegmentWork {
  int64_t segments, segment_len, column_bytes, depth;
};

// Runs segment(b, oh, ow0, rows, c0, ncols, tile, columns), which writes the tile of its pixels and channels, for
// every work item, and the epilogue on each tile.
template <class Segment>
void for_each_segment(const ConvGeometry& g, const SegmentWork& work, const Epilogue& ep, CpuIsa isa,
                      const Segment& segment) {
  const int64_t blocks = (g.channels + kDepthwiseChannels - 1) / kDepthwiseChannels;
  const int64_t items = g.batch * g.out_h * work.segments * blocks;
  const int64_t item_cost = work.segment_len * kDepthwiseChannels * work.depth;  // multiply-adds
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(item_cost, 1));
  const Epilogue out_ep = with_streaming(ep, g.rows, g.channels);
  const PanelEpilogues panels(out_ep, 1, g.channels, work.depth, isa);  // one per channel block
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t tile[kDepthwisePixels * kPackAlign];
    const ScratchScope columns_scope(Scratch::GemmRows);
    void* columns = nullptr;
    if (work.column_bytes > 0) {  // 64-byte aligned: the vectors' loads then never split a cache line
      uint8_t* buffer = scratch_buffer(Scratch::GemmRows, work.column_bytes + 64);
      columns = buffer + (-reinterpret_cast<uintptr_t>(buffer) & 63);
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item % blocks, segment_index = item / blocks;
      const int64_t image_row = segment_index / work.segments;  // b * out_h + oh
      const int64_t ow0 = (segment_index % work.segments) * work.segment_len;
      const int64_t rows = std::min(work.segment_len, g.out_w - ow0);
      const int64_t c0 = block * kDepthwiseChannels, ncols = std::min(kDepthwiseChannels, g.channels - c0);
      segment(image_row / g.out_h, image_row % g.out_h, ow0, rows, c0, ncols, tile, columns);
      epilogue_tile(out_ep, panels[block], tile, image_row * g.out_w + ow0, rows, c0, ncols, isa);
    }
    if (out_ep.streaming) _mm_sfence();
  });
}

// The depthwise int8_conv2d (or a grouped one's passes): x channels-last bytes, w the weight, the epilogue as for
// the GEMM.
void conv_u8s8_depthwise(const ConvGeometry& g, const uint8_t* x, const DepthwiseWeight& w, uint8_t flip,
                         uint8_t pad_byte, const Epilogue& ep, CpuIsa isa) {
  const int64_t taps = g.kh * g.kw;
  RowSplit split = split_row(g, std::numeric_limits<int64_t>::max());
  const int64_t quad_cols = quad_columns(g, split.segment_len);
  const bool quads = isa == CpuIsa::Avx512Vnni && quad_cols > 0, pairs = isa != CpuIsa::Scalar && !quads;
  int64_t column_bytes = 0;  // a work item's quads or row pairs
  if (quads) {
    column_bytes = quad_cols * quad_row_groups(g) * kQuadBytes;
  } else if (pairs) {
    split = split_row(g, kMaxSegmentColumns);
    column_bytes = segment_columns(g, split.segment_len) * pair_row_groups(g.kh) * kPairValues * sizeof(int16_t);
  }
  std::vector<DepthwiseSource> sources;
  const int64_t tap_bytes = taps * g.channels, quads_bytes = weight_quads_bytes(g.channels, g.kh, g.kw);
  for (int64_t i = 0; i < w.passes; ++i) {
    const int8_t* layouts = w.layouts + i * depthwise_extra_bytes(g.channels, g.kh, g.kw);
    sources.push_back(depthwise_source(x, g, layouts, quads ? layouts + tap_bytes : nullptr,
                                       pairs ? layouts + tap_bytes + quads_bytes : nullptr, pad_byte, w.passes, i));
  }
  const SegmentWork work{split.segments, split.segment_len, column_bytes, taps * w.passes};
  for_each_segment(g, work, ep, isa, [&](int64_t b, int64_t oh, int64_t ow0, int64_t rows, int64_t c0, int64_t ncols,
                                         int32_t* tile, void* columns) {
    for (const DepthwiseSource& src : sources) {
      if (flip != 0) depthwise_segment<true>(src, b, oh, ow0, rows, c0, ncols, tile, columns, isa);
      else depthwise_segment<false>(src, b, oh, ow0, rows, c0, ncols, tile, columns, isa);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Grouped convs of 4, 8, 16 or 32 channels in and out per group, uint8 input, AVX-512 VNNI: each lane of a vector
// sums input channels of its output channel's group against the input pixel's bytes broadcast from memory: every
// product a valid one, 64 an instruction. Groups of 16 and 32: 16 output channels a zmm, a lane 4 input channels (a
// dword broadcast). Groups of 8: 8 output channels a zmm, two lanes each for the group's 8 input channels (a qword
// broadcast), added as the tile is written (8 channels in a ymm made 32 products an instruction). Groups of 4: the
// pixel's 16 bytes of 4 groups broadcast to the 4 128-bit lanes, dword q of lane k summing output channel k of group
// q, transposed as the tile is written (the depthwise kernel's 4 passes ran them). The GEMM ran a 64-column weight
// panel for each group's 16 or 32 columns (ResNeXt-50 32x4d's 3x3 convs at 0.25-0.6x torch.ao's groupwise kernels).
// ---------------------------------------------------------------------------------------------------------------

// Whether the dword kernel takes a conv of groups of cg input and ocg output channels (where it runs: a uint8 input
// on AVX-512). Groups of 4 in whole 16-byte broadcasts only (no read past the channels).
bool dword_kernel_takes(int64_t groups, int64_t cg, int64_t ocg) {
  return groups > 1 && ocg == cg && (cg == 8 || cg == 16 || cg == 32 || (cg == 4 && groups % 4 == 0));
}

// The weight of the dword kernel: [64-channel block][tap][dword d][channel of the block][4 bytes], output channel c's
// bytes for input channels 4 d .. 4 d + 3 of its group; zero past the channels.
int64_t dword_weight_bytes(int64_t channels, int64_t cg, int64_t taps) {
  return round_up(channels, kPackAlign) * taps * cg;
}

// Lays out the dword kernel's weight at dst from weight(c, t, i): output channel c's weight of input channel i of
// its group at tap t.
template <class Weight>
void dword_weight(int64_t channels, int64_t cg, int64_t taps, const Weight& weight, int8_t* dst) {
  std::memset(dst, 0, dword_weight_bytes(channels, cg, taps));
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t i = 0; i < cg; ++i)
        dst[((c / kPackAlign * taps + t) * (cg / 4) + i / 4) * 4 * kPackAlign + c % kPackAlign * 4 + i % 4] =
            weight(c, t, i);
}

// Dword q of 128-bit lane k to and from channel 4 q + k of 16 (groups of 4; its own inverse).
TQ_TARGET_VNNI __m512i transpose_quads(__m512i v) {
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v);
}

// The layouts of groups of 4 and 8 made from the dword layout w (the packed weight keeps that one, which the AVX2
// pair kernel reads; a few hundred vector moves a call): groups of 8, each channel's two dwords side by side,
// [64-channel block][tap][channel][8 bytes]; groups of 4, each 16 channels' dwords transposed (transpose_quads).
TQ_TARGET_VNNI void group_lane_weight(const int8_t* w, int64_t channels, int64_t cg, int64_t taps, int8_t* dst) {
  const __m512i interleave = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const int64_t tap_blocks = round_up(channels, kPackAlign) / kPackAlign * taps;  // cg x 64 bytes each
  for (int64_t t = 0; t < tap_blocks; ++t) {
    const int8_t* from = w + t * cg * kPackAlign;
    int8_t* to = dst + t * cg * kPackAlign;
    if (cg == 4) {
      for (int64_t m = 0; m < kPackAlign / 16; ++m)
        _mm512_storeu_si512(to + m * 64, transpose_quads(_mm512_loadu_si512(from + m * 64)));
      continue;
    }
    for (int64_t m = 0; m < kPackAlign / 8; ++m) {
      const __m512i d0 = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + m * 32)));
      const __m512i d1 = _mm512_castsi256_si512(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + 4 * kPackAlign + m * 32)));
      _mm512_storeu_si512(to + m * 64, _mm512_permutex2var_epi32(d0, interleave, d1));
    }
  }
}

struct DwordSource {
  const uint8_t* x;  // channels-last uint8 input bytes
  ConvGeometry g;
  const int8_t* w;   // dword_weight's layout (groups of 4 and 8: group_lane_weight's)
  alignas(64) uint8_t pad[kPackAlign];  // the zero point: what taps outside the input read
};

// The zmm vectors of the dword kernel: kChannels output channels each, a broadcast of kBytes input channels a step,
// kWeightBytes of each output channel's weight a step.
struct DwordLanes {  // groups of 16 and 32: a lane a channel
  static constexpr int kChannels = 16, kBytes = 4, kWeightBytes = 4;
  static TQ_TARGET_VNNI __m512i broadcast(const uint8_t* p) {
    int32_t bytes;
    std::memcpy(&bytes, p, sizeof(bytes));
    return _mm512_set1_epi32(bytes);
  }
  static TQ_TARGET_VNNI void store(int32_t* p, __m512i v) { _mm512_storeu_si512(p, v); }
};

struct QwordLanes {  // groups of 8: lanes 2 c and 2 c + 1 for channel c, added when stored
  static constexpr int kChannels = 8, kBytes = 8, kWeightBytes = 8;
  static TQ_TARGET_VNNI __m512i broadcast(const uint8_t* p) {
    int64_t bytes;
    std::memcpy(&bytes, p, sizeof(bytes));
    return _mm512_set1_epi64(bytes);
  }
  static TQ_TARGET_VNNI void store(int32_t* p, __m512i v) {
    const __m512i pairs = _mm512_add_epi32(v, _mm512_srli_epi64(v, 32));  // channel c's sum in lane 2 c
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi64_epi32(pairs));
  }
};

struct QuadLanes {  // groups of 4: 4 groups' 16 input channels a broadcast, lane 4 k + q channel 4 q + k
  static constexpr int kChannels = 16, kBytes = 16, kWeightBytes = 4;
  static TQ_TARGET_VNNI __m512i broadcast(const uint8_t* p) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static TQ_TARGET_VNNI void store(int32_t* p, __m512i v) { _mm512_storeu_si512(p, transpose_quads(v)); }
};

// The sums of R consecutive output pixels from (b, oh, ow) on, for the V vectors of Lanes::kChannels channels from c0
// on, into tile rows kPackAlign apart; groups of CG channels (a constant: the products' byte offsets are then
// immediates, and the registers they took hold the pixels' addresses: groups of 8 85 -> 91-100 G multiply-adds/s).
template <class Lanes, int CG, int R, int V>
TQ_TARGET_VNNI void dword_group_pixels(const DwordSource& s, int64_t b, int64_t oh, int64_t ow, int64_t c0,
                                       int32_t* tile) {
  constexpr int64_t L = Lanes::kChannels, step = Lanes::kBytes, steps = std::max<int64_t>(CG / step, 1);
  const ConvGeometry& g = s.g;
  const int8_t* w = s.w + c0 / kPackAlign * g.kh * g.kw * CG * kPackAlign;
  __m512i acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < V; ++m) acc[r][m] = _mm512_setzero_si512();
  const int64_t channels = g.channels, width = g.width, stride_w = g.stride_w;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
    const bool row_inside = ih >= 0 && ih < g.height;
    const int64_t row_at = g.pixel_offset(b, ih, 0) + c0;  // used for rows inside only
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw0 = ow * stride_w - g.pad_w + j * g.dil_w;
      const uint8_t* pixel[R];  // the tap's input pixel at channel c0, or the zero point's bytes
      for (int r = 0; r < R; ++r) {
        const int64_t iw = iw0 + r * stride_w;
        const bool inside = row_inside && static_cast<uint64_t>(iw) < static_cast<uint64_t>(width);
        pixel[r] = inside ? s.x + row_at + iw * channels : s.pad;
      }
      const int8_t* w_tap = w + (i * g.kw + j) * CG * kPackAlign;
      for (int64_t d = 0; d < steps; ++d)
        for (int m = 0; m < V; ++m) {
          __m512i wv = _mm512_loadu_si512(w_tap + (d * kPackAlign + m * L) * Lanes::kWeightBytes);
          // in a register for the R products: as each vpdpbusd's memory operand (what the compiler chose), a zmm
          // load beside every broadcast halved the rate (0.5 vpdpbusd a cycle on Zen 4, 1 from registers)
          asm("" : "+v"(wv));
          const int64_t at = L * m / CG * CG + step * d;  // the vector's (first) group's first channel, the step's
          for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], Lanes::broadcast(pixel[r] + at), wv);
        }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < V; ++m) Lanes::store(tile + r * kPackAlign + L * m, acc[r][m]);
}

// Pixels per call: 24 accumulators for the 64 channels of a block (16-lane vectors: 4 pixels measured 8-13 % slower).
template <class Lanes>
constexpr int kDwordPixels = 24 / (kPackAlign / Lanes::kChannels);

// The last n < kDwordPixels pixels in one call (one at a time would load each weight vector per pixel).
template <class Lanes, int CG, int V, int N>
TQ_TARGET_VNNI void dword_group_rest(const DwordSource& s, int64_t b, int64_t oh, int64_t ow, int64_t n, int64_t c0,
                                     int32_t* tile) {
  if constexpr (N > 0) {
    if (n == N) return dword_group_pixels<Lanes, CG, N, V>(s, b, oh, ow, c0, tile);
    dword_group_rest<Lanes, CG, V, N - 1>(s, b, oh, ow, n, c0, tile);
  }
}

template <class Lanes, int CG, int V>
TQ_TARGET_VNNI void dword_group_segment(const DwordSource& s, int64_t b, int64_t oh, int64_t ow0, int64_t rows,
                                        int64_t c0, int32_t* tile) {
  constexpr int R = kDwordPixels<Lanes>;
  // every input line the segment's windows read, asked for at once: from L3 (at batch 8 the input outgrows L2) the
  // first tap to reach each one stalled on it in turn (ResNeXt-50's 512 -> 512 at batch 8: 0.97-1.35 -> 0.89-0.94 ms)
  const ConvGeometry& g = s.g;
  const int64_t iw_first = std::max<int64_t>(ow0 * g.stride_w - g.pad_w, 0);
  const int64_t iw_last = std::min((ow0 + rows - 1) * g.stride_w - g.pad_w + (g.kw - 1) * g.dil_w, g.width - 1);
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
    if (ih < 0 || ih >= g.height) continue;
    for (int64_t iw = iw_first; iw <= iw_last; ++iw)
      _mm_prefetch(reinterpret_cast<const char*>(s.x + g.pixel_offset(b, ih, iw) + c0),
                   _MM_HINT_T0);
  }
  int64_t r = 0;
  for (; r + R <= rows; r += R) dword_group_pixels<Lanes, CG, R, V>(s, b, oh, ow0 + r, c0, tile + r * kPackAlign);
  dword_group_rest<Lanes, CG, V, R - 1>(s, b, oh, ow0 + r, rows - r, c0, tile + r * kPackAlign);
}

// The segment for the block's v vectors of Lanes::kChannels channels (whole vectors, at most V).
template <class Lanes, int CG, int V>
TQ_TARGET_VNNI void dword_group_vectors(const DwordSource& s, int64_t v, int64_t b, int64_t oh, int64_t ow0,
                                        int64_t rows, int64_t c0, int32_t* tile) {
  if constexpr (V > 1) {
    if (v < V) return dword_group_vectors<Lanes, CG, V - 1>(s, v, b, oh, ow0, rows, c0, tile);
  }
  dword_group_segment<Lanes, CG, V>(s, b, oh, ow0, rows, c0, tile);
}

// The grouped int8_conv2d of dword_kernel_takes: x channels-last uint8 bytes, w dword_weight's layout, the epilogue
// as for the GEMM.
void conv_u8s8_dword_groups(const ConvGeometry& g, const uint8_t* x, const int8_t* w, int64_t cg, uint8_t pad_byte,
                            const Epilogue& ep) {
  // whole vectors in every block (a partial one would leave tile columns unwritten)
  TORCH_INTERNAL_ASSERT(g.channels % (cg == 4 ? 16 : cg) == 0 && dword_kernel_takes(g.channels / cg, cg, cg));
  // w is never in this slot: conv_cpu's weights there are padded kernel rows, for ungrouped convs only
  const ScratchScope weight_scope(Scratch::Weights);
  if (cg <= 8) {
    auto* lanes = reinterpret_cast<int8_t*>(
        scratch_buffer(Scratch::Weights, dword_weight_bytes(g.channels, cg, g.kh * g.kw)));
    group_lane_weight(w, g.channels, cg, g.kh * g.kw, lanes);
    w = lanes;
  }
  DwordSource s{x, g, w, {}};
  std::memset(s.pad, pad_byte, sizeof(s.pad));
  const RowSplit split = split_row(g, std::numeric_limits<int64_t>::max());
  const SegmentWork work{split.segments, split.segment_len, 0, g.kh * g.kw * cg};
  for_each_segment(g, work, ep, CpuIsa::Avx512Vnni, [&](int64_t b, int64_t oh, int64_t ow0, int64_t rows, int64_t c0,
                                                       int64_t ncols, int32_t* tile, void*) {
    if (cg == 4) return dword_group_vectors<QuadLanes, 4, 4>(s, ncols / 16, b, oh, ow0, rows, c0, tile);
    if (cg == 8) return dword_group_vectors<QwordLanes, 8, 8>(s, ncols / 8, b, oh, ow0, rows, c0, tile);
    if (cg == 16) return dword_group_vectors<DwordLanes, 16, 4>(s, ncols / 16, b, oh, ow0, rows, c0, tile);
    dword_group_vectors<DwordLanes, 32, 4>(s, ncols / 16, b, oh, ow0, rows, c0, tile);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Grouped convs of 4, 8 or 16 channels in and out per group on AVX2, which has no byte dot product that cannot
// saturate: a work item first widens the input columns its windows read (every kernel row, its 64 channels) to
// int16; vpmaddwd then multiplies a pixel's 4 input channels of a group (one 64-bit broadcast) by 4 output channels'
// weights for them (16 bytes of the dword kernel's layout, sign-extended), each output channel's two lanes added as
// the tile is written; 6 pixels x 8 output channels per call. The GEMM's 64-column panel for each group, or the
// depthwise kernel's passes, had run ResNeXt-50 32x4d's grouped convs at 0.36-0.72x torch.ao's groupwise kernels.
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kPairGroupColumns = 64;  // input columns a work item widens where the geometry allows (L1-sized)
constexpr int kPairGroupPixels = 6;        // 12 accumulators, 2 weight vectors and a broadcast: 15 of 16 registers

// Whether the AVX2 pair kernel takes a conv of groups of cg input and ocg output channels: groups of 4 (two groups'
// broadcasts for the 8 output channels of a call; the layout is made per call where the dword kernel does not take
// them), 8 or 16. The GEMM's widened kernel outruns it at 32 (ResNeXt-50's 1024 -> 1024 at 7x7: 0.23 against
// 0.27 ms).
bool pair_kernel_takes(int64_t groups, int64_t cg, int64_t ocg) {
  return groups > 1 && ocg == cg && (cg == 4 || cg == 8 || cg == 16);
}

struct PairGroupSource {
  const uint8_t* x;  // channels-last input bytes (int8 ones read as uint8, flip applied as they are widened)
  ConvGeometry g;
  const int8_t* w;   // dword_weight's layout
  int64_t group_channels;
  int64_t columns;   // widened columns of each kernel row
  uint8_t flip, pad_byte;
};

// The input columns from iw_first on that each kernel row of output row oh reads, the ncols channels from c0 (a
// multiple of 4) widened, at rows[(i * s.columns + column) * kDepthwiseChannels]; the padding byte outside the input.
TQ_TARGET_AVX2 void widen_window_rows(const PairGroupSource& s, int64_t b, int64_t oh, int64_t iw_first, int64_t c0,
                                      int64_t ncols, int16_t* rows) {
  const ConvGeometry& g = s.g;
  const __m256i pad = _mm256_set1_epi16(s.pad_byte);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(s.flip));
  // columns [lo, hi) lie inside the input
  const int64_t lo = std::clamp<int64_t>(-iw_first, 0, s.columns);
  const int64_t hi = std::clamp<int64_t>(g.width - iw_first, lo, s.columns);
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
    const bool row_inside = ih >= 0 && ih < g.height;
    for (int64_t p = 0; p < s.columns; ++p) {
      int16_t* out = rows + (i * s.columns + p) * kDepthwiseChannels;
      if (!row_inside || p < lo || p >= hi) {
        for (int64_t v = 0; v < ncols; v += 16) _mm256_store_si256(reinterpret_cast<__m256i*>(out + v), pad);
        continue;
      }
      const uint8_t* pixel = s.x + g.pixel_offset(b, ih, iw_first + p) + c0;
      int64_t v = 0;
      for (; v + 16 <= ncols; v += 16) {
        const __m128i bytes = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pixel + v)), flip);
        _mm256_store_si256(reinterpret_cast<__m256i*>(out + v), _mm256_cvtepu8_epi16(bytes));
      }
      for (; v < ncols; v += 8) {  // 8 or 4 channels left (the values past them meet zero weights)
        __m128i bytes;
        if (ncols - v >= 8) {
          bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pixel + v));
        } else {
          int32_t four;
          std::memcpy(&four, pixel + v, sizeof(four));
          bytes = _mm_cvtsi32_si128(four);
        }
        _mm_store_si128(reinterpret_cast<__m128i*>(out + v), _mm_cvtepu8_epi16(_mm_xor_si128(bytes, flip)));
      }
    }
  }
}

// The sums of R output pixels (the work item's pixels first.. of its widened rows) for the 8 output channels c..c+7
// of its channel block (one group's of QUADS x 4 channels), from the block's weight w_block; into tile rows kPackAlign
// apart.
template <int QUADS, int R>
TQ_TARGET_AVX2 void pair_group_pixels(const PairGroupSource& s, const int16_t* rows, int64_t first, int64_t c,
                                      const int8_t* w_block, int32_t* tile) {
  const ConvGeometry& g = s.g;
  constexpr int64_t quads = QUADS;
  // the first input channel of the group of channels c.. and of c + 4.. (the next group in groups of 4)
  const int64_t group_at = c / (4 * QUADS) * (4 * QUADS), next_at = QUADS == 1 ? c + 4 : group_at;
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int16_t* column = rows + (i * s.columns + first * g.stride_w + j * g.dil_w) * kDepthwiseChannels;
      const int8_t* w_tap = w_block + (i * g.kw + j) * quads * 4 * kPackAlign + c * 4;
      for (int64_t d = 0; d < quads; ++d) {
        const int8_t* w_quad = w_tap + d * 4 * kPackAlign;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_quad)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_quad + 16)));
        for (int r = 0; r < R; ++r) {
          const int16_t* pixel = column + r * g.stride_w * kDepthwiseChannels + 4 * d;
          int64_t values;  // the pixel's input channels 4 d .. 4 d + 3 of the group
          std::memcpy(&values, pixel + group_at, sizeof(values));
          const __m256i xv = _mm256_set1_epi64x(values);
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xv, w0));
          if (QUADS == 1) std::memcpy(&values, pixel + next_at, sizeof(values));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(QUADS == 1 ? _mm256_set1_epi64x(values) : xv, w1));
        }
      }
    }
  for (int r = 0; r < R; ++r) store_column_sums_avx2(acc[r][0], acc[r][1], tile + r * kPackAlign + c, true);
}

// n <= N pixels in one call.
template <int QUADS, int N>
TQ_TARGET_AVX2 void pair_group_call(const PairGroupSource& s, const int16_t* rows, int64_t first, int64_t n, int64_t c,
                                    const int8_t* w_block, int32_t* tile) {
  if constexpr (N > 0) {
    if (n == N) return pair_group_pixels<QUADS, N>(s, rows, first, c, w_block, tile);
    pair_group_call<QUADS, N - 1>(s, rows, first, n, c, w_block, tile);
  }
}

// The n pixels of a work item for its ncols channels, kPairGroupPixels a call and the rest in one (7 pixels as 6 and
// 1 measured faster than as 4 and 3).
template <int QUADS>
TQ_TARGET_AVX2 void pair_group_segment(const PairGroupSource& s, const int16_t* rows, int64_t n, int64_t ncols,
                                       const int8_t* w_block, int32_t* tile) {
  for (int64_t c = 0; c < ncols; c += 8) {
    int64_t r = 0;
    for (; r + kPairGroupPixels <= n; r += kPairGroupPixels)
      pair_group_pixels<QUADS, kPairGroupPixels>(s, rows, r, c, w_block, tile + r * kPackAlign);
    pair_group_call<QUADS, kPairGroupPixels - 1>(s, rows, r, n - r, c, w_block, tile + r * kPackAlign);
  }
}

// The grouped int8_conv2d of pair_kernel_takes: x channels-last bytes (flip: int8 ones), w dword_weight's
// layout, the epilogue as for the GEMM.
void conv_u8s8_pair_groups(const ConvGeometry& g, const uint8_t* x, const int8_t* w, int64_t cg, uint8_t flip,
                           uint8_t pad_byte, const Epilogue& ep) {
  const RowSplit split = split_row(g, kPairGroupColumns);
  const PairGroupSource s{x, g, w, cg, segment_columns(g, split.segment_len), flip, pad_byte};
  const int64_t column_bytes = g.kh * s.columns * kDepthwiseChannels * sizeof(int16_t);
  const int64_t taps = g.kh * g.kw;
  const SegmentWork work{split.segments, split.segment_len, column_bytes, taps * cg};
  for_each_segment(g, work, ep, CpuIsa::Avx2, [&](int64_t b, int64_t oh, int64_t ow0, int64_t n, int64_t c0,
                                                  int64_t ncols, int32_t* tile, void* columns) {
    auto* rows = static_cast<int16_t*>(columns);
    widen_window_rows(s, b, oh, ow0 * g.stride_w - g.pad_w, c0, ncols, rows);
    const int8_t* w_block = w + c0 / kPackAlign * taps * cg * kPackAlign;
    if (cg == 4) pair_group_segment<1>(s, rows, n, ncols, w_block, tile);
    else if (cg == 8) pair_group_segment<2>(s, rows, n, ncols, w_block, tile);
    else pair_group_segment<4>(s, rows, n, ncols, w_block, tile);
  });
}

// The packed conv weight w (n columns, panels of depth kp, k running (kh, kw, c)) with each kernel row's `run`
// values followed by padded_run - run zero weights: the layout conv_u8s8_in_place reads when kw * channels is not a
// multiple of 4. dst holds round_up(n, kPackAlign) / kPackAlign panels of depth kh * padded_run.
void pad_kernel_rows(const int8_t* w, int64_t n, int64_t kp, int64_t kh, int64_t run, int64_t padded_run, int8_t* dst) {
  const int64_t panels = (n + kPackAlign - 1) / kPackAlign, padded_kp = kh * padded_run;
  std::memset(dst, 0, panels * padded_kp * kPackAlign);
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t t = 0; t < run; ++t) {
        const int64_t k = i * run + t, padded_k = i * padded_run + t;
        const int8_t* from = w + p * kp * kPackAlign;
        int8_t* to = dst + p * padded_kp * kPackAlign;
        for (int64_t col = 0; col < kPackAlign; ++col) to[panel_byte(padded_k, col)] = from[panel_byte(k, col)];
      }
}

// Whether windows of kh kernel rows of `run` bytes may be read in place for ocg output channels on `isa` (see
// conv_cpu): up to two weight panels, and kernel rows padded to whole 4-byte steps where that adds at most a quarter
// to the multiplies, on AVX-512 those of an im2col row (kh * run bytes padded once: one channel's 3x3 kernel rows
// of 3 bytes read as 4 make no more), on AVX2 those of the kernel row (its kernel widens the rows of every window
// segment, which for a few bytes a row cost more than the im2col rows: 1.1-1.3x slower on 1-channel 3x3 convs).
// nullopt: either ISA's rule, for the weight packed on one machine and run on another.
bool windows_in_place(int64_t ocg, int64_t kh, int64_t run, std::optional<CpuIsa> isa) {
  const int64_t padded_run = round_up(run, 4);
  const bool row_rule = 4 * (padded_run - run) <= run, window_rule = 4 * kh * padded_run <= 5 * round_up(kh * run, 4);
  const bool padding_pays = !isa ? row_rule || window_rule : *isa == CpuIsa::Avx512Vnni ? window_rule : row_rule;
  return ocg <= 2 * kPackAlign && padding_pays;
}

// The packed weight's extras of a conv weight w [G, N, KH, KW, C] ([tap][channel], quads and pairs of each pass of
// the depthwise kernel, then the dword kernel's layout; padded kernel rows of an ungrouped one that may be read in
// place), or nullptr without them.
const int8_t* conv_weight_extras(const at::Tensor& w_packed, const PackedWeightLayout& layout) {
  const int64_t panels = layout.groups * layout.group_bytes, extras = conv_weight_extra_bytes(w_packed.sizes());
  const bool present = extras > 0 && w_packed.storage_offset() == 0 &&
                       static_cast<int64_t>(w_packed.storage().nbytes()) == panels + extras;
  return present ? static_cast<const int8_t*>(w_packed.storage().data()) + panels : nullptr;
}

}  // namespace

int64_t conv_weight_extra_bytes(at::IntArrayRef w) {
  if (w.size() != 5) return 0;
  const int64_t groups = w[0], n = w[1], kh = w[2], kw = w[3], run = kw * w[4], padded_run = round_up(run, 4);
  // the depthwise kernel's passes, then the dword kernel's layout (groups of 8, and of 4 in multiples of 4 groups,
  // take either)
  const int64_t passes = depthwise_passes(groups, w[4], n);
  const int64_t dword_bytes = dword_kernel_takes(groups, w[4], n) ? dword_weight_bytes(groups * n, n, kh * kw) : 0;
  if (passes > 0 || dword_bytes > 0) return passes * depthwise_extra_bytes(groups * n, kh, kw) + dword_bytes;
  if (groups == 1 && padded_run != run && windows_in_place(n, kh, run, std::nullopt))
    return round_up(n, kPackAlign) * kh * padded_run;
  return 0;
}

void pack_conv_weight_extras(const at::Tensor& w, const int8_t* panels, int64_t kp, int8_t* dst) {
  const int64_t groups = w.size(0), n = w.size(1), kh = w.size(2), kw = w.size(3), cg = w.size(4), run = kw * cg;
  const int64_t passes = depthwise_passes(groups, cg, n), channels = groups * n;
  const bool dword = dword_kernel_takes(groups, cg, n);
  if (passes == 0 && !dword) return pad_kernel_rows(panels, n, kp, kh, run, round_up(run, 4), dst);
  const at::Tensor by_tap = w.reshape({channels, kh * kw, cg});  // [output channel][tap][input channel of the group]
  const auto accessor = by_tap.accessor<int8_t, 3>();
  const auto weight = [&](int64_t c, int64_t t, int64_t i) { return accessor[c][t][i]; };
  depthwise_pass_layouts(channels, kh, kw, passes, weight, dst);
  if (dword) dword_weight(channels, cg, kh * kw, weight, dst + passes * depthwise_extra_bytes(channels, kh, kw));
}

namespace {

// The conv of a checked ConvFront into f.out_nhwc (g.rows > 0), with the residual add of int8_conv2d.residual when
// residual.data is set.
void conv_cpu(const ConvFront& f, const at::Tensor& x_q, int64_t x_zero_point, const at::Tensor& w_packed,
              int64_t out_channels, int64_t groups, const ResidualInput& residual) {
  const ConvGeometry& g = f.g;
  const int64_t cg = g.channels / groups, ocg = out_channels / groups;

  const ScratchScope input_scope(Scratch::Activations);
  at::Tensor x_copy;
  const uint8_t* x_bytes = channels_last_bytes(x_q, x_copy);
  const uint8_t flip = activation_flip(x_q);
  GemmArgs args;
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0;
  // Windows read in place for up to two weight panels: few panels share the cost of an im2col row (a sixth of a
  // 3x3 conv's time at 64 channels; at 128, in place measured 3-6 % faster); with four, reading rows in place
  // measured 7 % slower than the im2col rows they reuse. Kernel rows of kw * channels bytes not a multiple of 4 are
  // read padded to one, against zero weights, where that adds at most a quarter of the multiplies (a ResNet stem's
  // 21-byte rows as 24: im2col had been a quarter of its time).
  const int64_t run = g.kw * cg, padded_run = round_up(run, 4);
  bool amx = false;
  const CpuIsa isa = cpu_isa(&amx);
  // grouped convs of as many channels in as out per group: the dword kernel (AVX-512, uint8, groups of 4 to 32) or
  // the pair kernel (AVX2, groups of 4 to 16), else the depthwise kernel's passes (groups of 2 to 8) where they take
  // them
  const bool dword_layout = dword_kernel_takes(groups, cg, ocg);  // packed with the weight (extras) if it was
  const bool dword_grouped = isa == CpuIsa::Avx512Vnni && flip == 0 && dword_layout;
  const bool pair_grouped = isa == CpuIsa::Avx2 && pair_kernel_takes(groups, cg, ocg);
  const int64_t passes = depthwise_passes(groups, cg, ocg);
  const bool depthwise = passes > 0 && !dword_grouped && !pair_grouped;
  // uint8 windows of whole 4-byte steps per tap and full weight panels on AVX-512: the direct conv, which reads
  // every tap in place (no im2col rows at all) and, when the zero point is 0, skips the taps in the padding. With
  // AMX the GEMM on im2col rows multiplies on tiles, which outruns both vector kernels that read windows in place.
  const bool direct = isa == CpuIsa::Avx512Vnni && !amx && !depthwise && !pointwise && flip == 0 && groups == 1 &&
                      cg % 4 == 0 && ocg % kPackAlign == 0 && g.kh * g.kw <= kMaxDirectTaps;
  const bool in_place = !direct && !amx && !depthwise && !pointwise && flip == 0 && groups == 1 && g.dil_w == 1 &&
                        windows_in_place(ocg, g.kh, run, isa);
  const bool amx_windows = amx && !depthwise && !dword_grouped && !pointwise && flip == 0 && amx_pads_windows(g);
  const bool amx_blocks = amx && !depthwise && !dword_grouped && !amx_windows && flip == 0 && amx_takes_blocks(g);
  const int64_t run_stride = in_place ? padded_run : run;
  const Im2colSource im2col{x_bytes, g, static_cast<uint8_t>(static_cast<uint8_t>(x_zero_point) ^ flip), flip,
                            run_stride, round_up(g.kh * run_stride, 4)};
  if (pointwise && flip == 0 && cg % 4 == 0) {  // uint8 1x1: the channels-last input is the GEMM's row matrix
    args.a = x_bytes;
    args.lda = g.channels;
    args.a_group_offset = cg;
  } else {  // the GEMM produces the im2col rows as it goes
    args.fill_rows = fill_im2col_rows;
    args.fill_context = &im2col;
  }
  args.b = w_packed.data_ptr<int8_t>();
  args.ldb = f.weight.kp;
  args.b_group_stride = f.weight.group_bytes;
  args.m = g.rows;
  args.n = ocg;
  args.k = g.window;
  args.groups = groups;
  args.a_below_128 = isa == CpuIsa::Avx2 && !depthwise && !pair_grouped && flip == 0 && im2col.pad_byte < 128 &&
                     bytes_below_128(x_bytes, 1, g.batch * g.height * g.width * g.channels, 0, 1);
  const int8_t* extras = conv_weight_extras(w_packed, f.weight);
  const ScratchScope weight_scope(Scratch::Weights);
  if (run_stride != run) {  // the padded kernel rows packed with the weight, or made here
    args.k = g.kh * run_stride;
    if (extras == nullptr) {
      int8_t* padded = reinterpret_cast<int8_t*>(scratch_buffer(Scratch::Weights, round_up(ocg, kPackAlign) * args.k));
      pad_kernel_rows(args.b, ocg, args.ldb, g.kh, run, run_stride, padded);
      extras = padded;
    }
    args.b = extras;
    args.ldb = args.k;
  }
  std::vector<int32_t> col_offset;
  Epilogue ep = epilogue_for(f.epilogue, flip, f.out_nhwc.data_ptr(), out_channels, col_offset);
  ep.residual = residual;
  if (dword_grouped || pair_grouped) {
    std::vector<int8_t> derived;  // for a weight packed without the layout (as a matrix viewed as the conv weight)
    if (extras != nullptr && dword_layout) {  // after the passes' layouts, if any
      extras += passes * depthwise_extra_bytes(g.channels, g.kh, g.kw);
    } else {
      derived.resize(dword_weight_bytes(g.channels, cg, g.kh * g.kw));
      dword_weight(g.channels, cg, g.kh * g.kw, PanelWeight{args.b, args.b_group_stride, cg}, derived.data());
      extras = derived.data();
    }
    if (dword_grouped) conv_u8s8_dword_groups(g, x_bytes, extras, cg, im2col.pad_byte, ep);
    else conv_u8s8_pair_groups(g, x_bytes, extras, cg, flip, im2col.pad_byte, ep);
  } else if (depthwise)
    conv_u8s8_depthwise(g, x_bytes, depthwise_weight(g, passes, args.b, args.b_group_stride, extras), flip,
                        im2col.pad_byte, ep, isa);
  else if (amx_windows)
    conv_u8s8_amx(args, g, x_bytes, im2col.pad_byte, ep);
  else if (amx_blocks)
    conv_u8s8_amx_blocks(args, g, x_bytes, im2col.pad_byte, ep);
  else if (direct)
    conv_u8s8_direct(args, g, x_bytes, im2col.pad_byte, ep);
  else if (in_place)
    conv_u8s8_in_place(args, g, x_bytes, im2col.pad_byte, ep, isa);
  else
    gemm_u8s8(args, ep, isa);
}

at::Tensor int8_conv2d_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                           const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                           std::optional<double> clamp_min, std::optional<double> clamp_max, int64_t out_bits) {
  const ConvFront f = int8_conv2d_front(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels,
                                        kernel_size, stride, padding, dilation, groups, out_dtype, out_scale,
                                        out_zero_point, out_bits, clamp_min, clamp_max);
  if (f.g.rows > 0) conv_cpu(f, x_q, x_zero_point, w_packed, out_channels, groups, ResidualInput{});
  return f.out_nhwc.permute({0, 3, 1, 2});
}

// int8_conv2d.residual: the add in the conv's epilogue (every path: GEMM, direct, windows in place, depthwise),
// reading the residual's channels-last rows beside the output's.
at::Tensor int8_conv2d_residual_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                                    const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                                    const std::optional<at::Tensor>& bias, int64_t out_channels,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, at::ScalarType out_dtype,
                                    std::optional<double> out_scale, int64_t out_zero_point,
                                    std::optional<double> clamp_min, std::optional<double> clamp_max,
                                    const at::Tensor& residual, const at::Tensor& residual_scale,
                                    int64_t residual_zero_point, bool relu, int64_t out_bits) {
  const ConvFront f = int8_conv2d_front(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels,
                                        kernel_size, stride, padding, dilation, groups, out_dtype, out_scale,
                                        out_zero_point, out_bits, clamp_min, clamp_max);
  at::Tensor out = f.out_nhwc.permute({0, 3, 1, 2});
  check_conv_residual(x_q, out.sizes(), residual, residual_scale, residual_zero_point);
  check_scale_values("int8_conv2d", "residual_scale", residual_scale);
  if (f.g.rows == 0) return out;
  // rows of out_channels bytes, as the output's (a copy only for another layout)
  const at::Tensor rows = residual.contiguous(at::MemoryFormat::ChannelsLast);
  ResidualInput r;
  r.data = static_cast<const uint8_t*>(rows.const_data_ptr());
  r.row_stride = out_channels;
  r.flip = activation_flip(residual);  // int8 bytes read as uint8 hold the value + 128
  r.scale = residual_scale.item<float>();
  r.zero_point = static_cast<float>(residual_zero_point + (r.flip ? 128 : 0));
  if (relu) r.clamp.lo = 0.0f;
  conv_cpu(f, x_q, x_zero_point, w_packed, out_channels, groups, r);
  return out;
}

}  // namespace
}  // namespace torchquant::gemm

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("int8_conv2d", &torchquant::gemm::int8_conv2d_cpu);
  m.impl("int8_conv2d.residual", &torchquant::gemm::int8_conv2d_residual_cpu);
}
