// CUTLASS sm_90a implicit-GEMM conv: cutlass::bfloat16_t output, int8 and uint8 activations (see cutlass_conv.cuh).
#include "cuda/sm90/cutlass_conv.cuh"

namespace torchquant::sm90 {
template bool run_cutlass_conv_dequant<int8_t, cutlass::bfloat16_t>(const ConvGeometry&, const ConvOperands&, int64_t,
                                                    const DequantEpilogue&);
template bool run_cutlass_conv_dequant<uint8_t, cutlass::bfloat16_t>(const ConvGeometry&, const ConvOperands&, int64_t,
                                                     const DequantEpilogue&);
}  // namespace torchquant::sm90
