// Run-time choice of the CPU instruction set for the kernels that have several code paths.
// TORCHQUANT_CPU_ISA=avx512_amx|avx512_vnni|avx2|scalar forces a path (lower than the CPU supports) so tests can run
// each one. avx512_amx is the avx512_vnni path whose GEMMs multiply on AMX tiles (tdpbusd).
#pragma once
#include "cpu/simd.h"  // the AMX intrinsics (sources include it first; see there)
#include "check.h"
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

// Function attributes of the code paths that cpu_isa() chooses between (what detected_cpu_isa() checks for).
#define TQ_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TQ_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// The byte permutes (vpermb / vpermi2b) that table lookups use on the avx512_vnni path, where cpu_has_avx512_vbmi().
#define TQ_TARGET_VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi")))
// The AMX tile kernels of the avx512_amx path (they also run the avx512_vnni path's code).
#define TQ_TARGET_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

namespace torchquant {

constexpr int kAmxTileRows = 16;  // the most rows of an AMX tile

// Palette 1's tile configuration (the layout ldtilecfg reads), as the AMX kernels use the tiles: 0-3 the int32 sums
// of rows [0, 16) x columns [0, 16), rows [0, 16) x [16, 32), rows [16, 32) x [0, 16), [16, 32) x [16, 32); 4 and 5
// activation rows [0, 16) and [16, 32) (64 bytes each); 6 and 7 weight columns [0, 16) and [16, 32) (16 k-steps).
// With a single tile of rows (multiply_amx's four-sum path, configured (rows, rows)) 0-3 hold rows [0, rows) x
// columns [0, 16), [16, 32), [32, 48), [48, 64) and 5 is unused. A tile of 0 rows is left unconfigured. int8_mm's
// kernel for rows against b's columns read in place (multiply_rows_amx, configured (16, 16)) has the operands the
// other way round: 4 and 5 hold columns of b, 6 and 7 rows of a, and 0-3 sums transposed (see there).
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration above with rows_lo rows in the tiles of rows [0, 16) and rows_hi in those of [16, 32)
// (a new configuration zeroes every tile).
TQ_TARGET_AMX inline void configure_amx(int rows_lo, int rows_hi) {
  AmxConfig c;
  const int rows[8] = {rows_lo, rows_lo, rows_hi, rows_hi, rows_lo, rows_hi, kAmxTileRows, kAmxTileRows};
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(rows[t]);
    c.bytes_per_row[t] = rows[t] > 0 ? 64 : 0;
  }
  // GCC does not count the configuration as read by _tile_loadconfig and drops the stores that fill it in: the
  // barrier makes them happen first
  __asm__ volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

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

// Whether this CPU has AMX with int8 tiles and Linux lets this process use them: the tile data is state that the
// kernel saves only for processes that ask for it (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; without
// it the first tile instruction raises SIGILL). Asked once, for the whole process.
inline bool detected_cpu_amx() {
  static const bool has = [] {
    __builtin_cpu_init();
    if (detected_cpu_isa() != CpuIsa::Avx512Vnni || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-int8"))
      return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
}

// The path to run now: the detected one, or the one TORCHQUANT_CPU_ISA asks for (read on every call so tests
// can switch paths inside one process; getenv is cheap next to any kernel launch). amx: whether the GEMMs multiply
// on AMX tiles (the avx512_amx path), where the caller asks.
inline CpuIsa cpu_isa(bool* amx = nullptr) {
  const CpuIsa detected = detected_cpu_isa();
  const char* forced = std::getenv("TORCHQUANT_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') {
    if (amx != nullptr) *amx = detected_cpu_amx();
    return detected;
  }
  CpuIsa want;
  const bool want_amx = std::strcmp(forced, "avx512_amx") == 0;
  if (want_amx || std::strcmp(forced, "avx512_vnni") == 0) want = CpuIsa::Avx512Vnni;
  else if (std::strcmp(forced, "avx2") == 0) want = CpuIsa::Avx2;
  else if (std::strcmp(forced, "scalar") == 0) want = CpuIsa::Scalar;
  else TQ_CHECK(false, "TORCHQUANT_CPU_ISA must be avx512_amx, avx512_vnni, avx2 or scalar, got '", forced, "'");
  TQ_CHECK(static_cast<int>(want) <= static_cast<int>(detected) && (!want_amx || detected_cpu_amx()),
           "TORCHQUANT_CPU_ISA=", forced, " is not supported by this CPU");
  if (amx != nullptr) *amx = want_amx;
  return want;
}

}  // namespace torchquant
