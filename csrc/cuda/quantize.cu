// CUDA kernels of the quantize family, of quantized_add / quantized_mul and of quantized_lookup (schemas in
// csrc/ops.cpp, element math in csrc/quant_math.h, the same functions the CPU kernels use, so both produce the same
// integers).
//
// Every op is an element-wise map over x's memory (csrc/memory_order.h) viewed as [outer, channels, inner]:
// the element at offset i belongs to channel (i / inner) % channels (per-tensor: one channel). Threads walk the
// tensor in 16-byte vectors (grid-stride), with a scalar kernel for tensors whose pointers are not aligned and a
// scalar loop for the tail.
//
// Unlike the CPU kernels these do not read scale/zero_point values on the host (that would synchronize with the
// device on every call): the Python wrappers validate them.
#include "check.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cuda/common.cuh"
#include "memory_order.h"
#include "quant_math.h"
#include "sizes.h"

namespace torchquant {
namespace {

constexpr int kThreads = 256;

// Scale, 1 / scale and zero point of one channel.
struct Qparams {
  float scale;
  float inv_scale;
  float zero_point;
};

// Finds the quantization parameters of a flat element index. Index is uint32_t (fast division, for tensors of at
// most INT32_MAX elements) or int64_t.
template <typename Index>
struct ChannelOf {
  const float* scale;
  const int32_t* zero_point;
  at::cuda::detail::IntDivider<Index> inner;
  at::cuda::detail::IntDivider<Index> channels;

  __device__ __forceinline__ Qparams at(Index c) const {
    const float s = scale[c];
    return {s, 1.0f / s, static_cast<float>(zero_point[c])};
  }
  __device__ __forceinline__ Index channel(Index i) const { return channels.mod(inner.div(i)); }
};

// The ops. Each reads element i (and its neighbours up to VEC) and writes the same positions of its output;
// params(i) gives element i's quantization parameters.
template <typename In, typename Out>
struct QuantizeOp {
  static constexpr int kVec = 16 / (sizeof(In) > sizeof(Out) ? sizeof(In) : sizeof(Out));
  const In* x;
  Out* q;
  QuantFormat format;
  Rounding rounding;

  bool aligned() const { return is_aligned<In, kVec>(x) && is_aligned<Out, kVec>(q); }

  template <int VEC, typename Index, typename Params>
  __device__ __forceinline__ void apply(Index i, const Params& params) const {
    const Vec<In, VEC> xv = load_vec<In, VEC>(x + i);
    Vec<Out, VEC> qv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const Qparams p = params(i + j);
      const float v = quantize_value(static_cast<float>(xv.v[j]), p.inv_scale, p.zero_point, format, rounding);
      qv.v[j] = static_cast<Out>(static_cast<int>(v));
    }
    store_vec<Out, VEC>(q + i, qv);
  }
};

template <typename In, typename Out>
struct DequantizeOp {
  static constexpr int kVec = 16 / (sizeof(In) > sizeof(Out) ? sizeof(In) : sizeof(Out));
  const In* q;
  Out* y;

  bool aligned() const { return is_aligned<In, kVec>(q) && is_aligned<Out, kVec>(y); }

  template <int VEC, typename Index, typename Params>
  __device__ __forceinline__ void apply(Index i, const Params& params) const {
    const Vec<In, VEC> qv = load_vec<In, VEC>(q + i);
    Vec<Out, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const Qparams p = params(i + j);
      yv.v[j] = static_cast<Out>((static_cast<float>(qv.v[j]) - p.zero_point) * p.scale);
    }
    store_vec<Out, VEC>(y + i, yv);
  }
};

template <typename T>
struct FakeQuantizeOp {
  static constexpr int kVec = 16 / sizeof(T);
  const T* x;
  T* y;
  QuantFormat format;
  Rounding rounding;

  bool aligned() const { return is_aligned<T, kVec>(x) && is_aligned<T, kVec>(y); }

  template <int VEC, typename Index, typename Params>
  __device__ __forceinline__ void apply(Index i, const Params& params) const {
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + i);
    Vec<T, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const Qparams p = params(i + j);
      yv.v[j] = static_cast<T>(
          fake_quantize_value(static_cast<float>(xv.v[j]), p.scale, p.inv_scale, p.zero_point, format, rounding));
    }
    store_vec<T, VEC>(y + i, yv);
  }
};

