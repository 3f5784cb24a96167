// CUTLASS sm_90a GEMM: int8_t activations, cutlass::bfloat16_t output (see cutlass_gemm.cuh).
#include "cuda/sm90/cutlass_gemm.cuh"

namespace torchquant::sm90 {
template void run_cutlass_dequant<int8_t, cutlass::bfloat16_t>(CutlassTile, const GemmArgs&, const DequantEpilogue&);
}  // namespace torchquant::sm90
