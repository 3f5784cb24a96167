// CPU quantized_max_pool2d (schema in csrc/ops.cpp). torch's own max_pool2d takes int8/uint8 on the CPU, but its
// channels-last kernel indexes the input with the element type itself (it fails once H * W > 127 for int8), so
// channels-last inputs run here: per output pixel, the byte-wise maximum of its taps' channel vectors, in 64-,
// 32- or 16-byte registers by the CPU's instruction set (TORCHQUANT_CPU_ISA) (a window without a tap inside the
// input, possible in ceil mode with dilation, gives the type's lowest value as torch's integer kernel does). Other
// layouts go to torch's kernel. csrc/cuda/pool.cu has the CUDA kernel. Also quantized_sum: the int32 sums of a
// channels-last x over H and W (a global average pool on integers), and quantized_avg_pool2d /
// quantized_adaptive_avg_pool2d: average pools of a channels-last x's dequantized values from exact int32 window
// sums.
#include "cpu/simd.h"  // first: see there
#include "check.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cpu/isa.h"
#include "dtype_dispatch.h"
#include "output_memory.h"

namespace torchquant {
namespace {

#define TQ_TARGET_AVX512BW __attribute__((target("avx512f,avx512bw")))

// The taps of one output pixel inside the input: rows x cols channel vectors, the first at `first`.
struct Taps {
  const uint8_t* first;
  int64_t rows, cols, row_step, col_step;  // steps in bytes
};

// out[c] = the maximum over the taps of byte c, for c in [c0, channels): 16 channels at a time in one register
// across all taps (SSE2 unsigned byte maximum; int8 bytes compare as unsigned once their sign bit is flipped),
// stored once (a per-tap read-modify-write of the output made the pool twice as slow), then byte by byte. No
// taps give the type's lowest value (byte 0 once flipped).
template <typename T>
void pixel_max_sse2(const Taps& t, int64_t channels, int64_t c0, uint8_t* out) {
  constexpr uint8_t flip = std::is_signed_v<T> ? 0x80 : 0;
  const __m128i f = _mm_set1_epi8(static_cast<char>(flip));
  int64_t c = c0;
  for (; c + 16 <= channels; c += 16) {
    __m128i m = _mm_setzero_si128();
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t j = 0; j < t.cols; ++j) {
        const uint8_t* in = t.first + i * t.row_step + j * t.col_step + c;
        m = _mm_max_epu8(m, _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)), f));
      }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm_xor_si128(m, f));
  }
  for (; c < channels; ++c) {
    uint8_t m = 0;
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t j = 0; j < t.cols; ++j) m = std::max<uint8_t>(m, t.first[i * t.row_step + j * t.col_step + c] ^ flip);
    out[c] = m ^ flip;
  }
}

// The same with 32-byte vectors first (a 64-channel pixel in two registers rather than four).
template <typename T>
TQ_TARGET_AVX2 void pixel_max_avx2(const Taps& t, int64_t channels, uint8_t* out) {
  int64_t c = 0;
  for (; c + 32 <= channels; c += 32) {
    __m256i m = _mm256_set1_epi8(std::is_signed_v<T> ? -128 : 0);
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t j = 0; j < t.cols; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.first + i * t.row_step +
                                                                              j * t.col_step + c));
        m = std::is_signed_v<T> ? _mm256_max_epi8(m, v) : _mm256_max_epu8(m, v);
      }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), m);
  }
  pixel_max_sse2<T>(t, channels, c, out);
}

// 64-byte vectors, the last one masked (masked-off lanes load as zero and are not stored).
template <typename T>
TQ_TARGET_AVX512BW void pixel_max_avx512(const Taps& t, int64_t channels, uint8_t* out) {
  for (int64_t c = 0; c < channels; c += 64) {
    const __mmask64 mask = channels - c >= 64 ? ~__mmask64{0} : (__mmask64{1} << (channels - c)) - 1;
    __m512i m = _mm512_set1_epi8(std::is_signed_v<T> ? -128 : 0);
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t j = 0; j < t.cols; ++j) {
        const __m512i v = _mm512_maskz_loadu_epi8(mask, t.first + i * t.row_step + j * t.col_step + c);
        m = std::is_signed_v<T> ? _mm512_max_epi8(m, v) : _mm512_max_epu8(m, v);
      }
    _mm512_mask_storeu_epi8(out + c, mask, m);
  }
}

