// The CPU int8 GEMM engine: packing, register-blocked microkernels per ISA, the fused epilogue, and the
// cache-blocked, threaded driver. Layouts: see gemm_core.h.
#include "cpu/gemm_core.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <optional>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "quant_math.h"

namespace torchquant::gemm {
namespace {

// Work item: up to kRowsPerChunk rows x one 64-column panel. Its int32 tile (24 KB) stays in L1/L2 while k runs in
// blocks of kKBlock: the panel's slice of the weight for one block (64 KB) stays in L2 across the chunk's rows.
// Blocks of 1024 measured 0-10 % faster than 256 (which kept the slice in L1): fewer tile round trips.
constexpr int64_t kRowsPerChunk = 96;  // at most; a multiple of every microkernel's row count (6, 2, 1)
constexpr int64_t kKBlock = 1024;      // bytes of k per cache block (a multiple of 4)
constexpr int64_t kCachedActivationBytes = 512 << 10;  // activations this small stay in L2 (1 MB on Zen 4)
// outputs from this size (both cores' L2 together) bypass the caches
constexpr int64_t kStreamingOutputBytes = int64_t{2} << 20;

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

// ---------------------------------------------------------------------------------------------------------------
// Microkernels: tile[r][0..16 vectors) (+)= sum over `steps` k-steps s of a(r, s)[0..4) . panel[s][col][0..4),
// r < rows, where the 4 activation bytes a(r, s) sit at a + r * a_row + 4 * s. `first` starts the sums at
// zero, otherwise they add to the tile (the next k block). Columns from 16 vectors on are left alone.
// ---------------------------------------------------------------------------------------------------------------

// AVX-512 VNNI: MR rows x NV zmm (16 columns each) of int32 accumulators = 24 registers at MR = 6, NV = 4, plus
// the weight vectors and a broadcast; vpdpbusd does 64 u8 x s8 products per instruction without saturation.
constexpr int kVnniRows = 6;

template <int MR, int NV>
TQ_TARGET_VNNI void microkernel_vnni(const uint8_t* a, int64_t a_row, const int8_t* b, int64_t steps,
                                     int32_t* tile, bool first) {
  __m512i acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[r][j] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(tile + r * kPackAlign + 16 * j);
  for (int64_t s = 0; s < steps; ++s) {
    const int8_t* bs = b + s * kStepBytes;
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_si512(bs + 64 * j);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(load_i32(a + r * a_row + 4 * s));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
    }
  }
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
// added pairwise (hadd) when the block ends. MR rows x 4 ymm per 16-column quarter = 8 accumulators at MR = 2.
constexpr int kAvx2Rows = 2;

template <int MR>
TQ_TARGET_AVX2 void microkernel_avx2(const uint8_t* a, int64_t a_row, const int8_t* b, int64_t steps,
                                     int32_t* tile, int vectors, bool first) {
  for (int q = 0; q < vectors; ++q) {
    __m256i acc[MR][4];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
    for (int64_t s = 0; s < steps; ++s) {
      __m256i av[MR];
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r)
        av[r] = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(load_i32(a + r * a_row + 4 * s))));
      const int8_t* bs = b + s * kStepBytes + 64 * q;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i bw = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bs + 16 * j)));
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(bw, av[r]));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      // hadd gives columns (0 1 4 5 | 2 3 6 7); the 64-bit permute puts them in order
      const __m256i lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][0], acc[r][1]), 0xD8);
      const __m256i hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][2], acc[r][3]), 0xD8);
      __m256i* dst = reinterpret_cast<__m256i*>(tile + r * kPackAlign + 16 * q);
      if (first) {
        _mm256_storeu_si256(dst, lo);
        _mm256_storeu_si256(dst + 1, hi);
      } else {
        _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst), lo));
        _mm256_storeu_si256(dst + 1, _mm256_add_epi32(_mm256_loadu_si256(dst + 1), hi));
      }
    }
  }
}

TQ_TARGET_AVX2 void microkernel_avx2_rows(const uint8_t* a, int64_t a_row, const int8_t* b,
                                          int64_t steps, int32_t* tile, int rows, int vectors, bool first) {
  if (rows == 2) microkernel_avx2<2>(a, a_row, b, steps, tile, vectors, first);
  else microkernel_avx2<1>(a, a_row, b, steps, tile, vectors, first);
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
    y = clamp_activation(y, ep.clamp);
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

void epilogue_tile_scalar(const Epilogue& ep, const int32_t* tile, int64_t row0, int64_t rows, int64_t col0,
                          int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) epilogue_row_scalar(ep, tile + r * kPackAlign, row0 + r, col0, ncols);
}

