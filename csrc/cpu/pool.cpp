// CPU quantized_max_pool2d (schema in csrc/ops.cpp). torch's own max_pool2d takes int8/uint8 on the CPU, but its
// channels-last kernel indexes the input with the element type itself (it fails once H * W > 127 for int8), so
// channels-last inputs run here: per output pixel, the byte-wise maximum of its taps' channel vectors (a loop the
// compiler vectorizes; a window without a tap inside the input, possible in ceil mode with dilation, gives the type's
// lowest value as torch's integer kernel does). Other layouts go to torch's kernel. csrc/cuda/pool.cu has the CUDA
// kernel.
#include "check.h"

#include <algorithm>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "dtype_dispatch.h"

namespace torchquant {
namespace {

// Output rows (b, oh) [begin, end) of a channels-last x and out.
template <typename T>
void max_pool2d_channels_last(const T* x, T* out, const PoolGeometry& g, int64_t begin, int64_t end) {
  const int64_t c_count = g.channels;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.out_h, oh = row % g.out_h;
    int64_t h0 = oh * g.stride_h - g.pad_h;
    const int64_t h_end = std::min(h0 + (g.kh - 1) * g.dil_h + 1, g.height);
    while (h0 < 0) h0 += g.dil_h;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      int64_t w0 = ow * g.stride_w - g.pad_w;
      const int64_t w_end = std::min(w0 + (g.kw - 1) * g.dil_w + 1, g.width);
      while (w0 < 0) w0 += g.dil_w;
      T* o = out + ((b * g.out_h + oh) * g.out_w + ow) * c_count;
      std::fill_n(o, c_count, std::numeric_limits<T>::lowest());  // a window with no tap inside, as torch's
      for (int64_t ih = h0; ih < h_end; ih += g.dil_h)
        for (int64_t iw = w0; iw < w_end; iw += g.dil_w) {
          const T* in = x + ((b * g.height + ih) * g.width + iw) * c_count;
          for (int64_t c = 0; c < c_count; ++c) o[c] = std::max(o[c], in[c]);
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