// Output rows (b, oh) [begin, end) of a channels-last x and out, pixel by pixel with PixelMax (one of the above).
template <typename PixelMax>
void max_pool2d_channels_last(const uint8_t* x, uint8_t* out, const PoolGeometry& g, int64_t begin, int64_t end,
                              PixelMax pixel_max) {
  const int64_t c_count = g.channels;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.out_h, oh = row % g.out_h;
    const int64_t h_start = oh * g.stride_h - g.pad_h;
    const int64_t h_end = std::min(h_start + (g.kh - 1) * g.dil_h + 1, g.height);
    const int64_t h0 = first_tap_inside(h_start, g.dil_h);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t w_start = ow * g.stride_w - g.pad_w;
      const int64_t w_end = std::min(w_start + (g.kw - 1) * g.dil_w + 1, g.width);
      const int64_t w0 = first_tap_inside(w_start, g.dil_w);
      // a window with no tap inside (possible in ceil mode with dilation) has rows or cols 0; a step is formed only
      // where there is a second tap (it is inside the input then, so the product does not overflow)
      const int64_t rows = taps_inside(h0, h_end, g.dil_h), cols = taps_inside(w0, w_end, g.dil_w);
      const Taps taps{x + ((b * g.height + h0) * g.width + w0) * c_count, rows, cols,
                      rows > 1 ? g.dil_h * g.width * c_count : 0, cols > 1 ? g.dil_w * c_count : 0};
      pixel_max(taps, c_count, out + ((b * g.out_h + oh) * g.out_w + ow) * c_count);
    }
  }
}

at::Tensor quantized_max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TQ_CHECK(x.device().is_cpu(), "quantized_max_pool2d: x must be a CPU tensor for the CPU kernel, got ", x.device());
  const PoolGeometry g =
      check_pool2d_arguments("quantized_max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode);
  if (x.dim() != 4 || x.suggest_memory_format() != at::MemoryFormat::ChannelsLast)
    return at::max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out =
      empty_output({g.batch, g.channels, g.out_h, g.out_w}, x.options(), at::MemoryFormat::ChannelsLast);
  const int64_t rows = g.batch * g.out_h;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(g.out_w * g.channels, 1));
  with_byte_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const uint8_t* xp = static_cast<const uint8_t*>(xc.data_ptr());
    uint8_t* op = static_cast<uint8_t*>(out.data_ptr());
    const CpuIsa isa = cpu_isa();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      if (isa == CpuIsa::Avx512Vnni) max_pool2d_channels_last(xp, op, g, begin, end, pixel_max_avx512<T>);
      else if (isa == CpuIsa::Avx2) max_pool2d_channels_last(xp, op, g, begin, end, pixel_max_avx2<T>);
      else max_pool2d_channels_last(xp, op, g, begin, end, [](const Taps& t, int64_t channels, uint8_t* o) {
        pixel_max_sse2<T>(t, channels, 0, o);
      });
    });
  });
  return out;
}

// quantized_sum's arguments: x int8 or uint8 (the dims are torch.sum's to check).
void check_quantized_sum(const at::Tensor& x) {
  TQ_CHECK(x.scalar_type() == at::kChar || x.scalar_type() == at::kByte,
           "quantized_sum: x must be int8 or uint8, got ", x.scalar_type());
}

// torch's sum everywhere but the CPU's channels-last case below.
at::Tensor quantized_sum_any(const at::Tensor& x, at::IntArrayRef dim, bool keepdim) {
  check_quantized_sum(x);
  return at::sum(x, dim, keepdim, at::kInt);
}

// 16 bytes as 16 int32, with their sign for int8.
template <typename T>
TQ_TARGET_AVX512BW inline __m512i widened(__m128i bytes) {
  return std::is_signed_v<T> ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
}

