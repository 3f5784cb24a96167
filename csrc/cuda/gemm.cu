// CUDA int8_mm, pack_int8_weight and int8_linear (schemas in csrc/ops.cpp) on the int8 tensor-core GEMM engine
// declared in gemm.cuh.
//
// Kernels, chosen per call by launch_gemm:
//   CUTLASS (sm90/, built with the sm_90a target, run on compute capability 9.0): TMA warp-specialized wgmma kernels
//                        from CUTLASS's collective builders with the epilogue as a visitor tree; 128x256 tiles on
//                        2-CTA clusters when the tiles fill the GPU, else 128x128 tiles with stream-K. Takes every
//                        ungrouped GEMM with 16-byte aligned output rows and M > 16.
//   gemm_small_m_kernel: M <= 16 (decode-style GEMV): streams B straight from global memory with 16-byte loads, one
//                        m16n8k32 tile per warp per 64 k, K split over 4 warps and reduced in shared memory.
//   gemm_tiled_kernel:   everything else (other GPUs; grouped convs, unaligned outputs on Hopper): mma.sync m16n8k32,
//                        128x128x64 block tiles, 8 warps of 64x32, a 4-stage cp.async shared-memory pipeline
//                        (zero-filled tails), ldmatrix from an XOR-swizzled layout (no bank conflicts). When those
//                        tiles fill under half of the multiprocessors, K is split over blockIdx.y and the slices add
//                        their int32 sums atomically before one epilogue pass (split_k_count).
// TORCHQUANT_CUDA_GEMM overrides the choice (benchmarks and tests): "cutlass" runs CUTLASS wherever it can (M <= 16
// too), "mma" the mma.sync kernels only, "wgmma" the hand-written Hopper kernel of gemm_sm90.cu in place of
// gemm_tiled_kernel (same grid, split-K and epilogues), kept only to be timed against CUTLASS.
#include "check.h"
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "arg_checks.h"
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#if defined(TORCHQUANT_CUTLASS)
#include "cuda/sm90/cutlass_gemm.h"
#endif

