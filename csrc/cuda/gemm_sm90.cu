// The Hopper int8 GEMM main loop: wgmma.mma_async (sm_90a) for the tiled case of the engine in gemm.cuh, opt-in
// through TORCHQUANT_CUDA_GEMM=wgmma (see tiled_kernel in gemm.cu) until a GPU run has verified it.
//
// Design (one role for all threads, no warp specialization):
//   - block tile 128 x 256 (M x N) x 128 bytes of K; 256 threads = 2 warpgroups, warpgroup w computing rows
//     [64 w, 64 w + 64) x all 256 columns with m64n256k32 (128 int32 accumulators per thread);
//   - a 4-stage shared-memory ring (48 KiB per stage, 193 KiB in all: one block per multiprocessor) filled by every
//     thread with 16-byte cp.async (zero-filled tails), written straight into the 128-byte swizzled layout wgmma
//     reads, so no ldmatrix and no register traffic for the operands;
//   - per k-tile: one __syncthreads, then each warpgroup issues 4 wgmma (k = 32 each) and the copies of the tile two
//     ahead, and waits for its previous batch only (wgmma.wait_group 1), so the tensor cores always have a batch
//     queued while the threads synchronize. Two tiles of copies are in flight.
// Why not TMA + mbarriers + a producer warpgroup (setmaxnreg): more machinery (tensor maps per call from the driver
// entry point, phase-tracked barriers) whose first run would be on the GPU; this loop keeps the mma.sync kernel's
// synchronization pattern, which is proven, and changes only where the operands go and who multiplies them.
// Everything outside the main loop is the mma.sync kernel's: grid (tiles, k-slices, groups), tile order
// (tile_origin), split-K (k_slice, AtomicAddEpilogue), and the epilogue objects' row/column/store calls.
//
// PTX ISA facts this file relies on (sections of "Asynchronous Warpgroup Level Matrix Multiply-Accumulate
// Instructions", 9.7.15 in the PTX ISA 8.x documents):
//   [shape]  wgmma.mma_async.sync.aligned.m64nNk32.s32.{s8,u8}.s8 d, a-desc, b-desc, scale-d: integer wgmma has
//            K = 32 bytes, both operands from shared memory through descriptors, and (8-bit types) K-major only;
//            scale-d is a predicate, false: D = A * B, true: D = A * B + D.
//   [frag]   accumulator D (9.7.15.5.1.1, "Register Fragments"; the m64nNk32 .s32 figure repeats the m64nNk16
//            .f32 one): N/2 registers per thread; warp w of the warpgroup holds rows 16 w .. 16 w + 15; register
//            d[i] is row 16 w + lane / 4 + 8 * ((i / 2) % 2), column 8 * (i / 4) + 2 * (lane % 4) + (i % 2).
//   [atom]   shared memory layout (9.7.15.5.1.2): a K-major operand with 128-byte swizzling is made of atoms of
//            8 rows x 128 bytes (8 x 8 units of 16 bytes), 1024 contiguous bytes; inside an atom the 16-byte unit
//            u of row r is stored at unit position u XOR r (the swizzle acts on address bits 4-6 XOR bits 7-9,
//            which is why an atom must start on a 1024-byte boundary).
//   [desc]   matrix descriptor (9.7.15.5.1.2, "Matrix Descriptor Format"): bits 0-13 start address >> 4,
//            bits 16-29 leading dimension byte offset >> 4 (not used for swizzled K-major layouts, "assumed 1"),
//            bits 32-45 stride dimension byte offset >> 4 (from one 8-row group to the next: 1024 here), bits 49-51
//            base offset (0: atoms on 1024-byte boundaries), bits 62-63 swizzle mode (1 = 128 bytes).
//   [fence]  wgmma.fence before the first wgmma and after registers the wgmma uses were written otherwise;
//            accumulating into the same registers across in-flight wgmma of one shape needs none (9.7.15.7.1).
//   [proxy]  wgmma reads shared memory through the async proxy: writes by the generic proxy (cp.async here) need
//            fence.proxy.async before the wgmma that reads them; a wgmma's completion carries an implicit
//            async-generic fence, so after wgmma.wait_group the copies may overwrite what it read (9.7.15.4).
//   [group]  wgmma.commit_group closes a batch; wgmma.wait_group N returns when at most N batches are pending.
#include "check.h"
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/common.cuh"
#include "cuda/gemm.cuh"