// grad * mask as a product (not a select), as the CPU kernel and torch's fake-quantize backward do.
template <typename T>
struct FakeQuantizeBackwardOp {
  static constexpr int kVec = 16 / sizeof(T);
  const T* grad;
  const T* x;
  T* grad_x;
  QuantFormat format;
  Rounding rounding;

  bool aligned() const {
    return is_aligned<T, kVec>(grad) && is_aligned<T, kVec>(x) && is_aligned<T, kVec>(grad_x);
  }

  template <int VEC, typename Index, typename Params>
  __device__ __forceinline__ void apply(Index i, const Params& params) const {
    const Vec<T, VEC> gv = load_vec<T, VEC>(grad + i);
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + i);
    Vec<T, VEC> ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const Qparams p = params(i + j);
      const bool pass = fake_quantize_passes_grad(static_cast<float>(xv.v[j]), p.scale, p.inv_scale, p.zero_point,
                                                  format, rounding);
      ov.v[j] = static_cast<T>(static_cast<float>(gv.v[j]) * (pass ? 1.0f : 0.0f));
    }
    store_vec<T, VEC>(grad_x + i, ov);
  }
};

// Grid-stride map over n elements: VEC-element vectors, then the tail one by one.
template <int VEC, bool PER_CHANNEL, typename Index, typename Op>
__global__ void __launch_bounds__(kThreads) quant_map_kernel(Op op, ChannelOf<Index> channel_of, Index n) {
  const Qparams tensor_params = channel_of.at(0);
  const auto params = [&](Index i) { return PER_CHANNEL ? channel_of.at(channel_of.channel(i)) : tensor_params; };
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  const Index first = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x;
  const Index vectors = n / VEC;
  for (Index v = first; v < vectors; v += stride) op.template apply<VEC>(v * VEC, params);
  for (Index i = vectors * VEC + first; i < n; i += stride) op.template apply<1>(i, params);
}

template <int VEC, bool PER_CHANNEL, typename Index, typename Op>
void launch_map(const Op& op, const ChannelOf<Index>& channel_of, int64_t n) {
  const int64_t work = std::max<int64_t>(n / VEC, 1);
  const int blocks =
      static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_resident_blocks(kThreads)));
  quant_map_kernel<VEC, PER_CHANNEL, Index><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      op, channel_of, static_cast<Index>(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x viewed as [outer, channels, inner].
template <typename Index, typename Op>
void launch_indexed(const Op& op, const QuantLayout& layout, const at::Tensor& scale, const at::Tensor& zero_point,
                    int64_t n) {
  const at::Tensor scale_c = scale.contiguous();  // freed after the launch: the caching allocator orders reuse
  const at::Tensor zero_point_c = zero_point.contiguous();
  const ChannelOf<Index> channel_of{scale_c.data_ptr<float>(), zero_point_c.data_ptr<int32_t>(),
                                    at::cuda::detail::IntDivider<Index>(static_cast<Index>(layout.inner)),
                                    at::cuda::detail::IntDivider<Index>(static_cast<Index>(layout.channels))};
  const bool vectorized = op.aligned();
  if (layout.per_channel) {
    if (vectorized) launch_map<Op::kVec, true>(op, channel_of, n);
    else launch_map<1, true>(op, channel_of, n);
  } else {
    if (vectorized) launch_map<Op::kVec, false>(op, channel_of, n);
    else launch_map<1, false>(op, channel_of, n);
  }
}

// Runs op over n elements (n > 0) on the current stream.
template <typename Op>
void run_map(const Op& op, const QuantLayout& layout, const at::Tensor& scale, const at::Tensor& zero_point, int64_t n) {
  if (n <= INT32_MAX) launch_indexed<uint32_t>(op, layout, scale, zero_point, n);
  else launch_indexed<int64_t>(op, layout, scale, zero_point, n);
}

// ---------------------------------------------------------------------------------------------------------------
// Argument checks (the same rules and messages as the CPU kernels).
// ---------------------------------------------------------------------------------------------------------------

QuantLayout checked_layout(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                           std::optional<int64_t> axis) {
  TQ_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  return checked_quant_layout(x, scale, zero_point, axis);
}

// A kernel's output, laid out as its dense input (memory_order.h).
at::Tensor empty_like_cuda(const at::Tensor& dense, at::ScalarType dtype) {
  return at::empty_strided(dense.sizes(), dense.strides(), dense.options().dtype(dtype));
}

// ---------------------------------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------------------------------

at::Tensor quantize_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                         std::optional<int64_t> axis, int64_t bits, bool is_signed, c10::string_view rounding) {
  const QuantFormat f = checked_format(bits, is_signed);
  const Rounding r = parse_rounding(rounding);
  const c10::MaybeOwned<at::Tensor> xc = dense_in_memory(x);
  const QuantLayout layout = checked_layout(*xc, scale, zero_point, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = empty_like_cuda(*xc, is_signed ? at::kChar : at::kByte);
  with_float_type(x.scalar_type(), "x", [&](auto in_tag) {
    using In = decltype(in_tag);
    with_byte_type(q.scalar_type(), "output", [&](auto out_tag) {
      using Out = decltype(out_tag);
      if (x.numel() > 0)
        run_map(QuantizeOp<In, Out>{xc->data_ptr<In>(), q.data_ptr<Out>(), f, r}, layout, scale, zero_point,
                x.numel());
    });
  });
  return q;
}

at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero_point,
                           std::optional<int64_t> axis, at::ScalarType dtype) {
  const c10::MaybeOwned<at::Tensor> qc = dense_in_memory(q);
  const QuantLayout layout = checked_layout(*qc, scale, zero_point, axis);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor y = empty_like_cuda(*qc, dtype);
  with_byte_type(q.scalar_type(), "q", [&](auto in_tag) {
    using In = decltype(in_tag);
    with_float_type(dtype, "dtype", [&](auto out_tag) {
      using Out = decltype(out_tag);
      if (q.numel() > 0)
        run_map(DequantizeOp<In, Out>{qc->data_ptr<In>(), y.data_ptr<Out>()}, layout, scale, zero_point, q.numel());
    });
  });
  return y;
}