// Stores the valid lanes (mask) of one output vector at p: a streaming store when asked and the vector is whole
// (p is then aligned to its size, see epilogue_tile_avx512), else a normal one. Conversions to narrower types
// happen in registers first: the memory forms of vpmov* and masked narrow stores were the epilogue's slowest
// instructions on Zen 4.
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

// The epilogue of a whole tile (rows x ncols <= 64), 16 columns at a time, with the per-column inputs loaded once.
// Matches epilogue_row_scalar: same operation order (the activation clamp included), round-to-nearest-even
// conversions (vcvtps2ph, a bit-exact bfloat16 rounding), NaN -> zero point when requantizing.
template <OutKind KIND, typename T>
TQ_TARGET_VNNI void epilogue_tile_avx512_kind(const Epilogue& ep, const int32_t* tile, int64_t row0, int64_t rows,
                                              int64_t col0, int64_t ncols) {
  constexpr int kVectors = kPackAlign / 16;
  const int vectors = static_cast<int>((ncols + 15) / 16);
  __mmask16 mask[kVectors];
  __m512i offset[kVectors];
  __m512 scale[kVectors], bias[kVectors];
  const bool has_bias = ep.bias != nullptr;
  const __m512 clamp_lo = _mm512_set1_ps(ep.clamp.lo), clamp_hi = _mm512_set1_ps(ep.clamp.hi);
  for (int j = 0; j < vectors; ++j) {
    mask[j] = ncols - 16 * j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ncols - 16 * j)) - 1);
    offset[j] = _mm512_maskz_loadu_epi32(mask[j], ep.col_offset + col0 + 16 * j);
    if (KIND == OutKind::Int32) continue;
    scale[j] = _mm512_maskz_loadu_ps(mask[j], ep.col_scale + col0 + 16 * j);
    bias[j] = has_bias ? _mm512_maskz_loadu_ps(mask[j], ep.bias + col0 + 16 * j) : _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    T* out = static_cast<T*>(ep.out) + row * ep.out_row_stride + col0;
    // streaming stores need vector-aligned addresses: the row start decides for all its vectors
    const bool stream = ep.streaming && reinterpret_cast<uintptr_t>(out) % (16 * sizeof(T)) == 0;
    const __m512 xs = _mm512_set1_ps(ep.row_scale == nullptr ? 1.0f : ep.row_scale[ep.per_row_scale ? row : 0]);
    for (int j = 0; j < vectors; ++j) {
      const __m512i v = _mm512_sub_epi32(_mm512_load_si512(tile + r * kPackAlign + 16 * j), offset[j]);
      T* dst = out + 16 * j;
      if constexpr (KIND == OutKind::Int32) {
        store_vector(dst, v, mask[j], stream);
        continue;
      }
      __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), xs), scale[j]);
      if (has_bias) y = _mm512_add_ps(y, bias[j]);
      y = _mm512_min_ps(clamp_hi, _mm512_max_ps(clamp_lo, y));  // clamp_activation: NaN passes (second operand)
      if constexpr (KIND == OutKind::Float32) {
        store_vector(dst, _mm512_castps_si512(y), mask[j], stream);
      } else if constexpr (KIND == OutKind::Float16) {
        store_vector(dst, _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), mask[j], stream);
      } else if constexpr (KIND == OutKind::BFloat16) {
        const __m512i bits = _mm512_castps_si512(y);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        __m512i h = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        h = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), h, _mm512_set1_epi32(0x7FC0));
        store_vector(dst, _mm512_cvtepi32_epi16(h), mask[j], stream);
      } else {  // Int8 / UInt8: values are already clamped to the type's range, so truncating the bytes is exact
        __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(ep.inv_out_scale)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_add_ps(q, _mm512_set1_ps(ep.out_zero_point));
        q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(ep.qmin)), _mm512_set1_ps(ep.qmax));
        q = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), q, _mm512_set1_ps(ep.out_zero_point));
        store_vector(dst, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(q)), mask[j], stream);
      }
    }
  }
}

