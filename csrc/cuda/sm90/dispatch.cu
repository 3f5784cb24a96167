// Host-side choices for the CUTLASS sm_90a GEMMs: which kernel shape, whether a GEMM qualifies, and the
// (activation, output) type switch onto the translation units that instantiate them.
#include <ATen/cuda/CUDAContext.h>
#include <cutlass/numeric_types.h>

#include "check.h"
#include "cuda/common.cuh"
#include "cuda/sm90/cutlass_gemm.h"

namespace torchquant::sm90 {

CutlassTile cutlass_tile_for(int64_t m, int64_t n) {
  const int64_t tiles = ((m + 127) / 128) * ((n + 255) / 256);
  return tiles >= at::cuda::getCurrentDeviceProperties()->multiProcessorCount ? CutlassTile::Large
                                                                               : CutlassTile::StreamK;
}

bool cutlass_can_run(const GemmArgs& args, const void* out, int64_t ldo, int64_t out_element_size) {
  return args.groups == 1 && args.k % 16 == 0 && args.lda % 16 == 0 && args.ldb % 16 == 0 &&
         is_aligned<int8_t, 16>(static_cast<const int8_t*>(args.a)) && is_aligned<int8_t, 16>(args.b) &&
         (ldo * out_element_size) % 16 == 0 && (args.n * out_element_size) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

void run_cutlass_gemm(CutlassTile tile, bool a_unsigned, const GemmArgs& args, const DequantEpilogue& epilogue) {
  // one call per (activation, output) pair; A_TYPE is the activation type
#define TQ_OUT_SWITCH(A_TYPE)                                                                              \
  switch (epilogue.kind) {                                                                                 \
    case OutKind::Float32: return run_cutlass_dequant<A_TYPE, float>(tile, args, epilogue);                \
    case OutKind::Float16: return run_cutlass_dequant<A_TYPE, cutlass::half_t>(tile, args, epilogue);      \
    case OutKind::BFloat16: return run_cutlass_dequant<A_TYPE, cutlass::bfloat16_t>(tile, args, epilogue); \
    case OutKind::Int8: return run_cutlass_dequant<A_TYPE, int8_t>(tile, args, epilogue);                  \
    case OutKind::UInt8: return run_cutlass_dequant<A_TYPE, uint8_t>(tile, args, epilogue);                \
    case OutKind::Int32: break;                                                                            \
  }
  if (a_unsigned) {
    TQ_OUT_SWITCH(uint8_t)
  } else {
    TQ_OUT_SWITCH(int8_t)
  }
#undef TQ_OUT_SWITCH
  TQ_CHECK(false, "int8 GEMM: unknown output kind");
}

}  // namespace torchquant::sm90
