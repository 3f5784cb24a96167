// CPU helpers shared by the int8_linear (gemm.cpp) and int8_conv2d (conv.cpp) kernels and the fast entries
// (python_calls.cpp): the epilogue set-up, conv weight layouts, channels-last outputs made contiguous.
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

// A conv weight's layouts that int8_conv2d would otherwise derive from the panels on every call, which
// pack_int8_weight stores after the panels of a conv weight w [G, N, KH, KW, C]: a depthwise one's ([G, 1, KH, KW,
// 1]) [tap][channel] weight and AVX-512 quads (gathered one byte per 4 KB panel, they took longer than the conv
// itself at 960 channels of 7x7 pixels), and an ungrouped one's kernel rows padded to a multiple of 4 bytes where
// windows are read in place (a 7x7 stem of 3 channels: 2.5 us a call). Their size for w's sizes (0: none), and the
// extras of w (the weight itself, any strides) written at dst from its panels (kp deep).
int64_t conv_weight_extra_bytes(at::IntArrayRef w);
void pack_conv_weight_extras(const at::Tensor& w, const int8_t* panels, int64_t kp, int8_t* dst);

// y in the contiguous memory format: a CPU channels-last 4-D float32/float16/bfloat16 tensor of at least one
// 16-byte tile of channels (a conv kernel's output) transposed by 16-byte tiles (torch's copy ran at 5-13 GB/s
// there), anything else by y.contiguous().
at::Tensor contiguous_from_channels_last(const at::Tensor& y);

}  // namespace torchquant::gemm
