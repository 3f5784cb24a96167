// Run-time choice of the CPU instruction set for the kernels that have several code paths.
// TORCHQUANT_CPU_ISA=avx512_vnni|avx2|scalar forces a path (lower than the CPU supports) so tests can run each one.
#pragma once
#include "check.h"
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

// Function attributes of the code paths that cpu_isa() chooses between (what detected_cpu_isa() checks for).
#define TQ_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TQ_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// The byte permutes (vpermb / vpermi2b) that table lookups use on the avx512_vnni path, where cpu_has_avx512_vbmi().
#define TQ_TARGET_VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi")))

namespace torchquant {

enum class CpuIsa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };

inline CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return CpuIsa::Avx512Vnni;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return CpuIsa::Avx2;
    return CpuIsa::Scalar;
  }();
  return isa;
}

// AVX-512 VBMI is not part of any path's requirements (some AVX-512 VNNI CPUs lack it): kernels that use it check
// this as well as cpu_isa() == CpuIsa::Avx512Vnni.
inline bool cpu_has_avx512_vbmi() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") != 0;
  }();
  return has;
}

// The path to run now: the detected one, or the one TORCHQUANT_CPU_ISA asks for (read on every call so tests
// can switch paths inside one process; getenv is cheap next to any kernel launch).
inline CpuIsa cpu_isa() {
  const CpuIsa detected = detected_cpu_isa();
  const char* forced = std::getenv("TORCHQUANT_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') return detected;
  CpuIsa want;
  if (std::strcmp(forced, "avx512_vnni") == 0) want = CpuIsa::Avx512Vnni;
  else if (std::strcmp(forced, "avx2") == 0) want = CpuIsa::Avx2;
  else if (std::strcmp(forced, "scalar") == 0) want = CpuIsa::Scalar;
  else TQ_CHECK(false, "TORCHQUANT_CPU_ISA must be avx512_vnni, avx2 or scalar, got '", forced, "'");
  TQ_CHECK(static_cast<int>(want) <= static_cast<int>(detected), "TORCHQUANT_CPU_ISA=", forced,
              " is not supported by this CPU");
  return want;
}

}  // namespace torchquant
