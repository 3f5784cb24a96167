// CUTLASS sm_90a GEMM: uint8_t activations, cutlass::half_t output (see cutlass_gemm.cuh).
#include "cuda/sm90/cutlass_gemm.cuh"

namespace torchquant::sm90 {
template void run_cutlass_dequant<uint8_t, cutlass::half_t>(CutlassTile, const GemmArgs&, const DequantEpilogue&);
}  // namespace torchquant::sm90