at::Tensor fake_quantize_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                              std::optional<int64_t> axis, int64_t bits, bool is_signed, c10::string_view rounding) {
  const QuantFormat f = checked_format(bits, is_signed);
  const Rounding r = parse_rounding(rounding);
  const c10::MaybeOwned<at::Tensor> xc = dense_in_memory(x);
  const QuantLayout layout = checked_layout(*xc, scale, zero_point, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = empty_like_cuda(*xc, x.scalar_type());
  with_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    if (x.numel() > 0)
      run_map(FakeQuantizeOp<T>{xc->data_ptr<T>(), y.data_ptr<T>(), f, r}, layout, scale, zero_point, x.numel());
  });
  return y;
}

at::Tensor fake_quantize_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                       const at::Tensor& zero_point, std::optional<int64_t> axis, int64_t bits,
                                       bool is_signed, c10::string_view rounding) {
  const QuantFormat f = checked_format(bits, is_signed);
  const Rounding r = parse_rounding(rounding);
  const c10::MaybeOwned<at::Tensor> xc = dense_in_memory(x);
  const QuantLayout layout = checked_layout(*xc, scale, zero_point, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  check_grad_like(grad, x);
  const c10::MaybeOwned<at::Tensor> gc = in_layout_of(grad, *xc);
  at::Tensor grad_x = empty_like_cuda(*xc, x.scalar_type());
  with_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    if (x.numel() > 0)
      run_map(FakeQuantizeBackwardOp<T>{gc->data_ptr<T>(), xc->data_ptr<T>(), grad_x.data_ptr<T>(), f, r}, layout,
              scale, zero_point, x.numel());
  });
  return grad_x;
}

