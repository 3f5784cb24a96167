// The CPU int8 GEMM engine: packing, register-blocked microkernels per ISA, the fused epilogue, and the
// cache-blocked, threaded driver. Layouts: see gemm_core.h.
#include "cpu/simd.h"  // first: see there
#include "cpu/gemm_core.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "quant_math.h"

namespace torchquant::gemm {
namespace {

// Work item: up to kRowsPerChunk rows x one 64-column panel (on AMX, rows of up to kAmxChunkBytes where the weight
// is large, summed 32 at a time). Its int32 tile (24 KB) stays in L1/L2 while k runs in blocks of kKBlock: the
// panel's slice of the weight for one block (64 KB) stays in L2 across the chunk's rows.
// Blocks of 1024 measured 0-10 % faster than 256 (which kept the slice in L1): fewer tile round trips.
constexpr int64_t kRowsPerChunk = 96;  // at most; a multiple of every microkernel's row count (6, 4, 2, 1)
constexpr int64_t kKBlock = 1024;      // bytes of k per cache block (a multiple of 4)
constexpr int64_t kWideKBlock = 512;   // the same for the AVX2 kernel on widened operands (WidePanels)
// The fused kernel (full panels on AVX-512) runs k whole: up to this k (a 3x3 conv over 512 channels, a 295 KB
// panel of weight) 1-3 % faster than in blocks with the tile between them, as far as measured.
constexpr int64_t kFusedMaxK = 4608;
constexpr int64_t kCachedActivationBytes = 512 << 10;  // activations this small stay in L2 (1 MB on Zen 5)
// On AMX, where a group's weight is larger than this, a chunk holds as many rows as fit in this many bytes (half of
// an AMX core's 2 MB L2, beside a weight panel; at least kRowsPerChunk rows), as long as the work items still
// outnumber the threads: the chunk-major order streams such a weight from L3 once per chunk, and larger chunks stream
// it fewer times. One thread on a Xeon: a 3x3 conv 512 -> 512 over 8 x 7 x 7 (392 x 4608 x 512 on im2col rows) 0.905
// ms in chunks of 96 rows, 0.764 ms in chunks of 224 (1 MB), 0.872 ms in one of 416 (1.8 MB); int8_mm 2048^3 (512
// rows) 9.75 -> 8.09 ms.
constexpr int64_t kAmxChunkBytes = 1 << 20;
// outputs from this size (half of a Zen 5 L3) bypass the caches, unless TORCHQUANT_STREAMING_BYTES says otherwise
constexpr int64_t kStreamingOutputBytes = int64_t{16} << 20;

int64_t out_kind_bytes(OutKind kind) {
  switch (kind) {
    case OutKind::Int32:
    case OutKind::Float32: return 4;
    case OutKind::Float16:
    case OutKind::BFloat16: return 2;
    case OutKind::Int8:
    case OutKind::UInt8: break;
  }
  return 1;
}

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline int64_t load_i64(const void* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Microkernels: tile[r][0..16 vectors) (+)= sum over `steps` k-steps s of a(r, s)[0..4) . panel[s][col][0..4),
// r < rows, where the 4 activation bytes a(r, s) sit at a + r * a_row + 4 * s. `first` starts the sums at
// zero, otherwise they add to the tile (the next k block). Columns from 16 vectors on are left alone.
// ---------------------------------------------------------------------------------------------------------------

// AVX-512 VNNI: MR rows x NV zmm (16 columns each) of int32 accumulators = 24 registers at MR = 6, NV = 4, plus
// the weight vectors and a broadcast; vpdpbusd does 64 u8 x s8 products per instruction without saturation.
constexpr int kVnniRows = 6;

// acc[r][j] += the products of `steps` k-steps, activation rows rows[r], weight steps from b on.
template <int MR, int NV>
TQ_TARGET_VNNI inline __attribute__((always_inline)) void accumulate_vnni_rows(__m512i (&acc)[MR][NV],
                                                                              const uint8_t* const (&rows)[MR],
                                                                              const int8_t* b, int64_t steps) {
  for (int64_t s = 0; s < steps; ++s) {
    const int8_t* bs = b + s * kStepBytes;
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_si512(bs + 64 * j);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(load_i32(rows[r] + 4 * s));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
    }
  }
}

// The same over rows a + r * a_row.
template <int MR, int NV>
TQ_TARGET_VNNI inline __attribute__((always_inline)) void accumulate_vnni(__m512i (&acc)[MR][NV], const uint8_t* a,
                                                                         int64_t a_row, const int8_t* b,
                                                                         int64_t steps) {
  const uint8_t* rows[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) rows[r] = a + r * a_row;
  accumulate_vnni_rows<MR, NV>(acc, rows, b, steps);
}

template <int MR, int NV>
TQ_TARGET_VNNI void microkernel_vnni(const uint8_t* a, int64_t a_row, const int8_t* b, int64_t steps,
                                     int32_t* tile, bool first) {
  __m512i acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[r][j] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(tile + r * kPackAlign + 16 * j);
  accumulate_vnni<MR, NV>(acc, a, a_row, b, steps);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_si512(tile + r * kPackAlign + 16 * j, acc[r][j]);
}

template <int NV>
TQ_TARGET_VNNI void microkernel_vnni_columns(const uint8_t* a, int64_t a_row, const int8_t* b,
                                             int64_t steps, int32_t* tile, int rows, bool first) {
  switch (rows) {
    case 6: return microkernel_vnni<6, NV>(a, a_row, b, steps, tile, first);
    case 5: return microkernel_vnni<5, NV>(a, a_row, b, steps, tile, first);
    case 4: return microkernel_vnni<4, NV>(a, a_row, b, steps, tile, first);
    case 3: return microkernel_vnni<3, NV>(a, a_row, b, steps, tile, first);
    case 2: return microkernel_vnni<2, NV>(a, a_row, b, steps, tile, first);
    default: return microkernel_vnni<1, NV>(a, a_row, b, steps, tile, first);
  }
}

// Only the 16-column vectors that hold output columns are multiplied: a panel of 16 valid columns (a conv with 16
// output channels, a 10-class head) costs a quarter of a full one.
TQ_TARGET_VNNI void microkernel_vnni_rows(const uint8_t* a, int64_t a_row, const int8_t* b,
                                          int64_t steps, int32_t* tile, int rows, int vectors, bool first) {
  switch (vectors) {
    case 1: return microkernel_vnni_columns<1>(a, a_row, b, steps, tile, rows, first);
    case 2: return microkernel_vnni_columns<2>(a, a_row, b, steps, tile, rows, first);
    case 3: return microkernel_vnni_columns<3>(a, a_row, b, steps, tile, rows, first);
    default: return microkernel_vnni_columns<4>(a, a_row, b, steps, tile, rows, first);
  }
}

// AVX2, exact: u8 activations and s8 weights widened to int16, then vpmaddwd (int16 x int16 -> int32 pair sums,
// |sum| <= 2 * 255 * 128, no saturation, unlike vpmaddubsw). A 16-byte slice of a panel step holds 4 columns x 4 k;
// widened and multiplied by the broadcast 4 activation values it gives 2 partial sums per column, which are
// added pairwise (hadd) when the block ends. The rows' activations are widened once per call into a buffer of
// 4-value groups (each then one broadcast load), not once per group of columns. The k-steps run over 32 columns at a
// time for one row, 16 for two and 8 for more (see microkernel_avx2): at most 8 accumulators, beside the weight
// vectors and broadcasts in the 16 registers.
constexpr int kAvx2Rows = 4;
constexpr int64_t kAvx2WideSteps = kKBlock / 4;  // the k-steps of one call at most (a k block)

// An activation row of the AVX2 kernels: dst[i] = src[i] for i < len (u8 to int16).
TQ_TARGET_AVX2 void widen_row(const uint8_t* src, int64_t len, int16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < len; ++i) dst[i] = src[i];
}

// A work item of few rows multiplies each weight byte once to four times, so a weight that does not stay in a core's
// caches comes at the speed its lines arrive, and a pass over a k block reads 32 to 128 bytes of each 256-byte
// k-step: a strided stream that the hardware prefetchers served at 4-7 GB/s on Zen 3 (a sum over memory: 13-16). For
// weights of more than kStreamedWeightBytes (n x k bytes) the int8 kernel (streaming_kernel) runs a k block in
// sub-blocks of kStreamSubSteps k-steps (8 KB: the passes after the first read it from L1), each pass prefetching its
// share of the next sub-block's lines: 1-4 rows against 16 MB and 43 MB weights 1.2-2.0x faster than the same
// kernel without, against 8 MB ones mixed (0.8-1.7x across row counts and runs), below that level or slower.
constexpr int64_t kStreamSubSteps = 32;
constexpr int64_t kStreamedWeightBytes = int64_t{8} << 20;

// One k-step of the int8 kernel's 8-accumulator shapes in assembly: from intrinsics, GCC kept one accumulator on the
// stack (a load and a store on the loop's dependency chain every k-step) and copied the others between registers.
// 1 row x 4 slices: the row's 4 values broadcast from a, then per 16 weight bytes at w (4 columns x 4 k) a widening
// load, vpmaddwd and vpaddd; 2 rows x 2 slices: both rows' broadcasts (a and a + row_bytes), each weight vector
// multiplied by both. xmm14 and xmm15 are clobbered.
#define TQ_NARROW_1(j)                                                                                       \
  "vpmovsxbw 16*" #j "(%[w]), %%ymm15\n\tvpmaddwd %[x0], %%ymm15, %%ymm15\n\tvpaddd %%ymm15, %[c" #j "], %[c" #j \
  "]\n\t"
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void step_avx2_1x32(__m256i (&acc)[1][8], const int16_t* a,
                                                                       const int8_t* w) {
  __m256i x0;
  __asm__("vpbroadcastq (%[a]), %[x0]\n\t"
          TQ_NARROW_1(0) TQ_NARROW_1(1) TQ_NARROW_1(2) TQ_NARROW_1(3)
          TQ_NARROW_1(4) TQ_NARROW_1(5) TQ_NARROW_1(6) TQ_NARROW_1(7)
          : [c0] "+x"(acc[0][0]), [c1] "+x"(acc[0][1]), [c2] "+x"(acc[0][2]), [c3] "+x"(acc[0][3]),
            [c4] "+x"(acc[0][4]), [c5] "+x"(acc[0][5]), [c6] "+x"(acc[0][6]), [c7] "+x"(acc[0][7]), [x0] "=&x"(x0)
          : [a] "r"(a), [w] "r"(w)
          : "xmm15", "memory");
}
#define TQ_NARROW_2(j)                                                                                          \
  "vpmovsxbw 16*" #j "(%[w]), %%ymm14\n\tvpmaddwd %[x0], %%ymm14, %%ymm15\n\tvpaddd %%ymm15, %[c0" #j "], %[c0" #j \
  "]\n\tvpmaddwd %[x1], %%ymm14, %%ymm15\n\tvpaddd %%ymm15, %[c1" #j "], %[c1" #j "]\n\t"
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void step_avx2_2x16(__m256i (&acc)[2][4], const int16_t* a,
                                                                       int64_t row_bytes, const int8_t* w) {
  __m256i x0, x1;
  __asm__("vpbroadcastq (%[a]), %[x0]\n\t"
          "vpbroadcastq (%[a],%[s],1), %[x1]\n\t"
          TQ_NARROW_2(0) TQ_NARROW_2(1) TQ_NARROW_2(2) TQ_NARROW_2(3)
          : [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]), [c02] "+x"(acc[0][2]), [c03] "+x"(acc[0][3]),
            [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]), [c12] "+x"(acc[1][2]), [c13] "+x"(acc[1][3]),
            [x0] "=&x"(x0), [x1] "=&x"(x1)
          : [a] "r"(a), [s] "r"(row_bytes), [w] "r"(w)
          : "xmm14", "xmm15", "memory");
}
#undef TQ_NARROW_2
#undef TQ_NARROW_1

// tile[r][8 h .. 8 h + 8 G) (+)= the sums over k-steps [s0, s1) of MR widened rows and the G 8-column slices of the
// k block at b from slice h on (32 bytes of each 256-byte k-step a slice). With STREAM, the pass also prefetches
// lines pass, pass + passes, ... (of those holding the item's `slices`) of the k-step kStreamSubSteps ahead.
template <int MR, int G, bool STREAM>
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void slices_avx2(const int16_t (*wide)[kAvx2WideSteps * 4],
                                                                      const int8_t* b, int h, int64_t s0, int64_t s1,
                                                                      int32_t* tile, bool first, int pass,
                                                                      int passes, int slices) {
  __m256i acc[MR][2 * G];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < 2 * G; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int64_t s = s0; s < s1; ++s) {
    const int8_t* bs = b + s * kStepBytes;
    if constexpr (STREAM)
      for (int line = pass; 2 * line < slices; line += passes)
        // (the address may lie past the weight's end: a prefetch does not fault, and the pointer is not formed)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(bs) + kStreamSubSteps * kStepBytes +
                                                   64 * line),
                     _MM_HINT_T0);
    if constexpr (MR == 1 && G == 4) {
      step_avx2_1x32(acc, wide[0] + 4 * s, bs + 32 * h);
    } else if constexpr (MR == 2 && G == 2) {
      step_avx2_2x16(acc, wide[0] + 4 * s, sizeof(wide[0]), bs + 32 * h);
    } else {
      __m256i av[MR];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) av[r] = _mm256_set1_epi64x(load_i64(wide[r] + 4 * s));
#pragma GCC unroll 2
      for (int j = 0; j < 2 * G; ++j) {
        const __m256i w =
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bs + 32 * h + 16 * j)));
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(w, av[r]));
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
      store_column_sums_avx2(acc[r][2 * g], acc[r][2 * g + 1], tile + r * kPackAlign + 8 * (h + g), first);
}

// The passes run G slices each, G x MR accumulator pairs in at most 8 registers (1 row: 4 slices, half a k-step; 2
// rows: 2; more rows 1): one slice a pass for 1 and 2 rows, its broadcast, loads and loop counter spread over fewer
// products, took 1.1-1.6x the time (1-2 rows x 384-4096 x 384-11008, one process, interleaved, Zen 3).
template <int MR, bool STREAM>
TQ_TARGET_AVX2 void microkernel_avx2(const uint8_t* a, int64_t a_row, const int8_t* b, int64_t steps,
                                     int32_t* tile, int vectors, bool first) {
  alignas(32) int16_t wide[MR][kAvx2WideSteps * 4];
  for (int r = 0; r < MR; ++r) widen_row(a + r * a_row, 4 * steps, wide[r]);
  constexpr int G = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  const int slices = 2 * vectors;
  // (two loops, not the sub-block loop with one sub-block for cached weights: with that loop around the passes GCC
  // kept 4 rows' accumulators partly on the stack, and cached weights ran 0.6-0.7x at 4 rows)
  if constexpr (!STREAM) {
    int h = 0;
    for (; h + G <= slices; h += G) slices_avx2<MR, G, false>(wide, b, h, 0, steps, tile, first, 0, 1, slices);
    for (; h < slices; ++h) slices_avx2<MR, 1, false>(wide, b, h, 0, steps, tile, first, 0, 1, slices);
  } else {
    const int passes = slices / G + slices % G;
    for (int64_t s0 = 0; s0 < steps; s0 += kStreamSubSteps) {
      const int64_t s1 = std::min(steps, s0 + kStreamSubSteps);
      const bool start = first && s0 == 0;
      int h = 0, pass = 0;
      for (; h + G <= slices; h += G, ++pass)
        slices_avx2<MR, G, true>(wide, b, h, s0, s1, tile, start, pass, passes, slices);
      for (; h < slices; ++h, ++pass) slices_avx2<MR, 1, true>(wide, b, h, s0, s1, tile, start, pass, passes, slices);
    }
  }
}

// Calls of more k-steps than the buffer holds (the conv kernel rows read in place are shorter) go in parts.
template <bool STREAM>
TQ_TARGET_AVX2 void microkernel_avx2_rows(const uint8_t* a, int64_t a_row, const int8_t* b,
                                          int64_t steps, int32_t* tile, int rows, int vectors, bool first) {
  for (int64_t s0 = 0; s0 < steps; s0 += kAvx2WideSteps) {
    const int64_t part = std::min(kAvx2WideSteps, steps - s0);
    const uint8_t* as = a + 4 * s0;
    const int8_t* bs = b + s0 * kStepBytes;
    const bool start = first && s0 == 0;
    if (rows == 4) microkernel_avx2<4, STREAM>(as, a_row, bs, part, tile, vectors, start);
    else if (rows == 3) microkernel_avx2<3, STREAM>(as, a_row, bs, part, tile, vectors, start);
    else if (rows == 2) microkernel_avx2<2, STREAM>(as, a_row, bs, part, tile, vectors, start);
    else microkernel_avx2<1, STREAM>(as, a_row, bs, part, tile, vectors, start);
  }
}

// The AVX2 kernel on operands that the driver widened to int16 once for all the row groups of a work item
// (WidePanels, WideConvOperands): activation rows a_row values apart, and one 16-column vector of a weight block, its
// k-steps one after the other (64 values each). Nothing is widened in its loop, and the weights are vpmaddwd's memory
// operand: a k-step of 3 rows x 16 columns is 3 broadcast loads + 12 vpmaddwd + 12 vpaddd, into 12 accumulators
// (with the 3 broadcasts and a product, the 16 registers). One 16-column vector per call: the driver runs each vector
// of the block over all the row groups, so that its 16 KB stay in L1 (all 4 vectors, 64 KB, would not).
constexpr int kAvx2WideRows = 3;
constexpr int64_t kWideRowValues = kWideKBlock;  // WidePanels: int16 values from one activation row to the next

// acc[r][j] += the products of one k-step of 3 rows x 16 columns: row r's 4 values at a + r * row_bytes bytes, the
// 4 weight vectors (4 columns x 4 k each) at w. In assembly: from intrinsics, GCC loaded weight vectors into
// registers and kept 8 of the 12 accumulators on the stack (a load and a store each per k-step). The pointers are
// registers, with a memory clobber, and the product register is ymm15, clobbered: asm takes at most 30 operands
// (an in-out operand counts twice), which loads as memory operands or the product as an operand would exceed.
#define TQ_MADD_ADD(r, j) \
  "vpmaddwd 32*" #j "(%[w]), %[x" #r "], %%ymm15\n\tvpaddd %%ymm15, %[c" #r #j "], %[c" #r #j "]\n\t"
#define TQ_MADD_ADD_ROWS(j) TQ_MADD_ADD(0, j) TQ_MADD_ADD(1, j) TQ_MADD_ADD(2, j)
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void step_avx2_3x16(__m256i (&acc)[3][4], const int16_t* a,
                                                                       int64_t row_bytes, const int16_t* w) {
  __m256i x0, x1, x2;
  __asm__("vpbroadcastq (%[a]), %[x0]\n\t"
          "vpbroadcastq (%[a],%[s],1), %[x1]\n\t"
          "vpbroadcastq (%[a],%[s],2), %[x2]\n\t"
          TQ_MADD_ADD_ROWS(0) TQ_MADD_ADD_ROWS(1) TQ_MADD_ADD_ROWS(2) TQ_MADD_ADD_ROWS(3)
          : [c00] "+x"(acc[0][0]), [c01] "+x"(acc[0][1]), [c02] "+x"(acc[0][2]), [c03] "+x"(acc[0][3]),
            [c10] "+x"(acc[1][0]), [c11] "+x"(acc[1][1]), [c12] "+x"(acc[1][2]), [c13] "+x"(acc[1][3]),
            [c20] "+x"(acc[2][0]), [c21] "+x"(acc[2][1]), [c22] "+x"(acc[2][2]), [c23] "+x"(acc[2][3]),
            [x0] "=&x"(x0), [x1] "=&x"(x1), [x2] "=&x"(x2)
          : [a] "r"(a), [s] "r"(row_bytes), [w] "r"(w)
          : "xmm15", "memory");
}
#undef TQ_MADD_ADD_ROWS
#undef TQ_MADD_ADD

// tile[r][0..16) (+)= the sums over `steps` k-steps of the MR rows from a on (a_row values apart) and the weight
// vector at w.
template <int MR>
TQ_TARGET_AVX2 void microkernel_avx2_wide(const int16_t* a, int64_t a_row, const int16_t* w, int64_t steps,
                                          int32_t* tile, bool first) {
  __m256i acc[MR][4];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int64_t s = 0; s < steps; ++s) {
    if constexpr (MR == 3) {
      step_avx2_3x16(acc, a + 4 * s, a_row * static_cast<int64_t>(sizeof(int16_t)), w + 64 * s);
    } else {
      __m256i av[MR];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) av[r] = _mm256_set1_epi64x(load_i64(a + r * a_row + 4 * s));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i wj = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * s + 16 * j));
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(wj, av[r]));
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
      store_column_sums_avx2(acc[r][2 * h], acc[r][2 * h + 1], tile + r * kPackAlign + 8 * h, first);
}

TQ_TARGET_AVX2 void microkernel_avx2_wide_rows(const int16_t* a, int64_t a_row, const int16_t* w, int64_t steps,
                                               int32_t* tile, int rows, bool first) {
  if (rows == 3) microkernel_avx2_wide<3>(a, a_row, w, steps, tile, first);
  else if (rows == 2) microkernel_avx2_wide<2>(a, a_row, w, steps, tile, first);
  else microkernel_avx2_wide<1>(a, a_row, w, steps, tile, first);
}

// The weight operand of microkernel_avx2_wide: `steps` k-steps of the packed panel at b, vector v's 64 values of
// step s at dst + (v * steps + s) * 64.
TQ_TARGET_AVX2 void widen_weights(const int8_t* b, int64_t steps, int16_t* dst) {
  for (int64_t s = 0; s < steps; ++s)
    for (int v = 0; v < 4; ++v)
      for (int q = 0; q < 4; ++q) {
        const int8_t* src = b + s * kStepBytes + 64 * v + 16 * q;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (v * steps + s) * 64 + 16 * q),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
      }
}