TQ_TARGET_VNNI void epilogue_tile_avx512(const Epilogue& ep, const int32_t* tile, int64_t row0, int64_t rows,
                                         int64_t col0, int64_t ncols) {
  switch (ep.kind) {
    case OutKind::Int32: return epilogue_tile_avx512_kind<OutKind::Int32, int32_t>(ep, tile, row0, rows, col0, ncols);
    case OutKind::Float32: return epilogue_tile_avx512_kind<OutKind::Float32, float>(ep, tile, row0, rows, col0, ncols);
    case OutKind::Float16:
      return epilogue_tile_avx512_kind<OutKind::Float16, c10::Half>(ep, tile, row0, rows, col0, ncols);
    case OutKind::BFloat16:
      return epilogue_tile_avx512_kind<OutKind::BFloat16, c10::BFloat16>(ep, tile, row0, rows, col0, ncols);
    case OutKind::Int8: return epilogue_tile_avx512_kind<OutKind::Int8, int8_t>(ep, tile, row0, rows, col0, ncols);
    case OutKind::UInt8: return epilogue_tile_avx512_kind<OutKind::UInt8, uint8_t>(ep, tile, row0, rows, col0, ncols);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------------------------

struct IsaPath {
  void (*kernel)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int, int, bool);
  void (*epilogue)(const Epilogue&, const int32_t*, int64_t, int64_t, int64_t, int64_t);
  int rows;
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
    case CpuIsa::Avx512Vnni: return {microkernel_vnni_rows, epilogue_tile_avx512, kVnniRows};
    case CpuIsa::Avx2: return {microkernel_avx2_rows, epilogue_tile_scalar, kAvx2Rows};
    case CpuIsa::Scalar: break;
  }
  return {microkernel_scalar, epilogue_tile_scalar, kVnniRows};
}

}  // namespace

namespace {

struct ScratchSlot {
  std::unique_ptr<uint8_t[]> data;
  int64_t size = 0;
};
thread_local ScratchSlot scratch_slots[3];

}  // namespace

uint8_t* scratch_buffer(Scratch slot, int64_t bytes) {
  ScratchSlot& b = scratch_slots[static_cast<int>(slot)];
  if (b.size < bytes) {
    // release before allocating the larger one, and record the size only once the allocation succeeded
    b.data.reset();
    b.size = 0;
    // nothrow + an explicit bad_alloc: the same MemoryError in Python, and it also reaches Python under
    // AddressSanitizer, whose throwing operator new aborts the process instead
    b.data.reset(new (std::nothrow) uint8_t[bytes]);
    if (b.data == nullptr) throw std::bad_alloc();
    b.size = bytes;
  }
  return b.data.get();
}

ScratchScope::~ScratchScope() {
  ScratchSlot& b = scratch_slots[static_cast<int>(slot_)];
  if (b.size > kScratchKeptBytes) {
    b.data.reset();
    b.size = 0;
  }
}

void gemm_u8s8(const GemmArgs& args, const Epilogue& ep, CpuIsa isa) {
  const IsaPath path = isa_path(isa);
  const int64_t k4 = round_up(args.k, 4);
  const int64_t n_panels = (args.n + kPackAlign - 1) / kPackAlign;
  // rows split evenly over the fewest chunks of <= kRowsPerChunk (128 rows: 2 x 66, not 96 + 32, which would
  // leave one of two threads a quarter of the work), rounded to whole microkernel row groups
  const int64_t min_chunks = (args.m + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t chunk_rows = round_up((args.m + min_chunks - 1) / std::max<int64_t>(min_chunks, 1), kVnniRows);
  const int64_t m_chunks = (args.m + chunk_rows - 1) / chunk_rows;
  const int64_t items = args.groups * n_panels * m_chunks;
  // ~1M multiply-adds (or weight bytes, for few rows) per task before a second thread is worth waking
  const int64_t item_cost = (std::min(args.m, chunk_rows) + 4) * kPackAlign * k4;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(item_cost, 1));

  // Work order. Chunk-major (each chunk meets every panel while it stays in L2) streams the weight once per chunk;
  // when all the activation rows fit in L2 anyway, panel-major streams the weight once in all, and threads split
  // the panels rather than the chunks.
  const int64_t all_rows_bytes =
      checked_mul("int8 GEMM", "the activation rows' size", checked_mul("int8 GEMM", "the rows", args.groups, args.m), k4);
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

  const Epilogue out_ep = with_streaming(ep, args.m);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t tile[kRowsPerChunk * kPackAlign];
    std::optional<ScratchScope> chunk_scope;  // each thread's own chunk rows
    uint8_t* chunk_buffer = nullptr;
    if (rows_per_chunk) {
      chunk_scope.emplace(Scratch::GemmRows);
      chunk_buffer = scratch_buffer(Scratch::GemmRows, checked_mul("int8 GEMM", "the row buffer", chunk_rows, k4));
    }
    int64_t filled = -1;  // the (group, chunk) whose rows chunk_buffer holds
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
      for (int64_t k0 = 0; k0 < k4; k0 += kKBlock) {
        const int64_t steps = std::min(kKBlock, k4 - k0) / 4;
        for (int64_t r = 0; r < rows;) {
          const int mr = group_rows(path.rows, rows - r);
          // rows are read in place: re-laying them as sequential micro-panels first measured no faster
          path.kernel(a + r * lda + k0, lda, b + k0 * kPackAlign, steps, tile + r * kPackAlign, mr, vectors,
                      k0 == 0);
          r += mr;
        }
      }
      path.epilogue(out_ep, tile, row0, rows, col0, ncols);
    }
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

