// int8_conv2d.residual as its steps in the order its schema states (int8_conv2d with a float32 output, dequantize,
// the float32 add, the ReLU, quantize or the cast), each through the dispatcher, so that it runs the kernels of
// whichever device x_q is on: registered as CompositeExplicitAutograd for the devices without a fused kernel (the
// CPU has one: csrc/cpu/conv.cpp). Every step is bit-exact against torchquant/reference.py, so the composition is
// too.
#include "check.h"
#include <optional>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "arg_checks.h"

namespace torchquant {
namespace {

using Int8Conv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const std::optional<at::Tensor>&, int64_t, at::IntArrayRef,
                                at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, at::ScalarType,
                                std::optional<double>, int64_t, std::optional<double>, std::optional<double>);
using DequantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<int64_t>,
                                at::ScalarType);
using QuantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<int64_t>,
                              int64_t, bool, c10::string_view);

at::Tensor int8_conv2d_residual_steps(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                                      const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                                      const std::optional<at::Tensor>& bias, int64_t out_channels,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups, at::ScalarType out_dtype,
                                      std::optional<double> out_scale, int64_t out_zero_point,
                                      std::optional<double> clamp_min, std::optional<double> clamp_max,
                                      const at::Tensor& residual, const at::Tensor& residual_scale,
                                      int64_t residual_zero_point, bool relu) {
  constexpr const char* op = "int8_conv2d";
  static const auto conv =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchquant::int8_conv2d", "").typed<Int8Conv2dFn>();
  static const auto dequantize =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchquant::dequantize", "").typed<DequantizeFn>();
  static const auto quantize =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchquant::quantize", "").typed<QuantizeFn>();
  check_output_dtype(op, out_dtype, out_scale, out_zero_point);
  at::Tensor y = conv.call(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels, kernel_size,
                           stride, padding, dilation, groups, at::kFloat, std::nullopt, 0, clamp_min, clamp_max);
  check_conv_residual(x_q, y.sizes(), residual, residual_scale, residual_zero_point);
  const at::TensorOptions int32 = residual_scale.options().dtype(at::kInt);
  // dequantized as the NHWC tensor of its channels-last layout (element-wise: the same values), so that the add
  // reads both operands in y's layout
  const at::Tensor residual_nhwc = residual.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1});
  y.add_(dequantize.call(residual_nhwc, residual_scale, at::full({1}, residual_zero_point, int32), std::nullopt,
                         at::kFloat)
             .permute({0, 3, 1, 2}));
  if (relu) y.clamp_min_(0);
  if (!out_scale.has_value()) return y.to(out_dtype);
  const at::Tensor scale = at::full({1}, static_cast<float>(*out_scale), residual_scale.options());
  // per tensor, so element-wise: the channels-last y quantized as the NHWC tensor it is in memory, which keeps the
  // output channels-last (as int8_conv2d's) without a copy
  return quantize
      .call(y.permute({0, 2, 3, 1}), scale, at::full({1}, out_zero_point, int32), std::nullopt, 8,
            out_dtype == at::kChar, "nearest")
      .permute({0, 3, 1, 2});
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, CompositeExplicitAutograd, m) {
  m.impl("int8_conv2d.residual", &torchquant::int8_conv2d_residual_steps);
}
