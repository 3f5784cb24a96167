// Per-token (per-row) symmetric quantization on the CPU, shared by quantize_per_token (csrc/cpu/quantize.cpp) and
// the fused int8_linear_dynamic (csrc/cpu/gemm.cpp), which writes the GEMM's activation rows with it.
#pragma once
#include <cstdint>

#include <ATen/ATen.h>

namespace torchquant {

// x: contiguous float32/float16/bfloat16 [rows, row_len] (any leading shape; row_len = x.size(-1)), bits in [2, 8].
// Row r: scale[r] = per_token_scale(largest finite |x| of the row, qmax) (quant_math.h), qmax = 2^(bits-1) - 1,
// q = clamp(rne(x * (1 / scale[r])), -qmax, qmax) (NaN -> 0, +-inf -> +-qmax), stored as the bytes
// q + offset at out + r * out_row_stride (offset 0: int8 q; 128: the unsigned form the int8 GEMM reads), with the
// bytes from row_len to out_row_stride zeroed. Threaded over rows.
void quantize_rows_per_token(const at::Tensor& x, int64_t rows, int64_t bits, uint8_t offset, uint8_t* out,
                             int64_t out_row_stride, float* scale);

}  // namespace torchquant
