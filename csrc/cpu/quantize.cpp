// CPU kernels of the quantize family and of quantized_add / quantized_mul (schemas in csrc/ops.cpp, element math in
// csrc/quant_math.h).
//
// Every op is an element-wise map over x's memory (csrc/memory_order.h) viewed as [outer, channels, inner]:
// the element at offset i belongs to channel (i / inner) % channels (per-tensor: one channel). The map runs in
// spans; a span either shares one channel's parameters (broadcast) or, for short rows (inner < kBroadcastRowMin),
// carries one parameter per element from a small buffer, so the vector loops stay busy on every axis. Each span
// runs in one of three code paths, chosen at run time by cpu_isa(): AVX-512 or AVX2 (intrinsics, bit-identical to
// the scalar path) or the scalar path, which calls the quant_math.h functions element by element.

// GCC 12's AVX-512 headers pass _mm512_undefined_ps() as a pass-through operand, which -Wall reports as
// uninitialized in every caller; the value is never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/simd.h"  // first: see there
#include "check.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/MaybeOwned.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cpu/isa.h"
#include "cpu/per_token.h"
#include "dtype_dispatch.h"
#include "memory_order.h"
#include "output_memory.h"
#include "quant_math.h"
#include "sizes.h"

namespace torchquant {
namespace {

constexpr int64_t kGrain = 1 << 15;          // elements per parallel task: tensors below this stay on one thread
constexpr int64_t kBroadcastRowMin = 16;     // rows at least this long use broadcast parameters
constexpr int64_t kParamChunk = 512;         // elements per per-element parameter buffer

// Parameters of one span: pointers to one value each (broadcast) or to one value per element.
struct SpanParams {
  const float* scale;
  const float* inv_scale;
  const float* zero_point;

  template <bool PerElement>
  SpanParams advanced(int64_t i) const {
    if constexpr (PerElement) return {scale + i, inv_scale + i, zero_point + i};
    else return *this;
  }
};

// quantized_add's and quantized_mul's element map (BinaryMap, quant_math.h) with the scales' values.
struct BinaryParams {
  float a_scale, b_scale;
  BinaryMap map;
};

template <class T>
constexpr bool kIsByte = std::is_same_v<T, int8_t> || std::is_same_v<T, uint8_t>;

// ---------------------------------------------------------------------------------------------------------------
// Scalar path: quant_math.h element by element. Also the tail of every SIMD span.
// ---------------------------------------------------------------------------------------------------------------
namespace scalar_spans {

template <bool PerElement>
inline int64_t at(int64_t i) {
  return PerElement ? i : 0;
}

template <bool PerElement, class In, class Out>
void quantize_span(const In* x, Out* q, int64_t n, SpanParams p, QuantFormat f, Rounding r) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = at<PerElement>(i);
    q[i] = static_cast<Out>(quantize_value(static_cast<float>(x[i]), p.inv_scale[k], p.zero_point[k], f, r));
  }
}

template <bool PerElement, class T>
void fake_quantize_span(const T* x, T* y, int64_t n, SpanParams p, QuantFormat f, Rounding r) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = at<PerElement>(i);
    y[i] = static_cast<T>(
        fake_quantize_value(static_cast<float>(x[i]), p.scale[k], p.inv_scale[k], p.zero_point[k], f, r));
  }
}

// grad * mask as a product (not a select), as torch's fake-quantize backward does: inf/NaN gradients give NaN.
template <bool PerElement, class T>
void fake_quantize_backward_span(const T* grad, const T* x, T* grad_x, int64_t n, SpanParams p, QuantFormat f,
                                 Rounding r) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = at<PerElement>(i);
    const bool pass =
        fake_quantize_passes_grad(static_cast<float>(x[i]), p.scale[k], p.inv_scale[k], p.zero_point[k], f, r);
    grad_x[i] = static_cast<T>(static_cast<float>(grad[i]) * (pass ? 1.0f : 0.0f));
  }
}

template <bool PerElement, class In, class Out>
void dequantize_span(const In* q, Out* y, int64_t n, SpanParams p) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = at<PerElement>(i);
    y[i] = static_cast<Out>((static_cast<float>(q[i]) - p.zero_point[k]) * p.scale[k]);
  }
}

template <class A, class B, class Out>
void binary_span(const A* a, const B* b, Out* y, int64_t n, const BinaryParams& p) {
  const BinaryMap& m = p.map;
  for (int64_t i = 0; i < n; ++i) {
    const float va = (static_cast<float>(a[i]) - m.a_zero_point) * p.a_scale;
    const float vb = (static_cast<float>(b[i]) - m.b_zero_point) * p.b_scale;
    float v = m.op == BinaryOp::Add ? va + vb : va * vb;
    v = clamp_activation(v, m.clamp);
    if constexpr (kIsByte<Out>)
      y[i] = static_cast<Out>(quantize_value(v, m.inv_out_scale, m.out_zero_point, m.out_format, Rounding::Nearest));
    else y[i] = static_cast<Out>(v);
  }
}

// fake_quantize_error's sum for a chunk of at most kErrorChunk elements at one scale and zero point, in the order
// quant_math.h defines: lanes[i % kErrorLanes] = fma(d, d, that lane) for d = fake_quantize_value(x[i]) - x[i], i in
// order, then sum_error_lanes.
inline double chunk_error(const float* x, int64_t n, SpanParams p, QuantFormat f, Rounding r) {
  float lanes[kErrorLanes] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float d = fake_quantize_value(x[i], *p.scale, *p.inv_scale, *p.zero_point, f, r) - x[i];
    lanes[i % kErrorLanes] = std::fma(d, d, lanes[i % kErrorLanes]);
  }
  return sum_error_lanes(lanes);
}

template <class In>
float finite_absmax(const In* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(static_cast<float>(x[i]));
    if (a < INFINITY) m = std::max(m, a);
  }
  return m;
}

}  // namespace scalar_spans

