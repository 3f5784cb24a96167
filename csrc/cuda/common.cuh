// Small helpers shared by the CUDA kernels: vector loads/stores, dtype dispatch, launch sizing, reductions.
#pragma once
#include "check.h"
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

// Calls body(T{}) with T the C++ type of a float32/float16/bfloat16 dtype.
template <class Body>
void with_float_type(at::ScalarType dtype, const char* what, const Body& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kHalf: body(at::Half{}); break;
    case at::kBFloat16: body(at::BFloat16{}); break;
    default: TQ_CHECK(false, what, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

// Calls body(T{}) with T = int8_t or uint8_t.
template <class Body>
void with_byte_type(at::ScalarType dtype, const char* what, const Body& body) {
  switch (dtype) {
    case at::kChar: body(int8_t{}); break;
    case at::kByte: body(uint8_t{}); break;
    default: TQ_CHECK(false, what, " must be int8 or uint8, got ", dtype);
  }
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

}  // namespace torchquant
