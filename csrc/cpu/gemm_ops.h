// Checks and epilogue set-up shared by the CPU int8_linear (gemm.cpp) and int8_conv2d (conv.cpp) ops.
#pragma once
#include <optional>

#include <ATen/ATen.h>

#include "cpu/gemm_core.h"

namespace torchquant::gemm {

// The per-column and per-row epilogue inputs, validated and in the form the kernels read (contiguous float32 /
// int32), kept alive while the GEMM runs.
struct EpilogueInputs {
  at::Tensor col_offset;  // int32 [n]: (x_zero_point + 128 for int8 activations) * w_sum
  at::Tensor x_scale;     // float32, `rows` or 1 elements
  at::Tensor w_scale;     // float32 [n]
  std::optional<at::Tensor> bias;  // float32 [n]

  // The epilogue writing out_dtype (validated by check_output_dtype) into out, rows out_row_stride elements apart;
  // requantized with out_scale / out_zero_point for int8/uint8.
  Epilogue epilogue(at::ScalarType out_dtype, void* out, int64_t out_row_stride, std::optional<double> out_scale,
                    int64_t out_zero_point) const;
};

// Validates x_q's dtype, the zero point's range and the shapes of x_scale ([rows] or [1]), w_sum, w_scale and bias
// ([n]); `op` names the operator in the messages.
EpilogueInputs prepare_epilogue_inputs(const char* op, const at::Tensor& x_q, int64_t x_zero_point,
                                       const at::Tensor& x_scale, int64_t rows, const at::Tensor& w_sum,
                                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t n);

// The activation byte transform that makes x_q unsigned: 0x80 for int8, 0 for uint8.
inline uint8_t activation_flip(const at::Tensor& x_q) { return x_q.scalar_type() == at::kChar ? 0x80 : 0; }

}  // namespace torchquant::gemm