// ---------------------------------------------------------------------------------------------------------------
// AVX-512 path (16 floats per vector).
// ---------------------------------------------------------------------------------------------------------------
namespace avx512 {
#define TQ_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
constexpr int64_t W = 16;
using V = __m512;
using VI = __m512i;
using M = __mmask16;
constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
constexpr int kTruncate = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;

TQ_TARGET inline V set1(float v) { return _mm512_set1_ps(v); }
TQ_TARGET inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
TQ_TARGET inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
TQ_TARGET inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
TQ_TARGET inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c, rounded once
TQ_TARGET inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }  // b when either is NaN
TQ_TARGET inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }  // b when either is NaN
TQ_TARGET inline V vabs(V a) { return _mm512_abs_ps(a); }
TQ_TARGET inline V vround(V a, Rounding r) {
  return r == Rounding::Nearest ? _mm512_roundscale_ps(a, kNearest) : _mm512_roundscale_ps(a, kTruncate);
}
TQ_TARGET inline M is_nan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
TQ_TARGET inline M not_nan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q); }
TQ_TARGET inline M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
TQ_TARGET inline M le(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
TQ_TARGET inline M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
TQ_TARGET inline M both(M a, M b) { return a & b; }
TQ_TARGET inline M first_lanes(int k) { return static_cast<M>((1u << k) - 1); }  // k in [1, W]
TQ_TARGET inline V vload_first(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }  // 0 in other lanes
// sum_error_lanes (quant_math.h) of the kErrorLanes floats in four vectors (lanes 16 j .. 16 j + 15 in v[j]): the same
// additions of the same pairs, in vectors of doubles
TQ_TARGET inline __m512d low_doubles(__m512 a) { return _mm512_cvtps_pd(_mm512_castps512_ps256(a)); }
TQ_TARGET inline __m512d high_doubles(__m512 a) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
TQ_TARGET inline double sum_error_lanes(const __m512* v) {
  // s[0..7], s[8..15], s[16..23], s[24..31] after the first step (lane l + lane l + 32)
  __m512d s0 = _mm512_add_pd(low_doubles(v[0]), low_doubles(v[2]));
  __m512d s1 = _mm512_add_pd(high_doubles(v[0]), high_doubles(v[2]));
  const __m512d s2 = _mm512_add_pd(low_doubles(v[1]), low_doubles(v[3]));
  const __m512d s3 = _mm512_add_pd(high_doubles(v[1]), high_doubles(v[3]));
  s0 = _mm512_add_pd(_mm512_add_pd(s0, s2), _mm512_add_pd(s1, s3));  // the steps of 16, then 8
  const __m256d s4 = _mm256_add_pd(_mm512_castpd512_pd256(s0), _mm512_extractf64x4_pd(s0, 1));
  const __m128d s5 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s5, _mm_unpackhi_pd(s5, s5)));
}
TQ_TARGET inline V select(M m, V if_true, V if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
TQ_TARGET inline float hmax(V a) { return _mm512_reduce_max_ps(a); }
TQ_TARGET inline VI iadd(VI a, VI b) { return _mm512_add_epi32(a, b); }
TQ_TARGET inline VI to_int(V a) { return _mm512_cvtps_epi32(a); }  // a holds integers: exact in any rounding mode
// a rounded to integers (the rounding embedded in the instruction, whatever MXCSR says), 0 where keep is clear.
TQ_TARGET inline VI round_to_int(V a, M keep, Rounding r) {
  return r == Rounding::Nearest ? _mm512_maskz_cvt_roundps_epi32(keep, a, kNearest)
                                : _mm512_maskz_cvt_roundps_epi32(keep, a, kTruncate);
}

TQ_TARGET inline V vload(const float* p) { return _mm512_loadu_ps(p); }
TQ_TARGET inline V vload(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
TQ_TARGET inline V vload(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
TQ_TARGET inline V vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
TQ_TARGET inline V vload(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

TQ_TARGET inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
TQ_TARGET inline void vstore(at::Half* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, kNearest));
}
// c10::BFloat16's rounding: round to nearest even on the upper 16 bits, NaN -> 0x7FC0.
TQ_TARGET inline void vstore(at::BFloat16* p, V v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_blend_epi32(is_nan(v), rounded, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
// v holds integers inside the 8-bit range: keep the low byte of each.
template <class Out, class = std::enable_if_t<kIsByte<Out>>>
TQ_TARGET inline void vstore(Out* p, VI v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v));
}
template <class Out, class = std::enable_if_t<kIsByte<Out>>>
TQ_TARGET inline void vstore(Out* p, V v) { vstore(p, to_int(v)); }
// Four vectors of integers as 4 * W bytes in order, in int16 first (with saturation) offset by c.zero_point (with
// saturation) and clamped to [c.lo, c.hi], then packed to Out (with saturation): one 64-byte store and fewer
// shuffle-port operations than four vstore (per-tensor float32 quantize at 64K: 7.06 -> 6.13 us).
struct ByteClamp {
  __m512i zero_point, lo, hi;  // int16 lanes
};
TQ_TARGET inline ByteClamp byte_clamp(int zero_point, int lo, int hi) {
  return {_mm512_set1_epi16(static_cast<int16_t>(zero_point)), _mm512_set1_epi16(static_cast<int16_t>(lo)),
          _mm512_set1_epi16(static_cast<int16_t>(hi))};
}
TQ_TARGET inline __m512i clamped(__m512i v, const ByteClamp& k) {
  return _mm512_min_epi16(_mm512_max_epi16(_mm512_adds_epi16(v, k.zero_point), k.lo), k.hi);
}
// The int16 lanes of vectors a, b (ab) and c, d (cd) packed to Out with saturation and stored in order.
template <class Out>
TQ_TARGET inline void store_bytes4(Out* p, __m512i ab, __m512i cd) {
  const __m512i bytes = std::is_same_v<Out, uint8_t> ? _mm512_packus_epi16(ab, cd) : _mm512_packs_epi16(ab, cd);
  // dword 4 * lane + j holds vector j's elements 4 * lane .. 4 * lane + 3
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_si512(p, _mm512_permutexvar_epi32(order, bytes));
}
template <class Out>
TQ_TARGET inline void vstore4(Out* p, VI a, VI b, VI c, VI d, const ByteClamp& k) {
  store_bytes4(p, clamped(_mm512_packs_epi32(a, b), k), clamped(_mm512_packs_epi32(c, d), k));
}
// Four vectors of integers inside Out's range (the packs never saturate them).
template <class Out>
TQ_TARGET inline void vstore4(Out* p, VI a, VI b, VI c, VI d) {
  store_bytes4(p, _mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
}
// a converted to integers by the conversion's own rounding: cvtps2dq as MXCSR says (nearest even by default),
// cvttps2dq truncating; NaN, infinities and values outside int32's range give INT_MIN.
TQ_TARGET inline VI convert(V a, Rounding r) {
  return r == Rounding::Nearest ? _mm512_cvtps_epi32(a) : _mm512_cvttps_epi32(a);
}
using IM = __mmask16;  // lanes of an integer vector
TQ_TARGET inline IM int_min_lanes(VI v) { return _mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(INT32_MIN)); }
TQ_TARGET inline IM no_lanes() { return 0; }
TQ_TARGET inline IM either(IM a, IM b) { return a | b; }
TQ_TARGET inline bool any(IM m) { return m != 0; }

#include "cpu/quantize_simd.inc"
#undef TQ_TARGET
}  // namespace avx512

// ---------------------------------------------------------------------------------------------------------------
// AVX2 path (8 floats per vector).
// ---------------------------------------------------------------------------------------------------------------
namespace avx2 {
#define TQ_TARGET __attribute__((target("avx2,fma,f16c")))
constexpr int64_t W = 8;
using V = __m256;
using VI = __m256i;
using M = __m256;  // all-ones / all-zeros lanes
constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
constexpr int kTruncate = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;

TQ_TARGET inline V set1(float v) { return _mm256_set1_ps(v); }
TQ_TARGET inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
TQ_TARGET inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
TQ_TARGET inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
TQ_TARGET inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
TQ_TARGET inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }  // b when either is NaN
TQ_TARGET inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }  // b when either is NaN
TQ_TARGET inline V vabs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
TQ_TARGET inline V vround(V a, Rounding r) {
  return r == Rounding::Nearest ? _mm256_round_ps(a, kNearest) : _mm256_round_ps(a, kTruncate);
}
TQ_TARGET inline M is_nan(V a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
TQ_TARGET inline M not_nan(V a) { return _mm256_cmp_ps(a, a, _CMP_ORD_Q); }
TQ_TARGET inline M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
TQ_TARGET inline M le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
TQ_TARGET inline M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
TQ_TARGET inline M both(M a, M b) { return _mm256_and_ps(a, b); }
TQ_TARGET inline M first_lanes(int k) {  // k in [1, W]
  return _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(static_cast<float>(k)), _CMP_LT_OQ);
}
TQ_TARGET inline V vload_first(const float* p, M m) { return _mm256_maskload_ps(p, _mm256_castps_si256(m)); }
// as avx512::sum_error_lanes, the lanes in eight vectors (8 j .. 8 j + 7 in v[j]), s in vectors of four doubles
TQ_TARGET inline double sum_error_lanes(const __m256* v) {
  __m256d s[8];  // s[k] holds s[4 k .. 4 k + 3] after the first step
  for (int j = 0; j < 4; ++j) {
    s[2 * j] = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v[j])),
                             _mm256_cvtps_pd(_mm256_castps256_ps128(v[j + 4])));
    s[2 * j + 1] = _mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v[j], 1)),
                                 _mm256_cvtps_pd(_mm256_extractf128_ps(v[j + 4], 1)));
  }
  for (int k = 0; k < 4; ++k) s[k] = _mm256_add_pd(s[k], s[k + 4]);  // the step of 16
  for (int k = 0; k < 2; ++k) s[k] = _mm256_add_pd(s[k], s[k + 2]);  // 8
  const __m256d s4 = _mm256_add_pd(s[0], s[1]);  // 4
  const __m128d s5 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s5, _mm_unpackhi_pd(s5, s5)));
}
TQ_TARGET inline V select(M m, V if_true, V if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
TQ_TARGET inline float hmax(V a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
TQ_TARGET inline VI iadd(VI a, VI b) { return _mm256_add_epi32(a, b); }
TQ_TARGET inline VI to_int(V a) { return _mm256_cvtps_epi32(a); }  // a holds integers: exact in any rounding mode
// a rounded to integers, 0 where keep is clear.
TQ_TARGET inline VI round_to_int(V a, M keep, Rounding r) {
  return _mm256_and_si256(to_int(vround(a, r)), _mm256_castps_si256(keep));
}

TQ_TARGET inline V vload(const float* p) { return _mm256_loadu_ps(p); }
TQ_TARGET inline V vload(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TQ_TARGET inline V vload(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
TQ_TARGET inline V vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
TQ_TARGET inline V vload(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Low 16 bits of each 32-bit lane, in order (values already fit in 16 bits unsigned).
TQ_TARGET inline __m128i narrow_to_u16(__m256i v) {
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08));
}
// Low byte of each 32-bit lane, in order.
TQ_TARGET inline __m128i narrow_to_u8(__m256i v) {
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i packed = _mm256_shuffle_epi8(v, low_bytes);
  return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1)));
}