// AVX2 on weights of at most 64 in magnitude (7-bit or narrower weights), or on activations below 128 (unsigned
// 7-bit ones, as torch.ao's x86 engine quantizes them, reduce_range): vpmaddubsw multiplies the u8 activations and s8
// weights as they are packed, 32 products summed in pairs to int16, exact there (|a0 w0 + a1 w1| <= 2 * 255 * 64 =
// 32640, or 2 * 127 * 128 = 32512, < 2^15; 8-bit weights and activations could saturate), then vpmaddwd by ones sums
// each column's pairs to int32: the
// VNNI step (4 k of 8 columns per 32 bytes, the packed order) in two instructions, twice vpmaddwd's products per
// multiply and nothing widened. 2 rows x 32 columns: 8 accumulators, 4 weight vectors, a broadcast, the ones and a
// product in the 16 registers. On Zen 3, int8_mm 1024^3 ran at 67 G multiply-adds/s against 57 on widened operands.
constexpr int kAvx2ByteRows = 2;
constexpr int8_t kByteKernelMaxWeight = 64;

// Whether every weight byte of `bytes` bytes at b (whole 256-byte k-steps) lies in [-64, 64], looked at one k-step
// after the other: 8-bit weights usually fail in the first ones.
TQ_TARGET_AVX2 bool weights_fit_byte_kernel(const int8_t* b, int64_t bytes) {
  const __m256i most = _mm256_set1_epi8(kByteKernelMaxWeight), least = _mm256_set1_epi8(-kByteKernelMaxWeight);
  for (int64_t i = 0; i < bytes; i += kStepBytes) {
    __m256i outside = _mm256_setzero_si256();
    for (int64_t j = i; j < i + kStepBytes; j += 32) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j));
      outside = _mm256_or_si256(outside, _mm256_or_si256(_mm256_cmpgt_epi8(w, most), _mm256_cmpgt_epi8(least, w)));
    }
    if (!_mm256_testz_si256(outside, outside)) return false;
  }
  return true;
}

// tile[r][0..8 NV) (+)= the sums over `steps` k-steps of MR rows from a on (a_row bytes apart) and 8 NV columns of the
// packed panel from b on (NV 32-byte vectors of each 256-byte k-step).
template <int MR, int NV>
TQ_TARGET_AVX2 void microkernel_avx2_bytes(const uint8_t* a, int64_t a_row, const int8_t* b, int64_t steps,
                                           int32_t* tile, bool first) {
  __m256i acc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t s = 0; s < steps; ++s) {
    __m256i w[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + s * kStepBytes + 32 * j));
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i av = _mm256_set1_epi32(load_i32(a + r * a_row + 4 * s));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j)
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w[j]), ones));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      __m256i* d = reinterpret_cast<__m256i*>(tile + r * kPackAlign + 8 * j);
      _mm256_storeu_si256(d, first ? acc[r][j] : _mm256_add_epi32(_mm256_loadu_si256(d), acc[r][j]));
    }
}

// tile[r][c] (+)= the products of `rows` activation rows from a on (a_row bytes apart) and `steps` k-steps of the
// packed panel at b (its weights in [-64, 64]), r < rows, c < 16 * vectors: 32 columns at a time over all the row
// pairs, so that those columns' weights stay in L1.
TQ_TARGET_AVX2 void multiply_avx2_bytes(const uint8_t* a, int64_t a_row, const int8_t* b, int64_t steps, int64_t rows,
                                        int vectors, int32_t* tile, bool first) {
  for (int h = 0; h < vectors; h += 2) {
    const int8_t* bh = b + 64 * h;  // (16 columns of a k-step are 64 bytes)
    int32_t* th = tile + 16 * h;
    int64_t r = 0;
    if (vectors - h >= 2) {
      for (; r + kAvx2ByteRows <= rows; r += kAvx2ByteRows)
        microkernel_avx2_bytes<kAvx2ByteRows, 4>(a + r * a_row, a_row, bh, steps, th + r * kPackAlign, first);
      if (r < rows) microkernel_avx2_bytes<1, 4>(a + r * a_row, a_row, bh, steps, th + r * kPackAlign, first);
    } else {
      for (; r + kAvx2ByteRows <= rows; r += kAvx2ByteRows)
        microkernel_avx2_bytes<kAvx2ByteRows, 2>(a + r * a_row, a_row, bh, steps, th + r * kPackAlign, first);
      if (r < rows) microkernel_avx2_bytes<1, 2>(a + r * a_row, a_row, bh, steps, th + r * kPackAlign, first);
    }
  }
}

// AMX (the avx512_amx path): tdpbusd multiplies a tile of 16 rows x 64 u8 activation bytes by a tile of 16 k-steps
// x 16 columns x 4 s8 weights into 16 x 16 int32 sums, exactly (no saturation), 16384 multiply-adds an instruction.
// A 16-column slice of a packed panel is such a weight tile as it lies (k-steps kStepBytes apart), and activation
// rows are read in place. Blocks of 32 rows x 32 columns: 4 accumulator tiles, 2 activation and 2 weight tiles
// (16 rows x 64 columns when there is a single tile of rows).
constexpr int64_t kAmxChunk = 64;  // bytes of k per tdpbusd
constexpr int64_t kAmxRows = kAmxTileRows;  // (as int64_t for the row arithmetic)
// the fewest rows of a work item that the AMX kernel takes: 12 x 384 x 1536 took 35 us on tiles against 46 us on
// the VNNI kernel (weights from memory), a single row is faster on VNNI
constexpr int64_t kAmxMinRows = 8;

// The k range of multiply_amx: `count` runs of `chunks` whole k-chunks (kAmxChunk bytes) each, whose activation bytes
// start `stride` bytes apart (a conv window's kernel rows read in place; one run for GEMM rows); the weight's k-chunks
// follow each other.
struct AmxRuns {
  int64_t count, stride, chunks;
};

// The tile configuration a thread has loaded (rows of the two activation tiles; -1: none). A configuration costs
// about as much as 16 tdpbusd: a thread keeps it across its work items and releases the tiles when it is done.
struct AmxTiles {
  int lo = -1, hi = -1;
  AmxTiles() = default;
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
  ~AmxTiles() { if (lo >= 0) release(); }
  static TQ_TARGET_AMX void release() { _tile_release(); }
};

// tile[r][0..32 halves) = the sums over the k range `k` of `rows` activation rows from a on (a_row bytes apart) and
// the packed panel at b (the caller adds any k past it), on the calling thread's tiles. between(step, steps) runs
// after each of the `steps` k-chunk steps, while the tile unit works on them (PendingEpilogue's slices).
template <class Between>
TQ_TARGET_AMX void multiply_amx(const uint8_t* a, int64_t a_row, const int8_t* b, const AmxRuns& k, int64_t rows,
                                int halves, int32_t* tile, AmxTiles& tiles, const Between& between) {
  constexpr int64_t tile_row = kPackAlign * sizeof(int32_t);  // bytes between the int32 tile's rows
  constexpr int64_t chunk_bytes = kAmxChunk / 4 * kStepBytes;  // the weight bytes of one k-chunk
  const int64_t k_steps = k.count * k.chunks;
  if (rows <= kAmxRows && halves == 2) {
    // One tile of rows (a few tokens): the panel's four 16-column groups at once, one activation load a k-chunk and
    // four independent sums in flight (two sums of one half at a time chained each product on the last: 12 x 1536
    // x 384 took 27.6 us against 22.0 with the weights streaming from L3)
    const int lo = static_cast<int>(rows);
    if (lo != tiles.lo || lo != tiles.hi) {  // tiles 0-3 and the activation tile all `rows` rows
      configure_amx(lo, lo);
      tiles.lo = lo;
      tiles.hi = lo;
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int8_t* wc = b;
    for (int64_t i = 0; i < k.count; ++i) {
      for (int64_t j = 0; j < k.chunks; ++j, wc += chunk_bytes) {
        _tile_loadd(4, a + i * k.stride + j * kAmxChunk, a_row);
        _tile_loadd(6, wc, kStepBytes);
        _tile_loadd(7, wc + 64, kStepBytes);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_loadd(6, wc + 128, kStepBytes);
        _tile_loadd(7, wc + 192, kStepBytes);
        _tile_dpbusd(2, 4, 6);
        _tile_dpbusd(3, 4, 7);
        between(i * k.chunks + j, k_steps);
      }
    }
    _tile_stored(0, tile, tile_row);
    _tile_stored(1, tile + 16, tile_row);
    _tile_stored(2, tile + 32, tile_row);
    _tile_stored(3, tile + 48, tile_row);
    __asm__ volatile("" ::: "memory");  // (as below)
    return;
  }
  const int64_t steps = ceil_div(rows, 2 * kAmxRows) * halves * k_steps;
  int64_t step = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += 2 * kAmxRows) {
    const int lo = static_cast<int>(std::min(kAmxRows, rows - r0));
    const int hi = static_cast<int>(std::clamp<int64_t>(rows - r0 - kAmxRows, 0, kAmxRows));
    if (lo != tiles.lo || hi != tiles.hi) {  // (a new configuration zeroes every tile)
      configure_amx(lo, hi);
      tiles.lo = lo;
      tiles.hi = hi;
    }
    const uint8_t* a_lo = a + r0 * a_row;
    const uint8_t* a_hi = a_lo + kAmxRows * a_row;
    for (int h = 0; h < halves; ++h) {
      const int8_t* w = b + h * 32 * 4;
      int32_t* out = tile + r0 * kPackAlign + h * 32;
      _tile_zero(0);
      _tile_zero(1);
      if (hi > 0) {
        _tile_zero(2);
        _tile_zero(3);
      }
      const int8_t* wc = w;
      for (int64_t i = 0; i < k.count; ++i) {
        for (int64_t j = 0; j < k.chunks; ++j, wc += chunk_bytes) {
          const int64_t offset = i * k.stride + j * kAmxChunk;
          // (the loads of a step ahead of its products: loading each tile just before its first product measured
          // a quarter slower)
          _tile_loadd(4, a_lo + offset, a_row);
          _tile_loadd(6, wc, kStepBytes);
          _tile_loadd(7, wc + 64, kStepBytes);
          _tile_dpbusd(0, 4, 6);
          _tile_dpbusd(1, 4, 7);
          if (hi > 0) {
            _tile_loadd(5, a_hi + offset, a_row);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
          }
          between(step++, steps);
        }
      }
      _tile_stored(0, out, tile_row);
      _tile_stored(1, out + 16, tile_row);
      if (hi > 0) {
        _tile_stored(2, out + kAmxRows * kPackAlign, tile_row);
        _tile_stored(3, out + kAmxRows * kPackAlign + 16, tile_row);
      }
    }
  }
  __asm__ volatile("" ::: "memory");  // the tile stores' asm names no memory: the epilogue reads what they wrote
}

// Portable path. Sums in uint32: wrap-around (the hardware's behaviour) without signed-overflow UB.
void microkernel_scalar(const uint8_t* a, int64_t a_row, const int8_t* b, int64_t steps,
                        int32_t* tile, int rows, int vectors, bool first) {
  for (int r = 0; r < rows; ++r) {
    const uint8_t* ar = a + r * a_row;
    for (int64_t col = 0; col < 16 * vectors; ++col) {
      uint32_t sum = first ? 0u : static_cast<uint32_t>(tile[r * kPackAlign + col]);
      for (int64_t s = 0; s < steps; ++s)
        for (int j = 0; j < 4; ++j)
          sum += static_cast<uint32_t>(static_cast<int32_t>(ar[4 * s + j]) * b[s * kStepBytes + col * 4 + j]);
      tile[r * kPackAlign + col] = static_cast<int32_t>(sum);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// GELU of the epilogue, y * P(y), in the forms of torch.nn.functional.gelu: P the normal CDF (the erf form) or
// 1 / (1 + e^(-2u)), u = sqrt(2 / pi) (y + 0.044715 y^3) (approximate="tanh"). P is a polynomial of degree
// kGeluDegree in v = y - center on each of kGeluIntervals intervals of [-kGeluRange, kGeluRange]
// (scripts/gelu_tables.py fits them: |error| < 6e-8, half a float32 ulp of 1), 0 below and 1 above (where P is
// within 2e-8 of those). The epilogue's GELU is bound by the vector units' instruction throughput: this takes ~25
// instructions a vector (an exp-based erf, A&S 7.1.26 as torch's kernel, ~35 measured a tenth slower). The
// scalar and AVX-512 versions run the same correctly rounded operations in the same order, so every ISA path gives
// the same bits; gelu(+inf) = +inf, gelu(-inf) = NaN (-inf * 0), as torch's y * 0.5 * (1 + erf(y / sqrt(2))).
// ---------------------------------------------------------------------------------------------------------------

#include "cpu/gelu_tables.inc"

constexpr float kGeluIndexScale = kGeluIntervals / (2 * kGeluRange);

// The intervals' centers, (2i - 31) * kGeluHalfWidth: exact float32 values (an integer times 11 / 64).
constexpr auto kGeluCenters = [] {
  struct Centers {
    alignas(64) float values[kGeluIntervals];
    constexpr operator const float*() const { return values; }
  } c{};
  for (int i = 0; i < kGeluIntervals; ++i)
    c.values[i] = static_cast<float>(2 * i - (kGeluIntervals - 1)) * kGeluHalfWidth;
  return c;
}();

using GeluCoeffs = float[kGeluDegree + 1][kGeluIntervals];

constexpr const GeluCoeffs& gelu_coeffs(Gelu kind) { return kind == Gelu::Tanh ? kGeluTanhCoeffs : kGeluErfCoeffs; }

float gelu_scalar(float y, Gelu kind) {
  if (std::isnan(y) || y > kGeluRange) return y;  // y * 1 (NaN: y * P(y))
  if (y < -kGeluRange) return y * 0.0f;
  const GeluCoeffs& c = gelu_coeffs(kind);
  const int i = std::min(static_cast<int>((y + kGeluRange) * kGeluIndexScale), kGeluIntervals - 1);
  const float v = y - kGeluCenters.values[i];
  float p = c[kGeluDegree][i];
  for (int d = kGeluDegree - 1; d >= 0; --d) p = std::fma(p, v, c[d][i]);
  return y * p;
}

// Entry i (a vector of interval indices, 0..31) of a 32-entry table.
TQ_TARGET_VNNI inline __attribute__((always_inline)) __m512 gelu_table(const float* row, __m512i i) {
  return _mm512_permutex2var_ps(_mm512_load_ps(row), i, _mm512_load_ps(row + 16));
}

template <Gelu KIND>
TQ_TARGET_VNNI inline __attribute__((always_inline)) __m512 gelu_avx512(__m512 y) {
  static_assert(kGeluIntervals == 32, "one two-register permute per coefficient");
  const GeluCoeffs& c = gelu_coeffs(KIND);
  const __m512 range = _mm512_set1_ps(kGeluRange);
  // the interval of y, clamped to the table (y outside the range, or NaN: any interval, and P(y) set below)
  __m512i i = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_add_ps(y, range), _mm512_set1_ps(kGeluIndexScale)));
  i = _mm512_min_epi32(_mm512_max_epi32(i, _mm512_setzero_si512()), _mm512_set1_epi32(kGeluIntervals - 1));
  const __m512 v = _mm512_sub_ps(y, gelu_table(kGeluCenters, i));
  __m512 p = gelu_table(c[kGeluDegree], i);
#pragma GCC unroll 8
  for (int d = kGeluDegree - 1; d >= 0; --d) p = _mm512_fmadd_ps(p, v, gelu_table(c[d], i));
  p = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, _mm512_set1_ps(-kGeluRange), _CMP_LT_OQ), p, _mm512_setzero_ps());
  p = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, range, _CMP_GT_OQ), p, _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(y, p);
}

// The same on 8 lanes (AVX2), whose permutes reach 8 table entries: each lane loads its interval's row of the
// table below (center, then the coefficients in the order the polynomial uses them: 32 bytes) and an 8 x 8
// transpose turns the rows into one vector per entry (8 loads and 24 shuffles a vector; four permutes and three
// blends for each of the 8 entries took ~1.7 times as long, vgatherdps ~4 ns an element on Zen 3).
template <Gelu KIND>
constexpr auto kGeluRows = [] {
  static_assert(kGeluDegree + 2 == 8, "a row is the center and the coefficients: one 8-lane vector");
  struct Rows {
    alignas(64) float values[kGeluIntervals][8];
  } rows{};
  for (int i = 0; i < kGeluIntervals; ++i) {
    rows.values[i][0] = kGeluCenters.values[i];
    for (int d = kGeluDegree; d >= 0; --d) rows.values[i][1 + kGeluDegree - d] = gelu_coeffs(KIND)[d][i];
  }
  return rows;
}();

// Rows r[0..7] (lane j's row in r[j]) to columns: r[k] becomes entry k of every lane's row.
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void transpose_8x8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    u[j] = _mm256_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
    r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
  }
}

template <Gelu KIND>
TQ_TARGET_AVX2 inline __attribute__((always_inline)) __m256 gelu_avx2(__m256 y) {
  const __m256 range = _mm256_set1_ps(kGeluRange);
  __m256i i = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_add_ps(y, range), _mm256_set1_ps(kGeluIndexScale)));
  i = _mm256_min_epi32(_mm256_max_epi32(i, _mm256_setzero_si256()), _mm256_set1_epi32(kGeluIntervals - 1));
  alignas(32) int32_t row_of[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(row_of), i);
  __m256 r[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm256_load_ps(kGeluRows<KIND>.values[row_of[j]]);
  transpose_8x8(r);
  const __m256 v = _mm256_sub_ps(y, r[0]);
  __m256 p = r[1];
#pragma GCC unroll 8
  for (int k = 2; k < 8; ++k) p = _mm256_fmadd_ps(p, v, r[k]);
  p = _mm256_blendv_ps(p, _mm256_setzero_ps(), _mm256_cmp_ps(y, _mm256_set1_ps(-kGeluRange), _CMP_LT_OQ));
  p = _mm256_blendv_ps(p, _mm256_set1_ps(1.0f), _mm256_cmp_ps(y, range, _CMP_GT_OQ));
  return _mm256_mul_ps(y, p);
}

// ---------------------------------------------------------------------------------------------------------------
// Epilogue: one row of a tile (ncols <= 64 valid columns) to the output. Pointers are already at the panel's first
// column; `row` indexes the output row.
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
inline T* out_at(const Epilogue& ep, int64_t row, int64_t col0) {
  return static_cast<T*>(ep.out) + row * ep.out_row_stride + col0;
}

void epilogue_row_scalar(const Epilogue& ep, const int32_t* acc, int64_t row, int64_t col0, int64_t ncols) {
  const float xs = ep.row_scale == nullptr ? 1.0f : ep.row_scale[ep.per_row_scale ? row : 0];
  const QuantFormat fmt{ep.qmin, ep.qmax, false};
  for (int64_t c = 0; c < ncols; ++c) {
    const int64_t n = col0 + c;
    const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(acc[c]) - static_cast<uint32_t>(ep.col_offset[n]));
    if (ep.kind == OutKind::Int32) {
      out_at<int32_t>(ep, row, col0)[c] = v;
      continue;
    }
    float y = static_cast<float>(v) * xs * ep.col_scale[n];
    if (ep.bias != nullptr) y += ep.bias[n];
    if (ep.gelu != Gelu::None) y = gelu_scalar(y, ep.gelu);
    y = clamp_activation(y, ep.clamp);
    if (ep.residual.data != nullptr) {
      const uint8_t r = ep.residual.data[row * ep.residual.row_stride + n] ^ ep.residual.flip;
      y = clamp_activation(y + (static_cast<float>(r) - ep.residual.zero_point) * ep.residual.scale,
                           ep.residual.clamp);
    }
    switch (ep.kind) {
      case OutKind::Float32: out_at<float>(ep, row, col0)[c] = y; break;
      case OutKind::Float16: out_at<c10::Half>(ep, row, col0)[c] = c10::Half(y); break;
      case OutKind::BFloat16: out_at<c10::BFloat16>(ep, row, col0)[c] = c10::BFloat16(y); break;
      case OutKind::Int8:
        out_at<int8_t>(ep, row, col0)[c] =
            static_cast<int8_t>(quantize_value(y, ep.inv_out_scale, ep.out_zero_point, fmt, Rounding::Nearest));
        break;
      case OutKind::UInt8:
        out_at<uint8_t>(ep, row, col0)[c] =
            static_cast<uint8_t>(quantize_value(y, ep.inv_out_scale, ep.out_zero_point, fmt, Rounding::Nearest));
        break;
      case OutKind::Int32: break;
    }
  }
}

// (the PanelEpilogue is the AVX-512 epilogue's)
void epilogue_tile_scalar(const Epilogue& ep, const PanelEpilogue&, const int32_t* tile, int64_t row0, int64_t rows,
                          int64_t col0, int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) epilogue_row_scalar(ep, tile + r * kPackAlign, row0 + r, col0, ncols);
}

// Stores the valid lanes (mask) of one output vector at p: a streaming store when asked and the vector is whole
// (p is then aligned to its size, see epilogue_tile_avx512), else a normal one. Conversions to narrower types
// happen in registers first: the memory forms of vpmov* and masked narrow stores were the epilogue's slowest
// instructions on Zen 5.
TQ_TARGET_VNNI inline void store_vector(void* p, __m512i v, __mmask16 mask, bool stream) {
  if (mask != 0xFFFF) _mm512_mask_storeu_epi32(p, mask, v);
  else if (stream) _mm512_stream_si512(static_cast<__m512i*>(p), v);
  else _mm512_storeu_si512(p, v);
}
TQ_TARGET_VNNI inline void store_vector(void* p, __m256i v, __mmask16 mask, bool stream) {
  if (mask != 0xFFFF) _mm256_mask_storeu_epi16(p, mask, v);
  else if (stream) _mm256_stream_si256(static_cast<__m256i*>(p), v);
  else _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}
TQ_TARGET_VNNI inline void store_vector(void* p, __m128i v, __mmask16 mask, bool stream) {
  if (mask != 0xFFFF) _mm_mask_storeu_epi8(p, mask, v);
  else if (stream) _mm_stream_si128(static_cast<__m128i*>(p), v);
  else _mm_storeu_si128(static_cast<__m128i*>(p), v);
}