// setup.py defines TORCHQUANT_WGMMA only when it builds the sm_90a target; elsewhere this file compiles to nothing.
#if defined(TORCHQUANT_WGMMA)

namespace torchquant {
namespace {

constexpr int kBM = kWgmmaTile.bm, kBN = kWgmmaTile.bn, kBK = kWgmmaTile.bk;
constexpr int kStages = 4;
constexpr int kWarpgroupThreads = 128;
constexpr int kWarpgroupRows = 64;  // the M of m64n256k32
constexpr int kThreads = kBM / kWarpgroupRows * kWarpgroupThreads;
constexpr int kAtomBytes = 8 * kBK;  // [atom]: 8 rows of 128 bytes
constexpr int kATileBytes = kBM * kBK;
constexpr int kStageBytes = kATileBytes + kBN * kBK;
constexpr int kSmemBytes = kStages * kStageBytes + kAtomBytes;  // + room to align the ring to an atom boundary
static_assert(kBK == 128, "rows of exactly 128 bytes: one 128-byte swizzle atom wide");
static_assert(kATileBytes % kAtomBytes == 0 && kStageBytes % kAtomBytes == 0 &&
                  (kWarpgroupRows * kBK) % kAtomBytes == 0,
              "every operand tile the descriptors point at starts on an atom boundary");
static_assert(kBN == 256, "gemm_wgmma_kernel issues m64n256k32");

// The device code below exists in the sm_90a pass only: other targets of the same build (e.g. sm_80 next to sm_90a)
// get an empty kernel, which the dispatcher never launches (it requires compute capability 9.0, where the sm_90a
// image is the one loaded).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kKStep = 32;              // bytes of K per wgmma
constexpr int kAccumulators = kBN / 2;  // [frag]: N/2 registers per thread
constexpr int kChunk = 16;              // bytes per cp.async and per swizzle unit

// Byte offset of 16-byte unit `chunk` (0..7) of row `row` in a tile of 128-byte rows, 128-byte swizzled [atom].
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * kBK + ((chunk ^ (row & 7)) << 4));
}

// [desc] for a K-major, 128-byte swizzled operand whose first row starts at `address` (an atom boundary, or one
// plus a multiple of 32 bytes to select a k-step inside the 128-byte rows: bits 7-9 of the address, which the
// swizzle uses, stay those of the row, so the base offset stays 0).
__device__ __forceinline__ uint64_t operand_descriptor(uint32_t address) {
  constexpr uint64_t kLeadingByteOffset = 1;                  // unused for swizzled K-major, "assumed 1"
  constexpr uint64_t kStrideByteOffset = kAtomBytes >> 4;      // next 8-row group
  constexpr uint64_t kSwizzle128B = 1;
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | (kLeadingByteOffset << 16) | (kStrideByteOffset << 32) |
         (kSwizzle128B << 62);
}

// Issues the cp.async copies of ROWS rows (first_row.., of which those >= row_limit are zero-filled) x 128 bytes
// of K from k0 (units at k >= K zero-filled: K is a multiple of 16, so a unit is all inside or all outside) into the
// swizzled tile at `tile`. Eight consecutive threads copy the eight units of one row: 128 contiguous bytes.
template <int ROWS>
__device__ __forceinline__ void load_rows(uint32_t tile, const int8_t* src, int64_t ld, int first_row, int row_limit,
                                          int k0, int K, int tid) {
  constexpr int kUnitsPerRow = kBK / kChunk;
  static_assert(ROWS * kUnitsPerRow % kThreads == 0, "every thread copies the same number of units");
#pragma unroll
  for (int i = 0; i < ROWS * kUnitsPerRow / kThreads; ++i) {
    const int id = tid + i * kThreads;
    const int row = id / kUnitsPerRow;
    const int chunk = id % kUnitsPerRow;
    const int k = k0 + chunk * kChunk;
    const bool ok = k < K && first_row + row < row_limit;
    cp_async_16(tile + swizzled(row, chunk), ok ? src + static_cast<int64_t>(first_row + row) * ld + k : src, ok);
  }
}

