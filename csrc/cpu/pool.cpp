// CPU quantized_max_pool2d (schema in csrc/ops.cpp). torch's own max_pool2d takes int8/uint8 on the CPU, but its
// channels-last kernel indexes the input with the element type itself (it fails once H * W > 127 for int8), so
// channels-last inputs run here: per output pixel, the byte-wise maximum of its taps' channel vectors (a window
// without a tap inside the input, possible in ceil mode with dilation, gives the type's lowest value as torch's
// integer kernel does). Other layouts go to torch's kernel. csrc/cuda/pool.cu has the CUDA
// kernel.
#include "check.h"
#include <emmintrin.h>

#include <algorithm>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "dtype_dispatch.h"

namespace torchquant {
namespace {

// Output rows (b, oh) [begin, end) of a channels-last x and out. Each output pixel's channels are taken 16 at a
// time in one register across all its taps (SSE2 unsigned byte maximum; int8 bytes compare as unsigned once their
// sign bit is flipped), stored once: a per-tap read-modify-write of the output made the pool twice as slow.
template <typename T>
void max_pool2d_channels_last(const T* x, T* out, const PoolGeometry& g, int64_t begin, int64_t end) {
  const int64_t c_count = g.channels;
  constexpr uint8_t flip = std::is_signed_v<T> ? 0x80 : 0;  // lowest value -> byte 0
  const __m128i f = _mm_set1_epi8(static_cast<char>(flip));
  const uint8_t* xb = reinterpret_cast<const uint8_t*>(x);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.out_h, oh = row % g.out_h;
    int64_t h0 = oh * g.stride_h - g.pad_h;
    const int64_t h_end = std::min(h0 + (g.kh - 1) * g.dil_h + 1, g.height);
    while (h0 < 0) h0 += g.dil_h;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      int64_t w0 = ow * g.stride_w - g.pad_w;
      const int64_t w_end = std::min(w0 + (g.kw - 1) * g.dil_w + 1, g.width);
      while (w0 < 0) w0 += g.dil_w;
      uint8_t* o = reinterpret_cast<uint8_t*>(out) + ((b * g.out_h + oh) * g.out_w + ow) * c_count;
      // a window with no tap inside (possible in ceil mode with dilation) gives the lowest value, as torch's
      int64_t c = 0;
      for (; c + 16 <= c_count; c += 16) {
        __m128i m = _mm_setzero_si128();
        for (int64_t ih = h0; ih < h_end; ih += g.dil_h)
          for (int64_t iw = w0; iw < w_end; iw += g.dil_w) {
            const uint8_t* in = xb + ((b * g.height + ih) * g.width + iw) * c_count + c;
            m = _mm_max_epu8(m, _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)), f));
          }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + c), _mm_xor_si128(m, f));
      }
      for (; c < c_count; ++c) {
        uint8_t m = 0;
        for (int64_t ih = h0; ih < h_end; ih += g.dil_h)
          for (int64_t iw = w0; iw < w_end; iw += g.dil_w)
            m = std::max<uint8_t>(m, xb[((b * g.height + ih) * g.width + iw) * c_count + c] ^ flip);
        o[c] = m ^ flip;
      }
    }
  }
}

at::Tensor quantized_max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TQ_CHECK(x.device().is_cpu(), "quantized_max_pool2d: x must be a CPU tensor for the CPU kernel, got ", x.device());
  const PoolGeometry g = check_max_pool2d_arguments(x, kernel_size, stride, padding, dilation, ceil_mode);
  if (x.dim() != 4 || x.suggest_memory_format() != at::MemoryFormat::ChannelsLast)
    return at::max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out =
      at::empty({g.batch, g.channels, g.out_h, g.out_w}, x.options(), at::MemoryFormat::ChannelsLast);
  const int64_t rows = g.batch * g.out_h;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(g.out_w * g.channels, 1));
  with_byte_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      max_pool2d_channels_last(xc.data_ptr<T>(), out.data_ptr<T>(), g, begin, end);
    });
  });
  return out;
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, CPU, m) { m.impl("quantized_max_pool2d", &torchquant::quantized_max_pool2d_cpu); }