void panel_epilogue(const Epilogue& ep, int64_t col0, int64_t ncols, int64_t k, PanelEpilogue& c) {
  c.ncols = static_cast<int>(ncols);
  c.vectors = static_cast<int>((ncols + 15) / 16);
  for (int j = 0; j < kPackAlign / 16; ++j) {
    const int64_t valid = std::clamp<int64_t>(ncols - 16 * j, 0, 16);
    c.mask[j] = static_cast<uint16_t>((1u << valid) - 1);
  }
  // copied whole (a loop per element cost a tenth of a small-k GEMM's epilogue)
  const auto copy = [&](auto* dst, const auto* src, auto fill) {
    const int64_t valid = src == nullptr ? 0 : ncols;
    if (valid > 0) std::memcpy(dst, src + col0, valid * sizeof(*dst));
    std::fill(dst + valid, dst + kPackAlign, fill);
  };
  copy(c.offset, ep.col_offset, 0);
  copy(c.scale, ep.col_scale, 0.0f);
  copy(c.bias, ep.bias, -0.0f);
  // y = float(v) * xs * scale + bias is NaN only from a NaN or infinite operand (or inf * 0 of an overflowed
  // product and a zero scale); y * inv_out_scale only from NaN y
  // (tested on the bits, without branches: the loop vectorizes; it was most of a small GEMM's set-up)
  uint32_t special = 0;
  for (int64_t i = 0; i < ncols; ++i) {
    uint32_t scale_bits, bias_bits;
    std::memcpy(&scale_bits, &c.scale[i], 4);
    std::memcpy(&bias_bits, &c.bias[i], 4);
    // a bias or scale inf or NaN (all exponent bits), or a scale of zero exponent: zero, or subnormal (zero where
    // denormals flush)
    special |= static_cast<uint32_t>((bias_bits & 0x7f800000u) == 0x7f800000u) |
               static_cast<uint32_t>((scale_bits & 0x7f800000u) == 0x7f800000u) |
               static_cast<uint32_t>((scale_bits & 0x7f800000u) == 0);
  }
  c.may_be_nan = special != 0 || (ep.row_scale != nullptr && (ep.per_row_scale || !std::isfinite(ep.row_scale[0])));
  c.clamp_lo = ep.clamp.lo;
  c.clamp_hi = ep.clamp.hi;
  c.gelu = ep.gelu;
  c.inv_out_scale = ep.inv_out_scale;
  c.zero_point = static_cast<int16_t>(ep.out_zero_point);
  c.residual_scale = ep.residual.scale;
  c.residual_zero_point = ep.residual.zero_point;
  c.residual_lo = ep.residual.clamp.lo;
  c.residual_hi = ep.residual.clamp.hi;
  c.residual_flip = ep.residual.flip;
  const float inv = ep.inv_out_scale;
  TQ_CHECK(inv > 0.0f && inv < INFINITY, "int8 GEMM: 1 / out_scale must be finite and positive, got ", inv);
  // the clamp just before the requantization: the residual's when there is one (the activation clamp then comes
  // before the add, in add_residual)
  const ActivationClamp last = ep.residual.data != nullptr ? ep.residual.clamp : ep.clamp;
  const float lo = last.lo * inv, hi = last.hi * inv;
  const auto fold = [&](float x) {
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    return fminf(fmaxf(x, ep.qmin - ep.out_zero_point), ep.qmax - ep.out_zero_point);
  };
  c.q_lo = fold(-INFINITY);
  c.q_hi = fold(INFINITY);
  // the packs saturate to the output type's own range, which [qmin, qmax] may lie inside (out_bits < 8)
  const bool signed_out = ep.kind == OutKind::Int8;
  const float type_min = signed_out ? -128.0f : 0.0f, type_max = signed_out ? 127.0f : 255.0f;
  c.clamp_q_lo = c.q_lo != type_min - ep.out_zero_point;
  c.clamp_q_hi = true;
  if (ep.kind != OutKind::Int8 && ep.kind != OutKind::UInt8) return;
  // Bounds in double (each float operation errs by at most 2^-24 of its result while nothing overflows, so bounds
  // below 2^126 keep the float values finite): |v| <= k * 255 * 128, |float(v) * xs| <= that * |xs|, y = that *
  // scale + bias, a residual term of 255 steps at most. Per-row scales (may_be_nan already) are not bounded.
  const double xs = ep.row_scale == nullptr ? 1.0 : std::fabs(static_cast<double>(ep.row_scale[0]));
  const double largest_product = static_cast<double>(k) * 255 * 128 * xs;
  double largest_y = 0;
  for (int64_t i = 0; i < ncols; ++i)
    largest_y = std::max(largest_y, largest_product * std::fabs(c.scale[i]) + std::fabs(c.bias[i]));
  const bool y_finite = !ep.per_row_scale && largest_product < 0x1p126 && largest_y < 0x1p126;
  const bool residual = ep.residual.data != nullptr;
  const double largest_residual = 255 * std::fabs(static_cast<double>(ep.residual.scale));
  const bool residual_finite = !residual || largest_residual < 0x1p126;
  // an overflowed y plus an overflowed residual term of the other sign is NaN, with every scale and bias finite
  if (!y_finite && !residual_finite) c.may_be_nan = true;
  // |x| = |y * inv| (y clamped: finite bounds, plus the residual) below 2^30, so that its conversion cannot give
  // INT_MIN for a large value
  for (const float bound : {ep.clamp.lo, ep.clamp.hi})
    if (std::isfinite(bound)) largest_y = std::max(largest_y, std::fabs(static_cast<double>(bound)));
  if (residual) largest_y += largest_residual;
  c.clamp_q_hi = c.q_hi != type_max - ep.out_zero_point || c.may_be_nan || !y_finite || !residual_finite ||
                 !(largest_y * inv < 0x1p30);
}


// A PanelEpilogue's scalars broadcast, taken into registers (locals) before a loop of stores: the output's bytes
// may alias any memory, so fields read through a reference would be loaded again after every store.
struct EpilogueVectors {
  __m512 inv_out_scale, q_lo, q_hi, clamp_lo, clamp_hi;
  __m512i zero_point;  // int16 lanes
  __m512 residual_scale, residual_zero_point, residual_lo, residual_hi;
  __m128i residual_flip;
};

TQ_TARGET_VNNI inline __attribute__((always_inline)) EpilogueVectors epilogue_vectors(const PanelEpilogue& c) {
  return {_mm512_set1_ps(c.inv_out_scale),
          _mm512_set1_ps(c.q_lo),
          _mm512_set1_ps(c.q_hi),
          _mm512_set1_ps(c.clamp_lo),
          _mm512_set1_ps(c.clamp_hi),
          _mm512_set1_epi16(c.zero_point),
          _mm512_set1_ps(c.residual_scale),
          _mm512_set1_ps(c.residual_zero_point),
          _mm512_set1_ps(c.residual_lo),
          _mm512_set1_ps(c.residual_hi),
          _mm_set1_epi8(static_cast<char>(c.residual_flip))};
}

// Output vector j of a row (16 columns) from v = acc - offset: the float value y before the activation clamp.
TQ_TARGET_VNNI inline __attribute__((always_inline)) __m512 epilogue_float(const PanelEpilogue& c, __m512i v,
                                                                           __m512 xs, int j) {
  const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), xs), _mm512_load_ps(c.scale + 16 * j));
  return _mm512_add_ps(y, _mm512_load_ps(c.bias + 16 * j));
}

// The activation clamp of y (NaN kept, as clamp_activation).
TQ_TARGET_VNNI inline __attribute__((always_inline)) __m512 activation_clamp(const EpilogueVectors& e, __m512 y) {
  return _mm512_min_ps(e.clamp_hi, _mm512_max_ps(e.clamp_lo, y));
}

// y (after the activation clamp) + (float(r ^ flip) - zero point) * scale for the 16 residual bytes at r (the valid
// lanes of mask), as epilogue_row_scalar computes it; the residual's clamp follows (folded into the requantization's
// for int8/uint8 outputs, see PanelEpilogue).
TQ_TARGET_VNNI inline __attribute__((always_inline)) __m512 add_residual(const EpilogueVectors& e, __m512 y,
                                                                         const uint8_t* r, __mmask16 mask) {
  const __m128i bytes = _mm_xor_si128(_mm_maskz_loadu_epi8(mask, r), e.residual_flip);
  const __m512 rf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
  return _mm512_add_ps(y, _mm512_mul_ps(_mm512_sub_ps(rf, e.residual_zero_point), e.residual_scale));
}

TQ_TARGET_VNNI inline __m512i less_offset(const PanelEpilogue& c, __m512i acc, int j) {
  return _mm512_sub_epi32(acc, _mm512_load_si512(c.offset + 16 * j));
}

// The output values of a requantized vector less the zero point, int32 in [qmin, qmax] - zero point (see
// PanelEpilogue; NaN y gives 0, looked for only where y may be NaN: a tenth of the epilogue at k = 64). A bound
// left out (BOUNDS bit 0: q_lo applied, bit 1: q_hi) is the packs' to apply (PanelEpilogue::clamp_q_lo / hi).
template <bool MAY_BE_NAN, int BOUNDS = 3>
TQ_TARGET_VNNI inline __attribute__((always_inline)) __m512i requantize(const EpilogueVectors& e, __m512 y) {
  const __m512 x = _mm512_mul_ps(y, e.inv_out_scale);
  __m512 q = x;
  if constexpr ((BOUNDS & 1) != 0) q = _mm512_max_ps(q, e.q_lo);
  if constexpr ((BOUNDS & 2) != 0) q = _mm512_min_ps(q, e.q_hi);
  if constexpr (MAY_BE_NAN)
    return _mm512_maskz_cvt_roundps_epi32(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), q,
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// One output row of a panel from v[j] = acc - offset, j < c.vectors. FULL: all 64 columns valid, where an
// int8/uint8 row is packed into one 64-byte store (saturating packs are exact on values already in range; the
// packs interleave 128-bit lanes, which one dword permute undoes; the zero point is added to int16 lanes). Matches
// epilogue_row_scalar: same operation order (the activation clamp included), round-to-nearest-even conversions
// (vcvtps2ph, a bit-exact bfloat16 rounding), NaN -> zero point when requantizing. Streaming stores when asked and
// the row start is aligned to the store. BOUNDS: the requantization's (see requantize).
template <OutKind KIND, typename T, bool FULL, bool MAY_BE_NAN, Gelu GELU = Gelu::None, bool CLAMP = true,
          int BOUNDS = 3>
TQ_TARGET_VNNI inline __attribute__((always_inline)) void epilogue_row_avx512(const PanelEpilogue& c,
                                                                              const EpilogueVectors& e,
                                                                              __m512i v0, __m512i v1, __m512i v2,
                                                                              __m512i v3, __m512 xs, T* out,
                                                                              bool streaming,
                                                                              const uint8_t* residual) {
  const __m512i v[4] = {v0, v1, v2, v3};
  constexpr bool kBytes = KIND == OutKind::Int8 || KIND == OutKind::UInt8;
  if constexpr (kBytes) {
    __m512i q[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (!FULL && j >= c.vectors) {
        q[j] = _mm512_setzero_si512();
        continue;
      }
      __m512 y = epilogue_float(c, v[j], xs, j);
      if (residual != nullptr)
        y = add_residual(e, CLAMP ? activation_clamp(e, y) : y, residual + 16 * j,
                         FULL ? __mmask16(0xFFFF) : c.mask[j]);
      q[j] = requantize<MAY_BE_NAN, BOUNDS>(e, y);
    }
    const __m512i w01 = _mm512_adds_epi16(_mm512_packs_epi32(q[0], q[1]), e.zero_point);
    const __m512i w23 = _mm512_adds_epi16(_mm512_packs_epi32(q[2], q[3]), e.zero_point);
    const __m512i bytes = KIND == OutKind::UInt8 ? _mm512_packus_epi16(w01, w23) : _mm512_packs_epi16(w01, w23);
    // dword 4 * lane + j of `bytes` holds vector j's columns 4 * lane .. 4 * lane + 3
    const __m512i row =
        _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
    if (!FULL) _mm512_mask_storeu_epi8(out, _cvtu64_mask64(~0ull >> (kPackAlign - c.ncols)), row);
    else if (streaming && reinterpret_cast<uintptr_t>(out) % 64 == 0)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out), row);
    else _mm512_storeu_si512(out, row);
    return;
  }
  // streaming stores need vector-aligned addresses: the row start decides for all its vectors
  const bool stream = streaming && reinterpret_cast<uintptr_t>(out) % (16 * sizeof(T)) == 0;
  const int vectors = FULL ? 4 : c.vectors;
  for (int j = 0; j < vectors; ++j) {
    const __mmask16 mask = FULL ? __mmask16(0xFFFF) : c.mask[j];
    T* dst = out + 16 * j;
    if constexpr (KIND == OutKind::Int32) {
      store_vector(dst, v[j], mask, stream);
      continue;
    }
    __m512 y = epilogue_float(c, v[j], xs, j);
    if constexpr (GELU != Gelu::None) {
      y = gelu_avx512<GELU>(y);  // (int8_linear_dynamic's: no clamp, no residual)
    } else {
      if constexpr (CLAMP) y = activation_clamp(e, y);
      if (residual != nullptr)
        y = _mm512_min_ps(e.residual_hi, _mm512_max_ps(e.residual_lo, add_residual(e, y, residual + 16 * j, mask)));
    }
    if constexpr (KIND == OutKind::Float32) {
      store_vector(dst, _mm512_castps_si512(y), mask, stream);
    } else if constexpr (KIND == OutKind::Float16) {
      store_vector(dst, _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), mask, stream);
    } else if constexpr (KIND == OutKind::BFloat16) {
      const __m512i bits = _mm512_castps_si512(y);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i h = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      h = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), h, _mm512_set1_epi32(0x7FC0));
      store_vector(dst, _mm512_cvtepi32_epi16(h), mask, stream);
    }
  }
}

// Where the rows of a panel go, their row scales and residual rows, copied out of the Epilogue (see
// EpilogueVectors).
template <typename T>
struct OutRows {
  T* base;
  int64_t stride;
  const float* row_scale;  // per row, or null
  float scale;             // otherwise
  bool streaming;
  const uint8_t* residual;  // at the panel's first column, or null
  int64_t residual_stride;

  OutRows(const Epilogue& ep, int64_t col0)
      : base(static_cast<T*>(ep.out) + col0), stride(ep.out_row_stride),
        row_scale(ep.per_row_scale ? ep.row_scale : nullptr),
        scale(ep.row_scale == nullptr || ep.per_row_scale ? 1.0f : ep.row_scale[0]), streaming(ep.streaming),
        residual(ep.residual.data == nullptr ? nullptr : ep.residual.data + col0),
        residual_stride(ep.residual.row_stride) {}
  T* row(int64_t r) const { return base + r * stride; }
  const uint8_t* residual_row(int64_t r) const {
    return residual == nullptr ? nullptr : residual + r * residual_stride;
  }
  TQ_TARGET_VNNI __m512 xs(int64_t r) const { return _mm512_set1_ps(row_scale == nullptr ? scale : row_scale[r]); }
};

// The epilogue of a whole tile (rows x ncols <= 64).
template <OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU>
struct TileAvx512 {
  TQ_TARGET_VNNI static void run(const Epilogue& ep, const PanelEpilogue& c, const int32_t* tile, int64_t row0,
                                 int64_t rows, int64_t col0, int64_t ncols);
};

// The rows of a tile whose 64 columns are all valid: the column offsets and the row scale kept in registers across
// the rows, a residual row read only where RESIDUAL, the activation clamp applied only where CLAMP (it bounds
// something: a clamp to +-inf keeps every value, NaN included). The general loop below spilled its four
// accumulator vectors and tested the residual pointer for each vector: a ResNet stem at batch 8 (6.4M uint8
// outputs) took 2.23 ms with it, 2.04 ms with this loop. BOUNDS: the requantization's, for int8/uint8 outputs.
template <OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU, bool RESIDUAL, bool CLAMP, int BOUNDS>
TQ_TARGET_VNNI inline __attribute__((always_inline)) void full_tile_rows(const PanelEpilogue& c,
                                                                        const EpilogueVectors& e,
                                                                        const OutRows<T>& out, const int32_t* tile,
                                                                        int64_t row0, int64_t rows) {
  const __m512i o0 = _mm512_load_si512(c.offset), o1 = _mm512_load_si512(c.offset + 16);
  const __m512i o2 = _mm512_load_si512(c.offset + 32), o3 = _mm512_load_si512(c.offset + 48);
  const bool per_row = out.row_scale != nullptr;
  const __m512 tile_xs = _mm512_set1_ps(out.scale);  // (the scale of every row without per-row scales)
  const bool streaming = out.streaming;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* t = tile + r * kPackAlign;
    const __m512 xs = per_row ? out.xs(row0 + r) : tile_xs;
    epilogue_row_avx512<KIND, T, true, MAY_BE_NAN, GELU, CLAMP, BOUNDS>(
        c, e, _mm512_sub_epi32(_mm512_load_si512(t), o0), _mm512_sub_epi32(_mm512_load_si512(t + 16), o1),
        _mm512_sub_epi32(_mm512_load_si512(t + 32), o2), _mm512_sub_epi32(_mm512_load_si512(t + 48), o3), xs,
        out.row(row0 + r), streaming, RESIDUAL ? out.residual_row(row0 + r) : nullptr);
  }
}

// full_tile_rows with the requantization's bounds of the panel (int8/uint8 outputs; the others have none).
template <OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU, bool RESIDUAL, bool CLAMP>
TQ_TARGET_VNNI inline __attribute__((always_inline)) void full_tile_rows_bounded(const PanelEpilogue& c,
                                                                                const EpilogueVectors& e,
                                                                                const OutRows<T>& out,
                                                                                const int32_t* tile, int64_t row0,
                                                                                int64_t rows) {
  if constexpr (KIND == OutKind::Int8 || KIND == OutKind::UInt8) {
    switch ((c.clamp_q_lo ? 1 : 0) | (c.clamp_q_hi ? 2 : 0)) {
      case 0: return full_tile_rows<KIND, T, MAY_BE_NAN, GELU, RESIDUAL, CLAMP, 0>(c, e, out, tile, row0, rows);
      case 1: return full_tile_rows<KIND, T, MAY_BE_NAN, GELU, RESIDUAL, CLAMP, 1>(c, e, out, tile, row0, rows);
      case 2: return full_tile_rows<KIND, T, MAY_BE_NAN, GELU, RESIDUAL, CLAMP, 2>(c, e, out, tile, row0, rows);
      default: break;
    }
  }
  full_tile_rows<KIND, T, MAY_BE_NAN, GELU, RESIDUAL, CLAMP, 3>(c, e, out, tile, row0, rows);
}

template <OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU>
TQ_TARGET_VNNI void TileAvx512<KIND, T, MAY_BE_NAN, GELU>::run(const Epilogue& ep, const PanelEpilogue& c,
                                                                const int32_t* tile, int64_t row0, int64_t rows,
                                                                int64_t col0, int64_t ncols) {
  const EpilogueVectors e = epilogue_vectors(c);
  const OutRows<T> out(ep, col0);
  if (ncols == kPackAlign) {
    const bool clamp = c.clamp_lo != -INFINITY || c.clamp_hi != INFINITY;
    if (out.residual != nullptr) {
      if (clamp) return full_tile_rows_bounded<KIND, T, MAY_BE_NAN, GELU, true, true>(c, e, out, tile, row0, rows);
      return full_tile_rows_bounded<KIND, T, MAY_BE_NAN, GELU, true, false>(c, e, out, tile, row0, rows);
    }
    if (clamp) return full_tile_rows_bounded<KIND, T, MAY_BE_NAN, GELU, false, true>(c, e, out, tile, row0, rows);
    return full_tile_rows_bounded<KIND, T, MAY_BE_NAN, GELU, false, false>(c, e, out, tile, row0, rows);
  }
  const int vectors = c.vectors;
  for (int64_t r = 0; r < rows; ++r) {
    __m512i v[kPackAlign / 16] = {};
    for (int j = 0; j < vectors; ++j) v[j] = less_offset(c, _mm512_load_si512(tile + r * kPackAlign + 16 * j), j);
    epilogue_row_avx512<KIND, T, false, MAY_BE_NAN, GELU>(c, e, v[0], v[1], v[2], v[3], out.xs(row0 + r),
                                                          out.row(row0 + r), out.streaming,
                                                          out.residual_row(row0 + r));
  }
}

// The tile epilogue of ep.kind: Tile<KIND, T, MAY_BE_NAN, GELU>::run, Tile an instruction set's (the NaN test only
// where a requantized value may be NaN, the panel's GELU for float kinds).
template <template <OutKind, typename, bool, Gelu> class Tile, OutKind KIND, typename T>
void epilogue_tile_float(const Epilogue& ep, const PanelEpilogue& c, const int32_t* tile, int64_t row0, int64_t rows,
                         int64_t col0, int64_t ncols) {
  switch (c.gelu) {
    case Gelu::None: return Tile<KIND, T, true, Gelu::None>::run(ep, c, tile, row0, rows, col0, ncols);
    case Gelu::Erf: return Tile<KIND, T, true, Gelu::Erf>::run(ep, c, tile, row0, rows, col0, ncols);
    case Gelu::Tanh: return Tile<KIND, T, true, Gelu::Tanh>::run(ep, c, tile, row0, rows, col0, ncols);
  }
}

template <template <OutKind, typename, bool, Gelu> class Tile, OutKind KIND, typename T>
void epilogue_tile_bytes(const Epilogue& ep, const PanelEpilogue& c, const int32_t* tile, int64_t row0, int64_t rows,
                         int64_t col0, int64_t ncols) {
  (c.may_be_nan ? Tile<KIND, T, true, Gelu::None>::run
                : Tile<KIND, T, false, Gelu::None>::run)(ep, c, tile, row0, rows, col0, ncols);
}

template <template <OutKind, typename, bool, Gelu> class Tile>
void epilogue_tile_kinds(const Epilogue& ep, const PanelEpilogue& c, const int32_t* tile, int64_t row0, int64_t rows,
                         int64_t col0, int64_t ncols) {
  switch (ep.kind) {
    case OutKind::Int32:
      return Tile<OutKind::Int32, int32_t, true, Gelu::None>::run(ep, c, tile, row0, rows, col0, ncols);
    case OutKind::Float32:
      return epilogue_tile_float<Tile, OutKind::Float32, float>(ep, c, tile, row0, rows, col0, ncols);
    case OutKind::Float16:
      return epilogue_tile_float<Tile, OutKind::Float16, c10::Half>(ep, c, tile, row0, rows, col0, ncols);
    case OutKind::BFloat16:
      return epilogue_tile_float<Tile, OutKind::BFloat16, c10::BFloat16>(ep, c, tile, row0, rows, col0, ncols);
    case OutKind::Int8: return epilogue_tile_bytes<Tile, OutKind::Int8, int8_t>(ep, c, tile, row0, rows, col0, ncols);
    case OutKind::UInt8:
      return epilogue_tile_bytes<Tile, OutKind::UInt8, uint8_t>(ep, c, tile, row0, rows, col0, ncols);
  }
}

