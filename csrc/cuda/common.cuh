// Small helpers shared by the CUDA kernels: vector loads/stores, dtype dispatch, launch sizing, reductions.
#pragma once
#include "check.h"
#include "dtype_dispatch.h"
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

namespace torchquant {

// VEC elements of T loaded or stored as one access (16 bytes at most).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

template <typename T, int VEC>
inline bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * VEC) == 0;
}

// Asynchronous global -> shared copies (cp.async), shared by the tiled GEMM kernels.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; with valid false the destination is zero-filled and src is not read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// Blocks of `threads` threads that fill the current device once: the grid of a grid-stride loop.
inline int64_t max_resident_blocks(int threads) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return static_cast<int64_t>(prop->multiProcessorCount) * (prop->maxThreadsPerMultiProcessor / threads);
}

// Maximum of non-negative v over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_max[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? warp_max[lane] : 0.0f;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// int8_conv2d.residual's steps after the conv (csrc/cuda/quantize.cu): y (the conv's float32 output, dense) +
// float(residual - residual_zero_point) * residual_scale, max(y, 0) when relu, then the cast to out_dtype or the
// requantization (out_scale, out_zero_point, out_bits), in one pass with quantized_add's element map; the output has
// y's layout (a residual laid out otherwise is copied to it first).
at::Tensor add_conv_residual_cuda(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& residual_scale,
                                  int64_t residual_zero_point, at::ScalarType out_dtype,
                                  std::optional<double> out_scale, int64_t out_zero_point, int64_t out_bits,
                                  bool relu);

}  // namespace torchquant