namespace torchquant {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// c += a (16x32, row) * b (32x8, col); A signed or unsigned bytes, B signed bytes.
template <bool A_UNSIGNED>
__device__ __forceinline__ void mma_m16n8k32(int32_t (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
  if constexpr (A_UNSIGNED) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tiled kernel
// ---------------------------------------------------------------------------------------------------------------

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 4, kTiledThreads = 256;
constexpr int kStageBytes = (kBM + kBN) * kBK;
constexpr int kTiledSmemBytes = kStages * kStageBytes;  // 64 KiB
static_assert(kBM == kBN, "load_tile copies A and B rows with the same thread layout");

// Byte offset of 16-byte chunk `chunk` (0..3) of row `row` of a [rows][64] shared tile. The chunk index is XOR-ed
// with bits 1..2 of the row, so the 8 rows one ldmatrix phase reads (same logical chunk) hit 8 distinct 16-byte
// bank groups: rows r and r+1 differ by 64 bytes, and (r >> 1) & 3 spreads the 4 row pairs over the 4 chunks.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4));
}

// Issues the cp.async copies of one k-tile (A rows m0.., B rows n0.., columns k0..k0+63) into one stage.
__device__ __forceinline__ void load_tile(uint32_t stage, const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                                          int m0, int n0, int k0, int M, int N, int K, int tid) {
#pragma unroll
  for (int i = 0; i < (kBM * kBK / 16) / kTiledThreads; ++i) {
    const int id = tid + i * kTiledThreads;
    const int row = id >> 2;
    const int chunk = id & 3;
    const int k = k0 + chunk * 16;
    const bool k_ok = k < K;
    const bool a_ok = k_ok && m0 + row < M;
    const bool b_ok = k_ok && n0 + row < N;
    cp_async_16(stage + swizzled(row, chunk), a_ok ? a + static_cast<int64_t>(m0 + row) * lda + k : a, a_ok);
    cp_async_16(stage + kBM * kBK + swizzled(row, chunk), b_ok ? b + static_cast<int64_t>(n0 + row) * ldb + k : b,
                b_ok);
  }
}

template <bool A_UNSIGNED, typename Epilogue>
__global__ void __launch_bounds__(kTiledThreads) gemm_tiled_kernel(GemmArgs args, Epilogue epilogue) {
  extern __shared__ __align__(128) int8_t smem[];
  const uint32_t smem_base = shared_address(smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp >> 2;  // 0..1: 64 rows each
  const int warp_n = warp & 3;   // 0..3: 32 columns each

  const int M = static_cast<int>(args.m), N = static_cast<int>(args.n), K = static_cast<int>(args.k);
  const auto [m0, n0] = tile_origin(M, N, kBM, kBN);

  const int group = blockIdx.z;
  const int8_t* a = static_cast<const int8_t*>(args.a) + group * args.a_group_offset;
  const int8_t* b = args.b + group * args.b_group_stride;

  int32_t acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0;

  const auto [k_begin, k_tiles] = k_slice(K, kBK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles)
      load_tile(smem_base + s * kStageBytes, a, args.lda, b, args.ldb, m0, n0, (k_begin + s) * kBK, M, N, K, tid);
    cp_async_commit();  // always commit, so that the group count below stays uniform
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (for this thread's copies)
    __syncthreads();               // ... for every thread's copies, and every warp is done with tile kt - 1
    const int next = kt + kStages - 1;
    if (next < k_tiles)
      load_tile(smem_base + (next % kStages) * kStageBytes, a, args.lda, b, args.ldb, m0, n0, (k_begin + next) * kBK,
                M, N, K, tid);
    cp_async_commit();

    const uint32_t a_tile = smem_base + (kt % kStages) * kStageBytes;
    const uint32_t b_tile = a_tile + kBM * kBK;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      // A: x4 = rows 0-7 / 8-15 of k 0-15, then of k 16-31 (a0..a3); lane l addresses row l % 16, half l / 16.
      uint32_t a_frag[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int row = warp_m * 64 + mi * 16 + (lane & 15);
        ldmatrix_x4(a_frag[mi], a_tile + swizzled(row, ks * 2 + (lane >> 4)));
      }
      // B: x4 = n 0-7 of k 0-15 / 16-31 (b0, b1 of tile 2p), then n 8-15 (tile 2p + 1).
      uint32_t b_frag[2][4];
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int row = warp_n * 32 + p * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(b_frag[p], b_tile + swizzled(row, ks * 2 + ((lane >> 3) & 1)));
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          mma_m16n8k32<A_UNSIGNED>(acc[mi][ni], a_frag[mi][0], a_frag[mi][1], a_frag[mi][2], a_frag[mi][3],
                                   b_frag[ni >> 1][(ni & 1) * 2], b_frag[ni >> 1][(ni & 1) * 2 + 1]);
    }
  }

  // Accumulator e of tile (mi, ni): row g + 8 h, column 2 t + c, with e = 2 h + c, g = lane / 4, t = lane % 4.
  // Each thread owns 8 rows and 8 columns: their epilogue inputs are loaded once.
  const int g = lane >> 2;
  const int t = lane & 3;
  float row_inputs[4][2];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_inputs[mi][h] = epilogue.row(min(m0 + warp_m * 64 + mi * 16 + g + h * 8, M - 1));
#pragma unroll
  for (int ni = 0; ni < 4; ++ni)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int n = n0 + warp_n * 32 + ni * 8 + t * 2 + c;
      if (n >= N) continue;
      const auto column = epilogue.column(group * N + n);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = m0 + warp_m * 64 + mi * 16 + g + h * 8;
          if (m < M) epilogue.store(m, group * N + n, acc[mi][ni][h * 2 + c], column, row_inputs[mi][h]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Small-M kernel (M <= 16, one group)
// ---------------------------------------------------------------------------------------------------------------
//
// A warp owns 8 rows of B (n) and one quarter of the 64-byte k-chunks. Lane (g = lane / 4, t = lane % 4) loads 16
// bytes of B row n0 + g and of A rows g and g + 8 at k = chunk * 64 + 16 t. The reduction order inside a chunk is
// free, so the 16 bytes serve as two m16n8k32 steps with the same k-permutation on both operands: step 0 pairs
// bytes 0-3 (as k 4t..4t+3) and 4-7 (as k 16+4t..), step 1 bytes 8-11 and 12-15.

constexpr int kSmallThreads = 256;
constexpr int kSmallNGroups = 2;  // warps side by side in n (8 rows each)
constexpr int kSmallKSplit = 4;   // warps splitting k
constexpr int kSmallUnroll = 4;   // chunks in flight per warp
constexpr int kSmallMaxM = 16;

template <bool A_UNSIGNED, typename Epilogue>
__global__ void __launch_bounds__(kSmallThreads) gemm_small_m_kernel(GemmArgs args, Epilogue epilogue) {
  __shared__ int32_t partial[kSmallThreads / 32][32][4];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_group = warp % kSmallNGroups;
  const int k_part = warp / kSmallNGroups;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int M = static_cast<int>(args.m), N = static_cast<int>(args.n), K = static_cast<int>(args.k);
  const int n0 = (blockIdx.x * kSmallNGroups + n_group) * 8;

  const bool b_row_ok = n0 + g < N;
  const bool a_row0_ok = g < M;
  const bool a_row1_ok = g + 8 < M;
  const int8_t* b_row = args.b + static_cast<int64_t>(b_row_ok ? n0 + g : 0) * args.ldb;
  const int8_t* a_rows = static_cast<const int8_t*>(args.a);
  const int8_t* a_row0 = a_rows + static_cast<int64_t>(a_row0_ok ? g : 0) * args.lda;
  const int8_t* a_row1 = a_rows + static_cast<int64_t>(a_row1_ok ? g + 8 : 0) * args.lda;

  int32_t acc[4] = {0, 0, 0, 0};
  const int chunks = (K + 63) / 64;
  for (int c0 = k_part; c0 < chunks; c0 += kSmallKSplit * kSmallUnroll) {
    int4 w[kSmallUnroll], x0[kSmallUnroll], x1[kSmallUnroll];
#pragma unroll
    for (int u = 0; u < kSmallUnroll; ++u) {
      const int k = (c0 + u * kSmallKSplit) * 64 + t * 16;
      const bool k_ok = k < K;
      const int4 zero = make_int4(0, 0, 0, 0);
      w[u] = k_ok && b_row_ok ? __ldg(reinterpret_cast<const int4*>(b_row + k)) : zero;
      x0[u] = k_ok && a_row0_ok ? __ldg(reinterpret_cast<const int4*>(a_row0 + k)) : zero;
      x1[u] = k_ok && a_row1_ok ? __ldg(reinterpret_cast<const int4*>(a_row1 + k)) : zero;
    }
#pragma unroll
    for (int u = 0; u < kSmallUnroll; ++u) {
      mma_m16n8k32<A_UNSIGNED>(acc, x0[u].x, x1[u].x, x0[u].y, x1[u].y, w[u].x, w[u].y);
      mma_m16n8k32<A_UNSIGNED>(acc, x0[u].z, x1[u].z, x0[u].w, x1[u].w, w[u].z, w[u].w);
    }
  }

#pragma unroll
  for (int e = 0; e < 4; ++e) partial[warp][lane][e] = acc[e];
  __syncthreads();
  if (k_part != 0) return;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    int32_t sum = 0;
#pragma unroll
    for (int p = 0; p < kSmallKSplit; ++p) sum += partial[n_group + p * kSmallNGroups][lane][e];
    const int m = g + (e >> 1) * 8;
    const int n = n0 + t * 2 + (e & 1);
    if (m < M && n < N) epilogue(m, n, sum);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------------------------

template <typename Epilogue>
__global__ void apply_epilogue_kernel(const int32_t* __restrict__ sums, int64_t rows, int64_t cols,
                                      Epilogue epilogue) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    epilogue(static_cast<int>(i / cols), static_cast<int>(i % cols), sums[i]);
}

constexpr int kMinKTilesPerSplit = 4;  // a split-K slice covers at least 4 k-tiles
constexpr int kEpilogueThreads = 256;
constexpr TileShape kMmaTile{kBM, kBN, kBK};

// How many k-slices a tiled kernel's grid takes: 1 unless the block tiles would leave more than half of the
// multiprocessors idle (M and N small against K, e.g. M = 128 x N = 4096), then enough to fill them once.
int split_k_count(int64_t blocks, int K, int bk) {
  const int k_tiles = (K + bk - 1) / bk;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (2 * blocks > sms) return 1;
  const int64_t wanted = std::min<int64_t>(sms / blocks, k_tiles / kMinKTilesPerSplit);
  if (wanted <= 1) return 1;
  // equal slices of k_per_split tiles, none empty
  const int k_per_split = static_cast<int>((k_tiles + wanted - 1) / wanted);
  return (k_tiles + k_per_split - 1) / k_per_split;
}

// The kernel families launch_gemm chooses from (see the top of this file).
enum class GemmKernel { Auto, Cutlass, Mma, Wgmma };

// TORCHQUANT_CUDA_GEMM: unset/empty (Auto), "cutlass", "mma" or "wgmma". Read on every call, like
// TORCHQUANT_CPU_ISA, so that tests and benchmarks can switch kernels inside one process; getenv is cheap next to a
// kernel launch.
GemmKernel requested_gemm_kernel() {
  const char* value = std::getenv("TORCHQUANT_CUDA_GEMM");
  if (value == nullptr || value[0] == '\0') return GemmKernel::Auto;
  if (std::strcmp(value, "cutlass") == 0) return GemmKernel::Cutlass;
  if (std::strcmp(value, "mma") == 0) return GemmKernel::Mma;
  TQ_CHECK(std::strcmp(value, "wgmma") == 0,
           "TORCHQUANT_CUDA_GEMM must be cutlass, mma or wgmma (or unset: the automatic choice), got '", value, "'");
  return GemmKernel::Wgmma;
}

#if defined(TORCHQUANT_WGMMA) || defined(TORCHQUANT_CUTLASS)
// Whether the current device runs the sm_90a image: compute capability 9.0 exactly (sm_90a code runs on no other).
bool sm90a_device() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
}
#endif

// The tiled kernel behind the mma.sync fallback: the wgmma kernel only where it was asked for and exists (built for
// sm_90a, i.e. TORCHQUANT_WGMMA, on a compute capability 9.0 device); elsewhere mma.sync.
enum class TiledKernel { Mma, Wgmma };

TiledKernel tiled_kernel(GemmKernel requested) {
#if defined(TORCHQUANT_WGMMA)
  if (requested == GemmKernel::Wgmma && sm90a_device()) return TiledKernel::Wgmma;
#else
  (void)requested;
#endif
  return TiledKernel::Mma;
}

#if defined(TORCHQUANT_CUTLASS)
int64_t output_element_size(const Int32Epilogue&) { return 4; }
int64_t output_element_size(const DequantEpilogue& e) { return out_element_size(e.kind); }

void run_cutlass(const GemmArgs& args, bool a_unsigned, const Int32Epilogue& e) {
  TQ_CHECK(!a_unsigned, "int8_mm on CUTLASS: the int32-output kernel takes int8 activations only");
  sm90::run_cutlass_gemm(sm90::cutlass_tile_for(args.m, args.n), args, e);
}
void run_cutlass(const GemmArgs& args, bool a_unsigned, const DequantEpilogue& e) {
  sm90::run_cutlass_gemm(sm90::cutlass_tile_for(args.m, args.n), a_unsigned, args, e);
}

// Runs the GEMM on the CUTLASS kernels when the request, the device and the shapes allow it (see the top of this
// file); returns whether it did.
template <typename Epilogue>
bool launched_cutlass(const GemmArgs& args, bool a_unsigned, const Epilogue& epilogue, GemmKernel requested) {
  const bool wanted = requested == GemmKernel::Cutlass || (requested == GemmKernel::Auto && args.m > kSmallMaxM);
  if (!wanted || !sm90a_device() ||
      !sm90::cutlass_can_run(args, epilogue.out, epilogue.ldo, output_element_size(epilogue)))
    return false;
  run_cutlass(args, a_unsigned, epilogue);
  return true;
}
#endif

template <bool A_UNSIGNED, typename Epilogue>
void launch_tiled(TiledKernel kernel_choice, const GemmArgs& args, const Epilogue& epilogue, dim3 grid,
                  cudaStream_t stream) {
#if defined(TORCHQUANT_WGMMA)
  if (kernel_choice == TiledKernel::Wgmma) {
    launch_wgmma_gemm<A_UNSIGNED>(args, epilogue, grid, stream);
    return;
  }
#else
  (void)kernel_choice;
#endif
  const auto kernel = gemm_tiled_kernel<A_UNSIGNED, Epilogue>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTiledSmemBytes));
  kernel<<<grid, kTiledThreads, kTiledSmemBytes, stream>>>(args, epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool A_UNSIGNED, typename Epilogue>
void launch_gemm(const GemmArgs& args, const Epilogue& epilogue, GemmKernel requested) {
#if defined(TORCHQUANT_CUTLASS)
  if (launched_cutlass(args, A_UNSIGNED, epilogue, requested)) return;
#endif
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (args.m <= kSmallMaxM && args.groups == 1) {
    const int blocks = static_cast<int>((args.n + kSmallNGroups * 8 - 1) / (kSmallNGroups * 8));
    gemm_small_m_kernel<A_UNSIGNED, Epilogue><<<blocks, kSmallThreads, 0, stream>>>(args, epilogue);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const TiledKernel kernel = tiled_kernel(requested);
#if defined(TORCHQUANT_WGMMA)
  const TileShape tile = kernel == TiledKernel::Wgmma ? kWgmmaTile : kMmaTile;
#else
  const TileShape tile = kMmaTile;
#endif
  const int64_t tiles = ((args.m + tile.bm - 1) / tile.bm) * ((args.n + tile.bn - 1) / tile.bn);
  TQ_CHECK(tiles <= INT32_MAX && args.groups <= 65535, "int8 GEMM too large: ", tiles, " tiles, ", args.groups,
              " groups");
  const int splits = split_k_count(tiles * args.groups, static_cast<int>(args.k), tile.bk);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits), static_cast<unsigned>(args.groups));
  if (splits == 1) {
    launch_tiled<A_UNSIGNED>(kernel, args, epilogue, grid, stream);
    return;
  }
  const int64_t cols = args.n * args.groups;  // the epilogue's column g * N + n
  const at::Tensor sums = at::zeros({args.m, cols}, at::TensorOptions().dtype(at::kInt).device(
                                                        at::kCUDA, c10::cuda::current_device()));
  launch_tiled<A_UNSIGNED>(kernel, args, AtomicAddEpilogue{sums.data_ptr<int32_t>(), cols}, grid, stream);
  const int64_t total = args.m * cols;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kEpilogueThreads - 1) / kEpilogueThreads,
                                                        max_resident_blocks(kEpilogueThreads)));
  apply_epilogue_kernel<Epilogue><<<blocks, kEpilogueThreads, 0, stream>>>(sums.data_ptr<int32_t>(), args.m, cols,
                                                                           epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Epilogue>
void dispatch_gemm(const GemmArgs& args, bool a_unsigned, const Epilogue& epilogue) {
  TQ_CHECK(args.m >= 1 && args.n >= 1 && args.k >= 16 && args.k % 16 == 0 && args.groups >= 1,
              "int8 GEMM: bad sizes M=", args.m, " N=", args.n, " K=", args.k, " groups=", args.groups);
  TQ_CHECK(args.lda % 16 == 0 && args.ldb % 16 == 0 && args.a_group_offset % 16 == 0 &&
                  args.b_group_stride % 16 == 0 && (is_aligned<int8_t, 16>(static_cast<const int8_t*>(args.a))) && (is_aligned<int8_t, 16>(args.b)),
              "int8 GEMM: operands must be 16-byte aligned");
  const GemmKernel requested = requested_gemm_kernel();  // checked on every call, whichever kernel runs
  if (a_unsigned) launch_gemm<true>(args, epilogue, requested);
  else launch_gemm<false>(args, epilogue, requested);
}

}  // namespace

