// The CUTLASS sm_90a int8 GEMMs (cutlass_gemm.cuh) as gemm.cu's dispatch sees them: plain functions, no CUTLASS
// headers. Built only with the sm_90a target (setup.py defines TORCHQUANT_CUTLASS then); the kernels run on compute
// capability 9.0 devices only.
#pragma once
#include <cstdint>

#include "cuda/gemm.cuh"

namespace torchquant::sm90 {

// Kernel shapes (cutlass_gemm.cuh): Large for grids that fill the GPU, StreamK for fewer tiles than
// multiprocessors (small M against N), where stream-K spreads K over the idle ones.
enum class CutlassTile { Large, StreamK };

// Large when its 128 x 256 tiles cover every multiprocessor at least once, else StreamK.
CutlassTile cutlass_tile_for(int64_t m, int64_t n);

// Whether the kernels can take the GEMM: one group, 16-byte aligned operand rows (K is a multiple of 16 already) and
// output rows: TMA stores need N * element size, ldo * element size and the output pointer to be multiples of 16
// bytes.
bool cutlass_can_run(const GemmArgs& args, const void* out, int64_t ldo, int64_t out_element_size);

void run_cutlass_gemm(CutlassTile tile, const GemmArgs& args, const Int32Epilogue& epilogue);
void run_cutlass_gemm(CutlassTile tile, bool a_unsigned, const GemmArgs& args, const DequantEpilogue& epilogue);

// One (activation type, output type) pair; explicitly instantiated, each pair in its own translation unit.
template <class A, class Out>
void run_cutlass_dequant(CutlassTile tile, const GemmArgs& args, const DequantEpilogue& epilogue);

}  // namespace torchquant::sm90
