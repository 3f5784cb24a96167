// Argument checks shared by the CPU and CUDA kernels of the integer-matrix ops (and the fake-quantize backward),
// so that both devices raise the same messages.
//
// They are compiled by the host C++ compiler only (csrc/*.cpp). Their messages are built by TQ_CHECK (check.h),
// never through iostreams, which crashed the process on the GPU machine instead of raising.
#pragma once
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

#include "quant_math.h"

namespace torchquant {

// int8_mm: a and b int8, 2-d, with a.size(1) == b.size(0) (devices are checked by each kernel).
void check_int8_mm_operands(const at::Tensor& a, const at::Tensor& b);

// pack_int8_weight: w int8, non-empty [N, K] or [G, N, K].
void check_weight_to_pack(const at::Tensor& w);

// t must have dtype `dtype` and shape [n]; `op` and `name` name the operator and argument in the message.
void check_epilogue_vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t n);

// bias must be a float tensor of shape [n].
void check_bias(const char* op, const at::Tensor& bias, int64_t n);

// w_packed must be int8, contiguous and of shape [groups?, round_up(n, n_align), round_up(k, k_align)] (2-d when
// groups is 0).
void check_packed_weight_layout(const char* op, const at::Tensor& w_packed, int64_t groups, int64_t n, int64_t k,
                                int64_t n_align, int64_t k_align);

// out_dtype must be float32, float16 or bfloat16.
void check_float_out_dtype(const char* op, at::ScalarType out_dtype);

// int8_linear's and int8_conv2d's out_dtype with out_scale and out_zero_point: a float dtype without out_scale, or
// int8/uint8 with a positive finite out_scale and out_zero_point in the output's range.
void check_output_dtype(const char* op, at::ScalarType out_dtype, std::optional<double> out_scale,
                         int64_t out_zero_point);

// The shape of an int8_conv2d: input [batch, channels, height, width], kernel, stride, padding, dilation, groups
// and the output size.
struct ConvGeometry {
  int64_t batch, channels, height, width;  // input
  int64_t groups, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;
};

// int8_conv2d: x_q 4-d, positive groups dividing both channel counts, 2-entry kernel_size >= 1, stride >= 1,
// padding >= 0, dilation >= 1, and a dilated kernel no larger than the padded input; returns the geometry.
ConvGeometry check_conv_arguments(const char* op, const at::Tensor& x_q, int64_t out_channels, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// fake_quantize backward: grad must have x's shape and dtype (devices are checked by each kernel).
void check_grad_like(const at::Tensor& grad, const at::Tensor& x);

// CUDA kernels: t must be on x_q's device.
void check_on_device_of(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x_q,
                        const char* hint = "");

// int8_linear / int8_conv2d epilogue inputs: x_q int8 or uint8 with x_zero_point in its range, x_scale float32 with
// 1 or `rows` elements, w_sum int32 [n], w_scale float32 [n], bias float [n] or none, all on x_q's device.
void check_epilogue_inputs(const char* op, const at::Tensor& x_q, int64_t x_zero_point, const at::Tensor& x_scale,
                           int64_t rows, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, int64_t n);

// ---- quantize family ----

Rounding parse_rounding(c10::string_view rounding);
// bits in [1, 8] -> the format's integer range
QuantFormat checked_format(int64_t bits, bool is_signed);

// x viewed as [outer, channels, inner] for its per-tensor (channels 1) or per-channel parameters.
struct QuantLayout {
  int64_t channels;
  int64_t inner;
  bool per_channel;
};
// Checks scale (float32) and zero_point (int32), 1-D, of one element (axis none) or x.size(axis), on x's device.
QuantLayout checked_quant_layout(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                 std::optional<int64_t> axis);

}  // namespace torchquant