// ---------------------------------------------------------------------------------------------------------------
// Per-token quantize: one block per row; the finite absmax (block reduction), then the row quantized while it is
// still in L1/L2. Same formulas as the CPU kernel: scale = absmax / qmax (1 for a row without finite non-zeros).
// ---------------------------------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) quantize_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                                                      float* __restrict__ scale, int64_t row_len,
                                                                      float qmax) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * row_len;
  int8_t* qr = q + row * row_len;
  const int64_t vectors = row_len / VEC;

  float absmax = 0.0f;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(xr + v * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float a = fabsf(static_cast<float>(xv.v[j]));
      if (a < INFINITY) absmax = fmaxf(absmax, a);
    }
  }
  for (int64_t i = vectors * VEC + threadIdx.x; i < row_len; i += blockDim.x) {
    const float a = fabsf(static_cast<float>(xr[i]));
    if (a < INFINITY) absmax = fmaxf(absmax, a);
  }
  absmax = block_max(absmax);

  const float s = per_token_scale(absmax, qmax);
  const float inv = 1.0f / s;
  if (threadIdx.x == 0) scale[row] = s;
  const QuantFormat f{-qmax, qmax, false};
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(xr + v * VEC);
    Vec<int8_t, VEC> qv;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      qv.v[j] = static_cast<int8_t>(
          static_cast<int>(quantize_value(static_cast<float>(xv.v[j]), inv, 0.0f, f, Rounding::Nearest)));
    store_vec<int8_t, VEC>(qr + v * VEC, qv);
  }
  for (int64_t i = vectors * VEC + threadIdx.x; i < row_len; i += blockDim.x)
    qr[i] = static_cast<int8_t>(
        static_cast<int>(quantize_value(static_cast<float>(xr[i]), inv, 0.0f, f, Rounding::Nearest)));
}

// Rows of at most kRowItems vectors per thread of a block of up to 1024 threads (bf16/fp16 rows up to 32768, fp32
// up to 16384): the block loads its whole row into registers at once (kRowItems independent 16-byte loads per thread
// in flight, strided so that each warp's loads are contiguous), reduces the absmax (shuffles, then one barrier
// across the warps) and quantizes from the registers, so x is read from memory exactly once. Short rows (up to
// 32 * kRowItems vectors) take one warp each (blocks of 4 rows, no barrier); longer ones one block, sized to the
// row. Few registers per thread (4 vectors), so 2048 threads and 16 rows or more fit on each SM: enough bytes in
// flight for the copy bandwidth. Same formulas as above.
constexpr int kRowItems = 4;
constexpr int kWarpRowThreads = 128;  // blocks of 4 one-warp rows

template <typename T, int VEC>
__device__ __forceinline__ void quantize_row_in_registers(const T* __restrict__ xr, int8_t* __restrict__ qr,
                                                          float* __restrict__ scale_out, int vectors, int thread,
                                                          int threads, float qmax, bool whole_block) {
  Vec<T, VEC> xv[kRowItems];
#pragma unroll
  for (int i = 0; i < kRowItems; ++i)
    if (thread + i * threads < vectors) xv[i] = load_vec<T, VEC>(xr + static_cast<int64_t>(thread + i * threads) * VEC);
  float absmax = 0.0f;
#pragma unroll
  for (int i = 0; i < kRowItems; ++i)
    if (thread + i * threads < vectors) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float a = fabsf(static_cast<float>(xv[i].v[j]));
        if (a < INFINITY) absmax = fmaxf(absmax, a);
      }
    }
  if (whole_block) {
    absmax = block_max(absmax);
  } else {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, offset));
  }

  const float s = per_token_scale(absmax, qmax);
  const float inv = 1.0f / s;
  if (thread == 0) *scale_out = s;
  const QuantFormat f{-qmax, qmax, false};
#pragma unroll
  for (int i = 0; i < kRowItems; ++i)
    if (thread + i * threads < vectors) {
      Vec<int8_t, VEC> qv;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        qv.v[j] = static_cast<int8_t>(
            static_cast<int>(quantize_value(static_cast<float>(xv[i].v[j]), inv, 0.0f, f, Rounding::Nearest)));
      store_vec<int8_t, VEC>(qr + static_cast<int64_t>(thread + i * threads) * VEC, qv);
    }
}

// One warp per row, kWarpRowThreads / 32 rows per block.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpRowThreads)
    quantize_per_token_warp_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale,
                                   int64_t rows, int64_t row_len, float qmax) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp leaves together; nothing below synchronizes beyond the warp
  quantize_row_in_registers<T, VEC>(x + row * row_len, q + row * row_len, scale + row,
                                    static_cast<int>(row_len / VEC), threadIdx.x % 32, 32, qmax, false);
}

