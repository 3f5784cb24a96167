// The CUDA int8 GEMM engine shared by int8_mm, int8_linear (gemm.cu) and int8_conv2d (conv.cu).
//
// Operands (GemmArgs, gemm_front.h; both K-contiguous, "row.col" for the tensor cores):
//   A: int8 or uint8 rows [M, K], row r at a + r * lda; B: int8 rows [N, K] (the weight, or b transposed).
//   K is a multiple of 16, lda/ldb and both base pointers are multiples of 16 bytes; columns from K on are never
//   read (callers zero-pad K up to a multiple of 16, see gemm_operand). M and N are arbitrary.
//   Groups: group g reads A from column offset g * a_group_offset and B from g * b_group_stride, and writes output
//   columns [g * N, (g + 1) * N).
#pragma once
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "gemm_front.h"
#include "quant_math.h"
#include "sizes.h"

namespace torchquant {

// Epilogues are called per output element as epilogue(m, n, acc). The tiled kernel instead loads the per-column
// and per-row inputs once per column and row it owns (column(n), row(m)) and calls store(m, n, acc, column, row);
// an epilogue without such inputs derives from NoEpilogueInputs, whose store is its operator().
template <class Epilogue>
struct NoEpilogueInputs {
  struct Column {};
  __device__ __forceinline__ Column column(int) const { return {}; }
  __device__ __forceinline__ float row(int) const { return 0.0f; }
  __device__ __forceinline__ void store(int m, int n, int32_t acc, Column, float) const {
    static_cast<const Epilogue&>(*this)(m, n, acc);
  }
};

// Stores the raw int32 accumulator: out[m * ldo + n].
struct Int32Epilogue : NoEpilogueInputs<Int32Epilogue> {
  int32_t* out;
  int64_t ldo;

  Int32Epilogue(int32_t* out_, int64_t ldo_) : out(out_), ldo(ldo_) {}

  __device__ __forceinline__ void operator()(int m, int n, int32_t acc) const {
    out[static_cast<int64_t>(m) * ldo + n] = acc;
  }
};

// Bytes per output element.
inline int64_t out_element_size(OutKind kind) {
  switch (kind) {
    case OutKind::Int32: case OutKind::Float32: return 4;
    case OutKind::Float16: case OutKind::BFloat16: return 2;
    case OutKind::Int8: case OutKind::UInt8: return 1;
  }
  return 1;
}

// y = float(acc - x_zero_point * w_sum[n]) * x_scale[m or 0] * w_scale[n] + bias[n] (no fused multiply-adds, the
// same operations in the same order as the CPU epilogue), then the activation clamp, stored as a float type or
// requantized to int8/uint8: clamp(rne(y * inv_out_scale) + out_zero_point).
struct DequantEpilogue {
  void* out;
  int64_t ldo;
  OutKind kind;
  const float* x_scale;
  bool per_row_scale;
  int32_t x_zero_point;
  const int32_t* w_sum;
  const float* w_scale;
  const float* bias;  // nullable
  float inv_out_scale;
  float out_zero_point;
  QuantFormat out_format;
  ActivationClamp clamp;  // the fused activation (none: -inf / +inf)

  struct Column {
    uint32_t zero_point_times_sum;  // x_zero_point * w_sum[n], modulo 2^32 like the accumulator itself
    float scale;                    // w_scale[n]
    float bias;                     // bias[n], or 0 without bias
  };

  __device__ __forceinline__ Column column(int n) const {
    return {static_cast<uint32_t>(x_zero_point) * static_cast<uint32_t>(w_sum[n]), w_scale[n],
            bias != nullptr ? bias[n] : 0.0f};
  }

  __device__ __forceinline__ float row(int m) const { return x_scale[per_row_scale ? m : 0]; }

  __device__ __forceinline__ void operator()(int m, int n, int32_t acc) const { store(m, n, acc, column(n), row(m)); }

  __device__ __forceinline__ void store(int m, int n, int32_t acc, const Column& c, float row_scale) const {
    const int32_t centered = static_cast<int32_t>(static_cast<uint32_t>(acc) - c.zero_point_times_sum);
    float y = __fmul_rn(__fmul_rn(static_cast<float>(centered), row_scale), c.scale);
    if (bias != nullptr) y = __fadd_rn(y, c.bias);
    y = clamp_activation(y, clamp);
    const int64_t o = static_cast<int64_t>(m) * ldo + n;
    switch (kind) {
      case OutKind::Float32: static_cast<float*>(out)[o] = y; break;
      case OutKind::Float16: static_cast<at::Half*>(out)[o] = static_cast<at::Half>(y); break;
      case OutKind::BFloat16: static_cast<at::BFloat16*>(out)[o] = static_cast<at::BFloat16>(y); break;
      case OutKind::Int8:
        static_cast<int8_t*>(out)[o] = static_cast<int8_t>(static_cast<int>(
            quantize_value(y, inv_out_scale, out_zero_point, out_format, Rounding::Nearest)));
        break;
      case OutKind::UInt8:
        static_cast<uint8_t*>(out)[o] = static_cast<uint8_t>(static_cast<int>(
            quantize_value(y, inv_out_scale, out_zero_point, out_format, Rounding::Nearest)));
        break;
      case OutKind::Int32: break;  // Int32Epilogue's
    }
  }
};

// Split-K partial sums: each k-slice adds its int32 accumulators into a zeroed workspace (integer addition, so the
// total is exact and independent of the order), which the launcher then hands to the real epilogue.
struct AtomicAddEpilogue : NoEpilogueInputs<AtomicAddEpilogue> {
  int32_t* sums;
  int64_t ld;