TQ_TARGET inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
TQ_TARGET inline void vstore(at::Half* p, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, kNearest));
}
TQ_TARGET inline void vstore(at::BFloat16* p, V v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  rounded = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), is_nan(v)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow_to_u16(rounded));
}
template <class Out, class = std::enable_if_t<kIsByte<Out>>>
TQ_TARGET inline void vstore(Out* p, VI v) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), narrow_to_u8(v));
}
template <class Out, class = std::enable_if_t<kIsByte<Out>>>
TQ_TARGET inline void vstore(Out* p, V v) { vstore(p, to_int(v)); }
// as avx512::ByteClamp, byte_clamp, store_bytes4, clamped, the vstore4s, convert, IM and its functions
struct ByteClamp {
  __m256i zero_point, lo, hi;  // int16 lanes
};
TQ_TARGET inline ByteClamp byte_clamp(int zero_point, int lo, int hi) {
  return {_mm256_set1_epi16(static_cast<int16_t>(zero_point)), _mm256_set1_epi16(static_cast<int16_t>(lo)),
          _mm256_set1_epi16(static_cast<int16_t>(hi))};
}
template <class Out>
TQ_TARGET inline void store_bytes4(Out* p, __m256i ab, __m256i cd) {
  const __m256i bytes = std::is_same_v<Out, uint8_t> ? _mm256_packus_epi16(ab, cd) : _mm256_packs_epi16(ab, cd);
  // dword 4 * lane + j holds vector j's elements 4 * lane .. 4 * lane + 3
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
TQ_TARGET inline __m256i clamped(__m256i v, const ByteClamp& k) {
  return _mm256_min_epi16(_mm256_max_epi16(_mm256_adds_epi16(v, k.zero_point), k.lo), k.hi);
}
template <class Out>
TQ_TARGET inline void vstore4(Out* p, VI a, VI b, VI c, VI d, const ByteClamp& k) {
  store_bytes4(p, clamped(_mm256_packs_epi32(a, b), k), clamped(_mm256_packs_epi32(c, d), k));
}
template <class Out>
TQ_TARGET inline void vstore4(Out* p, VI a, VI b, VI c, VI d) {
  store_bytes4(p, _mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
}
TQ_TARGET inline VI convert(V a, Rounding r) {
  return r == Rounding::Nearest ? _mm256_cvtps_epi32(a) : _mm256_cvttps_epi32(a);
}
using IM = __m256i;
TQ_TARGET inline IM int_min_lanes(VI v) { return _mm256_cmpeq_epi32(v, _mm256_set1_epi32(INT32_MIN)); }
TQ_TARGET inline IM no_lanes() { return _mm256_setzero_si256(); }
TQ_TARGET inline IM either(IM a, IM b) { return _mm256_or_si256(a, b); }
TQ_TARGET inline bool any(IM m) { return !_mm256_testz_si256(m, m); }

#include "cpu/quantize_simd.inc"
#undef TQ_TARGET
}  // namespace avx2

// The code-path namespaces as types, so the drivers below can take the path as a template argument. dequantize_ns:
// the namespace of dequantize_span, whose output is four times its input: on AVX-512 cores its 256-bit loop (AVX2)
// ran 3-5% faster than the 512-bit one at 64K-256K elements on 2 threads (an Intel Xeon with AMX), level on 1.
#define TQ_ISA_STRUCT(Name, ns, dequantize_ns)                                                                   \
  struct Name {                                                                                                  \
    template <bool PerElement, class In, class Out>                                                              \
    static void quantize_span(const In* x, Out* q, int64_t n, SpanParams p, QuantFormat f, Rounding r) {         \
      ns::quantize_span<PerElement>(x, q, n, p, f, r);                                                          \
    }                                                                                                            \
    template <bool PerElement, class T>                                                                          \
    static void fake_quantize_span(const T* x, T* y, int64_t n, SpanParams p, QuantFormat f, Rounding r) {       \
      ns::fake_quantize_span<PerElement>(x, y, n, p, f, r);                                                     \
    }                                                                                                            \
    template <bool PerElement, class T>                                                                          \
    static void fake_quantize_backward_span(const T* g, const T* x, T* gx, int64_t n, SpanParams p,              \
                                            QuantFormat f, Rounding r) {                                         \
      ns::fake_quantize_backward_span<PerElement>(g, x, gx, n, p, f, r);                                        \
    }                                                                                                            \
    template <bool PerElement, class In, class Out>                                                              \
    static void dequantize_span(const In* q, Out* y, int64_t n, SpanParams p) {                                  \
      dequantize_ns::dequantize_span<PerElement>(q, y, n, p);                                                   \
    }                                                                                                            \
    template <class In>                                                                                          \
    static float finite_absmax(const In* x, int64_t n) {                                                         \
      return ns::finite_absmax(x, n);                                                                            \
    }                                                                                                            \
    static double chunk_error(const float* x, int64_t n, SpanParams p, QuantFormat f, Rounding r) {              \
      return ns::chunk_error(x, n, p, f, r);                                                                     \
    }                                                                                                            \
    template <class A, class B, class Out>                                                                       \
    static void binary_span(const A* a, const B* b, Out* y, int64_t n, const BinaryParams& p) {                  \
      ns::binary_span(a, b, y, n, p);                                                                            \
    }                                                                                                            \
  };
TQ_ISA_STRUCT(Scalar, scalar_spans, scalar_spans)
TQ_ISA_STRUCT(Avx512, avx512, avx2)
TQ_ISA_STRUCT(Avx2, avx2, avx2)
#undef TQ_ISA_STRUCT

// Calls body(Isa{}) with the code path cpu_isa() picks.
template <class Body>
void with_cpu_isa(const Body& body) {
  switch (cpu_isa()) {
    case CpuIsa::Avx512Vnni: body(Avx512{}); break;
    case CpuIsa::Avx2: body(Avx2{}); break;
    case CpuIsa::Scalar: body(Scalar{}); break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Parameters, layout and the parallel span walk.
// ---------------------------------------------------------------------------------------------------------------

struct ChannelParams {  // inline for per-tensor parameters: no heap allocation on a small call
  c10::SmallVector<float, 1> scale, inv_scale, zero_point;
};

// Validates x against scale/zero_point/axis and returns its [outer, channels, inner] view.
QuantLayout checked_layout(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                           std::optional<int64_t> axis) {
  TQ_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x.device());
  return checked_quant_layout(x, scale, zero_point, axis);
}

// scale, 1 / scale and zero_point as floats, each checked (scale positive and finite, zero point in range).
ChannelParams checked_params(const at::Tensor& scale, const at::Tensor& zero_point, float zp_min, float zp_max) {
  // expect_contiguous: a contiguous tensor is borrowed, not copied (each copy is two atomic reference counts).
  const c10::MaybeOwned<at::Tensor> s = scale.expect_contiguous();
  const c10::MaybeOwned<at::Tensor> z = zero_point.expect_contiguous();
  const float* sp = s->data_ptr<float>();
  const int32_t* zp = z->data_ptr<int32_t>();
  ChannelParams p;
  const int64_t n = s->numel();
  p.scale.resize_for_overwrite(n);  // every entry is written below
  p.inv_scale.resize_for_overwrite(n);
  p.zero_point.resize_for_overwrite(n);
  // Local pointers: stores through the vectors' own would reload their data pointers on every channel.
  float* scale_out = p.scale.data();
  float* inv_scale_out = p.inv_scale.data();
  float* zero_point_out = p.zero_point.data();
  for (int64_t c = 0; c < n; ++c) {
    // A normal float32 (>= FLT_MIN) keeps 1 / scale finite, so that x * (1 / scale) is never 0 * inf.
    TQ_CHECK(std::isfinite(sp[c]) && sp[c] >= FLT_MIN,
                "scale must be positive and finite (at least 1.17549e-38), got ", sp[c],
                n > 1 ? " in channel " + std::to_string(c) : std::string());
    TQ_CHECK(zp[c] >= zp_min && zp[c] <= zp_max, "zero_point must be in [", zp_min, ", ", zp_max, "], got ",
                zp[c], n > 1 ? " in channel " + std::to_string(c) : std::string());
    scale_out[c] = sp[c];
    inv_scale_out[c] = 1.0f / sp[c];
    zero_point_out[c] = static_cast<float>(zp[c]);
  }
  return p;
}

// Calls span(offset, length, params, per_element) over [0, numel), in parallel chunks of at least kGrain. The chunk
// body holds everything it reads by value (and span should too): a worker thread reaches it through one pointer,
// where references would make it chase a chain of the calling thread's stack frames, each a cache line still in the
// other core's cache (at 64K elements on 2 threads that chain cost the worker more than a tenth of the call).
template <class Span>
void for_each_span(int64_t numel, QuantLayout layout, const ChannelParams& params, const Span& span) {
  const bool broadcast = layout.channels == 1 || layout.inner >= kBroadcastRowMin;
  const struct {
    const float* scale;
    const float* inv_scale;
    const float* zero_point;
  } p{params.scale.data(), params.inv_scale.data(), params.zero_point.data()};
  at::parallel_for(0, numel, kGrain, [broadcast, layout, p, span](int64_t begin, int64_t end) {
    if (broadcast) {  // one span per row: the row and its channel advance by one (no division per row)
      int64_t row = begin / layout.inner;
      int64_t c = row % layout.channels;
      for (int64_t i = begin; i < end; ++row) {
        const int64_t stop = std::min(end, (row + 1) * layout.inner);
        span(i, stop - i, SpanParams{&p.scale[c], &p.inv_scale[c], &p.zero_point[c]}, false);
        i = stop;
        if (++c == layout.channels) c = 0;
      }
      return;
    }
    if (layout.inner == 1) {  // channels are consecutive elements: the parameter arrays are the buffers
      for (int64_t i = begin; i < end;) {
        const int64_t c = i % layout.channels;
        const int64_t n = std::min(end - i, layout.channels - c);
        span(i, n, SpanParams{&p.scale[c], &p.inv_scale[c], &p.zero_point[c]}, true);
        i += n;
      }
      return;
    }
    float scale[kParamChunk], inv_scale[kParamChunk], zero_point[kParamChunk];
    int64_t pos = begin % layout.inner;
    int64_t c = (begin / layout.inner) % layout.channels;
    for (int64_t i = begin; i < end; i += kParamChunk) {
      const int64_t n = std::min(kParamChunk, end - i);
      for (int64_t j = 0; j < n;) {  // one run of equal parameters per (row, channel)
        const int64_t run = std::min(n - j, layout.inner - pos);
        std::fill_n(scale + j, run, p.scale[c]);
        std::fill_n(inv_scale + j, run, p.inv_scale[c]);
        std::fill_n(zero_point + j, run, p.zero_point[c]);
        j += run;
        pos += run;
        if (pos == layout.inner) {
          pos = 0;
          if (++c == layout.channels) c = 0;
        }
      }
      span(i, n, SpanParams{scale, inv_scale, zero_point}, true);
    }
  });
}

}  // namespace

// Per row: the finite absmax (one read), then the quantization of the row while it is still in cache. The values
// are written as q + offset through the (bits, signed) format [offset - qmax, offset + qmax] with zero point
// `offset`: rne(x / s) is a small integer, so clamp(rne(x / s) + offset) is exactly clamp(rne(x / s)) + offset,
// and NaN lands on offset as it lands on 0.
void quantize_rows_per_token(const at::Tensor& x, int64_t rows, int64_t bits, uint8_t offset, uint8_t* out,
                             int64_t out_row_stride, float* scale) {
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float zero_point = offset;
  const QuantFormat f{zero_point - qmax, zero_point + qmax, false};
  const int64_t row_len = x.size(-1);
  with_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    with_cpu_isa([&](auto isa) {
      using Isa = decltype(isa);
      const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(row_len, 1));
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const T* xr = xp + row * row_len;
          const float absmax = Isa::finite_absmax(xr, row_len);
          const float s = per_token_scale(absmax, qmax);
          const float inv = 1.0f / s;
          scale[row] = s;
          const SpanParams params{&s, &inv, &zero_point};
          uint8_t* qr = out + row * out_row_stride;
          if (offset == 0) {
            Isa::template quantize_span<false>(xr, reinterpret_cast<int8_t*>(qr), row_len, params, f,
                                               Rounding::Nearest);
          } else {
            Isa::template quantize_span<false>(xr, qr, row_len, params, f, Rounding::Nearest);
          }
          if (out_row_stride > row_len) std::memset(qr + row_len, 0, out_row_stride - row_len);  // not on empty q
        }
      });
    });
  });
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------------------------------

