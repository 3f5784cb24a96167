// CUDA quantized_max_pool2d (schema in csrc/ops.cpp): torch's CUDA max_pool2d takes floating types only. One thread
// per output element (or per 16 channels of a channels-last output, read with 16-byte loads), the input read through
// its strides; the output has the input's suggested memory format, as torch's max_pool2d does. Padding never wins:
// windows skip the taps outside the input; one without a tap inside (possible in ceil mode with dilation) gives the
// type's lowest value, as torch's integer CPU kernel does.
#include "check.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "arg_checks.h"
#include "cuda/common.cuh"

namespace torchquant {
namespace {

constexpr int kPoolThreads = 256;

struct PoolStrides {
  int64_t b, c, h, w;
};

// VEC consecutive channels (c fastest: VEC > 1 only for channels-last, x's channel stride 1) of output element
// index `unit` in the output's memory order.
template <typename T, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kPoolThreads) max_pool2d_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                   PoolGeometry g, PoolStrides xs, int64_t units) {
  const int64_t channel_units = g.channels / VEC;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kPoolThreads + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * kPoolThreads) {
    int64_t c, oh, ow, b;
    if (CHANNELS_LAST) {
      c = (u % channel_units) * VEC;
      ow = (u / channel_units) % g.out_w;
      oh = (u / (channel_units * g.out_w)) % g.out_h;
      b = u / (channel_units * g.out_w * g.out_h);
    } else {
      ow = u % g.out_w;
      oh = (u / g.out_w) % g.out_h;
      c = (u / (g.out_w * g.out_h)) % g.channels;
      b = u / (g.out_w * g.out_h * g.channels);
    }
    const int64_t h_start = oh * g.stride_h - g.pad_h, w_start = ow * g.stride_w - g.pad_w;
    const int64_t h_end = std::min(h_start + (g.kh - 1) * g.dil_h + 1, g.height);
    const int64_t w_end = std::min(w_start + (g.kw - 1) * g.dil_w + 1, g.width);
    const int64_t h0 = first_tap_inside(h_start, g.dil_h), w0 = first_tap_inside(w_start, g.dil_w);
    const T* xb = x + b * xs.b + c * xs.c;
    Vec<T, VEC> best;
#pragma unroll
    for (int j = 0; j < VEC; ++j) best.v[j] = std::numeric_limits<T>::lowest();
    // tap counts, not ih += dil_h < h_end: that sum could pass INT64_MAX for dilations near 2^63
    const int64_t rows = taps_inside(h0, h_end, g.dil_h), cols = taps_inside(w0, w_end, g.dil_w);
    for (int64_t tap_h = 0; tap_h < rows; ++tap_h)
      for (int64_t tap_w = 0; tap_w < cols; ++tap_w) {
        const Vec<T, VEC> v =
            load_vec<T, VEC>(xb + (h0 + tap_h * g.dil_h) * xs.h + (w0 + tap_w * g.dil_w) * xs.w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) best.v[j] = v.v[j] > best.v[j] ? v.v[j] : best.v[j];
      }
    store_vec<T, VEC>(out + u * VEC, best);
  }
}

template <typename T, int VEC, bool CHANNELS_LAST>
void launch_max_pool2d(const at::Tensor& x, at::Tensor& out, const PoolGeometry& g, const PoolStrides& xs) {
  const int64_t units = out.numel() / VEC;
  const int blocks = static_cast<int>(
      std::min<int64_t>((units + kPoolThreads - 1) / kPoolThreads, max_resident_blocks(kPoolThreads)));
  max_pool2d_kernel<T, VEC, CHANNELS_LAST><<<blocks, kPoolThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), out.data_ptr<T>(), g, xs, units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantized_max_pool2d_cuda(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TQ_CHECK(x.is_cuda(), "quantized_max_pool2d: x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  const PoolGeometry g =
      check_pool2d_arguments("quantized_max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x4 = x.dim() == 4 ? x : x.unsqueeze(0);
  const at::MemoryFormat format = x.dim() == 4 ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.batch, g.channels, g.out_h, g.out_w}, x.options(), format);
  if (out.numel() > 0) {
    const PoolStrides xs{x4.stride(0), x4.stride(1), x4.stride(2), x4.stride(3)};
    const bool channels_last = format == at::MemoryFormat::ChannelsLast;
    with_byte_type(x.scalar_type(), "x", [&](auto tag) {
      using T = decltype(tag);
      const bool vectorized = channels_last && xs.c == 1 && g.channels % 16 == 0 && xs.w % 16 == 0 &&
                              xs.h % 16 == 0 && xs.b % 16 == 0 && is_aligned<T, 16>(x4.data_ptr<T>());
      if (vectorized) launch_max_pool2d<T, 16, true>(x4, out, g, xs);
      else if (channels_last) launch_max_pool2d<T, 1, true>(x4, out, g, xs);
      else launch_max_pool2d<T, 1, false>(x4, out, g, xs);
    });
  }
  return x.dim() == 4 ? out : out.squeeze(0);
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, CUDA, m) { m.impl("quantized_max_pool2d", &torchquant::quantized_max_pool2d_cuda); }