void epilogue_tile_avx512(const Epilogue& ep, const PanelEpilogue& c, const int32_t* tile, int64_t row0, int64_t rows,
                          int64_t col0, int64_t ncols) {
  epilogue_tile_kinds<TileAvx512>(ep, c, tile, row0, rows, col0, ncols);
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 epilogue: the AVX-512 epilogue's operations in the same order on 8-column vectors, from the same
// PanelEpilogue (a scalar epilogue cost 4-10x the multiplies of a small-k conv: 30+ scalar operations an output).
// Rows of a partial panel are formed in a buffer and copied.
// ---------------------------------------------------------------------------------------------------------------

struct EpilogueVectors256 {
  __m256 inv_out_scale, q_lo, q_hi, clamp_lo, clamp_hi;
  __m256i zero_point;  // int16 lanes
  __m256 residual_scale, residual_zero_point, residual_lo, residual_hi;
  __m128i residual_flip;
};

TQ_TARGET_AVX2 inline __attribute__((always_inline)) EpilogueVectors256 epilogue_vectors_avx2(const PanelEpilogue& c) {
  return {_mm256_set1_ps(c.inv_out_scale),
          _mm256_set1_ps(c.q_lo),
          _mm256_set1_ps(c.q_hi),
          _mm256_set1_ps(c.clamp_lo),
          _mm256_set1_ps(c.clamp_hi),
          _mm256_set1_epi16(c.zero_point),
          _mm256_set1_ps(c.residual_scale),
          _mm256_set1_ps(c.residual_zero_point),
          _mm256_set1_ps(c.residual_lo),
          _mm256_set1_ps(c.residual_hi),
          _mm_set1_epi8(static_cast<char>(c.residual_flip))};
}

// Output vector j (8 columns) of a row of sums: y before the activation clamp, as epilogue_float.
TQ_TARGET_AVX2 inline __attribute__((always_inline)) __m256 epilogue_float_avx2(const PanelEpilogue& c,
                                                                                const int32_t* sums, __m256 xs,
                                                                                int j) {
  const __m256i v = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + 8 * j)),
                                     _mm256_load_si256(reinterpret_cast<const __m256i*>(c.offset + 8 * j)));
  const __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), xs), _mm256_load_ps(c.scale + 8 * j));
  return _mm256_add_ps(y, _mm256_load_ps(c.bias + 8 * j));
}

TQ_TARGET_AVX2 inline __attribute__((always_inline)) __m256 activation_clamp_avx2(const EpilogueVectors256& e,
                                                                                  __m256 y) {
  return _mm256_min_ps(e.clamp_hi, _mm256_max_ps(e.clamp_lo, y));
}

// y + (float(r ^ flip) - zero point) * scale for the 8 residual bytes at r, as add_residual.
TQ_TARGET_AVX2 inline __attribute__((always_inline)) __m256 add_residual_avx2(const EpilogueVectors256& e, __m256 y,
                                                                              const uint8_t* r) {
  const __m128i bytes = _mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r)), e.residual_flip);
  const __m256 rf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  return _mm256_add_ps(y, _mm256_mul_ps(_mm256_sub_ps(rf, e.residual_zero_point), e.residual_scale));
}

// As requantize: the output value less the zero point, NaN y giving 0.
template <bool MAY_BE_NAN>
TQ_TARGET_AVX2 inline __attribute__((always_inline)) __m256i requantize_avx2(const EpilogueVectors256& e, __m256 y) {
  const __m256 x = _mm256_mul_ps(y, e.inv_out_scale);
  const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(x, e.q_lo), e.q_hi));  // MXCSR: nearest even
  if constexpr (MAY_BE_NAN) return _mm256_and_si256(q, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q)));
  return q;
}

// One row of `vectors` 8-column vectors of sums (the sums, residual bytes and output of whole vectors; the caller
// buffers partial ones) through the epilogue.
template <OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU = Gelu::None>
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void epilogue_row_avx2(const PanelEpilogue& c,
                                                                            const EpilogueVectors256& e,
                                                                            const int32_t* sums, int vectors,
                                                                            __m256 xs, T* out,
                                                                            const uint8_t* residual) {
  if constexpr (KIND == OutKind::Int8 || KIND == OutKind::UInt8) {
    for (int j0 = 0; j0 < vectors; j0 += 4) {  // 32 columns: 4 vectors packed into one 32-byte store
      __m256i q[4];
      for (int i = 0; i < 4; ++i) {
        const int j = j0 + i;
        if (j >= vectors) {
          q[i] = _mm256_setzero_si256();
          continue;
        }
        __m256 y = epilogue_float_avx2(c, sums, xs, j);
        if (residual != nullptr) y = add_residual_avx2(e, activation_clamp_avx2(e, y), residual + 8 * j);
        q[i] = requantize_avx2<MAY_BE_NAN>(e, y);
      }
      const __m256i w01 = _mm256_adds_epi16(_mm256_packs_epi32(q[0], q[1]), e.zero_point);
      const __m256i w23 = _mm256_adds_epi16(_mm256_packs_epi32(q[2], q[3]), e.zero_point);
      const __m256i bytes = KIND == OutKind::UInt8 ? _mm256_packus_epi16(w01, w23) : _mm256_packs_epi16(w01, w23);
      // dword 4 * lane + i of `bytes` holds vector i's columns 4 * lane .. 4 * lane + 3
      const __m256i row = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * j0), row);
    }
    return;
  }
  for (int j = 0; j < vectors; ++j) {
    T* dst = out + 8 * j;
    if constexpr (KIND == OutKind::Int32) {
      const __m256i v = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + 8 * j)),
                                         _mm256_load_si256(reinterpret_cast<const __m256i*>(c.offset + 8 * j)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
      continue;
    }
    __m256 y = epilogue_float_avx2(c, sums, xs, j);
    if constexpr (GELU != Gelu::None) {
      y = gelu_avx2<GELU>(y);  // (int8_linear_dynamic's: no clamp, no residual)
    } else {
      y = activation_clamp_avx2(e, y);
      if (residual != nullptr)
        y = _mm256_min_ps(e.residual_hi, _mm256_max_ps(e.residual_lo, add_residual_avx2(e, y, residual + 8 * j)));
    }
    if constexpr (KIND == OutKind::Float32) {
      _mm256_storeu_ps(reinterpret_cast<float*>(dst), y);
    } else if constexpr (KIND == OutKind::Float16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
    } else if constexpr (KIND == OutKind::BFloat16) {  // as the AVX-512 epilogue: round to nearest even, NaN quiet
      const __m256i bits = _mm256_castps_si256(y);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i h = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
      h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0xD8);  // h <= 0xFFFF: exact
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
    }
  }
}

template <OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU>
struct TileAvx2 {
  TQ_TARGET_AVX2 static void run(const Epilogue& ep, const PanelEpilogue& c, const int32_t* tile, int64_t row0,
                                 int64_t rows, int64_t col0, int64_t ncols);
};

template <OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU>
TQ_TARGET_AVX2 void TileAvx2<KIND, T, MAY_BE_NAN, GELU>::run(const Epilogue& ep, const PanelEpilogue& c,
                                                              const int32_t* tile, int64_t row0, int64_t rows,
                                                              int64_t col0, int64_t ncols) {
  const EpilogueVectors256 e = epilogue_vectors_avx2(c);
  const OutRows<T> out(ep, col0);
  // rows whose vectors' stores end at their last column are written in place, others through a buffer
  constexpr int64_t kStoreColumns = KIND == OutKind::Int8 || KIND == OutKind::UInt8 ? 32 : 8;
  const bool whole = ncols % kStoreColumns == 0;
  const int vectors = static_cast<int>((ncols + 7) / 8);
  alignas(32) T buffer[kPackAlign];
  alignas(32) uint8_t residual_buffer[kPackAlign];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    const __m256 xs = _mm256_set1_ps(out.row_scale == nullptr ? out.scale : out.row_scale[row]);
    const uint8_t* residual = out.residual_row(row);
    if (residual != nullptr && !whole) {
      std::memcpy(residual_buffer, residual, ncols);
      residual = residual_buffer;
    }
    T* dst = whole ? out.row(row) : buffer;
    epilogue_row_avx2<KIND, T, MAY_BE_NAN, GELU>(c, e, tile + r * kPackAlign, vectors, xs, dst, residual);
    if (!whole) std::memcpy(out.row(row), buffer, ncols * sizeof(T));
  }
}

void epilogue_tile_avx2(const Epilogue& ep, const PanelEpilogue& c, const int32_t* tile, int64_t row0, int64_t rows,
                        int64_t col0, int64_t ncols) {
  epilogue_tile_kinds<TileAvx2>(ep, c, tile, row0, rows, col0, ncols);
}

// ---------------------------------------------------------------------------------------------------------------
// Fused AVX-512 kernel: a full panel multiplied over its whole k range and stored in one pass (the sums go from
// registers to the epilogue, no tile round trip, which cost as much as the multiplies at k = 64). The k range is
// `runs.count` runs of `runs.steps` k-steps whose activation rows start `runs.stride` bytes apart (the kernel rows
// of a conv window read in place; one run for GEMM rows); the weight steps follow each other. (Sums started at
// -offset instead of zero made GCC spill them inside the loop.)
// ---------------------------------------------------------------------------------------------------------------

struct KRuns {
  int64_t count, stride, steps;
};

// acc[r] (a full panel's sums) through the epilogue to output row out_rows[r], or row0 + r without out_rows.
template <int MR, OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU>
TQ_TARGET_VNNI inline __attribute__((always_inline)) void store_fused(__m512i (&acc)[MR][4], const PanelEpilogue& c,
                                                                     const Epilogue& ep, int64_t row0,
                                                                     const int64_t* out_rows, int64_t col0) {
  const EpilogueVectors e = epilogue_vectors(c);
  const OutRows<T> out(ep, col0);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int64_t row = out_rows == nullptr ? row0 + r : out_rows[r];
    epilogue_row_avx512<KIND, T, true, MAY_BE_NAN, GELU>(c, e, less_offset(c, acc[r][0], 0),
                                                         less_offset(c, acc[r][1], 1), less_offset(c, acc[r][2], 2),
                                                         less_offset(c, acc[r][3], 3), out.xs(row), out.row(row),
                                                         out.streaming, out.residual_row(row));
  }
}

template <int MR, OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU>
struct FusedVnni {
  static constexpr bool kTakesGelu = true;
  TQ_TARGET_VNNI static void run(const uint8_t* a, int64_t a_row, const int8_t* b, KRuns runs,
                                 const PanelEpilogue& c, const Epilogue& ep, int64_t row0, int64_t col0) {
    __m512i acc[MR][4];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
    for (int64_t i = 0; i < runs.count; ++i)
      accumulate_vnni<MR, 4>(acc, a + i * runs.stride, a_row, b + i * runs.steps * kStepBytes, runs.steps);
    store_fused<MR, KIND, T, MAY_BE_NAN, GELU>(acc, c, ep, row0, nullptr, col0);
  }
};

// Direct conv (conv_u8s8_direct): a group of up to kVnniRows output pixels, each with the input offset of its
// window's tap (0, 0) (outside the input where the window reaches into the padding), the taps of its window that lie
// inside the input (bit i * kw + j), and its output row.
struct PixelGroup {
  int64_t offset[kVnniRows];
  uint64_t inside[kVnniRows];
  int64_t out_row[kVnniRows];
};

// What every group of a direct conv shares: tap t of a window is tap_steps k-steps of weight from step
// t * tap_steps on and tap_offset[t] input bytes from the window's tap (0, 0); taps outside the input read pad_row
// (the zero point, tap_steps * 4 bytes), and with skip_padding (a zero point of 0) taps outside the input for every
// pixel of a group are not multiplied at all.
struct DirectTaps {
  const uint8_t* x;
  const uint8_t* pad_row;
  const int64_t* tap_offset;
  int64_t taps, tap_steps;
  bool skip_padding;
};

template <int MR, OutKind KIND, typename T, bool MAY_BE_NAN, Gelu GELU>
struct DirectVnni {
  static constexpr bool kTakesGelu = false;  // (convs have no fused GELU: not instantiated with one)
  TQ_TARGET_VNNI static void run(const DirectTaps& d, const PixelGroup& grp, const int8_t* b, const PanelEpilogue& c,
                                 const Epilogue& ep, int64_t col0) {
    __m512i acc[MR][4];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
    uint64_t any_inside = 0;
    for (int r = 0; r < MR; ++r) any_inside |= grp.inside[r];
    for (int64_t t = 0; t < d.taps; ++t) {
      if (d.skip_padding && ((any_inside >> t) & 1) == 0) continue;
      const uint8_t* rows[MR];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
        rows[r] = ((grp.inside[r] >> t) & 1) != 0 ? d.x + (grp.offset[r] + d.tap_offset[t]) : d.pad_row;
      accumulate_vnni_rows<MR, 4>(acc, rows, b + t * d.tap_steps * kStepBytes, d.tap_steps);
    }
    store_fused<MR, KIND, T, MAY_BE_NAN, GELU>(acc, c, ep, 0, grp.out_row, col0);
  }
};

// K<rows, kind, type, may be NaN, GELU>::run of a full panel c stored as `kind` (K: FusedVnni or DirectVnni).
template <template <int, OutKind, typename, bool, Gelu> class K, OutKind KIND, typename T, bool MAY_BE_NAN = true,
          Gelu GELU = Gelu::None>
auto fused_rows(int rows) {
  switch (rows) {
    case 6: return &K<6, KIND, T, MAY_BE_NAN, GELU>::run;
    case 5: return &K<5, KIND, T, MAY_BE_NAN, GELU>::run;
    case 4: return &K<4, KIND, T, MAY_BE_NAN, GELU>::run;
    case 3: return &K<3, KIND, T, MAY_BE_NAN, GELU>::run;
    case 2: return &K<2, KIND, T, MAY_BE_NAN, GELU>::run;
    default: return &K<1, KIND, T, MAY_BE_NAN, GELU>::run;
  }
}

// A float kind's kernel with the panel's GELU.
template <template <int, OutKind, typename, bool, Gelu> class K, OutKind KIND, typename T>
auto fused_float_rows(const PanelEpilogue& c, int rows) {
  if constexpr (K<1, KIND, T, true, Gelu::None>::kTakesGelu) {
    if (c.gelu == Gelu::Erf) return fused_rows<K, KIND, T, true, Gelu::Erf>(rows);
    if (c.gelu == Gelu::Tanh) return fused_rows<K, KIND, T, true, Gelu::Tanh>(rows);
  }
  return fused_rows<K, KIND, T>(rows);
}

template <template <int, OutKind, typename, bool, Gelu> class K>
auto fused_kernel(OutKind kind, const PanelEpilogue& c, int rows) {
  switch (kind) {
    case OutKind::Int32: break;
    case OutKind::Float32: return fused_float_rows<K, OutKind::Float32, float>(c, rows);
    case OutKind::Float16: return fused_float_rows<K, OutKind::Float16, c10::Half>(c, rows);
    case OutKind::BFloat16: return fused_float_rows<K, OutKind::BFloat16, c10::BFloat16>(c, rows);
    case OutKind::Int8:
      return c.may_be_nan ? fused_rows<K, OutKind::Int8, int8_t, true>(rows)
                          : fused_rows<K, OutKind::Int8, int8_t, false>(rows);
    case OutKind::UInt8:
      return c.may_be_nan ? fused_rows<K, OutKind::UInt8, uint8_t, true>(rows)
                          : fused_rows<K, OutKind::UInt8, uint8_t, false>(rows);
  }
  return fused_rows<K, OutKind::Int32, int32_t>(rows);
}

// ---------------------------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------------------------

struct IsaPath {
  void (*kernel)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int, int, bool);
  // the kernel on widened operands (WidePanels, WideConvOperands), of up to wide_rows rows; null where the path has
  // none
  void (*wide_kernel)(const int16_t*, int64_t, const int16_t*, int64_t, int32_t*, int, bool);
  void (*epilogue)(const Epilogue&, const PanelEpilogue&, const int32_t*, int64_t, int64_t, int64_t, int64_t);
  int rows;
  bool fused;  // the fused kernels apply to full panels
  int wide_rows = 0;
  // the kernel of weights in [-64, 64] that multiplies packed bytes as they are (null where the path has none), and
  // its test of a weight block
  void (*byte_kernel)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int, int32_t*, bool) = nullptr;
  bool (*fits_byte_kernel)(const int8_t*, int64_t) = nullptr;
  // the kernel for weights that stream from memory (kStreamedWeightBytes), where the path has one of its own
  void (*streaming_kernel)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int, int, bool) = nullptr;
};

// The fewest k-chunks of a block of AMX sums whose epilogue overlaps the next block's products (PendingEpilogue), one
// thread, batch 8. GEMMs: 640 x 1536 x 384 (24 chunks) 282 -> 225 us, 1568 x 1024 x 256 (16) 303 -> 290 us, but
// 4- and 8-chunk ones up to 15 % slower. ResNet's 3x3 convs: 256 channels (36 chunks) 0.63 -> 0.54 ms, 512 (72)
// 0.91 -> 0.86 ms, but 128 (18) 0.61 -> 0.65 ms and 64 (9) 0.77 -> 0.85 ms: their padded windows and weight panel
// fill L1 with one tile buffer already. Measured at 64 channels, batch 8 (thread CPU time, 1 thread): the epilogue
// takes a third of the conv (0.47-0.52 ms without it, 0.70 with); with the outputs all stored to one line (no
// output traffic) the overlap is as slow, so the stores are not the cause; the epilogue inlined in the tile loop, a
// row or two after each k-step, ran these convs alone 0-11 % faster but ResNet-18 at batch 8 no faster (17.7 against
// 17.6 ms).
constexpr int64_t kGemmOverlapMinChunks = 16;
constexpr int64_t kConvOverlapMinChunks = 32;

// A block of AMX sums waiting for the epilogue. Tile row r is output row out_row0 + r; or, where the conv's tiles
// span output rows (padded_width > 0), padded pixel first_pixel + r of the image whose first output row is out_row0,
// stored only where its column is below out_w (the rest straddle the border: junk).
struct TileBlock {
  const int32_t* tile = nullptr;
  int64_t rows = 0;
  const PanelEpilogue* panel = nullptr;
  int64_t col0 = 0, ncols = 0, out_row0 = 0;
  int64_t padded_width = 0, first_pixel = 0, out_w = 0;
};

// The epilogue of the last block a thread summed on tiles, run in slices between the k-chunk steps of its next block
// (multiply_amx's `between`) where the blocks are deep: the vector work then overlaps the tile unit's. Shallower
// blocks go through the epilogue as soon as they are summed (overlap false). Blocks are summed into free_tile(), one
// of the caller's two tile buffers (of 2 * kAmxRows rows); the caller calls finish() before its other kernels reuse
// those buffers or its thread is done. The epilogue runs while the next block's sums are live in the tiles: it is
// compiled without AMX, and the ABI leaves tile registers to the caller, so it must stay tile-free.
class PendingEpilogue {
 public:
  PendingEpilogue(const Epilogue& ep, const IsaPath& path, bool overlap, int32_t* buffer0, int32_t* buffer1)
      : ep_(ep), path_(path), overlap_(overlap), buffers_{buffer0, buffer1} {}
  // the buffer the pending block is not in: with no block pending (always, where blocks do not overlap) the first,
  // so that the second stays out of L1 and leaves it to the weight panel
  int32_t* free_tile() const { return block_.tile == buffers_[0] ? buffers_[1] : buffers_[0]; }
  // multiply_amx(..., between) of a block: with the slices of this one where it overlaps, else with nothing between
  // the steps (a check there slowed the shallow blocks)
  template <class Multiply>
  void multiply(const Multiply& multiply_amx_with) {
    if (overlap_) {
      multiply_amx_with([this](int64_t step, int64_t steps) { advance(step, steps); });
    } else {
      multiply_amx_with([](int64_t, int64_t) {});
    }
  }
  // Runs the rest of the pending block, and makes `block` the pending one.
  void start(const TileBlock& block) {
    finish();
    block_ = block;
    done_ = 0;
    if (block.padded_width > 0) {
      row_ = block.first_pixel / block.padded_width;
      column_ = block.first_pixel % block.padded_width;
    }
    if (!overlap_) finish();
  }
  // Step `step` of `steps` of the next block: the pending rows up to the step's share, in slices of at least
  // kMinSlice rows (each slice costs a call and the epilogue's set-up).
  void advance(int64_t step, int64_t steps) {
    if (block_.tile == nullptr) return;
    const int64_t end = (step + 1) * block_.rows / steps;
    if (end - done_ >= kMinSlice || step + 1 == steps) run_to(end);
  }
  void finish() {
    if (block_.tile == nullptr) return;
    run_to(block_.rows);
    block_.tile = nullptr;
  }

 private:
  static constexpr int64_t kMinSlice = 4;

  void run_to(int64_t end) {
    const TileBlock& b = block_;
    if (b.padded_width == 0) {
      if (end > done_) {
        path_.epilogue(ep_, *b.panel, b.tile + done_ * kPackAlign, b.out_row0 + done_, end - done_, b.col0, b.ncols);
        done_ = end;
      }
      return;
    }
    while (done_ < end) {  // the pixels of each output row in rows [done_, end); (row_, column_): done_'s
      const int64_t count = std::min((column_ < b.out_w ? b.out_w : b.padded_width) - column_, end - done_);
      if (column_ < b.out_w) {
        path_.epilogue(ep_, *b.panel, b.tile + done_ * kPackAlign, b.out_row0 + row_ * b.out_w + column_, count,
                       b.col0, b.ncols);
      }
      done_ += count;
      column_ += count;
      if (column_ == b.padded_width) {
        column_ = 0;
        ++row_;
      }
    }
  }

  const Epilogue& ep_;
  const IsaPath& path_;
  const bool overlap_;
  int32_t* const buffers_[2];
  TileBlock block_;
  int64_t done_ = 0;
  int64_t row_ = 0, column_ = 0;  // the padded pixel of tile row done_ (conv tiles spanning output rows)
};

// The rows of the next microkernel call, `left` rows of the chunk remaining: full groups of `rows`, except that
// the last 7 or 8 rows of a 6-row kernel go as 4 + 3 or 4 + 4. A kernel of 1 or 2 rows loads the same 4 weight
// vectors per k-step as one of 6 for a third of the multiply-adds or less, so it runs bound by the loads (M = 20:
// 6 + 6 + 6 + 2); from 3 rows on the multiply-adds dominate again.
int group_rows(int rows, int64_t left) {
  if (left > rows && left < rows + 3) return static_cast<int>((left + 1) / 2);
  return static_cast<int>(std::min<int64_t>(rows, left));
}