__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}

// Keeps the compiler from moving accumulator accesses across the asynchronous wgmma boundaries (the asm statements
// above do not name the registers a pending wgmma writes).
__device__ __forceinline__ void fence_accumulators(int32_t (&d)[kAccumulators]) {
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// d (64 x 256 int32, [frag]) += A (64 x 32 bytes) * B (256 x 32 bytes)^T, both K-major in shared memory [shape].
#define TQ_WGMMA_M64N256K32(ATYPE)                                                                                   \
  "{\n"                                                                                                              \
  ".reg .pred accumulate;\n"                                                                                         \
  "setp.ne.b32 accumulate, %130, 0;\n"                                                                               \
  "wgmma.mma_async.sync.aligned.m64n256k32.s32." ATYPE ".s8 {"                                                       \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                                 \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                                 \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                                 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                                 \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                                 \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                     \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "                \
  "%128, %129, accumulate;\n"                                                                                        \
  "}\n"
#define TQ_WGMMA_ACCUMULATORS                                                                                        \
  "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),                    \
  "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),              \
  "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),            \
  "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),            \
  "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),            \
  "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),            \
  "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),            \
  "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),            \
  "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),            \
  "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),            \
  "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),            \
  "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),            \
  "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),        \
  "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),    \
  "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),    \
  "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])

template <bool A_UNSIGNED>
__device__ __forceinline__ void wgmma_m64n256k32(int32_t (&d)[kAccumulators], uint64_t a_descriptor,
                                                 uint64_t b_descriptor) {
  if constexpr (A_UNSIGNED) {
    asm volatile(TQ_WGMMA_M64N256K32("u8")
                 : TQ_WGMMA_ACCUMULATORS
                 : "l"(a_descriptor), "l"(b_descriptor), "r"(1)
                 : "memory");
  } else {
    asm volatile(TQ_WGMMA_M64N256K32("s8")
                 : TQ_WGMMA_ACCUMULATORS
                 : "l"(a_descriptor), "l"(b_descriptor), "r"(1)
                 : "memory");
  }
}

#undef TQ_WGMMA_ACCUMULATORS
#undef TQ_WGMMA_M64N256K32
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <bool A_UNSIGNED, typename Epilogue>
__global__ void __launch_bounds__(kThreads, 1) gemm_wgmma_kernel(GemmArgs args, Epilogue epilogue) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) int8_t smem[];
  const uint32_t ring = (shared_address(smem) + kAtomBytes - 1) & ~static_cast<uint32_t>(kAtomBytes - 1);
  const int tid = threadIdx.x;
  const int warpgroup = tid / kWarpgroupThreads;
  const int M = static_cast<int>(args.m), N = static_cast<int>(args.n), K = static_cast<int>(args.k);
  const TileOrigin origin = tile_origin(M, N, kBM, kBN);  // named members: a lambda below captures them
  const int m0 = origin.m0, n0 = origin.n0;
  const int group = blockIdx.z;
  const int8_t* a = static_cast<const int8_t*>(args.a) + group * args.a_group_offset;
  const int8_t* b = args.b + group * args.b_group_stride;

  const auto load_stage = [&](int stage, int k_tile) {
    const uint32_t a_tile = ring + stage * kStageBytes;
    load_rows<kBM>(a_tile, a, args.lda, m0, M, k_tile * kBK, K, tid);
    load_rows<kBN>(a_tile + kATileBytes, b, args.ldb, n0, N, k_tile * kBK, K, tid);
  };

  int32_t acc[kAccumulators];
#pragma unroll
  for (int i = 0; i < kAccumulators; ++i) acc[i] = 0;

  // Tile t lives in stage t % kStages. While tile kt is multiplied, tile kt - 1 may still be (its batch is waited
  // for one iteration later) and tiles kt + 1, kt + 2 are being copied: all four stages are in use.
  constexpr int kAhead = kStages - 2;
  const auto [k_first, k_tiles] = k_slice(K, kBK);