// Runs span(isa, per_element, offset, length, params) over [0, numel) on the code path cpu_isa() picks (isa: Scalar,
// Avx2 or Avx512), per_element a std::bool_constant: whether the span carries one parameter per element. span is
// copied into each parallel chunk: it should hold its pointers and values, not references (see for_each_span).
template <class Span>
void map_spans(int64_t numel, QuantLayout layout, const ChannelParams& p, const Span& span) {
  with_cpu_isa([&](auto isa) {
    for_each_span(numel, layout, p, [isa, span](int64_t i, int64_t n, SpanParams sp, bool per_element) {
      if (per_element) span(isa, std::true_type{}, i, n, sp);
      else span(isa, std::false_type{}, i, n, sp);
    });
  });
}

// The checked arguments of quantize, fake_quantize and its backward.
struct QuantizeArgs {
  QuantFormat format;
  Rounding rounding;
  QuantLayout layout;
  ChannelParams params;
};

QuantizeArgs checked_quantize_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                   std::optional<int64_t> axis, int64_t bits, bool is_signed,
                                   c10::string_view rounding) {
  const QuantFormat f = checked_format(bits, is_signed);
  const Rounding r = parse_rounding(rounding);
  const QuantLayout layout = checked_layout(x, scale, zero_point, axis);
  return {f, r, layout, checked_params(scale, zero_point, f.binary ? 0.0f : f.qmin, f.binary ? 0.0f : f.qmax)};
}