// One block per row (blockDim.x a multiple of 32, at least row vectors / kRowItems).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024)
    quantize_per_token_block_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale,
                                    int64_t row_len, float qmax) {
  const int64_t row = blockIdx.x;
  quantize_row_in_registers<T, VEC>(x + row * row_len, q + row * row_len, scale + row,
                                    static_cast<int>(row_len / VEC), threadIdx.x, blockDim.x, qmax, true);
}

// fake_quantize_error, summed in the order quant_math.h defines (as the CPU kernel sums): thread l of a block takes
// lane l, a fused multiply-add per term (the intrinsics: nvcc could otherwise fuse the subtraction with the product
// before it).

// One block of kErrorLanes threads per (candidate, row, chunk) item (grid-stride), item = (candidate * channels +
// row) * chunks + chunk.
__global__ void __launch_bounds__(kErrorLanes)
    fake_quantize_error_chunks_kernel(const float* __restrict__ rows, int64_t length, int64_t channels,
                                      int64_t chunks, const float* __restrict__ scale,
                                      const int32_t* __restrict__ zero_point, QuantFormat format, Rounding rounding,
                                      double* __restrict__ chunk_sums, int64_t items) {
  __shared__ float lanes[kErrorLanes];
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t q = item / chunks, k = item % chunks;
    const float s = scale[q], inv_scale = 1.0f / s, zp = static_cast<float>(zero_point[q]);
    const float* x = rows + (q % channels) * length + k * kErrorChunk;
    const int64_t n = min(kErrorChunk, length - k * kErrorChunk);
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += kErrorLanes) {
      const float v = x[i];
      const float d = __fsub_rn(fake_quantize_value(v, s, inv_scale, zp, format, rounding), v);
      sum = __fmaf_rn(d, d, sum);
    }
    lanes[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) chunk_sums[item] = sum_error_lanes(lanes);
    __syncthreads();  // (lanes is written again by the next item)
  }
}

// errors[q] = the sum of q's chunks in order, one thread per (candidate, row).
__global__ void fake_quantize_error_sums_kernel(const double* __restrict__ chunk_sums, int64_t chunks,
                                                double* __restrict__ errors, int64_t count) {
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (q >= count) return;
  double sum = 0.0;
  for (int64_t k = 0; k < chunks; ++k) sum += chunk_sums[q * chunks + k];
  errors[q] = sum;
}