// sums[c] = the sum over the taps of byte c (as T), for c in [c0, c0 + width): widened to int32 in registers, 64
// channels at a time (four vectors of 16) across all taps, the last block masked.
template <typename T>
TQ_TARGET_AVX512BW void tap_sums_avx512(const Taps& t, int64_t c0, int64_t width, int32_t* sums) {
  for (int64_t c = c0; c < c0 + width; c += 64) {
    const int64_t n = std::min<int64_t>(64, c0 + width - c);
    const __mmask64 mask = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t j = 0; j < t.cols; ++j) {
        const __m512i v = _mm512_maskz_loadu_epi8(mask, t.first + i * t.row_step + j * t.col_step + c);
        // (the lane index is an immediate: written out, as unoptimized builds do not unroll a loop for it)
        acc[0] = _mm512_add_epi32(acc[0], widened<T>(_mm512_extracti32x4_epi32(v, 0)));
        acc[1] = _mm512_add_epi32(acc[1], widened<T>(_mm512_extracti32x4_epi32(v, 1)));
        acc[2] = _mm512_add_epi32(acc[2], widened<T>(_mm512_extracti32x4_epi32(v, 2)));
        acc[3] = _mm512_add_epi32(acc[3], widened<T>(_mm512_extracti32x4_epi32(v, 3)));
      }
    for (int k = 0; k < 4 && 16 * k < n; ++k)
      _mm512_mask_storeu_epi32(sums + c + 16 * k, static_cast<__mmask16>(mask >> (16 * k)), acc[k]);
  }
}

// The same as a plain loop (vectorized by the compiler for the target it is built for).
template <typename T>
void tap_sums_loop(const Taps& t, int64_t c0, int64_t width, int32_t* sums) {
  std::fill(sums + c0, sums + c0 + width, 0);
  for (int64_t i = 0; i < t.rows; ++i)
    for (int64_t j = 0; j < t.cols; ++j) {
      const T* tap = reinterpret_cast<const T*>(t.first + i * t.row_step + j * t.col_step);
      for (int64_t c = c0; c < c0 + width; ++c) sums[c] += tap[c];
    }
}

template <typename T>
TQ_TARGET_AVX2 void tap_sums_avx2(const Taps& t, int64_t c0, int64_t width, int32_t* sums) {
  tap_sums_loop<T>(t, c0, width, sums);
}

using TapSums = void (*)(const Taps&, int64_t, int64_t, int32_t*);

template <typename T>
TapSums tap_sums_for(CpuIsa isa) {
  return isa == CpuIsa::Avx512Vnni ? tap_sums_avx512<T> : isa == CpuIsa::Avx2 ? tap_sums_avx2<T> : tap_sums_loop<T>;
}

// quantized_sum on the CPU: a channels-last x [B, C, H, W] summed over H and W runs here, per (image, block of 64
// channels), each block's sums in registers across the image's pixels; anything else is torch's sum.
at::Tensor quantized_sum_cpu(const at::Tensor& x, at::IntArrayRef dim, bool keepdim) {
  check_quantized_sum(x);
  const bool spatial = x.dim() == 4 && dim.size() == 2 && x.numel() > 0 &&
                       ((at::maybe_wrap_dim(dim[0], 4) == 2 && at::maybe_wrap_dim(dim[1], 4) == 3) ||
                        (at::maybe_wrap_dim(dim[0], 4) == 3 && at::maybe_wrap_dim(dim[1], 4) == 2));
  if (!spatial || !x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.is_contiguous())
    return at::sum(x, dim, keepdim, at::kInt);
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  const std::vector<int64_t> sizes = keepdim ? std::vector<int64_t>{batch, channels, 1, 1}
                                             : std::vector<int64_t>{batch, channels};
  at::Tensor out = empty_output(sizes, x.options().dtype(at::kInt));
  const int64_t blocks = (channels + 63) / 64;
  // a task sums one block of one image: ~64 * pixels bytes; below 64 KiB a second thread costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (64 * pixels));
  with_byte_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const uint8_t* xp = static_cast<const uint8_t*>(x.data_ptr());
    int32_t* sums = out.data_ptr<int32_t>();
    const TapSums tap_sums = tap_sums_for<T>(cpu_isa());
    at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, c0 = task % blocks * 64;
        // the image's pixels as one row of taps
        tap_sums(Taps{xp + b * pixels * channels, 1, pixels, 0, channels}, c0, std::min<int64_t>(64, channels - c0),
                 sums + b * channels);
      }
    });
  });
  return out;
}

