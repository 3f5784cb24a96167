// CUDA int8_conv2d (schema in csrc/ops.cpp), the input in channels-last order and the output written channels-last
// by the float epilogue. Three paths:
//   CUTLASS (csrc/cuda/sm90, compute capability 9.0): an implicit-GEMM convolution reading the input through TMA's
//     im2col mode, with the GEMMs' fused epilogue; takes ungrouped convs with C a multiple of 16, 16-byte output
//     pixels and strides up to 8 (TMA's im2col limits on padding and dilation are checked by CUTLASS).
//   depthwise convs: a direct kernel, one thread per output value, with the GEMMs' epilogue;
//   everything else (other GPUs, grouped or unaligned convs, TORCHQUANT_CUDA_GEMM=mma or wgmma): im2col rows ordered
//     (kh, kw, c) per group (a 1x1 stride-1 unpadded conv reads the input in place), then the grouped tensor-core
//     GEMM of gemm.cuh, or, where the CUTLASS conv runs and the conv has one group (the 3-channel stem), that conv
//     as a 1x1 conv over the rows.
// All compute the same integers and the same float operations, so they give the same bits.
#include "check.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#if defined(TORCHQUANT_CUTLASS)
#include "cuda/sm90/cutlass_conv.h"
#endif

namespace torchquant {
namespace {

constexpr int kIm2colThreads = 256;

constexpr int kIm2colChunk = 16;  // bytes of a row one thread writes per step

// Writes im2col rows: row (b, oh, ow) holds, for each group, the (kh, kw, c) window in k16 bytes (zero past the
// window); taps outside the image read pad_byte (the activation zero point). Two kernels, both writing 16-byte
// chunks: with a group's channels a multiple of 16 and a 16-byte aligned input, a chunk is one tap's channels, read
// in one load (one thread per chunk); else one thread writes a whole row of a group, byte by byte, stepping
// (c, tap_w, tap_h) along the window with a running input offset, so that its divisions happen once a row (per
// chunk or per byte, 64-bit divisions made the 3-channel stem's im2col slower than its GEMM).
__global__ void __launch_bounds__(kIm2colThreads) im2col_nhwc_kernel(const int8_t* __restrict__ x,
                                                                      int8_t* __restrict__ columns, ConvGeometry g,
                                                                      int64_t k16, int8_t pad_byte) {
  const int64_t cg = g.channels / g.groups;
  const int64_t chunks_per_group = k16 / kIm2colChunk;
  const int64_t units = g.rows * g.groups * chunks_per_group;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kIm2colThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kIm2colThreads + threadIdx.x; u < units; u += stride) {
    const int64_t k = (u % chunks_per_group) * kIm2colChunk;
    const int64_t row_group = u / chunks_per_group;  // row * groups + group
    const int64_t group = row_group % g.groups;
    const int64_t row = row_group / g.groups;
    const int64_t ow = row % g.out_w;
    const int64_t oh = (row / g.out_w) % g.out_h;
    const int64_t b = row / (g.out_w * g.out_h);
    const int64_t ih = oh * g.stride_h - g.pad_h + (k / (cg * g.kw)) * g.dil_h;
    const int64_t iw = ow * g.stride_w - g.pad_w + ((k / cg) % g.kw) * g.dil_w;
    Vec<int8_t, kIm2colChunk> v;
#pragma unroll
    for (int j = 0; j < kIm2colChunk; ++j) v.v[j] = 0;
    if (k < g.window) {
      if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width) {
        v = load_vec<int8_t, kIm2colChunk>(x + ((b * g.height + ih) * g.width + iw) * g.channels + group * cg +
                                           k % cg);
      } else {
#pragma unroll
        for (int j = 0; j < kIm2colChunk; ++j) v.v[j] = pad_byte;
      }
    }
    store_vec<int8_t, kIm2colChunk>(columns + row_group * k16 + k, v);
  }
}