  AtomicAddEpilogue(int32_t* sums_, int64_t ld_) : sums(sums_), ld(ld_) {}

  __device__ __forceinline__ void operator()(int m, int n, int32_t acc) const {
    atomicAdd(sums + static_cast<int64_t>(m) * ld + n, acc);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// What the tiled kernels (mma.sync in gemm.cu, wgmma in gemm_sm90.cu) share: the grid is
// (block tiles, k-slices, groups); blockIdx.x picks the tile, blockIdx.y the k-slice, blockIdx.z the group.
// ---------------------------------------------------------------------------------------------------------------

struct TileShape {
  int bm, bn, bk;  // block tile rows (M), columns (N) and depth in bytes (K)
};

constexpr int kTileBandRows = 8;  // block tiles per column band, for L2 reuse

// The first row and column of this block's tile. Tiles go in bands of kTileBandRows tile rows, column by column
// within a band, so that consecutive blocks share B tiles in L2.
struct TileOrigin {
  int m0, n0;
};

__device__ __forceinline__ TileOrigin tile_origin(int M, int N, int bm, int bn) {
  const int tiles_m = (M + bm - 1) / bm;
  const int tiles_n = (N + bn - 1) / bn;
  const int band_tiles = kTileBandRows * tiles_n;
  const int band = blockIdx.x / band_tiles;
  const int first_m = band * kTileBandRows;
  const int band_rows = min(tiles_m - first_m, kTileBandRows);
  const int in_band = blockIdx.x % band_tiles;
  return {(first_m + in_band % band_rows) * bm, (in_band / band_rows) * bn};
}

// Split-K: this block's k-tiles (bk bytes each) are [first, first + count) of all of K's (all of them when
// gridDim.y is 1); count may be 0.
struct KTiles {
  int first, count;
};

__device__ __forceinline__ KTiles k_slice(int K, int bk) {
  const int all = (K + bk - 1) / bk;
  const int per_split = (all + gridDim.y - 1) / gridDim.y;
  const int first = blockIdx.y * per_split;
  return {first, max(0, min(all - first, per_split))};
}

#if defined(TORCHQUANT_WGMMA)
// The Hopper kernel (gemm_sm90.cu, compiled for sm_90a only; setup.py defines TORCHQUANT_WGMMA when it builds that
// target). Launches gemm_wgmma_kernel on `grid` = (tiles of kWgmmaTile, k-slices, groups) with the same operand
// contract and epilogue calls as the mma.sync kernel. The caller checks that the device has compute capability 9.0.
constexpr TileShape kWgmmaTile{128, 256, 128};

template <bool A_UNSIGNED, typename Epilogue>
void launch_wgmma_gemm(const GemmArgs& args, const Epilogue& epilogue, dim3 grid, cudaStream_t stream);
#endif

#if defined(TORCHQUANT_CUTLASS)
// Whether int8_conv2d may run the CUTLASS implicit-GEMM convolution (csrc/cuda/sm90): a compute capability 9.0
// device, and TORCHQUANT_CUDA_GEMM unset or "cutlass" ("mma" and "wgmma" keep the im2col + GEMM path; the value is
// checked as for every GEMM).
bool cutlass_conv_wanted();
#endif

// Runs the GEMM on the current stream (M, N, K, groups >= 1). a_unsigned: A holds uint8.
void run_int8_gemm(const GemmArgs& args, bool a_unsigned, const Int32Epilogue& epilogue);
void run_int8_gemm(const GemmArgs& args, bool a_unsigned, const DequantEpilogue& epilogue);

// x [R, C] (int8 or uint8, any strides) as GEMM rows of padded_cols >= C columns (a multiple of 16): x itself when
// its rows already qualify, else a copy zero-padded from column C on.
at::Tensor gemm_operand(const at::Tensor& x, int64_t padded_cols);

// The epilogue of `in` writing out (rows ldo elements apart).
DequantEpilogue epilogue_for(const EpilogueInputs& in, const at::Tensor& out, int64_t ldo);

}  // namespace torchquant