at::Tensor fake_quantize_error_cuda(const at::Tensor& rows, const at::Tensor& scale, const at::Tensor& zero_point,
                                    int64_t bits, bool is_signed, c10::string_view rounding) {
  check_fake_quantize_error_args(rows, scale, zero_point);
  TQ_CHECK(rows.is_cuda(), "fake_quantize_error: rows must be a CUDA tensor for the CUDA kernel, got ",
           rows.device());
  const QuantFormat format = checked_format(bits, is_signed);
  const Rounding r = parse_rounding(rounding);
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor x = rows.contiguous(), s = scale.contiguous(), z = zero_point.contiguous();
  const int64_t channels = x.size(0), length = x.size(1), candidates = s.size(0);
  const int64_t chunks = ceil_div(length, kErrorChunk);
  const int64_t count = checked_mul("fake_quantize_error", "the row count", candidates, channels);
  at::Tensor errors = at::zeros({candidates, channels}, x.options().dtype(at::kDouble));  // (rows of length 0: 0)
  if (count == 0 || chunks == 0) return errors;
  const int64_t items = checked_mul("fake_quantize_error", "the chunk count", count, chunks);
  at::Tensor chunk_sums = at::empty({items}, x.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>(items, int64_t{1} << 20);
  fake_quantize_error_chunks_kernel<<<blocks, kErrorLanes, 0, stream>>>(
      x.data_ptr<float>(), length, channels, chunks, s.data_ptr<float>(), z.data_ptr<int32_t>(), format, r,
      chunk_sums.data_ptr<double>(), items);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  fake_quantize_error_sums_kernel<<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      chunk_sums.data_ptr<double>(), chunks, errors.data_ptr<double>(), count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return errors;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x, int64_t bits) {
  TQ_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  TQ_CHECK(x.dim() >= 1, "x must have at least 1 dimension (tokens along the last)");
  TQ_CHECK(bits >= 2 && bits <= 8, "bits must be in [2, 8] for per-token quantization, got ", bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const at::Tensor xc = x.contiguous();
  const int64_t row_len = x.size(-1);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t rows = scale.numel();
  if (rows == 0) return {q, scale};
  TQ_CHECK(rows <= INT32_MAX, "quantize_per_token supports at most 2^31 - 1 rows, got ", rows);
  if (row_len == 0) {
    scale.fill_(1.0f);
    return {q, scale};
  }
  with_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* xp = xc.data_ptr<T>();
    int8_t* qp = q.data_ptr<int8_t>();
    // Rows start on 16-byte boundaries only when the row length is a multiple of the vector.
    const bool vectorized = row_len % kVec == 0 && is_aligned<T, kVec>(xp) && is_aligned<int8_t, kVec>(qp);
    const auto stream = at::cuda::getCurrentCUDAStream();
    if (vectorized && row_len <= 32 * kRowItems * kVec) {
      constexpr int rows_per_block = kWarpRowThreads / 32;
      const unsigned blocks = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
      quantize_per_token_warp_kernel<T, kVec><<<blocks, kWarpRowThreads, 0, stream>>>(
          xp, qp, scale.data_ptr<float>(), rows, row_len, qmax);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (vectorized && row_len <= 1024 * kRowItems * kVec) {
      const int64_t warps = (row_len / kVec + 32 * kRowItems - 1) / (32 * kRowItems);
      quantize_per_token_block_kernel<T, kVec><<<static_cast<unsigned>(rows), static_cast<unsigned>(warps * 32), 0,
                                                  stream>>>(xp, qp, scale.data_ptr<float>(), row_len, qmax);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t per_thread = vectorized ? kVec : 1;
    const int64_t wanted = (row_len / per_thread + 31) / 32 * 32;
    const int threads = static_cast<int>(std::min<int64_t>(std::max<int64_t>(wanted, 32), kThreads));
    if (vectorized)
      quantize_per_token_kernel<T, kVec><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
          xp, qp, scale.data_ptr<float>(), row_len, qmax);
    else
      quantize_per_token_kernel<T, 1><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
          xp, qp, scale.data_ptr<float>(), row_len, qmax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, scale};
}

// ---------------------------------------------------------------------------------------------------------------
// quantized_add / quantized_mul: a grid-stride map over a, b and the output laid out alike
// (prepare_quantized_binary), 16 elements (16 bytes of each input) per thread and step, the tail one by one. The
// scales are read on the device (no host synchronization); the same float operations in the same order as the CPU
// kernel, rounded one by one.
// ---------------------------------------------------------------------------------------------------------------

// Their element map (BinaryMap, quant_math.h) with the scales in device memory (a_scale null: 1).
struct BinaryArgs {
  const float* a_scale;
  const float* b_scale;
  BinaryMap map;
};

template <typename Out>
__device__ __forceinline__ Out binary_value(float a, float b, float a_scale, float b_scale, const BinaryMap& m) {
  const float va = __fmul_rn(a - m.a_zero_point, a_scale), vb = __fmul_rn(b - m.b_zero_point, b_scale);
  float y = m.op == BinaryOp::Add ? __fadd_rn(va, vb) : __fmul_rn(va, vb);
  y = clamp_activation(y, m.clamp);
  if constexpr (std::is_same_v<Out, int8_t> || std::is_same_v<Out, uint8_t>)
    return static_cast<Out>(
        static_cast<int>(quantize_value(y, m.inv_out_scale, m.out_zero_point, m.out_format, Rounding::Nearest)));
  else return static_cast<Out>(y);
}

constexpr int kBinaryVec = 16;

template <int VEC, typename A, typename B, typename Out, typename Index>
__global__ void __launch_bounds__(kThreads) quantized_binary_kernel(const A* __restrict__ a, const B* __restrict__ b,
                                                                  Out* __restrict__ y, Index n, BinaryArgs p) {
  const float a_scale = p.a_scale != nullptr ? *p.a_scale : 1.0f, b_scale = *p.b_scale;
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  const Index first = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x;
  const Index vectors = n / VEC;
  for (Index v = first; v < vectors; v += stride) {
    const Vec<A, VEC> av = load_vec<A, VEC>(a + v * VEC);
    const Vec<B, VEC> bv = load_vec<B, VEC>(b + v * VEC);
    Vec<Out, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      yv.v[j] = binary_value<Out>(static_cast<float>(av.v[j]), static_cast<float>(bv.v[j]), a_scale, b_scale, p.map);
    store_vec<Out, VEC>(y + v * VEC, yv);
  }
  for (Index i = vectors * VEC + first; i < n; i += stride)
    y[i] = binary_value<Out>(static_cast<float>(a[i]), static_cast<float>(b[i]), a_scale, b_scale, p.map);
}

template <int VEC, typename A, typename B, typename Out, typename Index>
void launch_quantized_binary(const A* a, const B* b, Out* y, int64_t n, const BinaryArgs& p) {
  const int64_t work = std::max<int64_t>(n / VEC, 1);
  const int blocks =
      static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_resident_blocks(kThreads)));
  quantized_binary_kernel<VEC, A, B, Out, Index><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      a, b, y, static_cast<Index>(n), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The add over n elements of a, b and y laid out alike: 16 at a time where all three are aligned for it, 32-bit
// indices where they suffice.
template <typename A, typename B, typename Out>
void run_quantized_binary(const A* a, const B* b, Out* y, int64_t n, const BinaryArgs& p) {
  const bool vectorized =
      is_aligned<A, kBinaryVec>(a) && is_aligned<B, kBinaryVec>(b) && is_aligned<Out, kBinaryVec>(y);
  if (n <= INT32_MAX) {
    if (vectorized) launch_quantized_binary<kBinaryVec, A, B, Out, uint32_t>(a, b, y, n, p);
    else launch_quantized_binary<1, A, B, Out, uint32_t>(a, b, y, n, p);
  } else {
    if (vectorized) launch_quantized_binary<kBinaryVec, A, B, Out, int64_t>(a, b, y, n, p);
    else launch_quantized_binary<1, A, B, Out, int64_t>(a, b, y, n, p);
  }
}

// quantized_add / quantized_mul (kind) on the device.
at::Tensor quantized_binary_cuda(const char* op, BinaryOp kind, const at::Tensor& a, const at::Tensor& a_scale,
                                 int64_t a_zero_point, const at::Tensor& b, const at::Tensor& b_scale,
                                 int64_t b_zero_point, at::ScalarType out_dtype, std::optional<double> out_scale,
                                 int64_t out_zero_point, int64_t out_bits, bool relu) {
  TQ_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor for the CUDA kernel, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const BinaryTensors t = prepare_quantized_binary(op, kind, a, a_scale, a_zero_point, b, b_scale, b_zero_point,
                                                   out_dtype, out_scale, out_zero_point, out_bits, relu);
  const int64_t n = t.out.numel();
  if (n == 0) return t.out;
  const at::Tensor a_scale_1 = a_scale.reshape({1}).contiguous(), b_scale_1 = b_scale.reshape({1}).contiguous();
  const BinaryArgs p{a_scale_1.data_ptr<float>(), b_scale_1.data_ptr<float>(), t.map};
  with_binary_pointers(t.a, t.b, t.out,
                       [&](const auto* ap, const auto* bp, auto* yp) { run_quantized_binary(ap, bp, yp, n, p); });
  return t.out;
}

at::Tensor quantized_add_cuda(const at::Tensor& a, const at::Tensor& a_scale, int64_t a_zero_point,
                              const at::Tensor& b, const at::Tensor& b_scale, int64_t b_zero_point,
                              at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                              bool relu, int64_t out_bits) {
  return quantized_binary_cuda("quantized_add", BinaryOp::Add, a, a_scale, a_zero_point, b, b_scale, b_zero_point,
                               out_dtype, out_scale, out_zero_point, out_bits, relu);
}

at::Tensor quantized_mul_cuda(const at::Tensor& a, const at::Tensor& a_scale, int64_t a_zero_point,
                              const at::Tensor& b, const at::Tensor& b_scale, int64_t b_zero_point,
                              at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                              int64_t out_bits) {
  return quantized_binary_cuda("quantized_mul", BinaryOp::Multiply, a, a_scale, a_zero_point, b, b_scale,
                               b_zero_point, out_dtype, out_scale, out_zero_point, out_bits, false);
}

// ---------------------------------------------------------------------------------------------------------------
// quantized_lookup: each block copies the 256-byte table into shared memory, then a grid-stride map over x and the
// output laid out alike (prepare_quantized_lookup), 16 bytes per thread and step, the tail byte by byte.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kLookupVec = 16;

template <int VEC, typename Index>
__global__ void __launch_bounds__(kThreads) quantized_lookup_kernel(const uint8_t* __restrict__ x,
                                                                     const uint8_t* __restrict__ table,
                                                                     uint8_t* __restrict__ y, Index n) {
  __shared__ uint8_t shared_table[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) shared_table[i] = table[i];
  __syncthreads();
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  const Index first = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x;
  const Index vectors = n / VEC;
  for (Index v = first; v < vectors; v += stride) {
    const Vec<uint8_t, VEC> xv = load_vec<uint8_t, VEC>(x + v * VEC);
    Vec<uint8_t, VEC> yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) yv.v[j] = shared_table[xv.v[j]];
    store_vec<uint8_t, VEC>(y + v * VEC, yv);
  }
  for (Index i = vectors * VEC + first; i < n; i += stride) y[i] = shared_table[x[i]];
}

