// The host-side front of the integer-matrix ops (see gemm_front.h).
#include "gemm_front.h"

#include <vector>

#include "check.h"
#include "output_memory.h"

namespace torchquant {

OutKind out_kind(at::ScalarType out_dtype) {
  switch (out_dtype) {
    case at::kFloat: return OutKind::Float32;
    case at::kHalf: return OutKind::Float16;
    case at::kBFloat16: return OutKind::BFloat16;
    case at::kChar: return OutKind::Int8;
    case at::kByte: return OutKind::UInt8;
    default: TQ_CHECK(false, "int8 GEMM epilogue: unsupported output dtype ", out_dtype);
  }
}

Gelu parse_activation(const char* op, c10::string_view activation) {
  if (activation == "gelu") return Gelu::Erf;
  if (activation == "gelu_tanh") return Gelu::Tanh;
  TQ_CHECK(false, op, ": activation must be 'gelu' or 'gelu_tanh', got '", std::string(activation), "'");
}

namespace {

// Checks x_q's dtype and zero point, x_scale ([rows] or [1]), w_sum, w_scale and bias ([n]) against x_q's device,
// out_dtype with out_scale / out_zero_point, and the clamp bounds; `op` names the operator in the messages.
EpilogueInputs prepare_epilogue_inputs(const char* op, const at::Tensor& x_q, int64_t x_zero_point,
                                       const at::Tensor& x_scale, int64_t rows, const at::Tensor& w_sum,
                                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t n,
                                       at::ScalarType out_dtype, std::optional<double> out_scale,
                                       int64_t out_zero_point, int64_t out_bits, std::optional<double> clamp_min,
                                       std::optional<double> clamp_max) {
  check_epilogue_inputs(op, x_q, x_zero_point, x_scale, rows, w_sum, w_scale, bias, n);
  EpilogueInputs in;
  if (bias.has_value()) in.bias = bias->to(at::kFloat).contiguous();
  in.x_scale = x_scale.contiguous();
  in.w_sum = w_sum.contiguous();
  in.w_scale = w_scale.contiguous();
  // the values of CPU scales are read here for free; those on a GPU are checked by the Python wrapper (it costs a
  // copy to the host there)
  if (x_q.is_cpu()) {
    check_scale_values(op, "x_scale", in.x_scale);
    check_scale_values(op, "w_scale", in.w_scale);
  }
  in.out_format = check_output_dtype(op, out_dtype, out_scale, out_zero_point, out_bits);
  in.clamp = check_activation_clamp(op, clamp_min, clamp_max);
  in.x_zero_point = static_cast<int32_t>(x_zero_point);
  in.kind = out_kind(out_dtype);
  if (out_scale.has_value()) {
    in.inv_out_scale = 1.0f / static_cast<float>(*out_scale);
    in.out_zero_point = static_cast<float>(out_zero_point);
  }
  return in;
}

}  // namespace

LinearFront int8_linear_front(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                              const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                              const std::optional<at::Tensor>& bias, int64_t out_features, at::ScalarType out_dtype,
                              std::optional<double> out_scale, int64_t out_zero_point, int64_t out_bits,
                              std::optional<double> clamp_min, std::optional<double> clamp_max) {
  constexpr const char* op = "int8_linear";
  TQ_CHECK(x_q.dim() >= 1, op, ": x_q must have at least 1 dimension [..., K]");
  TQ_CHECK(out_features >= 1, op, ": out_features must be >= 1, got ", out_features);
  const int64_t k = x_q.size(-1), n = out_features;
  TQ_CHECK(k >= 1, op, ": x_q's last dimension (K) must be >= 1");
  const int64_t m = x_q.numel() / k;
  const PackedWeightLayout weight = check_packed_weight(op, w_packed, x_q, 0, n, {k}, kLinearWeightShape);
  EpilogueInputs in = prepare_epilogue_inputs(op, x_q, x_zero_point, x_scale, m, w_sum, w_scale, bias, n, out_dtype,
                                              out_scale, out_zero_point, out_bits, clamp_min, clamp_max);
  std::vector<int64_t> out_shape(x_q.sizes().begin(), x_q.sizes().end());
  out_shape.back() = n;
  return {m, n, k, weight, std::move(in), empty_output(out_shape, x_q.options().dtype(out_dtype))};
}

ConvFront int8_conv2d_front(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                            const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                            int64_t out_bits, std::optional<double> clamp_min, std::optional<double> clamp_max) {
  constexpr const char* op = "int8_conv2d";
  const ConvGeometry g = check_conv_arguments(op, x_q, out_channels, kernel_size, stride, padding, dilation, groups);
  TQ_CHECK(g.window >= 1, op, ": x_q must have at least one channel");
  const PackedWeightLayout weight = check_packed_weight(op, w_packed, x_q, groups, out_channels / groups,
                                                       {g.kh, g.kw, g.channels / groups}, kConvWeightShape);
  TQ_CHECK(x_scale.numel() == 1, op, ": x_scale must have 1 element (per-tensor activations), got ",
           x_scale.numel());
  EpilogueInputs in = prepare_epilogue_inputs(op, x_q, x_zero_point, x_scale, g.rows, w_sum, w_scale, bias,
                                              out_channels, out_dtype, out_scale, out_zero_point, out_bits,
                                              clamp_min, clamp_max);
  at::Tensor out_nhwc =
      empty_output({g.batch, g.out_h, g.out_w, out_channels}, x_q.options().dtype(out_dtype));
  return {g, weight, std::move(in), std::move(out_nhwc)};
}

}  // namespace torchquant