// quantized_avg_pool2d's float32 steps on a window's int32 sums: out[c] = float(sums[c] - offset) * scale /
// divisor, offset the zero point times the elements inside the input (the same rounding steps as the composite's
// tensor ops: each IEEE-rounded in float32, no contraction).
void window_means_loop(const int32_t* sums, int64_t channels, int32_t offset, float scale, float divisor, float* out) {
  for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<float>(sums[c] - offset) * scale / divisor;
}

TQ_TARGET_AVX2 void window_means_avx2(const int32_t* sums, int64_t channels, int32_t offset, float scale,
                                      float divisor, float* out) {
  window_means_loop(sums, channels, offset, scale, divisor, out);
}

TQ_TARGET_AVX512BW void window_means_avx512(const int32_t* sums, int64_t channels, int32_t offset, float scale,
                                            float divisor, float* out) {
  const __m512i off = _mm512_set1_epi32(offset);
  const __m512 sc = _mm512_set1_ps(scale), dv = _mm512_set1_ps(divisor);
  for (int64_t c = 0; c < channels; c += 16) {
    const __mmask16 mask = channels - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (channels - c)) - 1);
    const __m512i s = _mm512_maskz_loadu_epi32(mask, sums + c);
    _mm512_mask_storeu_ps(out + c, mask,
                          _mm512_div_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s, off)), sc), dv));
  }
}

using WindowMeans = void (*)(const int32_t*, int64_t, int32_t, float, float, float*);

// quantized_avg_pool2d's windows along one axis: the window of output o starts at o * stride - pad; its elements
// inside the input are [max(start, 0), min(start + kernel, size)), and torch's divisor with padding counted is the
// part of the window inside the padded input, [start, min(start + kernel, size + pad)).
struct WindowSpan {
  int64_t first, inside, padded;
};

WindowSpan window_span(int64_t o, int64_t stride, int64_t pad, int64_t kernel, int64_t size) {
  const int64_t start = o * stride - pad;
  const int64_t end = std::min(start + kernel, size + pad);
  const int64_t first = std::max<int64_t>(start, 0);
  return {first, std::min(end, size) - first, end - start};
}

// quantized_avg_pool2d for any device and layout: the exact window sums of the float32 integers (torch's average
// pool with divisor 1) less the zero point for each element inside the input (the sums of a tensor of ones), times
// scale, over the divisor as a tensor on x's device (CUDA divides by a host scalar as a multiplication by its
// reciprocal): the same float32 steps as the CPU kernel.
at::Tensor quantized_avg_pool2d_any(const at::Tensor& x, double scale, int64_t zero_point, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                    bool count_include_pad, std::optional<int64_t> divisor_override) {
  const PoolGeometry g =
      check_avg_pool2d_arguments(x, scale, zero_point, kernel_size, stride, padding, ceil_mode, divisor_override);
  const at::Tensor xf = x.to(at::kFloat);
  const auto window_sums = [&](const at::Tensor& t, at::IntArrayRef pad) {
    return at::avg_pool2d(t, kernel_size, stride, pad, ceil_mode, true, 1);
  };
  const auto ones = [&](int64_t h, int64_t w) {  // one image of one channel (batched as x is)
    return x.dim() == 4 ? at::ones({1, 1, h, w}, xf.options()) : at::ones({1, h, w}, xf.options());
  };
  const at::Tensor inside = window_sums(ones(g.height, g.width), padding);
  const at::Tensor total = window_sums(xf, padding) - inside * zero_point;
  at::Tensor divisor;
  if (divisor_override.has_value()) {
    divisor = at::scalar_tensor(static_cast<double>(*divisor_override), xf.options());
  } else if (!count_include_pad) {
    divisor = inside;
  } else if (ceil_mode) {  // the elements of the padded input each window covers (a last one may reach past it)
    const int64_t pads[2] = {0, 0};
    divisor = window_sums(ones(g.height + 2 * g.pad_h, g.width + 2 * g.pad_w), pads)
                  .slice(-2, 0, g.out_h)
                  .slice(-1, 0, g.out_w);
  } else {
    divisor = at::scalar_tensor(static_cast<double>(g.kh * g.kw), xf.options());
  }
  return total.mul(scale).div(divisor);
}

