// CUTLASS sm_90a GEMM: int8 x int8 -> int32 (int8_mm; see cutlass_gemm.cuh).
#include "cuda/sm90/cutlass_gemm.cuh"

namespace torchquant::sm90 {

void run_cutlass_gemm(CutlassTile tile, const GemmArgs& args, const Int32Epilogue& epilogue) {
  if (tile == CutlassTile::Large) run_int32<LargeConfig>(args, epilogue);
  else run_int32<StreamKConfig>(args, epilogue);
}

}  // namespace torchquant::sm90
