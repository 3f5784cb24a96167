// The host-side front of the integer-matrix ops (int8_mm, int8_linear, int8_conv2d), shared by the CPU engine
// (csrc/cpu/gemm_core.h) and the CUDA engine (csrc/cuda/gemm.cuh): the GEMM's operands, the output kinds, the
// validated epilogue inputs, and per op the checks and the output that every device's kernel starts from.
// Definitions in gemm_front.cpp (host compiler only, like arg_checks.cpp); the CUDA kernels read GemmArgs and
// OutKind only.
#pragma once
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

#include "arg_checks.h"
#include "quant_math.h"

namespace torchquant {

// Writes the activation rows [row0, row0 + rows) of group g, round_up(k, 4) bytes each (zero filled past k),
// consecutively at dst: an implicit activation matrix (im2col) that the CPU engine produces piece by piece.
using RowFiller = void (*)(const void* context, int64_t g, int64_t row0, int64_t rows, uint8_t* dst);

// One (possibly grouped) int8 GEMM: for each group g, out[:, g*n:(g+1)*n] = a_g [m, k] @ b_g [n, k]^T, reading
// a_g from column offset g * a_group_offset of the activation rows and b_g at b + g * b_group_stride. Each engine
// states what else it needs of the operands (alignment, padding, the byte order of b).
struct GemmArgs {
  const void* a = nullptr;     // activation rows of int8 or uint8 bytes (CPU: unless fill_rows produces them)
  int64_t lda = 0;             // bytes between activation rows
  int64_t a_group_offset = 0;  // bytes from group g's activation columns to group g+1's
  const int8_t* b = nullptr;   // the weight, [n, k] rows in the engine's layout
  int64_t ldb = 0;             // bytes between weight rows (CPU: the packed panel depth)
  int64_t b_group_stride = 0;  // bytes between weight groups
  int64_t m = 0, n = 0, k = 0, groups = 1;
  RowFiller fill_rows = nullptr;  // CPU only: produces the activation rows in place of a
  const void* fill_context = nullptr;
  // CPU only: every activation byte the GEMM reads against a nonzero weight (padding included) is below 128, as
  // unsigned 7-bit activations are (bytes_below_128)
  bool a_below_128 = false;
};

// What the epilogue stores per output element: the int32 accumulator itself, or the dequantized value as a float
// type or requantized to int8/uint8.
enum class OutKind { Int32, Float32, Float16, BFloat16, Int8, UInt8 };

// The output kind of a float or int8/uint8 out_dtype (as check_output_dtype accepts).
OutKind out_kind(at::ScalarType out_dtype);

// A float activation of the epilogue (int8_linear_dynamic.activation's), applied to y after the bias: none, GELU in
// its erf form, or GELU in its tanh form.
enum class Gelu : uint8_t { None, Erf, Tanh };

// int8_linear_dynamic.activation's activation argument: "gelu" or "gelu_tanh" (anything else raises, naming op).
Gelu parse_activation(const char* op, c10::string_view activation);

// The epilogue of int8_linear and int8_conv2d, per output element:
//   y = clamp_activation(float(acc - x_zero_point * w_sum[n]) * x_scale[m or 0] * w_scale[n] + bias[n], clamp)
// stored as the output's float type or requantized: clamp(rne(y * inv_out_scale) + out_zero_point) to out_format
// (the range of out_bits bits, as check_output_dtype gives it). The tensors are validated, contiguous and on x_q's
// device, kept alive while the GEMM runs.
struct EpilogueInputs {
  at::Tensor x_scale;              // float32, one element per row or 1
  at::Tensor w_sum;                // int32 [n]
  at::Tensor w_scale;              // float32 [n]
  std::optional<at::Tensor> bias;  // float32 [n]
  int32_t x_zero_point = 0;
  OutKind kind = OutKind::Float32;
  float inv_out_scale = 1.0f;  // requantized outputs: 1 / out_scale
  float out_zero_point = 0.0f;
  QuantFormat out_format{};  // requantized outputs: the range they are clamped to
  ActivationClamp clamp;  // the fused activation (none: -inf / +inf)
  Gelu gelu = Gelu::None;  // applied before the clamp (float outputs only: int8_linear_dynamic's)
};

// int8_linear on any device, checked: x_q [..., K] times the packed weight [n, K] into out [..., n].
struct LinearFront {
  int64_t m, n, k;
  PackedWeightLayout weight;
  EpilogueInputs epilogue;
  at::Tensor out;
};
LinearFront int8_linear_front(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                              const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                              const std::optional<at::Tensor>& bias, int64_t out_features, at::ScalarType out_dtype,
                              std::optional<double> out_scale, int64_t out_zero_point, int64_t out_bits,
                              std::optional<double> clamp_min, std::optional<double> clamp_max);

// int8_conv2d on any device, checked: the geometry, and the output as the GEMM writes it, [batch, out_h, out_w,
// out_channels] (rows of out_channels); the op returns it permuted to [batch, out_channels, out_h, out_w].
struct ConvFront {
  ConvGeometry g;
  PackedWeightLayout weight;
  EpilogueInputs epilogue;
  at::Tensor out_nhwc;
};
ConvFront int8_conv2d_front(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                            const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                            int64_t out_bits, std::optional<double> clamp_min, std::optional<double> clamp_max);

}  // namespace torchquant