#if defined(TORCHQUANT_CUTLASS)
bool cutlass_conv_wanted() {
  const GemmKernel requested = requested_gemm_kernel();
  return (requested == GemmKernel::Auto || requested == GemmKernel::Cutlass) && sm90a_device();
}
#endif

void run_int8_gemm(const GemmArgs& args, bool a_unsigned, const Int32Epilogue& epilogue) {
  dispatch_gemm(args, a_unsigned, epilogue);
}

void run_int8_gemm(const GemmArgs& args, bool a_unsigned, const DequantEpilogue& epilogue) {
  dispatch_gemm(args, a_unsigned, epilogue);
}

at::Tensor gemm_operand(const at::Tensor& x, int64_t padded_cols) {
  const int64_t cols = x.size(1);
  const bool usable = cols == padded_cols && x.stride(1) == 1 && (x.stride(0) % 16 == 0 || x.size(0) == 1) &&
                      is_aligned<int8_t, 16>(static_cast<const int8_t*>(x.data_ptr()));
  if (usable) return x;
  at::Tensor rows = at::empty({x.size(0), padded_cols}, x.options());
  rows.narrow(1, 0, cols).copy_(x);
  if (padded_cols > cols) rows.narrow(1, cols, padded_cols - cols).zero_();
  return rows;
}