IsaPath isa_path(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512Vnni: return {microkernel_vnni_rows, nullptr, epilogue_tile_avx512, kVnniRows, true};
    case CpuIsa::Avx2:
      return {microkernel_avx2_rows<false>, microkernel_avx2_wide_rows, epilogue_tile_avx2, kAvx2Rows, false,
              kAvx2WideRows, multiply_avx2_bytes, weights_fit_byte_kernel, microkernel_avx2_rows<true>};
    case CpuIsa::Scalar: break;
  }
  return {microkernel_scalar, nullptr, epilogue_tile_scalar, kVnniRows, false};
}

// Whether a work item of `rows` rows and a depth of k4 bytes runs path's wide kernel: it must have more rows than the
// int8 kernel takes at once (else the widening is not shared), and at least 128 bytes of k: below that the calls'
// fixed costs dominate (int8_mm 3136 x K x N on AVX2: 0.70x the int8 kernel's speed at K = 16, 0.86x at 32, 0.94x at
// 64, 1.05x at 128).
bool uses_wide_kernel(const IsaPath& path, int64_t rows, int64_t k4) {
  return path.wide_kernel != nullptr && rows > path.rows && k4 >= 128;
}

// The k blocks of the wide kernel for a depth of k4 bytes: the fewest of <= kWideKBlock, of equal size (rounded to a
// k-step): 576 as 2 x 288, not 512 + 64, whose 16 k-steps would cost a kernel call each for little work.
int64_t wide_k_block(int64_t k4) {
  const int64_t blocks = (k4 + kWideKBlock - 1) / kWideKBlock;
  return round_up((k4 + blocks - 1) / std::max<int64_t>(blocks, 1), 4);
}

// The operands of a path's wide kernel for one k block (<= kWideKBlock) of a work item, widened to int16 in the
// thread's Scratch::WideOperands buffer, for the one parallel task that owns it.
// `values` int16 values of the calling thread's Scratch::WideOperands buffer, 64-byte aligned (new[] gives 16):
// 32-byte loads from 16-byte aligned addresses split a cache line every second time, which cost the wide kernel a
// quarter of its speed.
int16_t* wide_scratch(int64_t values) {
  uint8_t* buffer = scratch_buffer(Scratch::WideOperands, values * static_cast<int64_t>(sizeof(int16_t)) + 64);
  return reinterpret_cast<int16_t*>(buffer + (-reinterpret_cast<uintptr_t>(buffer) & 63));
}

// tile[r][c] (+)= the products of `rows` widened activation rows from a on (a_row values apart) and a widened weight
// block at w of `steps` k-steps (widen_weights), r < rows, c < 16 * vectors: each 16-column vector over all the row
// groups, so that its block stays in L1.
void multiply_wide(const IsaPath& path, const int16_t* a, int64_t a_row, const int16_t* w, int64_t steps, int64_t rows,
                   int vectors, int32_t* tile, bool first) {
  for (int v = 0; v < vectors; ++v)
    for (int64_t r = 0; r < rows;) {
      const int mr = group_rows(path.wide_rows, rows - r);
      path.wide_kernel(a + r * a_row, a_row, w + v * steps * 64, steps, tile + r * kPackAlign + 16 * v, mr, first);
      r += mr;
    }
}

class WidePanels {
  static constexpr int64_t kWideBlockValues = kWideKBlock * kPackAlign;  // a k block of a panel

 public:
  WidePanels() : scope_(Scratch::WideOperands) {}

  // the weight vectors of `steps` k-steps of the packed panel at b (widen_weights)
  void widen_block(const int8_t* b, int64_t steps) {
    if (wide_b_ == nullptr) {
      wide_b_ = wide_scratch(kWideBlockValues + kRowsPerChunk * kWideRowValues);
      wide_a_ = wide_b_ + kWideBlockValues;
    }
    steps_ = steps;
    widen_weights(b, steps, wide_b_);
  }
  // activation row r (< kRowsPerChunk) of the block, whose values start at row
  void widen_activations(int64_t r, const uint8_t* row) { widen_row(row, 4 * steps_, wide_a_ + r * kWideRowValues); }

  // tile[r][c] (+)= the block's products, r < rows, c < 16 * vectors (multiply_wide)
  void multiply(const IsaPath& path, int64_t rows, int vectors, int32_t* tile, bool first) const {
    multiply_wide(path, wide_a_, kWideRowValues, wide_b_, steps_, rows, vectors, tile, first);
  }

 private:
  ScratchScope scope_;
  int16_t* wide_b_ = nullptr;
  int16_t* wide_a_ = nullptr;
  int64_t steps_ = 0;
};

// Which k blocks of a weight panel fit the path's byte kernel: all where the activations are below 128
// (a_below_128), else those of weights in [-64, 64], tested when a work item of a new panel (or blocks of another
// depth) asks, and remembered for that panel: the items of a task run panel by panel where they are many.
class ByteKernelBlocks {
 public:
  explicit ByteKernelBlocks(bool a_below_128) : a_below_128_(a_below_128) {}

  // whether path has a byte kernel and the block from k0 on (blocks of k_block bytes of k) of the panel at b, k4
  // bytes deep, fits it
  bool fit(const IsaPath& path, const int8_t* panel, int64_t k4, int64_t k_block, int64_t k0) {
    if (path.byte_kernel == nullptr) return false;
    if (a_below_128_) return true;
    if (panel != panel_ || k_block != k_block_) {
      panel_ = panel;
      k_block_ = k_block;
      fits_.clear();
      for (int64_t k = 0; k < k4; k += k_block)
        fits_.push_back(path.fits_byte_kernel(panel + k * kPackAlign, std::min(k_block, k4 - k) / 4 * kStepBytes));
    }
    return fits_[k0 / k_block] != 0;
  }

 private:
  bool a_below_128_;
  const int8_t* panel_ = nullptr;
  int64_t k_block_ = 0;
  std::vector<char> fits_;
};

// The most bytes of a widened weight panel that WideConvOperands holds for a thread (half of a Zen 3 core's L2).
constexpr int64_t kWideConvPanelBytes = int64_t{256} << 10;

// The operands of path's wide kernel for a conv that reads its windows in place (conv_u8s8_in_place), in the
// thread's Scratch::WideOperands buffer, for the one parallel task that owns it: the weight panel widened once for
// all the work items of the panel that the task runs one after the other, and for each item one widened input row
// per kernel row, spanning the item's windows (the padding byte where they leave the input). Window r's kernel row
// i starts r * stride_w * channels values into widened row i, so overlapping windows share their widened values.
// Kernel rows deeper than kWideKBlock go in equal parts of at most that (part()), each part's weight block widened
// on its own (widen_weights), so that a 16-column vector's block stays in L1.
class WideConvOperands {
 public:
  // run: a kernel row's bytes in the weight (kw * channels rounded up to 4); segment: the most windows of an item
  WideConvOperands(const ConvGeometry& g, int64_t run, int64_t segment, uint8_t pad_byte)
      : scope_(Scratch::WideOperands), g_(g), run_(run), part_(wide_k_block(run)), pad_(pad_byte) {
    // (the rounded-up run reads up to 3 values past the last window: they meet zero weights)
    row_values_ = round_up(((segment - 1) * g.stride_w + g.kw) * g.channels + 4, 32);
    const int64_t weight_values = g.kh * run * kPackAlign;
    weights_ = wide_scratch(weight_values + g.kh * row_values_);
    rows_ = weights_ + weight_values;
  }

  // The widened panel at w: the part of `steps` k-steps from the panel's byte k0 on (k0 = i * run + a multiple of
  // part()) has vector v's k-steps at weights(k0) + v * steps * 64.
  void hold_panel(const int8_t* w) {
    if (w == held_) return;
    for (int64_t i = 0; i < g_.kh; ++i)
      for (int64_t k0 = i * run_; k0 < (i + 1) * run_; k0 += part_)
        widen_weights(w + k0 * kPackAlign, std::min(part_, (i + 1) * run_ - k0) / 4, weights_ + k0 * kPackAlign);
    held_ = w;
  }
  const int16_t* weights(int64_t k0) const { return weights_ + k0 * kPackAlign; }
  int64_t part() const { return part_; }

  // The input rows of `windows` windows from input position (b, ih0, iw0) on (the first window's top-left tap).
  void widen_windows(const uint8_t* x, int64_t b, int64_t ih0, int64_t iw0, int64_t windows) {
    const int64_t span = (windows - 1) * g_.stride_w + g_.kw;  // input columns
    const int64_t lo = std::clamp<int64_t>(-iw0, 0, span), hi = std::clamp<int64_t>(g_.width - iw0, lo, span);
    for (int64_t i = 0; i < g_.kh; ++i) {
      int16_t* dst = rows_ + i * row_values_;
      const int64_t ih = ih0 + i * g_.dil_h;
      if (ih < 0 || ih >= g_.height) {
        std::fill(dst, dst + span * g_.channels, pad_);
      } else {
        std::fill(dst, dst + lo * g_.channels, pad_);
        if (hi > lo)
          widen_row(x + g_.pixel_offset(b, ih, iw0 + lo), (hi - lo) * g_.channels,
                    dst + lo * g_.channels);
        std::fill(dst + hi * g_.channels, dst + span * g_.channels, pad_);
      }
      std::fill(dst + span * g_.channels, dst + span * g_.channels + 4, int16_t{0});
    }
  }
  const int16_t* row(int64_t i) const { return rows_ + i * row_values_; }

 private:
  ScratchScope scope_;
  const ConvGeometry& g_;
  int64_t run_, part_, row_values_ = 0;
  int16_t pad_;
  int16_t* weights_ = nullptr;
  int16_t* rows_ = nullptr;
  const int8_t* held_ = nullptr;  // the panel weights_ holds
};

}  // namespace

namespace {

struct ScratchSlot {
  std::unique_ptr<uint8_t[]> data;
  uint8_t* aligned = nullptr;  // data's first 64-byte boundary
  int64_t size = 0;
};
thread_local ScratchSlot scratch_slots[static_cast<int>(Scratch::PaddedInput) + 1];  // one per Scratch

}  // namespace

uint8_t* scratch_buffer(Scratch slot, int64_t bytes) {
  ScratchSlot& b = scratch_slots[static_cast<int>(slot)];
  if (b.size < bytes) {
    // release before allocating the larger one, and record the size only once the allocation succeeded
    b.data.reset();
    b.size = 0;
    // nothrow + an explicit bad_alloc: the same MemoryError in Python, and it also reaches Python under
    // AddressSanitizer, whose throwing operator new aborts the process instead. 64-byte aligned: an AMX tile row
    // that straddles two cache lines loads at a third of the speed (tdpbusd on such rows measured 13.8 ns against
    // 4.9 ns on aligned ones).
    b.data.reset(new (std::nothrow) uint8_t[checked_add("scratch buffer", "its size", bytes, 63)]);
    if (b.data == nullptr) throw std::bad_alloc();
    b.aligned = b.data.get() + (-reinterpret_cast<uintptr_t>(b.data.get()) & 63);
    b.size = bytes;
  }
  return b.aligned;
}

ScratchScope::~ScratchScope() {
  ScratchSlot& b = scratch_slots[static_cast<int>(slot_)];
  if (b.size > kScratchKeptBytes) {
    b.data.reset();
    b.size = 0;
  }
}

namespace {

// Whether gemm_u8s8 on the isa path multiplies k4 bytes of k on AMX tiles (its work items of at least kAmxMinRows
// rows): on the avx512_amx path, for at least one k-chunk
bool amx_multiplies(CpuIsa isa, int64_t k4) {
  bool amx = false;
  cpu_isa(&amx);
  return amx && isa == CpuIsa::Avx512Vnni && k4 >= kAmxChunk;
}

}  // namespace

namespace {

// Transposes the 16 x 16 matrix of 4-byte elements in r: afterwards element j of r[i] is what element i of r[j] was
// (unpacks within the 128-bit quarters of the vectors, then a 4 x 4 transpose of the quarters).
TQ_TARGET_VNNI inline __attribute__((always_inline)) void transpose_dwords(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // t[i], t[i + 1]: rows i, i + 1 at columns 4Q, 4Q + 1 and 4Q + 2, 4Q + 3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + m]: rows g .. g + 3 at column 4Q + m (in quarter Q)
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // column 4Q + m: quarter g of the result is quarter Q of r[4g + m]
    const __m512i v0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44), v1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + m] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[8 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// The sum of a vector's int32 lanes, wrapping as int32 sums do (the intrinsic _mm512_reduce_add_epi32 adds in C
// int, whose overflow is undefined).
TQ_TARGET_VNNI inline __attribute__((always_inline)) uint32_t sum_lanes(__m512i v) {
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  const __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  const __m128i p = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4E));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_add_epi32(p, _mm_shuffle_epi32(p, 0xB1))));
}
TQ_TARGET_AVX2 inline __attribute__((always_inline)) uint32_t sum_lanes_avx2(__m256i v) {
  const __m128i q = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i p = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4E));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_add_epi32(p, _mm_shuffle_epi32(p, 0xB1))));
}

// One 64-byte chunk q of columns c, c + 1, ... c + C - 1 of multiply_few_rows (the last one, k % 64 bytes, read
// masked) multiplied with every row's chunk (vpdpbusd) and summed alone (against ones: the +128 shift's correction).
template <int M, int C, bool TAIL>
TQ_TARGET_VNNI inline __attribute__((always_inline)) void few_rows_chunk(const uint8_t* a, int64_t depth,
                                                                          const int8_t* b, int64_t ldb, int64_t q,
                                                                          __mmask64 tail, __m512i (&acc)[M][C],
                                                                          __m512i (&sums)[C]) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i av[M];
  for (int i = 0; i < M; ++i) av[i] = _mm512_load_si512(a + i * depth + 64 * q);
  for (int j = 0; j < C; ++j) {
    const int8_t* col = b + j * ldb + 64 * q;
    const __m512i w = TAIL ? _mm512_maskz_loadu_epi8(tail, col) : _mm512_loadu_si512(col);
    sums[j] = _mm512_dpbusd_epi32(sums[j], ones, w);
    for (int i = 0; i < M; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av[i], w);
  }
}

// Columns [c0, c0 + groups * C) of multiply_few_rows for its M rows, C at a time.
template <int M, int C>
TQ_TARGET_VNNI void few_rows_block(const uint8_t* a, int64_t k, const int8_t* b, int64_t ldb, int64_t c0,
                                   int64_t groups, int32_t* out, int64_t ldo) {
  const int64_t depth = round_up(k, int64_t{64}), whole = k / 64;
  const __mmask64 tail = k % 64 == 0 ? 0 : ~0ull >> (64 - k % 64);
  for (int64_t c = c0; c < c0 + groups * C; c += C) {
    __m512i acc[M][C], sums[C];
    for (int j = 0; j < C; ++j) {
      sums[j] = _mm512_setzero_si512();
      for (int i = 0; i < M; ++i) acc[i][j] = _mm512_setzero_si512();
    }
    const int8_t* cols = b + c * ldb;
    for (int64_t q = 0; q < whole; ++q) few_rows_chunk<M, C, false>(a, depth, cols, ldb, q, tail, acc, sums);
    if (k % 64 != 0) few_rows_chunk<M, C, true>(a, depth, cols, ldb, whole, tail, acc, sums);
    for (int j = 0; j < C; ++j) {
      const uint32_t shift = 128u * sum_lanes(sums[j]);
      for (int i = 0; i < M; ++i) out[i * ldo + c + j] = static_cast<int32_t>(sum_lanes(acc[i][j]) - shift);
    }
  }
}

// One 32-byte chunk q of columns c, ... c + C - 1 on AVX2 for rows of int16 (signed: no shift): widened to two int16
// vectors and multiplied with every row's chunk (vpmaddwd: pairs of int8 products sum exactly in int32); the last
// one, k % 32 bytes, copied into a zeroed buffer (AVX2 has no masked byte loads).
template <int M, int C, bool TAIL>
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void few_rows_chunk_avx2(const int16_t* a, int64_t depth,
                                                                               int64_t k, const int8_t* b,
                                                                               int64_t ldb, int64_t q,
                                                                               __m256i (&acc)[M][C]) {
  for (int j = 0; j < C; ++j) {
    const int8_t* col = b + j * ldb + 32 * q;
    alignas(32) int8_t tail[32] = {};
    if constexpr (TAIL) {
      std::memcpy(tail, col, k - 32 * q);
      col = tail;
    }
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col));
    const __m256i w_lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(bytes));
    const __m256i w_hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(bytes, 1));
    for (int i = 0; i < M; ++i) {
      const __m256i* row = reinterpret_cast<const __m256i*>(a + i * depth + 32 * q);
      const __m256i lo = _mm256_madd_epi16(_mm256_load_si256(row), w_lo);
      const __m256i hi = _mm256_madd_epi16(_mm256_load_si256(row + 1), w_hi);
      acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_add_epi32(lo, hi));
    }
  }
}

template <int M, int C>
TQ_TARGET_AVX2 void few_rows_block_avx2(const int16_t* a, int64_t k, const int8_t* b, int64_t ldb, int64_t c0,
                                        int64_t groups, int32_t* out, int64_t ldo) {
  const int64_t depth = round_up(k, int64_t{32}), whole = k / 32;
  for (int64_t c = c0; c < c0 + groups * C; c += C) {
    __m256i acc[M][C];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < C; ++j) acc[i][j] = _mm256_setzero_si256();
    const int8_t* cols = b + c * ldb;
    for (int64_t q = 0; q < whole; ++q) few_rows_chunk_avx2<M, C, false>(a, depth, k, cols, ldb, q, acc);
    if (k % 32 != 0) few_rows_chunk_avx2<M, C, true>(a, depth, k, cols, ldb, whole, acc);
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < C; ++j) out[i * ldo + c + j] = static_cast<int32_t>(sum_lanes_avx2(acc[i][j]));
  }
}

// kernel(std::integral_constant<int, C>, c0, groups) for the groups of C columns from c0 that [c0, c1) holds, then
// kernel(std::integral_constant<int, 1>, ...) for the columns left.
template <int C, class Kernel>
void in_column_groups(int64_t c0, int64_t c1, const Kernel& kernel) {
  const int64_t groups = (c1 - c0) / C;
  kernel(std::integral_constant<int, C>{}, c0, groups);
  kernel(std::integral_constant<int, 1>{}, c0 + groups * C, c1 - c0 - groups * C);
}

// multiply_few_rows' columns [c0, c1) for M rows on the isa path's kernel, C columns at a time (the accumulators, and
// on AVX-512 the rows' chunks, in the vector registers).
template <int M>
void few_rows_columns(const void* a, int64_t k, const int8_t* b, int64_t ldb, int64_t c0, int64_t c1, int32_t* out,
                      int64_t ldo, CpuIsa isa) {
  if (isa == CpuIsa::Avx512Vnni) {
    in_column_groups<M <= 4 ? 4 : 2>(c0, c1, [&](auto cols, int64_t c, int64_t groups) {
      few_rows_block<M, decltype(cols)::value>(static_cast<const uint8_t*>(a), k, b, ldb, c, groups, out, ldo);
    });
  } else {  // (16 vector registers: 8 accumulators at most)
    in_column_groups<M <= 2 ? 4 : M <= 4 ? 2 : 1>(c0, c1, [&](auto cols, int64_t c, int64_t groups) {
      few_rows_block_avx2<M, decltype(cols)::value>(static_cast<const int16_t*>(a), k, b, ldb, c, groups, out, ldo);
    });
  }
}

}  // namespace

void multiply_few_rows(const int8_t* a, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k, const int8_t* b,
                       int64_t ldb, int64_t n, int32_t* out, int64_t ldo, CpuIsa isa) {
  TQ_CHECK(m >= 1 && m <= kFewRowsMax && (isa == CpuIsa::Avx512Vnni || isa == CpuIsa::Avx2),
           "multiply_few_rows: m must be in [1, ", kFewRowsMax, "] on an AVX-512 or AVX2 path, got ", m);
  // a's rows as the kernel reads them, zero filled past k: shifted to uint8 (AVX-512) or widened to int16 (AVX2)
  const ScratchScope activations_scope(Scratch::Activations);
  void* a_rows = nullptr;
  if (isa == CpuIsa::Avx512Vnni) {
    const int64_t depth = round_up(k, int64_t{64});
    auto* a_u8 = scratch_buffer(Scratch::Activations, checked_mul("int8_mm", "the packed a size", m, depth));
    pack_activation_rows(reinterpret_cast<const uint8_t*>(a), m, k, stride_m, stride_k, 0x80, a_u8, depth, isa);
    a_rows = a_u8;
  } else {
    const int64_t depth = round_up(k, int64_t{32});
    auto* a16 = reinterpret_cast<int16_t*>(scratch_buffer(
        Scratch::Activations, checked_mul("int8_mm", "the packed a size", m, depth * int64_t{sizeof(int16_t)})));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < k; ++j) a16[i * depth + j] = a[i * stride_m + j * stride_k];
      std::fill(a16 + i * depth + k, a16 + (i + 1) * depth, int16_t{0});
    }
    a_rows = a16;
  }
  // a thread's share: columns of at least 256 KB
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t c0, int64_t c1) {
    switch (m) {
      case 1: return few_rows_columns<1>(a_rows, k, b, ldb, c0, c1, out, ldo, isa);
      case 2: return few_rows_columns<2>(a_rows, k, b, ldb, c0, c1, out, ldo, isa);
      case 3: return few_rows_columns<3>(a_rows, k, b, ldb, c0, c1, out, ldo, isa);
      case 4: return few_rows_columns<4>(a_rows, k, b, ldb, c0, c1, out, ldo, isa);
      case 5: return few_rows_columns<5>(a_rows, k, b, ldb, c0, c1, out, ldo, isa);
      case 6: return few_rows_columns<6>(a_rows, k, b, ldb, c0, c1, out, ldo, isa);
      case 7: return few_rows_columns<7>(a_rows, k, b, ldb, c0, c1, out, ldo, isa);
      default: return few_rows_columns<8>(a_rows, k, b, ldb, c0, c1, out, ldo, isa);
    }
  });
}

