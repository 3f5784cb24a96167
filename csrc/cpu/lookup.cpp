// CPU kernel of quantized_lookup (schema in csrc/ops.cpp): y[i] = table[uint8 bits of x[i]].
//
// On the avx512_vnni path of a CPU with AVX-512 VBMI, the 256-byte table sits in four zmm registers and each 64
// bytes of x take two two-register byte permutes (vpermi2b, indexed by the low 7 bits: table[0, 128) and
// table[128, 256)) and a blend on the index's top bit. Every other path runs the plain byte loop (there is no byte
// gather to vectorize it with).
#include "cpu/simd.h"  // first: see there
#include "check.h"

#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cpu/isa.h"

namespace torchquant {
namespace {

void lookup_span_scalar(const uint8_t* x, uint8_t* y, int64_t n, const uint8_t* table) {
  for (int64_t i = 0; i < n; ++i) y[i] = table[x[i]];
}

TQ_TARGET_VBMI inline __m512i lookup_64(__m512i idx, __m512i t0, __m512i t1, __m512i t2, __m512i t3) {
  const __m512i low = _mm512_permutex2var_epi8(t0, idx, t1);
  const __m512i high = _mm512_permutex2var_epi8(t2, idx, t3);
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), low, high);
}

TQ_TARGET_VBMI void lookup_span_vbmi(const uint8_t* x, uint8_t* y, int64_t n, const uint8_t* table) {
  const __m512i t0 = _mm512_loadu_si512(table), t1 = _mm512_loadu_si512(table + 64);
  const __m512i t2 = _mm512_loadu_si512(table + 128), t3 = _mm512_loadu_si512(table + 192);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    _mm512_storeu_si512(y + i, lookup_64(_mm512_loadu_si512(x + i), t0, t1, t2, t3));
  if (i < n) {
    const __mmask64 tail = (__mmask64{1} << (n - i)) - 1;
    _mm512_mask_storeu_epi8(y + i, tail, lookup_64(_mm512_maskz_loadu_epi8(tail, x + i), t0, t1, t2, t3));
  }
}

at::Tensor quantized_lookup_cpu(const at::Tensor& x, const at::Tensor& table) {
  TQ_CHECK(x.device().is_cpu(), "quantized_lookup: x must be a CPU tensor for the CPU kernel, got ", x.device());
  const LookupTensors t = prepare_quantized_lookup(x, table);
  if (t.numel == 0) return t.out;
  const bool vbmi = cpu_isa() == CpuIsa::Avx512Vnni && cpu_has_avx512_vbmi();
  // bytes per parallel task: the permutes map 70-100 bytes a nanosecond, so below 256 KiB waking a second thread costs
  // more than it saves; the byte loop runs ~20x slower
  const int64_t grain = vbmi ? (int64_t{1} << 18) : (int64_t{1} << 14);
  const auto span = vbmi ? lookup_span_vbmi : lookup_span_scalar;
  at::parallel_for(0, t.numel, grain, [&](int64_t begin, int64_t end) {
    span(t.x_bytes + begin, t.out_bytes + begin, end - begin, t.table_bytes);
  });
  return t.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchquant, CPU, m) { m.impl("quantized_lookup", &quantized_lookup_cpu); }

}  // namespace torchquant