template <int VEC, typename Index>
void launch_quantized_lookup(const uint8_t* x, const uint8_t* table, uint8_t* y, int64_t n) {
  const int64_t work = std::max<int64_t>(n / VEC, 1);
  const int blocks =
      static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_resident_blocks(kThreads)));
  quantized_lookup_kernel<VEC, Index><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x, table, y, static_cast<Index>(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantized_lookup_cuda(const at::Tensor& x, const at::Tensor& table) {
  TQ_CHECK(x.is_cuda(), "quantized_lookup: x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const LookupTensors t = prepare_quantized_lookup(x, table);
  const int64_t n = t.numel;
  if (n == 0) return t.out;
  const uint8_t *xp = t.x_bytes, *tp = t.table_bytes;
  uint8_t* yp = t.out_bytes;
  const bool vectorized = is_aligned<uint8_t, kLookupVec>(xp) && is_aligned<uint8_t, kLookupVec>(yp);
  if (n <= INT32_MAX) {
    if (vectorized) launch_quantized_lookup<kLookupVec, uint32_t>(xp, tp, yp, n);
    else launch_quantized_lookup<1, uint32_t>(xp, tp, yp, n);
  } else {
    if (vectorized) launch_quantized_lookup<kLookupVec, int64_t>(xp, tp, yp, n);
    else launch_quantized_lookup<1, int64_t>(xp, tp, yp, n);
  }
  return t.out;
}

}  // namespace

at::Tensor add_conv_residual_cuda(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& residual_scale,
                                  int64_t residual_zero_point, at::ScalarType out_dtype,
                                  std::optional<double> out_scale, int64_t out_zero_point, int64_t out_bits,
                                  bool relu) {
  at::Tensor out = at::empty_like(y, y.options().dtype(out_dtype), at::MemoryFormat::Preserve);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor b = laid_out_as(residual, out);
  // y is quantized_add's a with scale 1 (a null a_scale) and zero point 0: float(y - 0) * 1 is y exactly, so the
  // element map computes y + float(residual - zero point) * scale (the product rounded, then the sum) as the schema
  // states
  const at::Tensor b_scale = residual_scale.reshape({1}).contiguous();
  const BinaryArgs p{nullptr, b_scale.data_ptr<float>(),
                     binary_map("int8_conv2d", BinaryOp::Add, 0, residual_zero_point, out_dtype, out_scale,
                                out_zero_point, out_bits, relu)};
  const float* ap = y.data_ptr<float>();
  with_byte_type(b.scalar_type(), "residual", [&](auto b_tag) {
    const auto* bp = b.data_ptr<decltype(b_tag)>();
    with_output_type(out_dtype,
                     [&](auto out_tag) { run_quantized_binary(ap, bp, out.data_ptr<decltype(out_tag)>(), n, p); });
  });
  return out;
}

TORCH_LIBRARY_IMPL(torchquant, CUDA, m) {
  m.impl("quantized_add", &quantized_add_cuda);
  m.impl("quantized_mul", &quantized_mul_cuda);
  m.impl("quantized_lookup", &quantized_lookup_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("fake_quantize", &fake_quantize_cuda);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda);
  m.impl("fake_quantize_error", &fake_quantize_error_cuda);
  m.impl("quantize_per_token", &quantize_per_token_cuda);
}

}  // namespace torchquant