// A kernel's output, laid out as its dense input (memory_order.h): straight from the allocator (at::empty would
// dispatch again, which costs as much as the work on a few thousand elements).
at::Tensor empty_like_cpu(const at::Tensor& dense, at::ScalarType dtype) {
  return empty_strided_output(dense.sizes(), dense.strides(), dense.options().dtype(dtype));
}

at::Tensor quantize_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                        std::optional<int64_t> axis, int64_t bits, bool is_signed, c10::string_view rounding) {
  const c10::MaybeOwned<at::Tensor> xc = dense_in_memory(x);
  const QuantizeArgs args = checked_quantize_args(*xc, scale, zero_point, axis, bits, is_signed, rounding);
  at::Tensor q = empty_like_cpu(*xc, is_signed ? at::kChar : at::kByte);
  with_float_type(x.scalar_type(), "x", [&](auto in_tag) {
    using In = decltype(in_tag);
    with_byte_type(q.scalar_type(), "output", [&](auto out_tag) {
      using Out = decltype(out_tag);
      const In* xp = xc->data_ptr<In>();
      Out* qp = q.data_ptr<Out>();
      map_spans(x.numel(), args.layout, args.params, [xp, qp, format = args.format, rounding = args.rounding](
                                                         auto isa, auto per_element, int64_t i, int64_t n,
                                                         SpanParams sp) {
        decltype(isa)::template quantize_span<per_element>(xp + i, qp + i, n, sp, format, rounding);
      });
    });
  });
  return q;
}

