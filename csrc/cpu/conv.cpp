// CPU int8_conv2d (schema in csrc/ops.cpp): channels-last input, im2col rows ordered (kh, kw, c) per group produced
// by the int8 GEMM of gemm_core as it needs them (or, for uint8 convs with one weight panel, window rows read in
// place by conv_u8s8_in_place), and its float epilogue writing the channels-last output directly.
#include "check.h"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cpu/gemm_core.h"
#include "cpu/gemm_ops.h"
#include "cpu/isa.h"

namespace torchquant::gemm {
namespace {

// What the im2col RowFiller reads: the channels-last input and how to turn it into GEMM rows.
struct Im2colSource {
  const uint8_t* x;
  ConvGeometry g;
  uint8_t pad_byte;  // taps outside the image read the zero point
  uint8_t flip;      // XOR of every byte (int8 -> shifted uint8)
  int64_t k4;        // bytes per row: the window, zero filled to a multiple of 4
};

// dst[i] = src[i] ^ flip for i < n with whole-vector moves only: a run of n >= 16 bytes ends with a 16-byte move
// that overlaps the previous one, a shorter run is two overlapping moves of 8, 4 or 1 bytes. The runs of an
// im2col row are short (21 bytes for a 7x7 window of 3 channels), where copy_flip's byte loop for the tail cost
// as much as the GEMM's multiplies.
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

// RowFiller of int8_conv2d: row (b, oh, ow) of group grp holds that output pixel's window values, k = (kh, kw, c).
void fill_im2col_rows(const void* context, int64_t grp, int64_t row0, int64_t rows, uint8_t* dst) {
  const Im2colSource& src = *static_cast<const Im2colSource*>(context);
  // local copies: the byte stores below may alias any object, so fields read through `src` would be loaded again
  // after every store (a third of a 7x7 stem's fill time)
  const ConvGeometry g = src.g;
  const uint8_t* const x = src.x;
  const uint8_t flip = src.flip, pad_byte = src.pad_byte;
  const int64_t k4 = src.k4;
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
    const int64_t pixel = ((b * g.height + ih0) * g.width + iw0) * g.channels;  // tap (0, 0)'s offset, maybe outside
    if (whole_pixels && ih0 >= 0 && ih0 + (g.kh - 1) * g.dil_h < g.height && iw0 >= 0 && iw0 + g.kw <= g.width) {
      for (int64_t i = 0; i < g.kh; ++i, out += run) copy_run(out, x + pixel + i * g.dil_h * pixel_row, run, flip);
    } else {
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = ih0 + i * g.dil_h;
        const int64_t in_row = pixel + i * g.dil_h * pixel_row;
        if (whole_pixels && ih >= 0 && ih < g.height && iw0 >= 0 && iw0 + g.kw <= g.width) {
          copy_run(out, x + in_row, run, flip);
          out += run;
          continue;
        }
        for (int64_t j = 0; j < g.kw; ++j, out += cg) {
          const int64_t iw = iw0 + j * g.dil_w;
          if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) std::memset(out, pad_byte, cg);
          else copy_run(out, x + in_row + j * g.dil_w * g.channels + grp * cg, cg, flip);
        }
      }
    }
    for (int64_t i = g.window; i < k4; ++i) *out++ = 0;
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

// x_q's bytes in channels-last order. A contiguous 3-channel input (an image network's first conv) is interleaved
// here into the calling thread's scratch buffer (torch's copy took six times as long as quantizing the image);
// other layouts are copied by torch (kept alive by `copy`), channels-last inputs read as they are.
const uint8_t* channels_last_bytes(const at::Tensor& x_q, at::Tensor& copy) {
  if (x_q.size(1) != 3 || !x_q.is_contiguous() || x_q.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    copy = x_q.contiguous(at::MemoryFormat::ChannelsLast);
    return static_cast<const uint8_t*>(copy.data_ptr());
  }
  const uint8_t* x = static_cast<const uint8_t*>(x_q.data_ptr());
  const int64_t pixels = x_q.size(2) * x_q.size(3);
  uint8_t* out = scratch_buffer(Scratch::Activations, x_q.numel());
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

at::Tensor int8_conv2d_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                           const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                           std::optional<double> clamp_min, std::optional<double> clamp_max) {
  const ConvFront f = int8_conv2d_front(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels,
                                        kernel_size, stride, padding, dilation, groups, out_dtype, out_scale,
                                        out_zero_point, clamp_min, clamp_max);
  const ConvGeometry& g = f.g;
  const int64_t cg = g.channels / groups, ocg = out_channels / groups;
  at::Tensor out = f.out_nhwc.permute({0, 3, 1, 2});
  if (g.rows == 0) return out;

  const ScratchScope input_scope(Scratch::Activations);
  at::Tensor x_copy;
  const uint8_t* x_bytes = channels_last_bytes(x_q, x_copy);
  const uint8_t flip = activation_flip(x_q);
  GemmArgs args;
  const Im2colSource im2col{x_bytes, g, static_cast<uint8_t>(static_cast<uint8_t>(x_zero_point) ^ flip), flip,
                            round_up(g.window, 4)};
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0;
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
  std::vector<int32_t> col_offset;
  const Epilogue ep = epilogue_for(f.epilogue, flip, f.out_nhwc.data_ptr(), out_channels, col_offset);
  // one weight panel: no other panel shares the cost of an im2col row (a sixth of a 3x3 conv's time at 64
  // channels); with more panels, reading rows in place measured slower than the im2col rows they reuse
  if (!pointwise && flip == 0 && groups == 1 && g.dil_w == 1 && g.kw * g.channels % 4 == 0 && ocg <= kPackAlign)
    conv_u8s8_in_place(args, g, x_bytes, ep, cpu_isa());
  else
    gemm_u8s8(args, ep, cpu_isa());
  return out;
}

}  // namespace
}  // namespace torchquant::gemm

TORCH_LIBRARY_IMPL(torchquant, CPU, m) { m.impl("int8_conv2d", &torchquant::gemm::int8_conv2d_cpu); }