namespace {

// The sums of COLS x 16 columns of b (COLS * ROWS == 4 tiles of sums) against ROWS x 16 rows of a, from `chunks`
// k-chunks of the columns at b (b's own, read in place, or a zero-filled copy; ldb bytes apart, chunk q at byte 64q
// of each) and then, where `tail` is not null, one chunk more from tail (64 bytes a column, zero filled); a's rows
// packed as a weight panel (pack_weight), whose 16-row slices are tdpbssd's second operand as they lie. Tile t's
// sums: columns 16 (t / ROWS) .. + 15 of the block (tile rows) by rows 16 (t % ROWS) .. + 15 of a (tile columns).
template <int COLS, int ROWS>
TQ_TARGET_AMX void rows_amx_block(const int8_t* b, int64_t ldb, int64_t chunks, const int8_t* tail,
                                  const int8_t* a_panel, int32_t* sums) {
  static_assert(COLS * ROWS == 4);
  constexpr int64_t chunk_bytes = kAmxChunk / 4 * kStepBytes;  // a panel's bytes of one k-chunk
  __asm__ volatile("" ::: "memory");  // the tile loads' asm names no memory: the copies and the panel come first
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const auto step = [&](const int8_t* cols, int64_t col_stride, const int8_t* rows) {
    if constexpr (ROWS == 1) {  // tiles 0-3: columns 0-15, 16-31, 32-47, 48-63; 4 and 5 the columns, 6 the rows
      _tile_loadd(6, rows, kStepBytes);
      _tile_loadd(4, cols, col_stride);
      _tile_loadd(5, cols + 16 * col_stride, col_stride);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 5, 6);
      _tile_loadd(4, cols + 32 * col_stride, col_stride);
      _tile_loadd(5, cols + 48 * col_stride, col_stride);
      _tile_dpbssd(2, 4, 6);
      _tile_dpbssd(3, 5, 6);
    } else {  // tiles 0-3: (columns 0-15, rows 0-15), (0-15, 16-31), (16-31, 0-15), (16-31, 16-31)
      _tile_loadd(6, rows, kStepBytes);
      _tile_loadd(7, rows + 16 * 4, kStepBytes);
      _tile_loadd(4, cols, col_stride);
      _tile_loadd(5, cols + 16 * col_stride, col_stride);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  };
  for (int64_t q = 0; q < chunks; ++q) step(b + q * kAmxChunk, ldb, a_panel + q * chunk_bytes);
  if (tail != nullptr) step(tail, kAmxChunk, a_panel + chunks * chunk_bytes);
  constexpr int64_t tile_row = kAmxRows * sizeof(int32_t);
  _tile_stored(0, sums, tile_row);
  _tile_stored(1, sums + kAmxRows * kAmxRows, tile_row);
  _tile_stored(2, sums + 2 * kAmxRows * kAmxRows, tile_row);
  _tile_stored(3, sums + 3 * kAmxRows * kAmxRows, tile_row);
  __asm__ volatile("" ::: "memory");  // (the tile stores' asm names no memory)
}

// out[i, c0 + c] for the block's sums (rows_amx_block<COLS, ROWS>), i < rows, c < cols: each tile transposed.
template <int ROWS>
TQ_TARGET_VNNI void store_rows_amx_block(const int32_t* sums, int64_t rows, int64_t cols, int32_t* out, int64_t ldo) {
  for (int t = 0; t < 4; ++t) {
    const int64_t c_first = (t / ROWS) * kAmxRows, r_first = (t % ROWS) * kAmxRows;
    const int64_t n_cols = std::clamp<int64_t>(cols - c_first, 0, kAmxRows);
    const int64_t n_rows = std::clamp<int64_t>(rows - r_first, 0, kAmxRows);
    if (n_cols == 0 || n_rows == 0) continue;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(sums + (t * kAmxRows + i) * kAmxRows);
    transpose_dwords(r);
    const __mmask16 mask = static_cast<__mmask16>((1u << n_cols) - 1);
    for (int64_t i = 0; i < n_rows; ++i) _mm512_mask_storeu_epi32(out + (r_first + i) * ldo + c_first, mask, r[i]);
  }
}

// multiply_rows_amx's columns [c0, c1) with blocks of COLS x 16 columns against ROWS x 16 rows of a
template <int COLS, int ROWS>
void rows_amx_columns(const int8_t* a_panel, int64_t m, int64_t k, const int8_t* b, int64_t ldb, int64_t c0,
                      int64_t c1, int32_t* out, int64_t ldo) {
  constexpr int64_t block = COLS * kAmxRows;
  const int64_t whole = k / kAmxChunk, depth = round_up(k, kAmxChunk);
  AmxTiles tiles;
  configure_amx(kAmxTileRows, kAmxTileRows);
  tiles.lo = tiles.hi = kAmxTileRows;
  alignas(64) int32_t sums[4 * kAmxRows * kAmxRows];
  alignas(64) int8_t tail[block * kAmxChunk];
  const ScratchScope weights_scope(Scratch::Weights);
  for (int64_t c = c0; c < c1; c += block) {
    const int64_t cols = std::min(block, c1 - c);
    const int8_t* columns = b + c * ldb;
    int64_t ld = ldb, chunks = whole;
    const int8_t* last = nullptr;
    if (cols < block) {  // the last columns, zero filled to a whole block (read past them, tiles would leave b)
      int8_t* copy = reinterpret_cast<int8_t*>(scratch_buffer(Scratch::Weights, block * depth));
      std::memset(copy, 0, block * depth);
      for (int64_t j = 0; j < cols; ++j) std::memcpy(copy + j * depth, columns + j * ldb, k);
      columns = copy;
      ld = depth;
      chunks = depth / kAmxChunk;
    } else if (k % kAmxChunk != 0) {
      std::memset(tail, 0, sizeof(tail));
      for (int64_t j = 0; j < block; ++j)
        std::memcpy(tail + j * kAmxChunk, columns + j * ldb + whole * kAmxChunk, k % kAmxChunk);
      last = tail;
    }
    // each group of 16 * ROWS rows against the block (from L2 after the first, up to k of 32K: 1 MB)
    for (int64_t r0 = 0; r0 < m; r0 += ROWS * kAmxRows) {
      const int8_t* rows = a_panel + (r0 / kPackAlign) * depth * kPackAlign + (r0 % kPackAlign) * 4;
      rows_amx_block<COLS, ROWS>(columns, ld, chunks, last, rows, sums);
      store_rows_amx_block<ROWS>(sums, m - r0, cols, out + r0 * ldo + c, ldo);
    }
  }
}

}  // namespace

bool rows_in_place_on_amx(int64_t m, int64_t k, int64_t n) {
  constexpr int64_t kSmallB = int64_t{4} << 20;
  return m <= kAmxRowsMax && (m >= 8 || (m >= 4 && k <= kSmallB / std::max<int64_t>(n, 1)));
}

void multiply_rows_amx(const int8_t* a, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k, const int8_t* b,
                       int64_t ldb, int64_t n, int32_t* out, int64_t ldo) {
  TQ_CHECK(m >= 1 && m <= kAmxRowsMax, "multiply_rows_amx: m must be in [1, ", kAmxRowsMax, "], got ", m);
  bool amx = false;
  TQ_CHECK(cpu_isa(&amx) == CpuIsa::Avx512Vnni && amx, "multiply_rows_amx: needs the avx512_amx path");
  const int64_t depth = round_up(k, kAmxChunk);
  const ScratchScope activations_scope(Scratch::Activations);
  auto* a_panel = reinterpret_cast<int8_t*>(scratch_buffer(
      Scratch::Activations, checked_mul("int8_mm", "the packed a size", depth, round_up(m, kPackAlign))));
  pack_weight(a, m, k, stride_m, stride_k, depth, a_panel, nullptr, CpuIsa::Avx512Vnni);
  // a thread's share: whole blocks of 64 columns, at least 256 KB of b
  const int64_t grain = round_up(std::max<int64_t>(1, (int64_t{256} << 10) / k), 4 * kAmxRows);
  at::parallel_for(0, ceil_div(n, grain), 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * grain, c1 = std::min(n, end * grain);
    if (m <= kAmxRows) rows_amx_columns<4, 1>(a_panel, m, k, b, ldb, c0, c1, out, ldo);
    else rows_amx_columns<2, 2>(a_panel, m, k, b, ldb, c0, c1, out, ldo);
  });
}

int64_t gemm_packed_depth(int64_t m, int64_t k, CpuIsa isa) {
  const int64_t k4 = round_up(k, 4);
  return amx_multiplies(isa, k4) && m >= kAmxMinRows ? round_up(k, kAmxChunk) : k4;
}

void gemm_u8s8(const GemmArgs& args, const Epilogue& ep, CpuIsa isa) {
  const IsaPath path = isa_path(isa);
  const int64_t k4 = round_up(args.k, 4);
  const bool amx = amx_multiplies(isa, k4);
  const int64_t n_panels = (args.n + kPackAlign - 1) / kPackAlign;
  // rows split evenly over the fewest chunks of <= max_rows (128 rows: 2 x 66, not 96 + 32, which would leave one
  // of two threads a quarter of the work), rounded to whole microkernel row groups, on AMX to whole pairs of tiles
  // (2 x 64: a tile of 2 rows costs what one of 16 costs)
  int64_t max_rows = kRowsPerChunk;
  if (amx && args.n * k4 > kAmxChunkBytes) {
    const int64_t rows = std::max(kRowsPerChunk, kAmxChunkBytes / k4 / (2 * kAmxRows) * (2 * kAmxRows));
    if (args.groups * n_panels * ceil_div(args.m, rows) >= at::get_num_threads()) max_rows = rows;
  }
  const int64_t min_chunks = ceil_div(args.m, max_rows);
  const int64_t chunk_rows = round_up((args.m + min_chunks - 1) / std::max<int64_t>(min_chunks, 1),
                                      amx ? 2 * kAmxRows : kVnniRows);
  const int64_t m_chunks = (args.m + chunk_rows - 1) / chunk_rows;
  const int64_t items = args.groups * n_panels * m_chunks;
  // ~1M multiply-adds (or weight bytes, for few rows) per task before a second thread is worth waking
  const int64_t item_cost = (std::min(args.m, chunk_rows) + 4) * kPackAlign * k4;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(item_cost, 1));

  // Work order. Chunk-major (each chunk meets every panel while it stays in L2) streams the weight once per chunk;
  // when all the activation rows fit in L2 anyway, panel-major streams the weight once in all, and threads split
  // the panels rather than the chunks.
  const int64_t all_rows_bytes = checked_mul("int8 GEMM", "the activation rows' size",
                                             checked_mul("int8 GEMM", "the rows", args.groups, args.m), k4);
  const bool panel_major = m_chunks > 1 && all_rows_bytes <= kCachedActivationBytes;

  // Where the activation rows come from: args.a, or rows that fill_rows produces. Produced rows are made once up
  // front for the panel-major order (they fit in L2), else one chunk at a time by the thread about to use it, so
  // that they are still in its caches (an im2col matrix written whole first went out to memory and back).
  const uint8_t* a_rows = static_cast<const uint8_t*>(args.a);
  int64_t lda = args.lda, a_group_offset = args.a_group_offset;
  const bool rows_per_chunk = args.fill_rows != nullptr && !panel_major;
  const ScratchScope rows_scope(Scratch::GemmRows);  // the rows made up front, read by every thread
  if (args.fill_rows != nullptr && panel_major) {
    uint8_t* rows = scratch_buffer(Scratch::GemmRows, all_rows_bytes);
    at::parallel_for(0, args.groups * m_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t g = i / m_chunks, row0 = (i % m_chunks) * chunk_rows;
        args.fill_rows(args.fill_context, g, row0, std::min(chunk_rows, args.m - row0),
                       rows + (g * args.m + row0) * k4);
      }
    });
    a_rows = rows;
    lda = k4;
    a_group_offset = args.m * k4;
  } else if (rows_per_chunk) {
    lda = k4;
  }

  const Epilogue out_ep = with_streaming(ep, args.m, args.n);
  const PanelEpilogues panels(out_ep, args.groups, args.n, args.k, isa);
  const bool streamed = args.groups * args.n * k4 > kStreamedWeightBytes;
  const auto int8_kernel = streamed && path.streaming_kernel != nullptr ? path.streaming_kernel : path.kernel;

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t tile[kRowsPerChunk * kPackAlign];  // (on AMX: PendingEpilogue's two buffers)
    static_assert(kRowsPerChunk >= 4 * kAmxRows);
    AmxTiles amx_tiles;  // (released when the thread is done)
    PendingEpilogue pending(out_ep, path, k4 / kAmxChunk >= kGemmOverlapMinChunks, tile,
                            tile + 2 * kAmxRows * kPackAlign);
    std::optional<ScratchScope> chunk_scope;  // each thread's own chunk rows
    uint8_t* chunk_buffer = nullptr;
    if (rows_per_chunk) {
      chunk_scope.emplace(Scratch::GemmRows);
      chunk_buffer = scratch_buffer(Scratch::GemmRows, checked_mul("int8 GEMM", "the row buffer", chunk_rows, k4));
    }
    int64_t filled = -1;  // the (group, chunk) whose rows chunk_buffer holds
    WidePanels wide;
    ByteKernelBlocks byte_blocks(args.a_below_128);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / (m_chunks * n_panels);
      const int64_t in_group = item % (m_chunks * n_panels);
      const int64_t panel = panel_major ? in_group / m_chunks : in_group % n_panels;
      const int64_t chunk = panel_major ? in_group % m_chunks : in_group / n_panels;
      const int64_t row0 = chunk * chunk_rows;
      const int64_t rows = std::min(chunk_rows, args.m - row0);
      const uint8_t* a = a_rows + row0 * lda + g * a_group_offset;
      if (rows_per_chunk) {
        if (g * m_chunks + chunk != filled) {
          args.fill_rows(args.fill_context, g, row0, rows, chunk_buffer);
          filled = g * m_chunks + chunk;
        }
        a = chunk_buffer;
      }
      const int8_t* b = args.b + g * args.b_group_stride + panel * args.ldb * kPackAlign;
      const int64_t col0 = g * args.n + panel * kPackAlign;
      const int64_t ncols = std::min(kPackAlign, args.n - panel * kPackAlign);
      const int vectors = static_cast<int>((ncols + 15) / 16);
      // (chunks of more than kRowsPerChunk rows are AMX's: the kernels below see at most the last rows of one)
      if (amx && rows >= kAmxMinRows) {
        const int64_t chunks = k4 / kAmxChunk, k0 = chunks * kAmxChunk;
        // a pair of tiles at a time through the epilogue, as conv_u8s8_amx does (the panel stays in L1)
        for (int64_t r0 = 0; r0 < rows; r0 += 2 * kAmxRows) {
          const int64_t block = std::min(2 * kAmxRows, rows - r0);
          const uint8_t* ab = a + r0 * lda;
          int32_t* block_tile = pending.free_tile();
          pending.multiply([&](const auto& between) {
            multiply_amx(ab, lda, b, AmxRuns{1, 0, chunks}, block, ncols > 32 ? 2 : 1, block_tile, amx_tiles,
                         between);
          });
          for (int64_t r = 0; k0 < k4 && r < block;) {  // the k-steps past the last whole chunk
            const int mr = group_rows(path.rows, block - r);
            path.kernel(ab + r * lda + k0, lda, b + k0 * kPackAlign, (k4 - k0) / 4, block_tile + r * kPackAlign, mr,
                        vectors, false);
            r += mr;
          }
          pending.start(TileBlock{block_tile, block, &panels[g * n_panels + panel], col0, ncols, row0 + r0});
        }
        continue;
      }
      pending.finish();  // (the other kernels sum into the whole tile buffer)
      if (path.fused && ncols == kPackAlign && k4 <= kFusedMaxK) {
        for (int64_t r = 0; r < rows;) {
          const int mr = group_rows(path.rows, rows - r);
          const PanelEpilogue& pe = panels[g * n_panels + panel];
          fused_kernel<FusedVnni>(out_ep.kind, pe, mr)(a + r * lda, lda, b, KRuns{1, 0, k4 / 4}, pe, out_ep,
                                                       row0 + r, col0);
          r += mr;
        }
        continue;
      }
      if (uses_wide_kernel(path, rows, k4)) {
        // operands widened once per k block; each 16-column vector over all the row groups (see WidePanels)
        const int64_t k_block = wide_k_block(k4);
        for (int64_t k0 = 0; k0 < k4; k0 += k_block) {
          const int64_t steps = std::min(k_block, k4 - k0) / 4;
          if (byte_blocks.fit(path, b, k4, k_block, k0)) {
            path.byte_kernel(a + k0, lda, b + k0 * kPackAlign, steps, rows, vectors, tile, k0 == 0);
            continue;
          }
          wide.widen_block(b + k0 * kPackAlign, steps);
          for (int64_t r = 0; r < rows; ++r) wide.widen_activations(r, a + r * lda + k0);
          wide.multiply(path, rows, vectors, tile, k0 == 0);
        }
        path.epilogue(out_ep, panels[g * n_panels + panel], tile, row0, rows, col0, ncols);
        continue;
      }
      for (int64_t k0 = 0; k0 < k4; k0 += kKBlock) {
        const int64_t steps = std::min(kKBlock, k4 - k0) / 4;
        // (the byte kernel's test of a streamed weight would add a pass over it: 7-bit weights of 16-43 MB ran
        // 1.1-1.9x faster at 1-2 rows through the streaming int8 kernel, level at 4; activations below 128 need no
        // test)
        if ((!streamed || args.a_below_128) && byte_blocks.fit(path, b, k4, kKBlock, k0)) {
          path.byte_kernel(a + k0, lda, b + k0 * kPackAlign, steps, rows, vectors, tile, k0 == 0);
          continue;
        }
        for (int64_t r = 0; r < rows;) {
          const int mr = group_rows(path.rows, rows - r);
          // rows are read in place: re-laying them as sequential micro-panels first measured no faster
          int8_kernel(a + r * lda + k0, lda, b + k0 * kPackAlign, steps, tile + r * kPackAlign, mr, vectors,
                      k0 == 0);
          r += mr;
        }
      }
      path.epilogue(out_ep, panels[g * n_panels + panel], tile, row0, rows, col0, ncols);
    }
    pending.finish();
    if (out_ep.streaming) _mm_sfence();  // streaming stores are weakly ordered: make them visible before the join
  });
}

namespace {

// Zeros the bytes of a panel that no weight lands in: padding columns, and everything from the step holding k on
// (its tail bytes and the padded depth).
void zero_panel_padding(int8_t* panel, int64_t cols, int64_t k, int64_t kp) {
  if (cols < kPackAlign) std::memset(panel, 0, kp * kPackAlign);
  else std::memset(panel + (k / 4) * kStepBytes, 0, (kp - (k / 4) * 4) * kPackAlign);
}

// The k-steps [s0, s0 + 16) of a full panel in the nn.Linear layout (k contiguous per column): each group of 16
// columns' 64 bytes of k loaded as 16 vectors of 16 steps and transposed (transpose_dwords), one 64-byte store per
// step. With SUMS, sums[g] += the block's sums of columns 16 g .. 16 g + 15 (vpdpbusd of the stored steps with bytes
// of 1).
template <bool SUMS>
TQ_TARGET_VNNI inline __attribute__((always_inline)) void fill_panel_block_avx512(const int8_t* src, int64_t stride_n,
                                                                                  int64_t s0, int8_t* panel,
                                                                                  __m512i* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t c0 = 0; c0 < kPackAlign; c0 += 16) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (c0 + i) * stride_n + 4 * s0);
    transpose_dwords(r);
    for (int s = 0; s < 16; ++s) {
      _mm512_storeu_si512(panel + (s0 + s) * kStepBytes + 4 * c0, r[s]);
      if constexpr (SUMS) sums[c0 / 16] = _mm512_dpbusd_epi32(sums[c0 / 16], ones, r[s]);
    }
  }
}

// The first 16 * blocks k-steps of a full panel (fill_panel_block_avx512), and the 64 columns' sums over them in
// col_sums (where not null).
TQ_TARGET_VNNI void fill_panel_blocks_avx512(const int8_t* src, int64_t stride_n, int64_t blocks, int8_t* panel,
                                             int32_t* col_sums) {
  __m512i sums[kPackAlign / 16] = {};
  if (col_sums == nullptr) {
    for (int64_t b = 0; b < blocks; ++b) fill_panel_block_avx512<false>(src, stride_n, 16 * b, panel, sums);
    return;
  }
  for (int64_t b = 0; b < blocks; ++b) fill_panel_block_avx512<true>(src, stride_n, 16 * b, panel, sums);
  for (int g = 0; g < kPackAlign / 16; ++g) _mm512_storeu_si512(col_sums + 16 * g, sums[g]);
}

// The nn.Linear layout (k contiguous per column). Full panels on AVX-512 go 16 steps at a time through
// fill_panel_block_avx512; the rest 4 columns at a time, in blocks of 16 steps, so that the block's 4 KB of the
// panel stays in L1 while every column's 64 bytes are read (4 columns over all of k at a time wrote each panel line
// in 16-byte pieces spread over the whole panel: 4096 x 4096 packed in 4.4 ms, 2.9 ms in blocks, 1.6 ms on
// AVX-512). Returns the first step whose column sums are left to the caller (with col_sums; 0 without).
int64_t fill_panel_k_contiguous(const int8_t* src, int64_t cols, int64_t k, int64_t stride_n, int8_t* panel,
                                int32_t* col_sums, CpuIsa isa) {
  constexpr int64_t kBlockSteps = 16;
  const int64_t full_steps = k / 4;
  int64_t s0 = 0;
  if (cols == kPackAlign && isa == CpuIsa::Avx512Vnni) {
    s0 = full_steps / kBlockSteps * kBlockSteps;
    fill_panel_blocks_avx512(src, stride_n, full_steps / kBlockSteps, panel, col_sums);
  }
  const int64_t summed = col_sums == nullptr ? 0 : s0;
  const int64_t c4 = cols / 4 * 4;
  for (; s0 < full_steps; s0 += kBlockSteps) {
    const int64_t s1 = std::min(full_steps, s0 + kBlockSteps);
    for (int64_t c0 = 0; c0 < c4; c0 += 4) {
      const int8_t* col = src + c0 * stride_n;
      for (int64_t s = s0; s < s1; ++s) {
        const int32_t v[4] = {load_i32(col + 4 * s), load_i32(col + stride_n + 4 * s),
                              load_i32(col + 2 * stride_n + 4 * s), load_i32(col + 3 * stride_n + 4 * s)};
        std::memcpy(panel + s * kStepBytes + 4 * c0, v, 16);
      }
    }
    for (int64_t c = c4; c < cols; ++c)
      for (int64_t s = s0; s < s1; ++s) std::memcpy(panel + s * kStepBytes + 4 * c, src + c * stride_n + 4 * s, 4);
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t kk = 4 * full_steps; kk < k; ++kk)
      panel[full_steps * kStepBytes + 4 * c + (kk - 4 * full_steps)] = src[c * stride_n + kk];
  return summed;
}

