// cpu_kernel_path: the name of the instruction-set path cpu_isa() picks (the detected one, or the one
// TORCHQUANT_CPU_ISA forces), so users and benchmarks can see which kernels run. cpu_multiply_add_peak: the
// physical limit of that path's GEMMs, measured on this core.
#include "cpu/simd.h"  // first: see there
#include "isa.h"

#include <time.h>

#include <string>

#include <torch/library.h>

namespace torchquant {

namespace {

double thread_seconds() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// The loops are written in assembly so that the compiler can neither compute the products once nor keep the
// accumulators on the stack: the instruction stream is exactly the one measured. Register values do not change the
// instructions' speed.

// The loops' registers (x/y/zmm0-13): zeroed before the loop, and declared clobbered.
#define TQ_ZERO_REGISTERS                                                                                   \
  "vpxor %%xmm0, %%xmm0, %%xmm0\n\tvpxor %%xmm1, %%xmm1, %%xmm1\n\tvpxor %%xmm2, %%xmm2, %%xmm2\n\t"             \
  "vpxor %%xmm3, %%xmm3, %%xmm3\n\tvpxor %%xmm4, %%xmm4, %%xmm4\n\tvpxor %%xmm5, %%xmm5, %%xmm5\n\t"             \
  "vpxor %%xmm6, %%xmm6, %%xmm6\n\tvpxor %%xmm7, %%xmm7, %%xmm7\n\tvpxor %%xmm8, %%xmm8, %%xmm8\n\t"             \
  "vpxor %%xmm9, %%xmm9, %%xmm9\n\tvpxor %%xmm10, %%xmm10, %%xmm10\n\tvpxor %%xmm11, %%xmm11, %%xmm11\n\t"       \
  "vpxor %%xmm12, %%xmm12, %%xmm12\n\tvpxor %%xmm13, %%xmm13, %%xmm13\n\t"
#define TQ_USED_REGISTERS                                                                                   \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", \
      "cc"

// vpdpbusd into 12 independent accumulators (more than its latency times its throughput on current cores): 64 u8 x
// s8 multiply-adds an instruction.
TQ_TARGET_VNNI void vnni_multiply_adds(int64_t iterations) {
  __asm__ volatile(
      TQ_ZERO_REGISTERS
      "1:\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm0\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm1\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm2\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm3\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm4\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm5\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm6\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm7\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm8\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm9\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm10\n\t"
      "vpdpbusd %%zmm13, %%zmm12, %%zmm11\n\t"
      "dec %0\n\t"
      "jnz 1b\n\t"
      : "+r"(iterations)
      :
      : TQ_USED_REGISTERS);
  _mm256_zeroupper();
}

// The exact AVX2 path's pair, vpmaddwd (16 int16 products summed in pairs) + vpaddd, into 8 accumulators.
TQ_TARGET_AVX2 void avx2_multiply_adds(int64_t iterations) {
  __asm__ volatile(
      TQ_ZERO_REGISTERS
      "1:\n\t"
      "vpmaddwd %%ymm12, %%ymm13, %%ymm8\n\t"
      "vpaddd %%ymm8, %%ymm0, %%ymm0\n\t"
      "vpmaddwd %%ymm12, %%ymm13, %%ymm9\n\t"
      "vpaddd %%ymm9, %%ymm1, %%ymm1\n\t"
      "vpmaddwd %%ymm12, %%ymm13, %%ymm10\n\t"
      "vpaddd %%ymm10, %%ymm2, %%ymm2\n\t"
      "vpmaddwd %%ymm12, %%ymm13, %%ymm11\n\t"
      "vpaddd %%ymm11, %%ymm3, %%ymm3\n\t"
      "vpmaddwd %%ymm12, %%ymm13, %%ymm8\n\t"
      "vpaddd %%ymm8, %%ymm4, %%ymm4\n\t"
      "vpmaddwd %%ymm12, %%ymm13, %%ymm9\n\t"
      "vpaddd %%ymm9, %%ymm5, %%ymm5\n\t"
      "vpmaddwd %%ymm12, %%ymm13, %%ymm10\n\t"
      "vpaddd %%ymm10, %%ymm6, %%ymm6\n\t"
      "vpmaddwd %%ymm12, %%ymm13, %%ymm11\n\t"
      "vpaddd %%ymm11, %%ymm7, %%ymm7\n\t"
      "dec %0\n\t"
      "jnz 1b\n\t"
      : "+r"(iterations)
      :
      : TQ_USED_REGISTERS);
  _mm256_zeroupper();
}

// tdpbusd into 4 tile accumulators (16 x 16 int32 each) from 2 + 2 operand tiles of 16 x 64 bytes: 16 x 16 x 64
// u8 x s8 multiply-adds an instruction, the avx512_amx path's GEMM step.
TQ_TARGET_AMX void amx_multiply_adds(int64_t iterations) {
  configure_amx(kAmxTileRows, kAmxTileRows);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t i = 0; i < iterations; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_release();
}

}  // namespace

static std::string cpu_kernel_path() {
  bool amx = false;
  switch (cpu_isa(&amx)) {
    case CpuIsa::Avx512Vnni: return amx ? "avx512_amx" : "avx512_vnni";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Scalar: break;
  }
  return "scalar";
}

// Multiply-adds per second of this thread's CPU time in `iterations` rounds of the current path's loop above;
// 0 on the scalar path, which has no instruction to measure.
static double cpu_multiply_add_peak(int64_t iterations) {
  TQ_CHECK(iterations >= 1, "cpu_multiply_add_peak: iterations must be >= 1, got ", iterations);
  bool amx = false;
  const CpuIsa isa = cpu_isa(&amx);
  if (isa == CpuIsa::Scalar) return 0.0;
  const double start = thread_seconds();
  double multiply_adds;
  if (amx) {
    amx_multiply_adds(iterations);
    multiply_adds = 4.0 * 16 * 16 * 64 * static_cast<double>(iterations);
  } else if (isa == CpuIsa::Avx512Vnni) {
    vnni_multiply_adds(iterations);
    multiply_adds = 12.0 * 64.0 * static_cast<double>(iterations);
  } else {
    avx2_multiply_adds(iterations);
    multiply_adds = 8.0 * 16.0 * static_cast<double>(iterations);
  }
  return multiply_adds / (thread_seconds() - start);
}

}  // namespace torchquant

// No tensor arguments, so no device to dispatch on: one kernel for every dispatch key.
TORCH_LIBRARY_IMPL(torchquant, CompositeExplicitAutograd, m) {
  m.impl("cpu_kernel_path", &torchquant::cpu_kernel_path);
  m.impl("cpu_multiply_add_peak", &torchquant::cpu_multiply_add_peak);
}