at::Tensor dequantize_cpu(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero_point,
                          std::optional<int64_t> axis, at::ScalarType dtype) {
  TQ_CHECK(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte, "q must be int8 or uint8, got ",
              q.scalar_type());
  const c10::MaybeOwned<at::Tensor> qc = dense_in_memory(q);
  const QuantLayout layout = checked_layout(*qc, scale, zero_point, axis);
  const bool is_signed = q.scalar_type() == at::kChar;
  const ChannelParams p = checked_params(scale, zero_point, is_signed ? -128.0f : 0.0f, is_signed ? 127.0f : 255.0f);
  at::Tensor y = empty_like_cpu(*qc, dtype);
  with_byte_type(q.scalar_type(), "q", [&](auto in_tag) {
    using In = decltype(in_tag);
    with_float_type(dtype, "dtype", [&](auto out_tag) {
      using Out = decltype(out_tag);
      const In* qp = qc->data_ptr<In>();
      Out* yp = y.data_ptr<Out>();
      map_spans(q.numel(), layout, p, [qp, yp](auto isa, auto per_element, int64_t i, int64_t n, SpanParams sp) {
        decltype(isa)::template dequantize_span<per_element>(qp + i, yp + i, n, sp);
      });
    });
  });
  return y;
}

at::Tensor fake_quantize_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                             std::optional<int64_t> axis, int64_t bits, bool is_signed, c10::string_view rounding) {
  const c10::MaybeOwned<at::Tensor> xc = dense_in_memory(x);
  const QuantizeArgs args = checked_quantize_args(*xc, scale, zero_point, axis, bits, is_signed, rounding);
  at::Tensor y = empty_like_cpu(*xc, x.scalar_type());
  with_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = xc->data_ptr<T>();
    T* yp = y.data_ptr<T>();
    map_spans(x.numel(), args.layout, args.params, [xp, yp, format = args.format, rounding = args.rounding](
                                                       auto isa, auto per_element, int64_t i, int64_t n,
                                                       SpanParams sp) {
      decltype(isa)::template fake_quantize_span<per_element>(xp + i, yp + i, n, sp, format, rounding);
    });
  });
  return y;
}

// The mse observer's errors: per candidate f and row c, the sum over the row of (fake_quantize(rows[c, r], scale[f, c],
// zero_point[f, c]) - rows[c, r])^2, as float64 [F, C], summed in the order quant_math.h defines (the same sums
// whatever the path and the thread count).
at::Tensor fake_quantize_error_cpu(const at::Tensor& rows, const at::Tensor& scale, const at::Tensor& zero_point,
                                   int64_t bits, bool is_signed, c10::string_view rounding) {
  check_fake_quantize_error_args(rows, scale, zero_point);
  TQ_CHECK(rows.device().is_cpu(), "fake_quantize_error: rows must be a CPU tensor for the CPU kernel, got ",
           rows.device());
  const QuantFormat f = checked_format(bits, is_signed);
  const Rounding r = parse_rounding(rounding);
  const ChannelParams p = checked_params(scale, zero_point, f.binary ? 0.0f : f.qmin, f.binary ? 0.0f : f.qmax);
  const c10::MaybeOwned<at::Tensor> x = rows.expect_contiguous();
  const int64_t channels = x->size(0), length = x->size(1), candidates = scale.size(0);
  const int64_t chunks = ceil_div(length, kErrorChunk);
  // [candidate][channel][chunk]
  std::vector<double> chunk_sums(checked_mul("fake_quantize_error", "the chunk count",
                                             checked_mul("fake_quantize_error", "the row count", candidates, channels),
                                             chunks));
  const float* xp = x->data_ptr<float>();
  with_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    at::parallel_for(0, channels * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / chunks, k = item % chunks;
        const float* xk = xp + c * length + k * kErrorChunk;
        const int64_t n = std::min(kErrorChunk, length - k * kErrorChunk);
        for (int64_t candidate = 0; candidate < candidates; ++candidate) {
          const int64_t q = candidate * channels + c;
          chunk_sums[q * chunks + k] =
              Isa::chunk_error(xk, n, SpanParams{&p.scale[q], &p.inv_scale[q], &p.zero_point[q]}, f, r);
        }
      }
    });
  });
  at::Tensor errors = at::empty({candidates, channels}, x->options().dtype(at::kDouble));
  double* out = errors.data_ptr<double>();
  for (int64_t q = 0; q < candidates * channels; ++q) {
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) sum += chunk_sums[q * chunks + k];
    out[q] = sum;
  }
  return errors;
}