void fill_panel_strided(const int8_t* src, int64_t cols, int64_t k, int64_t stride_n, int64_t stride_k, int8_t* panel) {
  for (int64_t kk = 0; kk < k; ++kk) {
    const int8_t* row = src + kk * stride_k;
    for (int64_t c = 0; c < cols; ++c) panel[panel_byte(kk, c)] = row[c * stride_n];
  }
}

// The [K, N] row-major layout (n contiguous): steps [s_begin, s_end) of every panel, reading 4 rows of k
// sequentially and interleaving their bytes (SSE2 unpacks: 4 rows x 16 columns -> 16 columns x 4 k).
void fill_steps_n_contiguous(const int8_t* w, int64_t n, int64_t k, int64_t stride_k, int64_t kp, int64_t s_begin,
                             int64_t s_end, int8_t* dst) {
  for (int64_t s = s_begin; s < s_end; ++s) {
    const int64_t rows = std::min<int64_t>(4, k - 4 * s);
    const int8_t* r = w + 4 * s * stride_k;
    for (int64_t n0 = 0; n0 < n; n0 += kPackAlign) {
      int8_t* out = dst + (n0 / kPackAlign) * kp * kPackAlign + s * kStepBytes;
      const int64_t cols = std::min(kPackAlign, n - n0);
      int64_t c = 0;
      if (rows == 4) {
        for (; c + 16 <= cols; c += 16) {
          const auto load = [&](int64_t j) {
            return _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j * stride_k + n0 + c));
          };
          const __m128i r01_lo = _mm_unpacklo_epi8(load(0), load(1)), r01_hi = _mm_unpackhi_epi8(load(0), load(1));
          const __m128i r23_lo = _mm_unpacklo_epi8(load(2), load(3)), r23_hi = _mm_unpackhi_epi8(load(2), load(3));
          __m128i* o = reinterpret_cast<__m128i*>(out + 4 * c);
          _mm_storeu_si128(o, _mm_unpacklo_epi16(r01_lo, r23_lo));
          _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(r01_lo, r23_lo));
          _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(r01_hi, r23_hi));
          _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(r01_hi, r23_hi));
        }
      }
      for (; c < cols; ++c)
        for (int64_t j = 0; j < rows; ++j) out[4 * c + j] = r[j * stride_k + n0 + c];
    }
  }
}

// The sums of a panel's 4-byte lanes over steps [s_begin, s_end): lane_sums[c] += the column c's bytes there
// (vpdpbusd / vpmaddubsw with bytes of 1 sum each lane's 4 bytes; a step holds kPackAlign lanes).
TQ_TARGET_VNNI void panel_lane_sums_avx512(const int8_t* panel, int64_t s_begin, int64_t s_end, int32_t* lane_sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[kStepBytes / 64];
  for (int g = 0; g < kStepBytes / 64; ++g) acc[g] = _mm512_loadu_si512(lane_sums + 16 * g);
  for (int64_t s = s_begin; s < s_end; ++s)
    for (int g = 0; g < kStepBytes / 64; ++g)
      acc[g] = _mm512_dpbusd_epi32(acc[g], ones, _mm512_loadu_si512(panel + s * kStepBytes + 64 * g));
  for (int g = 0; g < kStepBytes / 64; ++g) _mm512_storeu_si512(lane_sums + 16 * g, acc[g]);
}

TQ_TARGET_AVX2 void panel_lane_sums_avx2(const int8_t* panel, int64_t s_begin, int64_t s_end, int32_t* lane_sums) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256i acc[kStepBytes / 32];
  for (int g = 0; g < kStepBytes / 32; ++g)
    acc[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lane_sums + 8 * g));
  for (int64_t s = s_begin; s < s_end; ++s)
    for (int g = 0; g < kStepBytes / 32; ++g) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + s * kStepBytes + 32 * g));
      // pairs summed as int16 (|sum| <= 256: no saturation), then pairs of pairs as int32
      acc[g] = _mm256_add_epi32(acc[g], _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
    }
  for (int g = 0; g < kStepBytes / 32; ++g) _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane_sums + 8 * g), acc[g]);
}

// col_sums[c] = the sums of the panel's column c over its k-steps up to the one holding k; from step s_begin on,
// added to col_sums[c] (the sums of the steps before it).
void panel_col_sums(const int8_t* panel, int64_t cols, int64_t k, int32_t* col_sums, CpuIsa isa, int64_t s_begin = 0) {
  int32_t lane_sums[kPackAlign] = {};
  const int64_t s_end = (k + 3) / 4;
  if (isa == CpuIsa::Avx512Vnni) {
    panel_lane_sums_avx512(panel, s_begin, s_end, lane_sums);
  } else if (isa == CpuIsa::Avx2) {
    panel_lane_sums_avx2(panel, s_begin, s_end, lane_sums);
  } else {
    for (int64_t s = s_begin; s < s_end; ++s)
      for (int64_t e = 0; e < kStepBytes; ++e) lane_sums[e / 4] += panel[s * kStepBytes + e];
  }
  for (int64_t c = 0; c < cols; ++c) col_sums[c] = (s_begin > 0 ? col_sums[c] : 0) + lane_sums[c];
}

}  // namespace

void pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t stride_n, int64_t stride_k, int64_t kp, int8_t* dst,
                 int32_t* col_sums, CpuIsa isa) {
  const int64_t n_panels = (n + kPackAlign - 1) / kPackAlign;
  const int64_t panel_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(kp * kPackAlign, 1));
  const bool rows_contiguous = stride_n == 1 && stride_k != 1;
  at::parallel_for(0, n_panels, panel_grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int8_t* panel = dst + p * kp * kPackAlign;
      const int64_t n0 = p * kPackAlign, cols = std::min(kPackAlign, n - n0);
      zero_panel_padding(panel, cols, k, kp);
      if (rows_contiguous) continue;  // filled by steps below
      int32_t* sums = col_sums == nullptr ? nullptr : col_sums + n0;
      if (stride_k == 1) {
        const int64_t summed = fill_panel_k_contiguous(w + n0 * stride_n, cols, k, stride_n, panel, sums, isa);
        if (sums != nullptr) panel_col_sums(panel, cols, k, sums, isa, summed);
      } else {
        fill_panel_strided(w + n0 * stride_n, cols, k, stride_n, stride_k, panel);
        if (sums != nullptr) panel_col_sums(panel, cols, k, sums, isa);
      }
    }
  });
  if (!rows_contiguous) return;
  const int64_t steps = (k + 3) / 4;
  const int64_t step_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(4 * n, 1));
  at::parallel_for(0, steps, step_grain, [&](int64_t begin, int64_t end) {
    fill_steps_n_contiguous(w, n, k, stride_k, kp, begin, end, dst);
  });
  if (col_sums == nullptr) return;
  at::parallel_for(0, n_panels, panel_grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      panel_col_sums(dst + p * kp * kPackAlign, std::min(kPackAlign, n - p * kPackAlign), k,
                     col_sums + p * kPackAlign, isa);
  });
}

namespace {

TQ_TARGET_VNNI void copy_flip_avx512(uint8_t* dst, const uint8_t* src, int64_t n, uint8_t flip) {
  const __m512i f = _mm512_set1_epi8(static_cast<char>(flip));
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) _mm512_storeu_si512(dst + i, _mm512_xor_si512(_mm512_loadu_si512(src + i), f));
  if (i < n) {  // the tail as one masked move
    const __mmask64 tail = (uint64_t{1} << (n - i)) - 1;
    _mm512_mask_storeu_epi8(dst + i, tail, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, src + i), f));
  }
}

// dst[i] = src[i] ^ flip for i < n (64 bytes at a time on AVX-512, else 16).
void copy_flip(uint8_t* dst, const uint8_t* src, int64_t n, uint8_t flip, CpuIsa isa) {
  if (isa == CpuIsa::Avx512Vnni) return copy_flip_avx512(dst, src, n, flip);
  const __m128i f = _mm_set1_epi8(static_cast<char>(flip));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)), f));
  for (; i < n; ++i) dst[i] = src[i] ^ flip;
}

}  // namespace

TQ_TARGET_AVX2 bool bytes_below_128(const uint8_t* src, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k) {
  if (stride_k != 1) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < k; ++j)
        if (src[i * stride_m + j * stride_k] >= 128) return false;
    return true;
  }
  if (stride_m == k) {  // one run
    k *= m;
    m = 1;
  }
  for (int64_t i = 0; i < m; ++i) {
    const uint8_t* row = src + i * stride_m;
    int64_t j = 0;
    for (; j + 128 <= k; j += 128) {  // the sign bits of 4 vectors at a time
      const __m256i* v = reinterpret_cast<const __m256i*>(row + j);
      const __m256i any = _mm256_or_si256(_mm256_or_si256(_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)),
                                          _mm256_or_si256(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3)));
      if (_mm256_movemask_epi8(any) != 0) return false;
    }
    for (; j < k; ++j)
      if (row[j] >= 128) return false;
  }
  return true;
}

void pack_activation_rows(const uint8_t* src, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k, uint8_t flip,
                          uint8_t* dst, int64_t lda, CpuIsa isa) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(lda, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = src + i * stride_m;
      uint8_t* out = dst + i * lda;
      if (stride_k == 1) {
        copy_flip(out, row, k, flip, isa);
      } else {
        for (int64_t j = 0; j < k; ++j) out[j] = row[j * stride_k] ^ flip;
      }
      std::memset(out + k, 0, lda - k);
    }
  });
}

// The output size from which outputs are streamed: TORCHQUANT_STREAMING_BYTES (read on every call, as
// TORCHQUANT_CPU_ISA is: tests stream small outputs), else kStreamingOutputBytes.
int64_t streaming_output_bytes() {
  const char* forced = std::getenv("TORCHQUANT_STREAMING_BYTES");
  if (forced == nullptr || forced[0] == '\0') return kStreamingOutputBytes;
  char* end = nullptr;
  const long long bytes = std::strtoll(forced, &end, 10);
  TQ_CHECK(*end == '\0' && bytes >= 0, "TORCHQUANT_STREAMING_BYTES must be a non-negative integer, got '", forced,
           "'");
  return bytes;
}

// A large output is written with streaming stores: no read-for-ownership of lines that are fully overwritten (a
// 25 MB float32 output of a 1x1 conv took a third less time). One that fits in the last-level cache stays there
// for the next op: MobileNetV2 at batch 8 (activations up to 9.6 MB) ran 14 % faster with a 16 MB threshold than
// with 2 MB, ResNet-50 the same. Only outputs whose stores all fill whole 64-byte lines stream (rows and each
// group's columns a multiple of 64 bytes, so full vectors start on lines): rows of 96 uint8 channels, one in two
// starting on a line, would stream one line in three and store the other two through the cache (read for
// ownership and written back), interleaved, which takes 2-5x as long as cached stores throughout.
Epilogue with_streaming(const Epilogue& ep, int64_t rows, int64_t cols) {
  Epilogue out = ep;
  const int64_t bytes = out_kind_bytes(ep.kind);
  out.streaming = rows * ep.out_row_stride * bytes >= streaming_output_bytes() &&
                  (ep.out_row_stride * bytes) % 64 == 0 && (cols * bytes) % 64 == 0;
  return out;
}

PanelEpilogues::PanelEpilogues(const Epilogue& ep, int64_t groups, int64_t n, int64_t k, CpuIsa isa) {
  if (isa == CpuIsa::Scalar) return;
  const int64_t n_panels = (n + kPackAlign - 1) / kPackAlign;
  panels_.resize(groups * n_panels);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t p = 0; p < n_panels; ++p)
      panel_epilogue(ep, g * n + p * kPackAlign, std::min(kPackAlign, n - p * kPackAlign), k,
                     panels_[g * n_panels + p]);
}

void epilogue_tile(const Epilogue& ep, const PanelEpilogue& panel, const int32_t* tile, int64_t row0, int64_t rows,
                   int64_t col0, int64_t ncols, CpuIsa isa) {
  isa_path(isa).epilogue(ep, panel, tile, row0, rows, col0, ncols);
}

namespace {

// The work of the convs that read windows in place: segments of <= kRowsPerChunk output pixels of one output row
// (b, oh), split evenly; segment i's pixels and the first input row of their windows.
struct RowSegments {
  struct Segment {
    int64_t ow0, rows, row0, b, ih0;  // first output column, pixels, first output pixel, image, first input row
    bool rows_inside;                 // whether every kernel row of the windows lies inside the input
  };
  explicit RowSegments(const ConvGeometry& geometry)
      : g(geometry),
        per_row(ceil_div(g.out_w, kRowsPerChunk)),
        len(ceil_div(g.out_w, per_row)),
        count(g.batch * g.out_h * per_row) {}
  Segment operator[](int64_t i) const {
    const int64_t image_row = i / per_row;  // b * out_h + oh
    const int64_t ow0 = (i % per_row) * len, ih0 = (image_row % g.out_h) * g.stride_h - g.pad_h;
    return {ow0, std::min(len, g.out_w - ow0), image_row * g.out_w + ow0, image_row / g.out_h, ih0,
            ih0 >= 0 && ih0 + (g.kh - 1) * g.dil_h < g.height};
  }
  const ConvGeometry& g;
  int64_t per_row, len, count;
};

// The output columns [first, last) whose windows lie inside the input's columns (undilated kernel rows).
std::pair<int64_t, int64_t> inside_columns(const ConvGeometry& g) {
  const int64_t lo = (g.pad_w + g.stride_w - 1) / g.stride_w;
  const int64_t hi = g.width + g.pad_w >= g.kw ? (g.width + g.pad_w - g.kw) / g.stride_w + 1 : 0;
  return {std::min(lo, g.out_w), std::clamp(hi, std::min(lo, g.out_w), g.out_w)};
}

// How conv_u8s8_amx splits the output pixels into work items. With stride 1 the pixels of an image run on through
// the padded rows, pixel v = oh * padded width + ow reading its window at v * channels, so that a tile's rows may
// span output rows; the pixels whose ow >= out_w are junk (the kw - 1 windows that straddle two padded rows),
// multiplied and never stored. With other strides a tile's rows stay in one output row (stride_w * channels bytes
// apart). Such a line of pixels is cut into pieces of whole pairs of tiles (at most kRowsPerChunk pixels), the last
// one multiplied in whole pairs too (the rows past its end are junk as well: one tile configuration for the conv).
struct AmxLines {
  explicit AmxLines(const ConvGeometry& g)
      : spans_rows(g.stride_h == 1 && g.stride_w == 1),
        line(spans_rows ? (g.out_h - 1) * (g.width + 2 * g.pad_w) + g.out_w : g.out_w),
        lines(spans_rows ? g.batch : g.batch * g.out_h),
        len(std::min(kRowsPerChunk, round_up(ceil_div(line, ceil_div(line, kRowsPerChunk)), 2 * kAmxRows))),
        per_line(ceil_div(line, len)) {}
  // the pixels a line stores, and those it multiplies
  int64_t stored(const ConvGeometry& g) const { return spans_rows ? g.out_h * g.out_w : g.out_w; }
  int64_t multiplied() const { return (per_line - 1) * len + round_up(line - (per_line - 1) * len, 2 * kAmxRows); }
  bool spans_rows;
  int64_t line, lines, len, per_line;  // pixels a line, lines, pixels a piece, pieces a line
};

// The padded copy of the input that conv_u8s8_amx reads its windows from: images of (height + 2 pad_h) rows of
// (width + 2 pad_w) pixels, the padding x's zero point, and after the last image `slack` bytes that the junk rows
// of its last tiles may read (a piece's rows past the line's end, and the last window's run).
struct PaddedInput {
  int64_t width, height, image_bytes, slack;
  explicit PaddedInput(const ConvGeometry& g)
      : width(g.width + 2 * g.pad_w),
        height(g.height + 2 * g.pad_h),
        image_bytes(checked_mul("int8_conv2d", "the padded input size", checked_mul("int8_conv2d",
                                "the padded input size", width, height), g.channels)),
        slack((AmxLines(g).len * g.stride_w + g.kw) * g.channels) {}
  // of `images` images one after the other (the slack after the last)
  int64_t bytes(int64_t images) const {
    return checked_add("int8_conv2d", "the padded input size",
                       checked_mul("int8_conv2d", "the padded input size", image_bytes, images), slack);
  }
};

// Where conv_u8s8_amx_padded reads its windows: the padded copy of every image, made already (`images`), or the
// input x itself, whose padded rows each thread copies into a buffer of its own (one image) as its work items reach
// them, the next rows' input prefetched meanwhile. The copy then stays in the thread's cache for the tiles that read
// it: against a copy of the whole input up front, 3x3 convs over 64 channels at 56x56 and 256 at 14x14 ran 4-7 %
// faster at batch 8 (128 at 28x28 and batch 1 the same).
struct WindowSource {
  const uint8_t* images = nullptr;
  const uint8_t* x = nullptr;
  uint8_t pad_byte = 0;
};

// A thread's view of a WindowSource: image(b, begin, end) is image b's padded copy with at least its bytes [begin,
// end) filled. A thread's work items reach the rows of an image in order, so it copies each row once.
class PaddedRows {
 public:
  static constexpr int64_t kPrefetchRows = 2;
  PaddedRows(const ConvGeometry& g, const PaddedInput& p, const WindowSource& source) : g_(g), p_(p), source_(source) {
    if (source.images != nullptr) return;
    scope_.emplace(Scratch::PaddedInput);
    own_ = scratch_buffer(Scratch::PaddedInput, p.bytes(1));
    std::memset(own_ + p.image_bytes, source.pad_byte, p.slack);
  }
  const uint8_t* image(int64_t b, int64_t begin, int64_t end) {
    if (source_.images != nullptr) return source_.images + b * p_.image_bytes;
    const int64_t row_bytes = p_.width * g_.channels;
    const int64_t lo = begin / row_bytes, hi = std::min(p_.height, ceil_div(end, row_bytes));
    if (b != image_ || lo < lo_ || lo > hi_) {
      image_ = b;
      lo_ = hi_ = lo;
      fetched_ = 0;
    }
    for (; hi_ < hi; ++hi_) pad_row(b, hi_);
    // the input rows of the padded rows the next items will copy, on their way from memory while the tiles
    // multiply these
    const int64_t row_bytes_in = g_.width * g_.channels;
    for (fetched_ = std::max(fetched_, hi_ - g_.pad_h); fetched_ < std::min(hi_ + kPrefetchRows - g_.pad_h, g_.height);
         ++fetched_) {
      const char* src = reinterpret_cast<const char*>(source_.x + (b * g_.height + fetched_) * row_bytes_in);
      for (int64_t o = 0; o < row_bytes_in; o += 64) _mm_prefetch(src + o, _MM_HINT_T0);
    }
    return own_;
  }

 private:
  void pad_row(int64_t b, int64_t r) {
    const int64_t c = g_.channels, ih = r - g_.pad_h;
    uint8_t* out = own_ + r * p_.width * c;
    if (ih < 0 || ih >= g_.height) {
      std::memset(out, source_.pad_byte, p_.width * c);
      return;
    }
    std::memset(out, source_.pad_byte, g_.pad_w * c);
    std::memcpy(out + g_.pad_w * c, source_.x + g_.pixel_offset(b, ih, 0), g_.width * c);
    std::memset(out + (g_.pad_w + g_.width) * c, source_.pad_byte, g_.pad_w * c);
  }

  const ConvGeometry& g_;
  const PaddedInput& p_;
  const WindowSource& source_;
  std::optional<ScratchScope> scope_;
  uint8_t* own_ = nullptr;
  int64_t image_ = -1, lo_ = 0, hi_ = 0;  // the image own_ holds, and its rows [lo_, hi_) filled
  int64_t fetched_ = 0;                   // the input rows of that image prefetched: up to here
};

}  // namespace

bool amx_pads_windows(const ConvGeometry& g) {
  const int64_t extent_h = (g.kh - 1) * g.dil_h + 1;
  // padding no wider than the kernel ('same' convs: the padded copy is at most a few times the input), and at
  // least 7 stored pixels in 8 multiplied (7x7 images, 49 in 64, ran faster on im2col rows). Not 1x1 kernels (the
  // strided ones: the pointwise GEMM takes the others): their windows do not overlap, and gathering the pixels as
  // im2col rows beats copying the whole input (1x1/2 256 -> 512 over 8 x 56 x 56: 1.42 -> 1.07 ms).
  if (g.groups != 1 || g.dil_w != 1 || g.kw * g.channels % kAmxChunk != 0 || g.pad_w >= g.kw ||
      g.pad_h >= extent_h || extent_h > g.height + 2 * g.pad_h || g.kh * g.kw == 1)
    return false;
  const AmxLines lines(g);
  return lines.stored(g) * 8 >= lines.multiplied() * 7;
}

namespace {

// conv_u8s8_amx reading its windows from `source`
void conv_u8s8_amx_padded(const GemmArgs& args, const ConvGeometry& g, const WindowSource& source,
                          const Epilogue& ep) {
  const PaddedInput padded(g);
  const IsaPath path = isa_path(CpuIsa::Avx512Vnni);  // its epilogue
  const int64_t c = g.channels, run = g.kw * c;  // whole k-chunks: args.k = kh * run
  const int64_t n_panels = (args.n + kPackAlign - 1) / kPackAlign;
  const AmxLines split(g);
  const auto [spans_rows, line, lines, len, per_line] = split;
  const int64_t a_row = g.stride_w * c;
  const int64_t kernel_rows_apart = g.dil_h * padded.width * c;
  const int64_t item_cost = (len + 4) * kPackAlign * args.k;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(item_cost, 1));
  const Epilogue out_ep = with_streaming(ep, args.m, args.n);
  const PanelEpilogues panels(out_ep, 1, args.n, args.k, CpuIsa::Avx512Vnni);