// The windows of a channels-last x [B, C, H, W] pooled into the channels-last float32 out [B, C, out_h, out_w], per
// output row (b, oh) and pixel: span_h(oh) and span_w(ow) are a window's rows and columns inside the input,
// divisor(h, w) its divisor; the window's int32 sums over its taps (vectorized over the channels), then
// window_means. Every window has an element inside the input.
template <class SpanH, class SpanW, class Divisor>
void pool_windows_cpu(const at::Tensor& x, float scale, int64_t zero_point, at::Tensor& out, const SpanH& span_h,
                      const SpanW& span_w, const Divisor& divisor) {
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_h = out.size(2), out_w = out.size(3);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(out_w * channels, 1));
  with_byte_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const uint8_t* xp = static_cast<const uint8_t*>(x.data_ptr());
    float* op = out.data_ptr<float>();
    const CpuIsa isa = cpu_isa();
    const TapSums tap_sums = tap_sums_for<T>(isa);
    const WindowMeans window_means = isa == CpuIsa::Avx512Vnni ? window_means_avx512
                                     : isa == CpuIsa::Avx2     ? window_means_avx2
                                                               : window_means_loop;
    at::parallel_for(0, batch * out_h, grain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> sums(channels);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / out_h, oh = row % out_h;
        const WindowSpan h = span_h(oh);
        for (int64_t ow = 0; ow < out_w; ++ow) {
          const WindowSpan w = span_w(ow);
          const int64_t inside = h.inside * w.inside;
          tap_sums(Taps{xp + ((b * height + h.first) * width + w.first) * channels, h.inside, w.inside,
                        width * channels, channels},
                   0, channels, sums.data());
          window_means(sums.data(), channels, static_cast<int32_t>(inside * zero_point), scale,
                       static_cast<float>(divisor(h, w)), op + ((b * out_h + oh) * out_w + ow) * channels);
        }
      }
    });
  });
}

// quantized_avg_pool2d on the CPU: a channels-last x [B, C, H, W] runs here (pool_windows_cpu); anything else is
// quantized_avg_pool2d_any.
at::Tensor quantized_avg_pool2d_cpu(const at::Tensor& x, double scale, int64_t zero_point, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                    bool count_include_pad, std::optional<int64_t> divisor_override) {
  TQ_CHECK(x.device().is_cpu(), "quantized_avg_pool2d: x must be a CPU tensor for the CPU kernel, got ", x.device());
  const PoolGeometry g =
      check_avg_pool2d_arguments(x, scale, zero_point, kernel_size, stride, padding, ceil_mode, divisor_override);
  if (x.dim() != 4 || x.numel() == 0 || x.suggest_memory_format() != at::MemoryFormat::ChannelsLast)
    return quantized_avg_pool2d_any(x, scale, zero_point, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                    divisor_override);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = empty_output({g.batch, g.channels, g.out_h, g.out_w}, x.options().dtype(at::kFloat),
                                at::MemoryFormat::ChannelsLast);
  // (every window has an element inside the input: it starts before the input's end, and the padding is at most
  // half the kernel)
  pool_windows_cpu(
      xc, static_cast<float>(scale), zero_point, out,
      [&](int64_t oh) { return window_span(oh, g.stride_h, g.pad_h, g.kh, g.height); },
      [&](int64_t ow) { return window_span(ow, g.stride_w, g.pad_w, g.kw, g.width); },
      [&](const WindowSpan& h, const WindowSpan& w) {
        return divisor_override.has_value() ? *divisor_override
               : count_include_pad          ? h.padded * w.padded
                                            : h.inside * w.inside;
      });
  return out;
}

// Window o of `out` over `size` elements in torch's adaptive pools: [floor(o * size / out), ceil((o + 1) * size /
// out)).
WindowSpan adaptive_span(int64_t o, int64_t out, int64_t size) {
  const int64_t first = o * size / out, end = ((o + 1) * size + out - 1) / out;
  return {first, end - first, end - first};
}

// At least the most elements of an adaptive pool's window over h x w (ceil(size / out) + 1 in each dim).
int64_t adaptive_window_bound(int64_t h, int64_t out_h, int64_t w, int64_t out_w) {
  return (ceil_div(h, std::max<int64_t>(out_h, 1)) + 1) * (ceil_div(w, std::max<int64_t>(out_w, 1)) + 1);
}