at::Tensor fake_quantize_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& zero_point, std::optional<int64_t> axis, int64_t bits,
                                      bool is_signed, c10::string_view rounding) {
  const c10::MaybeOwned<at::Tensor> xc = dense_in_memory(x);
  const QuantizeArgs args = checked_quantize_args(*xc, scale, zero_point, axis, bits, is_signed, rounding);
  check_grad_like(grad, x);
  const c10::MaybeOwned<at::Tensor> gc = in_layout_of(grad, *xc);
  at::Tensor grad_x = empty_like_cpu(*xc, x.scalar_type());
  with_float_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = xc->data_ptr<T>();
    const T* gp = gc->data_ptr<T>();
    T* op = grad_x.data_ptr<T>();
    map_spans(x.numel(), args.layout, args.params, [gp, xp, op, format = args.format, rounding = args.rounding](
                                                       auto isa, auto per_element, int64_t i, int64_t n,
                                                       SpanParams sp) {
      decltype(isa)::template fake_quantize_backward_span<per_element>(gp + i, xp + i, op + i, n, sp, format,
                                                                        rounding);
    });
  });
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x, int64_t bits) {
  TQ_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x.device());
  TQ_CHECK(x.dim() >= 1, "x must have at least 1 dimension (tokens along the last)");
  TQ_CHECK(bits >= 2 && bits <= 8, "bits must be in [2, 8] for per-token quantization, got ", bits);
  at::Tensor q = empty_output(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = empty_output(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  quantize_rows_per_token(x.contiguous(), scale.numel(), bits, 0, static_cast<uint8_t*>(q.data_ptr()), x.size(-1),
                          scale.data_ptr<float>());
  return {q, scale};
}

// A walk over a dense output whose small operand is broadcast (expanded: its expansion to out's shape): the
// output's dims in memory order, coalesced from the innermost while the operand's strides follow, make rows of
// `inner` elements along which it steps by small_inner_stride (0: one value a row, 1: consecutive values); the outer
// dims give each row's offset into it.
struct BroadcastRows {
  int64_t inner = 1, small_inner_stride = 0;
  c10::SmallVector<int64_t, 6> sizes, small_strides;  // the outer dims, outermost first

  int64_t small_offset(int64_t row) const {
    int64_t offset = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      offset += row % sizes[d] * small_strides[d];
      row /= sizes[d];
    }
    return offset;
  }
};

// The rows of out (dense) and expanded, or nullopt where expanded steps otherwise than by 0 or 1 along them.
std::optional<BroadcastRows> broadcast_rows(const at::Tensor& out, const at::Tensor& expanded) {
  c10::SmallVector<int64_t, 6> dims;
  for (int64_t d = 0; d < out.dim(); ++d)
    if (out.size(d) > 1) dims.push_back(d);
  std::sort(dims.begin(), dims.end(), [&](int64_t x, int64_t y) { return out.stride(x) > out.stride(y); });
  BroadcastRows rows;
  size_t outer = dims.size();
  if (outer > 0) {
    rows.inner = out.size(dims[--outer]);
    rows.small_inner_stride = expanded.stride(dims[outer]);
    while (outer > 0 && expanded.stride(dims[outer - 1]) == rows.small_inner_stride * rows.inner)
      rows.inner *= out.size(dims[--outer]);
  }
  if (rows.small_inner_stride != 0 && rows.small_inner_stride != 1) return std::nullopt;
  for (size_t k = 0; k < outer; ++k) {
    rows.sizes.push_back(out.size(dims[k]));
    rows.small_strides.push_back(expanded.stride(dims[k]));
  }
  return rows;
}

// An operand's scale and zero point as the element map reads them (the zero point of int8 bytes read as uint8
// moved by 128).
struct OperandQuant {
  float scale, zero_point;
};

constexpr int64_t kRepeatChunk = 1024;  // floats of the buffer that repeats a row's values of the small operand