__global__ void __launch_bounds__(kIm2colThreads) im2col_nhwc_rows_kernel(const int8_t* __restrict__ x,
                                                                           int8_t* __restrict__ columns,
                                                                           ConvGeometry g, int64_t k16,
                                                                           int8_t pad_byte) {
  const int64_t cg = g.channels / g.groups;
  const int64_t units = g.rows * g.groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kIm2colThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kIm2colThreads + threadIdx.x; u < units; u += stride) {
    const int64_t group = u % g.groups;
    const int64_t row = u / g.groups;
    const int64_t ow = row % g.out_w;
    const int64_t oh = (row / g.out_w) % g.out_h;
    const int64_t b = row / (g.out_w * g.out_h);
    const int64_t iw0 = ow * g.stride_w - g.pad_w;
    const int8_t* image = x + b * g.height * g.width * g.channels + group * cg;
    int64_t ih = oh * g.stride_h - g.pad_h, iw = iw0, c = 0, tap_w = 0;
    int64_t offset = (ih * g.width + iw) * g.channels;  // of (ih, iw, c) in the image
    bool ih_inside = ih >= 0 && ih < g.height;
    int64_t k = 0;
    for (int64_t chunk = 0; chunk < k16; chunk += kIm2colChunk) {
      Vec<int8_t, kIm2colChunk> v;
#pragma unroll
      for (int j = 0; j < kIm2colChunk; ++j, ++k) {
        int8_t byte = 0;
        if (k < g.window) {
          byte = ih_inside && iw >= 0 && iw < g.width ? image[offset] : pad_byte;
          ++offset;
          if (++c == cg) {  // the next tap
            c = 0;
            iw += g.dil_w;
            offset += g.dil_w * g.channels - cg;
            if (++tap_w == g.kw) {  // the next row of taps
              tap_w = 0;
              ih += g.dil_h;
              iw = iw0;
              offset = (ih * g.width + iw) * g.channels;
              ih_inside = ih >= 0 && ih < g.height;
            }
          }
        }
        v.v[j] = byte;
      }
      store_vec<int8_t, kIm2colChunk>(columns + u * k16 + chunk, v);
    }
  }
}

constexpr int kDepthwiseThreads = 256;

// Depthwise convs (groups == channels == out_channels), where the GEMM would multiply one valid weight column per
// group: one thread per output pixel and channel, consecutive threads on consecutive channels, so that the
// channels-last reads and writes and the tap-major weights ([tap][channel]) coalesce. Taps outside the image read
// the zero point; the sums are the GEMM's, modulo 2^32 like its accumulators, and finish in the same epilogue.
template <typename T>
__global__ void __launch_bounds__(kDepthwiseThreads)
    depthwise_conv_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, ConvGeometry g, int32_t zero_point,
                          DequantEpilogue epilogue) {
  const int64_t total = g.rows * g.channels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kDepthwiseThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kDepthwiseThreads + threadIdx.x; u < total; u += stride) {
    const int64_t c = u % g.channels, row = u / g.channels;
    const int64_t ow = row % g.out_w, oh = (row / g.out_w) % g.out_h, b = row / (g.out_w * g.out_h);
    uint32_t acc = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
        const int32_t v = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width
                              ? static_cast<int32_t>(x[((b * g.height + ih) * g.width + iw) * g.channels + c])
                              : zero_point;
        const int32_t tap = w[(i * g.kw + j) * g.channels + c];
        acc += static_cast<uint32_t>(v) * static_cast<uint32_t>(tap);
      }
    }
    epilogue(static_cast<int>(row), static_cast<int>(c), static_cast<int32_t>(acc));
  }
}

#if defined(TORCHQUANT_CUTLASS)
// Runs the CUTLASS implicit-GEMM convolution when the request, the device and the shapes allow it; returns whether
// it did. TMA's im2col reads the taps outside the image as zeros, where the im2col path reads the activation zero
// point (so that x - zero point is 0 there, as on the CPU): with a nonzero zero point and padding, the input is first
// padded explicitly with the zero point (one pass over the input; a zero point of 0 needs none) and the convolution
// runs unpadded.
bool launched_cutlass_conv(const ConvGeometry& g, const at::Tensor& x_nhwc, int64_t x_zero_point,
                           const at::Tensor& w_packed, int64_t kp, int64_t out_channels,
                           const DequantEpilogue& epilogue) {
  if (!cutlass_conv_wanted()) return false;
  ConvGeometry geometry = g;
  sm90::ConvOperands operands{x_nhwc.data_ptr(), w_packed.data_ptr<int8_t>(), kp};
  if (!sm90::cutlass_conv_can_run(geometry, operands, epilogue.out, out_channels, out_element_size(epilogue.kind)))
    return false;
  at::Tensor padded;
  if (x_zero_point != 0 && (g.pad_h > 0 || g.pad_w > 0)) {
    padded = at::constant_pad_nd(x_nhwc.permute({0, 2, 3, 1}), {0, 0, g.pad_w, g.pad_w, g.pad_h, g.pad_h},
                                 x_zero_point)
                 .contiguous();  // [B, H + 2 pad_h, W + 2 pad_w, C]
    geometry.height += 2 * g.pad_h;
    geometry.width += 2 * g.pad_w;
    geometry.pad_h = geometry.pad_w = 0;
    operands.x = padded.data_ptr();
  }
  return sm90::run_cutlass_conv(x_nhwc.scalar_type() == at::kByte, geometry, operands, out_channels, epilogue);
}
#endif