// quantized_adaptive_avg_pool2d for any device and layout: torch's adaptive pool of x - zero_point in float32 (in
// float64 where a window may sum past 2^21: below that, float32 sums are exact and the mean times the count lies
// within 3.1 * 2^-24 |sum| < 0.5 of the sum, which rounding gives back), that sum as float32, times scale, over the
// count: the CPU kernel's float32 steps.
at::Tensor quantized_adaptive_avg_pool2d_any(const at::Tensor& x, double scale, int64_t zero_point,
                                             at::IntArrayRef output_size) {
  check_adaptive_avg_pool2d_arguments(x, scale, zero_point, output_size);
  const int64_t h = x.size(-2), w = x.size(-1), out_h = output_size[0], out_w = output_size[1];
  const at::ScalarType dtype =
      adaptive_window_bound(h, out_h, w, out_w) * 255 <= (int64_t{1} << 21) ? at::kFloat : at::kDouble;
  at::Tensor means = at::adaptive_avg_pool2d(x.to(dtype).sub_(zero_point), output_size);
  // the windows' element counts, made on x's device (a copy from the host would wait for the device, and cannot be
  // captured in a CUDA graph): adaptive_span's bounds as tensor ops
  const auto window_sizes = [&](int64_t out, int64_t size) {
    const at::Tensor o = at::arange(out, x.options().dtype(at::kLong));
    return at::floor_divide(o.add(1).mul_(size).add_(out - 1), out).sub_(at::floor_divide(o.mul(size), out));
  };
  const at::Tensor count = at::outer(window_sizes(out_h, h), window_sizes(out_w, w)).to(at::kFloat);
  const at::Tensor totals = means.mul_(count.to(dtype)).round_().to(at::kFloat);
  return totals.mul(at::scalar_tensor(scale, x.options().dtype(at::kFloat))).div(count);
}

// quantized_adaptive_avg_pool2d on the CPU: a channels-last x [B, C, H, W] with windows whose int32 sums cannot
// overflow runs here (pool_windows_cpu); anything else is quantized_adaptive_avg_pool2d_any.
at::Tensor quantized_adaptive_avg_pool2d_cpu(const at::Tensor& x, double scale, int64_t zero_point,
                                             at::IntArrayRef output_size) {
  TQ_CHECK(x.device().is_cpu(), "quantized_adaptive_avg_pool2d: x must be a CPU tensor for the CPU kernel, got ",
           x.device());
  check_adaptive_avg_pool2d_arguments(x, scale, zero_point, output_size);
  if (x.dim() != 4 || x.numel() == 0 || output_size[0] == 0 || output_size[1] == 0 ||
      x.suggest_memory_format() != at::MemoryFormat::ChannelsLast ||
      adaptive_window_bound(x.size(2), output_size[0], x.size(3), output_size[1]) > INT32_MAX / 255)
    return quantized_adaptive_avg_pool2d_any(x, scale, zero_point, output_size);
  const int64_t h = x.size(2), w = x.size(3), out_h = output_size[0], out_w = output_size[1];
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = empty_output({x.size(0), x.size(1), out_h, out_w}, x.options().dtype(at::kFloat),
                                at::MemoryFormat::ChannelsLast);
  pool_windows_cpu(
      xc, static_cast<float>(scale), zero_point, out, [&](int64_t oh) { return adaptive_span(oh, out_h, h); },
      [&](int64_t ow) { return adaptive_span(ow, out_w, w); },
      [](const WindowSpan& a, const WindowSpan& b) { return a.inside * b.inside; });
  return out;
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("quantized_max_pool2d", &torchquant::quantized_max_pool2d_cpu);
  m.impl("quantized_sum", &torchquant::quantized_sum_cpu);
  m.impl("quantized_avg_pool2d", &torchquant::quantized_avg_pool2d_cpu);
  m.impl("quantized_adaptive_avg_pool2d", &torchquant::quantized_adaptive_avg_pool2d_cpu);
}

TORCH_LIBRARY_IMPL(torchquant, CompositeExplicitAutograd, m) {
  m.impl("quantized_sum", &torchquant::quantized_sum_any);
  m.impl("quantized_avg_pool2d", &torchquant::quantized_avg_pool2d_any);
  m.impl("quantized_adaptive_avg_pool2d", &torchquant::quantized_adaptive_avg_pool2d_any);
}