#pragma unroll
  for (int t = 0; t < kAhead; ++t) {
    if (t < k_tiles) load_stage(t, k_first + t);
    cp_async_commit();  // always commit, so that the group count below stays uniform
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kAhead - 1>();  // this thread's copies of tile kt have landed
    fence_proxy_async_shared();   // [proxy] ... and are visible to wgmma
    __syncthreads();              // every thread's copies of tile kt have landed, and every warpgroup has passed
                                  // the wait for its batch kt - 2 (end of the last iteration)
    const uint32_t a_tile = ring + (kt % kStages) * kStageBytes + warpgroup * kWarpgroupRows * kBK;
    const uint32_t b_tile = ring + (kt % kStages) * kStageBytes + kATileBytes;
    fence_accumulators(acc);
    wgmma_fence();  // [fence]
#pragma unroll
    for (int ks = 0; ks < kBK / kKStep; ++ks)
      wgmma_m64n256k32<A_UNSIGNED>(acc, operand_descriptor(a_tile + ks * kKStep),
                                   operand_descriptor(b_tile + ks * kKStep));
    wgmma_commit();
    // tile kt + 2 goes where tile kt - 2 was: its batch completed everywhere before the barrier above
    const int next = kt + kAhead;
    if (next < k_tiles) load_stage(next % kStages, k_first + next);
    cp_async_commit();
    wgmma_wait<1>();  // batch kt - 1 done; batch kt keeps the tensor cores busy across the next barrier
    fence_accumulators(acc);
  }
  wgmma_wait<0>();
  fence_accumulators(acc);

  // [frag]: this thread holds rows r and r + 8 (h = 0, 1) and, for each 8-column block j, columns 8 j + 2 t + c;
  // acc[4 j + 2 h + c]. The epilogue inputs of each row and column are loaded once, as in the mma.sync kernel.
  const int lane = tid % 32;
  const int warp_in_group = (tid / 32) % 4;
  const int row = m0 + warpgroup * kWarpgroupRows + warp_in_group * 16 + lane / 4;
  const int t = lane % 4;
  float row_inputs[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) row_inputs[h] = epilogue.row(min(row + 8 * h, M - 1));
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int n = n0 + 8 * j + 2 * t + c;
      if (n >= N) continue;
      const auto column = epilogue.column(group * N + n);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = row + 8 * h;
        if (m < M) epilogue.store(m, group * N + n, acc[4 * j + 2 * h + c], column, row_inputs[h]);
      }
    }
#endif
}

}  // namespace

template <bool A_UNSIGNED, typename Epilogue>
void launch_wgmma_gemm(const GemmArgs& args, const Epilogue& epilogue, dim3 grid, cudaStream_t stream) {
  const auto kernel = gemm_wgmma_kernel<A_UNSIGNED, Epilogue>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(args, epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The epilogues gemm.cu launches the tiled kernels with.
template void launch_wgmma_gemm<false, Int32Epilogue>(const GemmArgs&, const Int32Epilogue&, dim3, cudaStream_t);
template void launch_wgmma_gemm<true, Int32Epilogue>(const GemmArgs&, const Int32Epilogue&, dim3, cudaStream_t);
template void launch_wgmma_gemm<false, DequantEpilogue>(const GemmArgs&, const DequantEpilogue&, dim3, cudaStream_t);
template void launch_wgmma_gemm<true, DequantEpilogue>(const GemmArgs&, const DequantEpilogue&, dim3, cudaStream_t);
template void launch_wgmma_gemm<false, AtomicAddEpilogue>(const GemmArgs&, const AtomicAddEpilogue&, dim3,
                                                          cudaStream_t);
template void launch_wgmma_gemm<true, AtomicAddEpilogue>(const GemmArgs&, const AtomicAddEpilogue&, dim3,
                                                         cudaStream_t);

}  // namespace torchquant

#endif  // TORCHQUANT_WGMMA