  at::parallel_for(0, lines * per_line * n_panels, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t tiles[2][2 * kAmxRows * kPackAlign];  // the pending block's and the one being summed
    AmxTiles amx_tiles;  // (released when the thread is done)
    PaddedRows windows(g, padded, source);
    PendingEpilogue pending(out_ep, path, g.kh * (run / kAmxChunk) >= kConvOverlapMinChunks, tiles[0], tiles[1]);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = item % n_panels, piece = item / n_panels;
      const int64_t line_index = piece / per_line, v0 = (piece % per_line) * len;
      const int64_t rows = std::min(len, line - v0);
      // the first pixel's window: image b's padded rows (spanning) or output row (b, oh)'s first kernel row
      const int64_t b = spans_rows ? line_index : line_index / g.out_h;
      const int64_t oh = spans_rows ? 0 : line_index % g.out_h;
      const int64_t first = (oh * g.stride_h * padded.width + v0 * g.stride_w) * c;
      // the bytes its windows read: up to the last multiplied pixel's last kernel row
      const int64_t last = first + (round_up(rows, 2 * kAmxRows) - 1) * a_row + (g.kh - 1) * kernel_rows_apart + run;
      const uint8_t* a = windows.image(b, first, last) + first;
      const int8_t* w = args.b + panel * args.ldb * kPackAlign;
      const int64_t ncols = std::min(kPackAlign, args.n - panel * kPackAlign);
      // a pair of tiles at a time, each through the epilogue while the next pair is summed: the sums of a whole
      // piece (24 KB) pushed the weight panel out of L1 between the pairs
      for (int64_t r0 = 0; r0 < rows; r0 += 2 * kAmxRows) {
        const int64_t block = std::min(2 * kAmxRows, rows - r0);
        int32_t* tile = pending.free_tile();
        pending.multiply([&](const auto& between) {
          multiply_amx(a + r0 * a_row, a_row, w, AmxRuns{g.kh, kernel_rows_apart, run / kAmxChunk}, 2 * kAmxRows,
                       ncols > 32 ? 2 : 1, tile, amx_tiles, between);
        });
        TileBlock summed{tile, block, &panels[panel], panel * kPackAlign, ncols, line_index * g.out_w + v0 + r0};
        if (spans_rows) {
          summed.out_row0 = b * g.out_h * g.out_w;
          summed.padded_width = padded.width;
          summed.first_pixel = v0 + r0;
          summed.out_w = g.out_w;
        }
        pending.start(summed);
      }
    }
    pending.finish();
    if (out_ep.streaming) _mm_sfence();
  });
}

}  // namespace

void conv_u8s8_amx(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, uint8_t pad_byte,
                   const Epilogue& ep) {
  conv_u8s8_amx_padded(args, g, WindowSource{nullptr, x, pad_byte}, ep);
}

namespace {

constexpr int64_t kBlockChannels = 16;  // the channels of a 2x2 block of pixels: kBlockColumns of them a k-chunk
constexpr int64_t kBlockColumns = kAmxChunk / kBlockChannels;

// The stride-1 conv over the 2x2 blocks of g's padded input (see conv_u8s8_amx_blocks): the same output pixels.
ConvGeometry block_geometry(const ConvGeometry& g) {
  ConvGeometry s = g;
  s.channels = kBlockChannels;
  s.kh = (g.kh + 1) / 2;
  s.kw = kBlockColumns;
  s.height = g.out_h + s.kh - 1;
  s.width = g.out_w + s.kw - 1;
  s.stride_h = s.stride_w = 1;
  s.pad_h = s.pad_w = 0;
  s.window = s.kh * s.kw * s.channels;
  return s;
}

// Block pixel (u, v) of image b: channel (p * 2 + q) * C + c is the input's (2u + p - pad_h, 2v + q - pad_w, c),
// pad_byte outside the input and in the channels past 4C. Where both of a block's input columns lie inside the
// input (all but the edge blocks), its row p is one copy of 2C bytes (the copies of C bytes with a bounds test each
// took a sixth of a ResNet stem's time).
template <int C>
void fill_blocks(const ConvGeometry& g, const ConvGeometry& s, const uint8_t* x, uint8_t pad_byte, uint8_t* z) {
  const int64_t inside_lo = std::min(s.width, (g.pad_w + 1) / 2);  // 2v - pad_w >= 0 from here
  const int64_t inside_hi = std::clamp((g.width + g.pad_w) / 2, inside_lo, s.width);  // 2v + 1 - pad_w < width
  at::parallel_for(0, s.batch * s.height, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / s.height, u = r % s.height;
      uint8_t* out = z + r * s.width * kBlockChannels;
      std::memset(out, pad_byte, s.width * kBlockChannels);
      for (int p = 0; p < 2; ++p) {
        const int64_t ih = 2 * u + p - g.pad_h;
        if (ih < 0 || ih >= g.height) continue;
        const uint8_t* in_row = x + g.pixel_offset(b, ih, 0);
        const auto edge_block = [&](int64_t v) {
          for (int q = 0; q < 2; ++q) {
            const int64_t iw = 2 * v + q - g.pad_w;
            if (iw >= 0 && iw < g.width) std::memcpy(out + v * kBlockChannels + (p * 2 + q) * C, in_row + iw * C, C);
          }
        };
        for (int64_t v = 0; v < inside_lo; ++v) edge_block(v);
        for (int64_t v = inside_lo; v < inside_hi; ++v)
          std::memcpy(out + v * kBlockChannels + p * 2 * C, in_row + (2 * v - g.pad_w) * C, 2 * C);
        for (int64_t v = inside_hi; v < s.width; ++v) edge_block(v);
      }
    }
  });
}

}  // namespace

bool amx_takes_blocks(const ConvGeometry& g) {
  return g.groups == 1 && g.stride_h == 2 && g.stride_w == 2 && g.dil_h == 1 && g.dil_w == 1 && g.channels <= 4 &&
         g.kh <= 8 && g.kw <= 8 && g.pad_h < g.kh && g.pad_w < g.kw && amx_pads_windows(block_geometry(g));
}

void conv_u8s8_amx_blocks(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, uint8_t pad_byte,
                          const Epilogue& ep) {
  const ConvGeometry s = block_geometry(g);
  const int64_t c = g.channels;
  // the blocks are the block conv's padded input (it has no padding): made straight into its buffer
  const PaddedInput padded(s);
  const ScratchScope padded_scope(Scratch::PaddedInput), weights_scope(Scratch::Weights);
  uint8_t* z = scratch_buffer(Scratch::PaddedInput, padded.bytes(s.batch));
  std::memset(z + padded.image_bytes * s.batch, pad_byte, padded.slack);
  switch (c) {
    case 1: fill_blocks<1>(g, s, x, pad_byte, z); break;
    case 2: fill_blocks<2>(g, s, x, pad_byte, z); break;
    case 3: fill_blocks<3>(g, s, x, pad_byte, z); break;
    default: fill_blocks<4>(g, s, x, pad_byte, z); break;
  }
  // the weight of the block conv, packed as args.b is (panels of 64 columns, k-steps of 4 bytes): tap (i, j) channel
  // ch goes to block tap (i / 2, j / 2), channel (i % 2 * 2 + j % 2) * C + ch
  const int64_t n_panels = ceil_div(args.n, kPackAlign), kp = s.window;
  int8_t* w = reinterpret_cast<int8_t*>(scratch_buffer(Scratch::Weights, n_panels * kPackAlign * kp));
  std::memset(w, 0, n_panels * kPackAlign * kp);
  for (int64_t oc = 0; oc < args.n; ++oc) {
    const int8_t* from = args.b + oc / kPackAlign * args.ldb * kPackAlign + oc % kPackAlign * 4;
    int8_t* to = w + oc / kPackAlign * kp * kPackAlign + oc % kPackAlign * 4;
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j)
        for (int64_t ch = 0; ch < c; ++ch) {
          const int64_t k = (i * g.kw + j) * c + ch;
          const int64_t kb = ((i / 2) * kBlockColumns + j / 2) * kBlockChannels + (i % 2 * 2 + j % 2) * c + ch;
          to[kb / 4 * kStepBytes + kb % 4] = from[k / 4 * kStepBytes + k % 4];
        }
  }
  GemmArgs blocks = args;
  blocks.b = w;
  blocks.ldb = kp;
  blocks.k = kp;
  conv_u8s8_amx_padded(blocks, s, WindowSource{z}, ep);
}

void conv_u8s8_in_place(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, uint8_t pad_byte,
                        const Epilogue& ep, CpuIsa isa) {
  const IsaPath path = isa_path(isa);
  const int64_t k4 = round_up(args.k, 4);
  const int64_t run = round_up(g.kw * g.channels, 4);  // bytes of one kernel row as the weight holds it
  const int64_t x_bytes = g.batch * g.height * g.width * g.channels;
  const int64_t n_panels = (args.n + kPackAlign - 1) / kPackAlign;
  const RowSegments segments(g);  // work items: the segments times the panels
  const int64_t items = segments.count * n_panels;
  // The wide kernel (AVX2) where the widened panel fits kWideConvPanelBytes and the windows overlap or nearly
  // (strides up to 4: the widened rows span the windows' input). Its items go panel by panel (a task widens each
  // panel's weight once), the others segment by segment (a segment's input rows stay in cache for its panels).
  const bool wide = uses_wide_kernel(path, segments.len, k4) &&
                    k4 * kPackAlign * static_cast<int64_t>(sizeof(int16_t)) <= kWideConvPanelBytes && g.stride_w <= 4;
  const int64_t item_cost = (segments.len + 4) * kPackAlign * k4;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(item_cost, 1));
  const Epilogue out_ep = with_streaming(ep, args.m, args.n);
  const PanelEpilogues panels(out_ep, 1, args.n, args.k, isa);
  // the row groups of a segment end where the columns with windows inside the input begin and end, so that a few
  // border windows take the im2col rows and not the whole group around them (on 8-pixel rows every group held a
  // border window)
  const auto [inside_lo, inside_hi] = inside_columns(g);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t tile[kRowsPerChunk * kPackAlign];
    const ScratchScope rows_scope(Scratch::GemmRows);
    uint8_t* window_rows = scratch_buffer(Scratch::GemmRows, checked_mul("int8_conv2d", "the row buffer", 8, k4));
    std::optional<WideConvOperands> wide_operands;
    if (wide) wide_operands.emplace(g, run, segments.len, pad_byte);
    ByteKernelBlocks byte_panels(args.a_below_128);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = wide ? item / segments.count : item % n_panels;
      const auto [ow0, rows, row0, b, ih0, rows_inside] = segments[wide ? item % segments.count : item / n_panels];
      const int8_t* w = args.b + panel * args.ldb * kPackAlign;
      const int64_t ncols = std::min(kPackAlign, args.n - panel * kPackAlign);
      const int vectors = static_cast<int>((ncols + 15) / 16);
      const int64_t col0 = panel * kPackAlign;
      // full panels on AVX-512: the kernel rows summed in registers and stored by the fused kernel
      const bool fused = path.fused && ncols == kPackAlign;
      const PanelEpilogue& pe = panels[panel];
      // weights in [-64, 64] (the whole panel): the byte kernel reads the windows in place as they are
      const bool bytes = !fused && byte_panels.fit(path, w, k4, k4, 0);
      if (wide && !bytes) {
        WideConvOperands& operands = *wide_operands;
        operands.hold_panel(w);
        operands.widen_windows(x, b, ih0, ow0 * g.stride_w - g.pad_w, rows);
        const int64_t window_apart = g.stride_w * g.channels;
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < run; j += operands.part())
            multiply_wide(path, operands.row(i) + j, window_apart, operands.weights(i * run + j),
                          std::min(operands.part(), run - j) / 4, rows, vectors, tile, i == 0 && j == 0);
        path.epilogue(out_ep, pe, tile, row0, rows, col0, ncols);
        continue;
      }
      const int64_t lo = std::clamp<int64_t>(inside_lo - ow0, 0, rows);
      const int64_t hi = std::clamp<int64_t>(inside_hi - ow0, lo, rows);
      int mr = 0;
      for (int64_t r = 0; r < rows; r += mr) {
        mr = static_cast<int>(std::min<int64_t>(path.rows, (r < lo ? lo : r < hi ? hi : rows) - r));
        int32_t* t = tile + r * kPackAlign;
        const int64_t iw0 = (ow0 + r) * g.stride_w - g.pad_w;
        // windows inside the input, whose padded kernel rows (up to 3 bytes past the window) stay inside it too;
        // the offsets are formed only for windows inside (a stride or dilation near 2^63 overflows them otherwise)
        bool inside = rows_inside && iw0 >= 0 && iw0 + (mr - 1) * g.stride_w + g.kw <= g.width;
        int64_t a_offset = 0, a_row = 0, kernel_rows_apart = 0;
        if (inside) {
          a_offset = g.pixel_offset(b, ih0, iw0);  // tap (0, 0) of row r
          a_row = mr > 1 ? g.stride_w * g.channels : 0;
          kernel_rows_apart = g.kh > 1 ? g.dil_h * g.width * g.channels : 0;
          inside = a_offset + (g.kh - 1) * kernel_rows_apart + (mr - 1) * a_row + run <= x_bytes;
        }
        if (inside) {
          const uint8_t* a = x + a_offset;
          if (fused) {
            fused_kernel<FusedVnni>(out_ep.kind, pe, mr)(a, a_row, w, KRuns{g.kh, kernel_rows_apart, run / 4}, pe,
                                                         out_ep, row0 + r, col0);
            continue;
          }
          for (int64_t i = 0; i < g.kh; ++i) {
            const uint8_t* ai = a + i * kernel_rows_apart;
            const int8_t* wi = w + i * run * kPackAlign;
            if (bytes) path.byte_kernel(ai, a_row, wi, run / 4, mr, vectors, t, i == 0);
            else path.kernel(ai, a_row, wi, run / 4, t, mr, vectors, i == 0);
          }
        } else {
          args.fill_rows(args.fill_context, 0, row0 + r, mr, window_rows);
          if (fused) {
            fused_kernel<FusedVnni>(out_ep.kind, pe, mr)(window_rows, k4, w, KRuns{1, 0, k4 / 4}, pe, out_ep,
                                                         row0 + r, col0);
            continue;
          }
          if (bytes) path.byte_kernel(window_rows, k4, w, k4 / 4, mr, vectors, t, true);
          else path.kernel(window_rows, k4, w, k4 / 4, t, mr, vectors, true);
        }
      }
      if (!fused) path.epilogue(out_ep, pe, tile, row0, rows, col0, ncols);
    }
    if (out_ep.streaming) _mm_sfence();
  });
}

namespace {

// The output pixels of a direct conv in the order its groups take them: region by region, where a region is the
// output pixels whose windows have the same kernel rows and the same kernel columns inside the input (one
// interior, edges and corners), image by image in it, row-major inside. Groups end where a class of regions ends
// (the regions of a band of output rows whose windows reach into the top or bottom padding, which share the kernel
// rows they skip; any other region on its own), so that their pixels share the taps they skip.
class DirectPixels {
 public:
  explicit DirectPixels(const ConvGeometry& g) : g_(g) {
    // bands: maximal runs of output rows (columns) whose windows have the same kernel rows (columns) inside
    const auto bands = [](int64_t outs, int64_t taps, int64_t stride, int64_t pad, int64_t dil, int64_t size) {
      std::vector<std::pair<int64_t, uint64_t>> out;  // (first output index, kernel index mask)
      for (int64_t o = 0; o < outs; ++o) {
        uint64_t mask = 0;
        for (int64_t i = 0; i < taps; ++i) {
          const int64_t at = o * stride - pad + i * dil;
          if (at >= 0 && at < size) mask |= uint64_t{1} << i;
        }
        if (out.empty() || out.back().second != mask) out.emplace_back(o, mask);
      }
      return out;
    };
    const auto rows = bands(g.out_h, g.kh, g.stride_h, g.pad_h, g.dil_h, g.height);
    const auto cols = bands(g.out_w, g.kw, g.stride_w, g.pad_w, g.dil_w, g.width);
    int64_t start = 0;
    const uint64_t all_rows = g.kh == 64 ? ~uint64_t{0} : (uint64_t{1} << g.kh) - 1;
    for (size_t i = 0; i < rows.size(); ++i) {
      const size_t band_start = regions_.size();
      for (size_t j = 0; j < cols.size(); ++j) {
        Region r;
        r.oh0 = rows[i].first;
        r.oh1 = i + 1 < rows.size() ? rows[i + 1].first : g.out_h;
        r.ow0 = cols[j].first;
        r.ow1 = j + 1 < cols.size() ? cols[j + 1].first : g.out_w;
        r.inside = 0;
        for (int64_t a = 0; a < g.kh; ++a)
          for (int64_t b = 0; b < g.kw; ++b)
            if (((rows[i].second >> a) & 1) != 0 && ((cols[j].second >> b) & 1) != 0)
              r.inside |= uint64_t{1} << (a * g.kw + b);
        r.start = start;
        start += g.batch * (r.oh1 - r.oh0) * (r.ow1 - r.ow0);
        r.class_end = start;
        regions_.push_back(r);
      }
      if (rows[i].second != all_rows)
        for (size_t k = band_start; k < regions_.size(); ++k) regions_[k].class_end = start;
    }
  }

  // A walk over the pixels from position q of the order on.
  class Cursor {
   public:
    Cursor(const DirectPixels& p, int64_t q) : p_(p) {
      while (region_ + 1 < p.regions_.size() && p.regions_[region_ + 1].start <= q) ++region_;
      const Region& r = p.regions_[region_];
      const int64_t area = (r.oh1 - r.oh0) * (r.ow1 - r.ow0), rem = q - r.start;
      b_ = rem / area;
      oh_ = r.oh0 + (rem % area) / (r.ow1 - r.ow0);
      ow_ = r.ow0 + (rem % area) % (r.ow1 - r.ow0);
      q_ = q;
    }
    // The pixels from the current one to the end of its class.
    int64_t left_in_class() const { return p_.regions_[region_].class_end - q_; }
    // Row r of `group` from the current pixel, then steps to the next one.
    void take(PixelGroup& group, int r) {
      const ConvGeometry& g = p_.g_;
      const Region& reg = p_.regions_[region_];
      group.offset[r] = ((b_ * g.height + oh_ * g.stride_h - g.pad_h) * g.width + ow_ * g.stride_w - g.pad_w) *
                        g.channels;
      group.inside[r] = reg.inside;
      group.out_row[r] = (b_ * g.out_h + oh_) * g.out_w + ow_;
      ++q_;
      if (++ow_ < reg.ow1) return;
      ow_ = reg.ow0;
      if (++oh_ < reg.oh1) return;
      oh_ = reg.oh0;
      if (++b_ < g.batch) return;
      b_ = 0;
      if (region_ + 1 < p_.regions_.size()) {
        const Region& next = p_.regions_[++region_];
        oh_ = next.oh0;
        ow_ = next.ow0;
      }
    }

   private:
    const DirectPixels& p_;
    size_t region_ = 0;
    int64_t q_ = 0, b_ = 0, oh_ = 0, ow_ = 0;
  };

 private:
  struct Region {
    int64_t oh0, oh1, ow0, ow1, start, class_end;
    uint64_t inside;
  };
  ConvGeometry g_;
  std::vector<Region> regions_;
};

}  // namespace

void conv_u8s8_direct(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, uint8_t pad_byte,
                      const Epilogue& ep) {
  TQ_CHECK(g.groups == 1 && g.channels % 4 == 0 && args.n % kPackAlign == 0 && g.kh * g.kw <= kMaxDirectTaps,
           "int8_conv2d: the direct conv kernel does not take this geometry");
  const int64_t taps = g.kh * g.kw, tap_steps = g.channels / 4;
  std::vector<int64_t> tap_offset(taps);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      tap_offset[i * g.kw + j] = (i * g.dil_h * g.width + j * g.dil_w) * g.channels;
  const std::vector<uint8_t> pad_row(g.channels, pad_byte);
  const DirectTaps d{x, pad_row.data(), tap_offset.data(), taps, tap_steps, pad_byte == 0};
  const DirectPixels pixels(g);
  const int64_t n_panels = args.n / kPackAlign;
  const int64_t min_chunks = (args.m + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t chunk_rows = round_up((args.m + min_chunks - 1) / std::max<int64_t>(min_chunks, 1), kVnniRows);
  const int64_t m_chunks = (args.m + chunk_rows - 1) / chunk_rows;
  // chunk-major unless the input fits in L2 (then panel-major streams the weight once, as in gemm_u8s8)
  const bool panel_major =
      m_chunks > 1 && g.batch * g.height * g.width * g.channels <= kCachedActivationBytes;
  const int64_t items = n_panels * m_chunks;
  const int64_t item_cost = (std::min(args.m, chunk_rows) + 4) * kPackAlign * args.k;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(item_cost, 1));
  const Epilogue out_ep = with_streaming(ep, args.m, args.n);
  const PanelEpilogues panels(out_ep, 1, args.n, args.k, CpuIsa::Avx512Vnni);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    // every group but a chunk's last has 3 rows or more
    constexpr int64_t kMaxGroups = kRowsPerChunk / 3 + 1;
    PixelGroup groups[kMaxGroups];
    int group_rows_of[kMaxGroups];
    int n_groups = 0;
    int64_t filled = -1;  // the chunk whose groups `groups` holds
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = panel_major ? item / m_chunks : item % n_panels;
      const int64_t chunk = panel_major ? item % m_chunks : item / n_panels;
      if (chunk != filled) {
        const int64_t row0 = chunk * chunk_rows, rows = std::min(chunk_rows, args.m - row0);
        DirectPixels::Cursor cursor(pixels, row0);
        n_groups = 0;
        for (int64_t r = 0; r < rows; ++n_groups) {
          // a group ends with its class, unless fewer than 3 pixels are left in it (groups of 1 or 2 rows run
          // bound by the weight loads)
          const int64_t in_class = std::min(cursor.left_in_class(), rows - r);
          const int mr = group_rows(kVnniRows, in_class >= 3 ? in_class : rows - r);
          for (int i = 0; i < mr; ++i) cursor.take(groups[n_groups], i);
          group_rows_of[n_groups] = mr;
          r += mr;
        }
        filled = chunk;
      }
      const int8_t* w = args.b + panel * args.ldb * kPackAlign;
      const PanelEpilogue& pe = panels[panel];
      for (int i = 0; i < n_groups; ++i)
        fused_kernel<DirectVnni>(out_ep.kind, pe, group_rows_of[i])(d, groups[i], w, pe, out_ep, panel * kPackAlign);
    }
    if (out_ep.streaming) _mm_sfence();
  });
}

}  // namespace torchquant::gemm