namespace {

// The row stride of a gemm_operand result (a single row may have any stride).
int64_t operand_ld(const at::Tensor& rows) {
  return rows.size(0) == 1 ? round_up(rows.size(1), 16) : rows.stride(0);
}

}  // namespace

DequantEpilogue epilogue_for(const EpilogueInputs& in, const at::Tensor& out, int64_t ldo) {
  DequantEpilogue ep{};
  ep.out = out.data_ptr();
  ep.ldo = ldo;
  ep.kind = in.kind;
  ep.x_scale = in.x_scale.data_ptr<float>();
  ep.per_row_scale = in.x_scale.numel() > 1;
  ep.x_zero_point = in.x_zero_point;
  ep.w_sum = in.w_sum.data_ptr<int32_t>();
  ep.w_scale = in.w_scale.data_ptr<float>();
  ep.bias = in.bias.has_value() ? in.bias->data_ptr<float>() : nullptr;
  ep.clamp = in.clamp;
  ep.inv_out_scale = in.inv_out_scale;
  ep.out_zero_point = in.out_zero_point;
  ep.out_format = in.out_format;
  return ep;
}

namespace {

at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_int8_mm_operands(a, b);
  TQ_CHECK(a.is_cuda() && b.device() == a.device(), "int8_mm: a and b must be on the same CUDA device, got ",
              a.device(), " and ", b.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor out = at::empty({m, n}, a.options().dtype(at::kInt));
  if (m == 0 || n == 0) return out;
  if (k == 0) return out.zero_();
  TQ_CHECK(m <= INT32_MAX - 256 && n <= INT32_MAX - 256 && k <= INT32_MAX - 256,
              "int8_mm: sizes must be below 2^31, got M=", m, ", K=", k, ", N=", n);
  const int64_t k16 = round_up(k, 16);
  const at::Tensor a_rows = gemm_operand(a, k16);
  const at::Tensor b_rows = gemm_operand(b.t(), k16);  // [N, K]: the tensor cores' "col" operand
  GemmArgs args;
  args.a = a_rows.data_ptr();
  args.lda = operand_ld(a_rows);
  args.b = static_cast<const int8_t*>(b_rows.data_ptr());
  args.ldb = operand_ld(b_rows);
  args.m = m;
  args.n = n;
  args.k = k16;
  run_int8_gemm(args, false, Int32Epilogue{out.data_ptr<int32_t>(), n});
  return out;
}

at::Tensor pack_int8_weight_cuda(const at::Tensor& w) {
  check_weight_to_pack(w);
  const c10::cuda::CUDAGuard guard(w.device());
  // row-major and zero padded: the packed tensor's logical view is the weight itself
  at::Tensor packed = empty_packed_weight(w, packed_weight_layout(w), /*zeroed=*/true);
  packed.copy_(w);
  return packed;
}

at::Tensor int8_linear_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                            const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, int64_t out_features, at::ScalarType out_dtype,
                            std::optional<double> out_scale, int64_t out_zero_point, std::optional<double> clamp_min,
                            std::optional<double> clamp_max, int64_t out_bits) {
  constexpr const char* op = "int8_linear";
  TQ_CHECK(x_q.is_cuda(), op, ": x_q must be a CUDA tensor for the CUDA kernel, got ", x_q.device());
  const LinearFront f = int8_linear_front(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias,
                                          out_features, out_dtype, out_scale, out_zero_point, out_bits, clamp_min,
                                          clamp_max);
  const int64_t m = f.m, n = f.n, k = f.k;
  if (m == 0) return f.out;
  const c10::cuda::CUDAGuard guard(x_q.device());
  TQ_CHECK(m <= INT32_MAX - 256 && n <= INT32_MAX - 256 && k <= INT32_MAX - 256, op, ": sizes must be below 2^31");
  const at::Tensor x_rows = gemm_operand(x_q.dim() == 2 ? x_q : x_q.reshape({m, k}), round_up(k, 16));
  GemmArgs args;
  args.a = x_rows.data_ptr();
  args.lda = operand_ld(x_rows);
  args.b = w_packed.data_ptr<int8_t>();
  args.ldb = f.weight.kp;
  args.m = m;
  args.n = n;
  args.k = round_up(k, 16);
  run_int8_gemm(args, x_q.scalar_type() == at::kByte, epilogue_for(f.epilogue, f.out, n));
  return f.out;
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, CUDA, m) {
  m.impl("int8_mm", &torchquant::int8_mm_cuda);
  m.impl("pack_int8_weight", &torchquant::pack_int8_weight_cuda);
  m.impl("int8_linear", &torchquant::int8_linear_cuda);
}