// quantized_mul of `full` (laid out as the dense output y) and `small` broadcast along rows (small_values: its
// elements, contiguous, which rows index): small's values are dequantized once ((float(v) - zero point) * scale, the
// element map's own rounding), then the map runs with full as its a and those values as its b, of scale 1 and zero
// point 0, which leave them as they are ((v - 0) * 1 == v); the product commutes exactly. Consecutive rows that read
// the same values (the pixels of one image against its gate) run as one span against a buffer that repeats them,
// so that short rows (a gate over a few channels) do not each end in a scalar tail.
template <class Isa, class Full, class Small, class Out>
void broadcast_product(const Full* full, OperandQuant full_q, const Small* small_values, int64_t small_numel,
                       OperandQuant small_q, const BroadcastRows& rows, Out* y, int64_t numel, const BinaryMap& map) {
  std::vector<float> small_float(small_numel);
  Isa::template dequantize_span<false>(small_values, small_float.data(), small_numel,
                                       SpanParams{&small_q.scale, /*inv_scale (unread)=*/nullptr, &small_q.zero_point});
  BinaryParams p{full_q.scale, 1.0f, map};
  p.map.a_zero_point = full_q.zero_point;
  p.map.b_zero_point = 0.0f;
  const int64_t inner = rows.inner;
  const int64_t unit = rows.small_inner_stride == 1 ? inner : 1;  // the values of one row
  const bool buffered = unit <= kRepeatChunk / 2;
  const int64_t chunk = buffered ? kRepeatChunk / unit * unit : inner;  // elements a span covers, whole rows
  at::parallel_for(0, numel / inner, std::max<int64_t>(1, kGrain / inner), [&](int64_t begin, int64_t end) {
    float repeated[kRepeatChunk];
    int64_t repeated_offset = -1, repeated_length = 0;  // the values that `repeated` holds: where, how many
    for (int64_t row = begin; row < end;) {
      const int64_t offset = rows.small_offset(row);
      int64_t run = 1;  // consecutive rows reading the same values (consecutive in memory too)
      while (row + run < end && rows.small_offset(row + run) == offset) ++run;
      const float* values = small_float.data() + offset;
      const int64_t start = row * inner, n = run * inner;
      if (buffered && (repeated_offset != offset || repeated_length < std::min(chunk, n))) {
        repeated_length = std::min(chunk, n);  // (whole rows: n and chunk are multiples of unit)
        for (int64_t i = 0; i < repeated_length; i += unit) std::copy(values, values + unit, repeated + i);
        repeated_offset = offset;
      }
      for (int64_t i = 0; i < n; i += chunk)
        Isa::binary_span(full + start + i, buffered ? repeated : values, y + start + i, std::min(chunk, n - i), p);
      row += run;
    }
  });
}

// quantized_add / quantized_mul (kind): an element-wise map over a, b and the output laid out alike in memory
// (prepare_quantized_binary), or for a product with one operand broadcast, over rows of its dequantized values
// (broadcast_product).
at::Tensor quantized_binary_cpu(const char* op, BinaryOp kind, const at::Tensor& a, const at::Tensor& a_scale,
                                int64_t a_zero_point, const at::Tensor& b, const at::Tensor& b_scale,
                                int64_t b_zero_point, at::ScalarType out_dtype, std::optional<double> out_scale,
                                int64_t out_zero_point, int64_t out_bits, bool relu) {
  TQ_CHECK(a.device().is_cpu(), op, ": a must be a CPU tensor for the CPU kernel, got ", a.device());
  BinaryTensors t = prepare_quantized_binary(op, kind, a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_dtype,
                                             out_scale, out_zero_point, out_bits, relu, /*keep_broadcast=*/true);
  const at::Tensor a_scale_1 = a_scale.reshape({1}).contiguous(), b_scale_1 = b_scale.reshape({1}).contiguous();
  check_scale_values(op, "a_scale", a_scale_1);
  check_scale_values(op, "b_scale", b_scale_1);
  const int64_t numel = t.out.numel();
  if (numel == 0) return t.out;
  const float as = *a_scale_1.data_ptr<float>(), bs = *b_scale_1.data_ptr<float>();
  // the operand kept broadcast (a where it is, else b; the other is laid out as the output): its contiguous values
  // and their rows
  const bool small_is_a = a.sizes() != t.out.sizes();
  const at::Tensor& small = small_is_a ? a : b;
  at::Tensor& small_operand = small_is_a ? t.a : t.b;
  const at::Tensor& full_operand = small_is_a ? t.b : t.a;
  const OperandQuant a_q{as, t.map.a_zero_point}, b_q{bs, t.map.b_zero_point};
  const OperandQuant small_q = small_is_a ? a_q : b_q, full_q = small_is_a ? b_q : a_q;
  const at::Tensor small_values = small.sizes() != t.out.sizes() ? small.contiguous() : at::Tensor();
  std::optional<BroadcastRows> rows;
  if (small_values.defined()) {
    rows = broadcast_rows(t.out, small_values.expand(t.out.sizes()));
    if (!rows) small_operand = laid_out_as(small_values.expand(t.out.sizes()), t.out);
  }
  with_cpu_isa([&](auto isa) {
    using Isa = decltype(isa);
    if (rows) {
      with_binary_pointers(full_operand, small_values, t.out, [&](const auto* fp, const auto* sp, auto* yp) {
        broadcast_product<Isa>(fp, full_q, sp, small_values.numel(), small_q, *rows, yp, numel, t.map);
      });
      return;
    }
    with_binary_pointers(t.a, t.b, t.out, [&](const auto* ap, const auto* bp, auto* yp) {
      at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
        Isa::binary_span(ap + begin, bp + begin, yp + begin, end - begin, BinaryParams{as, bs, t.map});
      });
    });
  });
  return t.out;
}

at::Tensor quantized_add_cpu(const at::Tensor& a, const at::Tensor& a_scale, int64_t a_zero_point, const at::Tensor& b,
                             const at::Tensor& b_scale, int64_t b_zero_point, at::ScalarType out_dtype,
                             std::optional<double> out_scale, int64_t out_zero_point, bool relu, int64_t out_bits) {
  return quantized_binary_cpu("quantized_add", BinaryOp::Add, a, a_scale, a_zero_point, b, b_scale, b_zero_point,
                              out_dtype, out_scale, out_zero_point, out_bits, relu);
}

at::Tensor quantized_mul_cpu(const at::Tensor& a, const at::Tensor& a_scale, int64_t a_zero_point, const at::Tensor& b,
                             const at::Tensor& b_scale, int64_t b_zero_point, at::ScalarType out_dtype,
                             std::optional<double> out_scale, int64_t out_zero_point, int64_t out_bits) {
  return quantized_binary_cpu("quantized_mul", BinaryOp::Multiply, a, a_scale, a_zero_point, b, b_scale,
                              b_zero_point, out_dtype, out_scale, out_zero_point, out_bits, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("quantized_add", &quantized_add_cpu);
  m.impl("quantized_mul", &quantized_mul_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("fake_quantize", &fake_quantize_cpu);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cpu);
  m.impl("fake_quantize_error", &fake_quantize_error_cpu);
  m.impl("quantize_per_token", &quantize_per_token_cpu);
}

}  // namespace torchquant
