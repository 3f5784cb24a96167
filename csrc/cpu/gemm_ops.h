// The CPU epilogue set-up shared by the int8_linear (gemm.cpp) and int8_conv2d (conv.cpp) kernels.
#pragma once
#include <vector>

#include <ATen/ATen.h>

#include "cpu/gemm_core.h"
#include "gemm_front.h"

namespace torchquant::gemm {

// The activation byte transform that makes x_q unsigned: 0x80 for int8, 0 for uint8.
inline uint8_t activation_flip(const at::Tensor& x_q) { return x_q.scalar_type() == at::kChar ? 0x80 : 0; }

// The engine's epilogue for `in`, writing into out with rows out_row_stride elements apart, for activations
// transformed by `flip`. Fills col_offset with the per-column corrections, (x_zero_point + 128 for int8
// activations) * w_sum modulo 2^32 like the accumulators; it must outlive the GEMM.
Epilogue epilogue_for(const EpilogueInputs& in, uint8_t flip, void* out, int64_t out_row_stride,
                      std::vector<int32_t>& col_offset);

// A depthwise conv's packed weight ([G, 1, KH, KW, 1]: one input and one output channel per group) is followed in its
// storage by two layouts of it for the depthwise kernel (conv.cpp), made by pack_int8_weight: derived on every call,
// one byte per 4 KB panel, they took longer than the conv itself at 960 channels of 7x7 pixels. The extras' size
// for w (0 for other weights), and the extras written at dst for w viewed as [G, KH * KW].
int64_t depthwise_extra_bytes(at::IntArrayRef w_sizes);
void pack_depthwise_extras(const at::Tensor& w_taps, int64_t kh, int64_t kw, int8_t* dst);

}  // namespace torchquant::gemm