at::Tensor int8_conv2d_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                            const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                            std::optional<double> clamp_min, std::optional<double> clamp_max, int64_t out_bits) {
  constexpr const char* op = "int8_conv2d";
  TQ_CHECK(x_q.is_cuda(), op, ": x_q must be a CUDA tensor for the CUDA kernel, got ", x_q.device());
  const ConvFront f = int8_conv2d_front(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels,
                                        kernel_size, stride, padding, dilation, groups, out_dtype, out_scale,
                                        out_zero_point, out_bits, clamp_min, clamp_max);
  const ConvGeometry& g = f.g;
  const int64_t cg = g.channels / groups, ocg = out_channels / groups;
  const int64_t m = g.rows, window = g.window;
  at::Tensor out = f.out_nhwc.permute({0, 3, 1, 2});
  if (m == 0) return out;
  const c10::cuda::CUDAGuard guard(x_q.device());
  TQ_CHECK(m <= INT32_MAX - 256 && ocg <= INT32_MAX - 256 && window <= INT32_MAX - 256, op,
           ": sizes must be below 2^31");

  const at::Tensor x_nhwc = x_q.contiguous(at::MemoryFormat::ChannelsLast);
  const DequantEpilogue epilogue = epilogue_for(f.epilogue, f.out_nhwc, out_channels);
#if defined(TORCHQUANT_CUTLASS)
  if (launched_cutlass_conv(g, x_nhwc, x_zero_point, w_packed, f.weight.kp, out_channels, epilogue)) return out;
#endif
  if (groups == g.channels && ocg == 1) {
    TQ_CHECK(g.channels <= INT32_MAX, op, ": sizes must be below 2^31");
    const int64_t units = m * g.channels;
    const int blocks = static_cast<int>(std::min<int64_t>((units + kDepthwiseThreads - 1) / kDepthwiseThreads,
                                                          max_resident_blocks(kDepthwiseThreads)));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    // the packed weight's logical view [channels, 1, kh, kw, 1] is the weight: its taps, tap-major
    const at::Tensor taps = w_packed.reshape({g.channels, g.kh * g.kw}).t().contiguous();
    const int8_t* w = taps.data_ptr<int8_t>();
    const int32_t zero_point = static_cast<int32_t>(x_zero_point);
    if (x_q.scalar_type() == at::kByte)
      depthwise_conv_kernel<uint8_t><<<blocks, kDepthwiseThreads, 0, stream>>>(
          static_cast<const uint8_t*>(x_nhwc.data_ptr()), w, g, zero_point, epilogue);
    else
      depthwise_conv_kernel<int8_t><<<blocks, kDepthwiseThreads, 0, stream>>>(
          static_cast<const int8_t*>(x_nhwc.data_ptr()), w, g, zero_point, epilogue);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  const int8_t* x_bytes = static_cast<const int8_t*>(x_nhwc.data_ptr());
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0;
  GemmArgs args;
  at::Tensor columns;
  if (pointwise && cg % 16 == 0 && is_aligned<int8_t, 16>(x_bytes)) {  // the input is the GEMM's row matrix
    args.a = x_bytes;
    args.lda = g.channels;
    args.a_group_offset = cg;
  } else {
    const int64_t k16 = round_up(window, 16);
    columns = at::empty({checked_mul(op, "the im2col matrix size", m, checked_mul(op, "the im2col row size", groups, k16))},
                        x_q.options());
    const int8_t pad_byte = static_cast<int8_t>(static_cast<uint8_t>(x_zero_point));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    int8_t* columns_ptr = static_cast<int8_t*>(columns.data_ptr());
    const bool vectorized = cg % 16 == 0 && is_aligned<int8_t, 16>(x_bytes);
    const int64_t units = vectorized ? m * groups * (k16 / kIm2colChunk) : m * groups;  // chunks, or rows of a group
    const int blocks = static_cast<int>(
        std::min<int64_t>((units + kIm2colThreads - 1) / kIm2colThreads, max_resident_blocks(kIm2colThreads)));
    if (vectorized)
      im2col_nhwc_kernel<<<blocks, kIm2colThreads, 0, stream>>>(x_bytes, columns_ptr, g, k16, pad_byte);
    else
      im2col_nhwc_rows_kernel<<<blocks, kIm2colThreads, 0, stream>>>(x_bytes, columns_ptr, g, k16, pad_byte);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#if defined(TORCHQUANT_CUTLASS)
    // The rows as the input of a 1x1 conv: the CUTLASS conv's 128 x 64 tiles suit the narrow convs that come here
    // (the 64-channel stem: 3 input channels) far better than the GEMM's 128 x 256 ones, which compute zeros in
    // three quarters of every step there.
    if (groups == 1) {
      ConvGeometry rows_geometry = g;
      rows_geometry.channels = rows_geometry.window = k16;
      rows_geometry.height = g.out_h;
      rows_geometry.width = g.out_w;
      rows_geometry.kh = rows_geometry.kw = 1;
      rows_geometry.stride_h = rows_geometry.stride_w = rows_geometry.dil_h = rows_geometry.dil_w = 1;
      rows_geometry.pad_h = rows_geometry.pad_w = 0;
      const at::Tensor rows = columns.view({g.batch, g.out_h, g.out_w, k16}).permute({0, 3, 1, 2});
      if (launched_cutlass_conv(rows_geometry, rows, x_zero_point, w_packed, f.weight.kp, out_channels, epilogue))
        return out;
    }
#endif
    args.a = columns_ptr;
    args.lda = groups * k16;
    args.a_group_offset = k16;
  }
  args.b = w_packed.data_ptr<int8_t>();
  args.ldb = f.weight.kp;
  args.b_group_stride = f.weight.group_bytes;
  args.m = m;
  args.n = ocg;
  args.k = round_up(window, 16);
  args.groups = groups;
  run_int8_gemm(args, x_q.scalar_type() == at::kByte, epilogue);
  return out;
}

// int8_conv2d.residual: the conv with a float32 output, then the add, the ReLU and the output conversion in one
// element-wise pass (rather than a pass over float32 for each step of the schema). Reading the residual in the
// CUTLASS conv's epilogue instead (as its TMA source tensor) was slower on an H200: the epilogue tree then needs 143
// registers a thread, which leaves one CTA per multiprocessor where the plain conv's 124 leave two, and the conv
// loses the overlap of one tile's epilogue with another's main loop that it is tuned for (cutlass_conv.cuh).
at::Tensor int8_conv2d_residual_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                                     const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                                     const std::optional<at::Tensor>& bias, int64_t out_channels,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups, at::ScalarType out_dtype,
                                     std::optional<double> out_scale, int64_t out_zero_point,
                                     std::optional<double> clamp_min, std::optional<double> clamp_max,
                                     const at::Tensor& residual, const at::Tensor& residual_scale,
                                     int64_t residual_zero_point, bool relu, int64_t out_bits) {
  check_output_dtype("int8_conv2d", out_dtype, out_scale, out_zero_point, out_bits);
  const at::Tensor y = int8_conv2d_cuda(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels,
                                        kernel_size, stride, padding, dilation, groups, at::kFloat, std::nullopt, 0,
                                        clamp_min, clamp_max, 8);
  check_conv_residual(x_q, y.sizes(), residual, residual_scale, residual_zero_point);
  const c10::cuda::CUDAGuard guard(x_q.device());
  return add_conv_residual_cuda(y, residual, residual_scale, residual_zero_point, out_dtype, out_scale,
                                out_zero_point, out_bits, relu);
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, CUDA, m) {
  m.impl("int8_conv2d", &torchquant::int8_conv2d_cuda);
  m.impl("int8_conv2d.residual", &torchquant::int8_conv2d_residual_cuda);
}