// The nn.Linear layout (k contiguous per column): 4 columns at a time over all of k, so 4 long sequential read
// streams feed 16-byte writes.
void fill_panel_k_contiguous(const int8_t* src, int64_t cols, int64_t k, int64_t stride_n, int8_t* panel) {
  const int64_t full_steps = k / 4;
  int64_t c0 = 0;
  for (; c0 + 4 <= cols; c0 += 4) {
    const int8_t* col = src + c0 * stride_n;
    for (int64_t s = 0; s < full_steps; ++s) {
      const int32_t v[4] = {load_i32(col + 4 * s), load_i32(col + stride_n + 4 * s),
                            load_i32(col + 2 * stride_n + 4 * s), load_i32(col + 3 * stride_n + 4 * s)};
      std::memcpy(panel + s * kStepBytes + 4 * c0, v, 16);
    }
  }
  for (int64_t c = c0; c < cols; ++c)
    for (int64_t s = 0; s < full_steps; ++s) std::memcpy(panel + s * kStepBytes + 4 * c, src + c * stride_n + 4 * s, 4);
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t kk = 4 * full_steps; kk < k; ++kk)
      panel[full_steps * kStepBytes + 4 * c + (kk - 4 * full_steps)] = src[c * stride_n + kk];
}

void fill_panel_strided(const int8_t* src, int64_t cols, int64_t k, int64_t stride_n, int64_t stride_k, int8_t* panel) {
  for (int64_t kk = 0; kk < k; ++kk) {
    int8_t* out = panel + (kk / 4) * kStepBytes + kk % 4;
    const int8_t* row = src + kk * stride_k;
    for (int64_t c = 0; c < cols; ++c) out[4 * c] = row[c * stride_n];
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

void panel_col_sums(const int8_t* panel, int64_t cols, int64_t k, int32_t* col_sums) {
  int32_t lane_sums[kStepBytes] = {};
  for (int64_t s = 0; s < (k + 3) / 4; ++s)
    for (int64_t e = 0; e < kStepBytes; ++e) lane_sums[e] += panel[s * kStepBytes + e];
  for (int64_t c = 0; c < cols; ++c)
    col_sums[c] = lane_sums[4 * c] + lane_sums[4 * c + 1] + lane_sums[4 * c + 2] + lane_sums[4 * c + 3];
}

}  // namespace

void pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t stride_n, int64_t stride_k, int64_t kp, int8_t* dst,
                 int32_t* col_sums) {
  const int64_t n_panels = (n + kPackAlign - 1) / kPackAlign;
  const int64_t panel_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(kp * kPackAlign, 1));
  const bool rows_contiguous = stride_n == 1 && stride_k != 1;
  at::parallel_for(0, n_panels, panel_grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int8_t* panel = dst + p * kp * kPackAlign;
      const int64_t n0 = p * kPackAlign, cols = std::min(kPackAlign, n - n0);
      zero_panel_padding(panel, cols, k, kp);
      if (rows_contiguous) continue;  // filled by steps below
      if (stride_k == 1) fill_panel_k_contiguous(w + n0 * stride_n, cols, k, stride_n, panel);
      else fill_panel_strided(w + n0 * stride_n, cols, k, stride_n, stride_k, panel);
      if (col_sums != nullptr) panel_col_sums(panel, cols, k, col_sums + n0);
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
                     col_sums + p * kPackAlign);
  });
}

void copy_flip(uint8_t* dst, const uint8_t* src, int64_t n, uint8_t flip) {
  const __m128i f = _mm_set1_epi8(static_cast<char>(flip));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)), f));
  for (; i < n; ++i) dst[i] = src[i] ^ flip;
}

void pack_activation_rows(const uint8_t* src, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k, uint8_t flip,
                          uint8_t* dst, int64_t lda) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(lda, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = src + i * stride_m;
      uint8_t* out = dst + i * lda;
      if (stride_k == 1) {
        copy_flip(out, row, k, flip);
      } else {
        for (int64_t j = 0; j < k; ++j) out[j] = row[j * stride_k] ^ flip;
      }
      std::memset(out + k, 0, lda - k);
    }
  });
}

// An output larger than the L2 caches is written with streaming stores: no read-for-ownership of lines that are
// fully overwritten (a 25 MB float32 output of a 1x1 conv took a third less time, and ResNet-style stages ran
// 2-6 % faster with this threshold than with none or 4-16 MB ones); a smaller one stays cached for the next op.
Epilogue with_streaming(const Epilogue& ep, int64_t rows) {
  Epilogue out = ep;
  out.streaming = rows * ep.out_row_stride * out_kind_bytes(ep.kind) >= kStreamingOutputBytes;
  return out;
}

void epilogue_tile(const Epilogue& ep, const int32_t* tile, int64_t row0, int64_t rows, int64_t col0, int64_t ncols,
                   CpuIsa isa) {
  isa_path(isa).epilogue(ep, tile, row0, rows, col0, ncols);
}

void conv_u8s8_in_place(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, const Epilogue& ep,
                        CpuIsa isa) {
  const IsaPath path = isa_path(isa);
  const int64_t k4 = round_up(args.k, 4);
  const int64_t run = g.kw * g.channels;  // bytes of one kernel row, a multiple of 4
  const int64_t n_panels = (args.n + kPackAlign - 1) / kPackAlign;
  // work items: segments of <= kRowsPerChunk output pixels of one output row (b, oh), times the panels
  const int64_t segments_per_row = (g.out_w + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t segment_len = (g.out_w + segments_per_row - 1) / segments_per_row;
  const int64_t items = g.batch * g.out_h * segments_per_row * n_panels;
  const int64_t item_cost = (segment_len + 4) * kPackAlign * k4;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(item_cost, 1));
  const Epilogue out_ep = with_streaming(ep, args.m);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t tile[kRowsPerChunk * kPackAlign];
    const ScratchScope rows_scope(Scratch::GemmRows);
    uint8_t* window_rows = scratch_buffer(Scratch::GemmRows, checked_mul("int8_conv2d", "the row buffer", 8, k4));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = item % n_panels, segment = item / n_panels;
      const int64_t image_row = segment / segments_per_row;  // b * out_h + oh
      const int64_t ow0 = (segment % segments_per_row) * segment_len;
      const int64_t rows = std::min(segment_len, g.out_w - ow0);
      const int64_t row0 = image_row * g.out_w + ow0;
      const int64_t b = image_row / g.out_h, oh = image_row % g.out_h;
      const int64_t ih0 = oh * g.stride_h - g.pad_h;
      const bool rows_inside = ih0 >= 0 && ih0 + (g.kh - 1) * g.dil_h < g.height;
      const int8_t* w = args.b + panel * args.ldb * kPackAlign;
      const int64_t ncols = std::min(kPackAlign, args.n - panel * kPackAlign);
      const int vectors = static_cast<int>((ncols + 15) / 16);
      for (int64_t r = 0; r < rows; r += path.rows) {
        const int mr = static_cast<int>(std::min<int64_t>(path.rows, rows - r));
        int32_t* t = tile + r * kPackAlign;
        const int64_t iw0 = (ow0 + r) * g.stride_w - g.pad_w;
        if (rows_inside && iw0 >= 0 && iw0 + (mr - 1) * g.stride_w + g.kw <= g.width) {
          for (int64_t i = 0; i < g.kh; ++i) {
            const uint8_t* a = x + ((b * g.height + ih0 + i * g.dil_h) * g.width + iw0) * g.channels;
            path.kernel(a, g.stride_w * g.channels, w + i * run * kPackAlign, run / 4, t, mr, vectors, i == 0);
          }
        } else {
          args.fill_rows(args.fill_context, 0, row0 + r, mr, window_rows);
          path.kernel(window_rows, k4, w, k4 / 4, t, mr, vectors, true);
        }
      }
      path.epilogue(out_ep, tile, row0, rows, panel * kPackAlign, ncols);
    }
    if (out_ep.streaming) _mm_sfence();
  });
}

}  // namespace torchquant::gemm
