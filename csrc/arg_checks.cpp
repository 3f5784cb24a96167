// Argument checks shared by the CPU and CUDA kernels (see arg_checks.h for why they live in a host-compiled file).
#include "check.h"
#include <algorithm>
#include "arg_checks.h"

#include <cmath>
#include <vector>

namespace torchquant {

void check_int8_mm_operands(const at::Tensor& a, const at::Tensor& b) {
  TQ_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar, "int8_mm: a and b must be int8, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TQ_CHECK(a.dim() == 2 && b.dim() == 2, "int8_mm: a and b must be 2-d, got ", a.dim(), "-d and ", b.dim(), "-d");
  TQ_CHECK(a.size(1) == b.size(0), "int8_mm: inner sizes differ: a is ", a.sizes(), ", b is ", b.sizes());
}

void check_weight_to_pack(const at::Tensor& w) {
  TQ_CHECK(w.scalar_type() == at::kChar, "pack_int8_weight: w must be int8, got ", w.scalar_type());
  TQ_CHECK(w.dim() == 2 || w.dim() == 3, "pack_int8_weight: w must be [N, K] or [G, N, K], got ", w.dim(), "-d");
  TQ_CHECK(w.numel() > 0, "pack_int8_weight: w must not be empty, got shape ", w.sizes());
}

void check_epilogue_vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t n) {
  TQ_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TQ_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
}

void check_bias(const char* op, const at::Tensor& bias, int64_t n) {
  TQ_CHECK(at::isFloatingType(bias.scalar_type()), op, ": bias must be a float tensor, got ", bias.scalar_type());
  TQ_CHECK(bias.dim() == 1 && bias.size(0) == n, op, ": bias must have shape [", n, "], got ", bias.sizes());
}

void check_packed_weight_layout(const char* op, const at::Tensor& w_packed, int64_t groups, int64_t n, int64_t k,
                                int64_t n_align, int64_t k_align) {
  TQ_CHECK(w_packed.scalar_type() == at::kChar, op, ": w_packed must be int8 (from pack_int8_weight), got ",
              w_packed.scalar_type());
  std::vector<int64_t> want;
  if (groups > 0) want.push_back(groups);
  want.push_back((n + n_align - 1) / n_align * n_align);
  want.push_back((k + k_align - 1) / k_align * k_align);
  const at::IntArrayRef want_ref(want);
  TQ_CHECK(w_packed.sizes() == want_ref, op, ": w_packed must have shape ", want_ref, " (a packed weight of ", n,
              " outputs and reduction size ", k, "), got ", w_packed.sizes());
  TQ_CHECK(w_packed.is_contiguous(), op, ": w_packed must be contiguous (as pack_int8_weight returns it)");
}

void check_float_out_dtype(const char* op, at::ScalarType out_dtype) {
  TQ_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
}

void check_output_dtype(const char* op, at::ScalarType out_dtype, std::optional<double> out_scale,
                        int64_t out_zero_point) {
  if (out_dtype == at::kChar || out_dtype == at::kByte) {
    TQ_CHECK(out_scale.has_value(), op, ": out_dtype ", out_dtype, " (requantized output) needs out_scale");
    TQ_CHECK(std::isfinite(*out_scale) && *out_scale > 0, op, ": out_scale must be positive and finite, got ",
                *out_scale);
    const int64_t qmin = out_dtype == at::kChar ? -128 : 0, qmax = out_dtype == at::kChar ? 127 : 255;
    TQ_CHECK(out_zero_point >= qmin && out_zero_point <= qmax, op, ": out_zero_point must lie in [", qmin, ", ",
                qmax, "] for ", out_dtype, " output, got ", out_zero_point);
    return;
  }
  TQ_CHECK(!out_scale.has_value(), op, ": out_scale is only for int8/uint8 out_dtype, got out_dtype ", out_dtype);
  check_float_out_dtype(op, out_dtype);
}

ConvGeometry check_conv_arguments(const char* op, const at::Tensor& x_q, int64_t out_channels,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups) {
  TQ_CHECK(x_q.dim() == 4, op, ": x_q must be 4-d [B, C, H, W], got ", x_q.dim(), "-d");
  TQ_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TQ_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation must have 2 entries each");
  TQ_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1, op, ": kernel_size must be >= 1, got ", kernel_size);
  TQ_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TQ_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  TQ_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  const int64_t channels = x_q.size(1);
  TQ_CHECK(channels % groups == 0, op, ": groups (", groups, ") must divide the input channels (", channels, ")");
  TQ_CHECK(out_channels >= 1 && out_channels % groups == 0, op, ": groups (", groups,
              ") must divide out_channels (", out_channels, ")");
  TQ_CHECK(x_q.size(2) + 2 * padding[0] >= dilation[0] * (kernel_size[0] - 1) + 1 &&
                  x_q.size(3) + 2 * padding[1] >= dilation[1] * (kernel_size[1] - 1) + 1,
              op, ": the (dilated) kernel ", kernel_size, " is larger than the padded input ", x_q.sizes().slice(2));
  ConvGeometry g{x_q.size(0), channels, x_q.size(2), x_q.size(3), groups,
                 kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                 0, 0};
  g.out_h = (g.height + 2 * g.pad_h - g.dil_h * (g.kh - 1) - 1) / g.stride_h + 1;
  g.out_w = (g.width + 2 * g.pad_w - g.dil_w * (g.kw - 1) - 1) / g.stride_w + 1;
  return g;
}

void check_grad_like(const at::Tensor& grad, const at::Tensor& x) {
  TQ_CHECK(grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  TQ_CHECK(grad.scalar_type() == x.scalar_type(), "grad must have x's dtype ", x.scalar_type(), ", got ",
              grad.scalar_type());
}

void check_on_device_of(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x_q,
                        const char* hint) {
  TQ_CHECK(t.device() == x_q.device(), op, ": ", name, " must be on x_q's device (", x_q.device(), "), got ",
              t.device(), hint);
}

void check_epilogue_inputs(const char* op, const at::Tensor& x_q, int64_t x_zero_point, const at::Tensor& x_scale,
                           int64_t rows, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, int64_t n) {
  const bool is_int8 = x_q.scalar_type() == at::kChar;
  TQ_CHECK(is_int8 || x_q.scalar_type() == at::kByte, op, ": x_q must be int8 or uint8, got ", x_q.scalar_type());
  const int64_t zp_min = is_int8 ? -128 : 0, zp_max = is_int8 ? 127 : 255;
  TQ_CHECK(x_zero_point >= zp_min && x_zero_point <= zp_max, op, ": x_zero_point must lie in [", zp_min, ", ",
           zp_max, "] for ", x_q.scalar_type(), " x_q, got ", x_zero_point);
  check_on_device_of(op, "x_scale", x_scale, x_q);
  TQ_CHECK(x_scale.scalar_type() == at::kFloat, op, ": x_scale must be float32, got ", x_scale.scalar_type());
  TQ_CHECK(x_scale.numel() == 1 || x_scale.numel() == rows, op, ": x_scale must have 1 element or one per row (",
           rows, "), got ", x_scale.numel());
  check_on_device_of(op, "w_sum", w_sum, x_q);
  check_epilogue_vector(op, "w_sum", w_sum, at::kInt, n);
  check_on_device_of(op, "w_scale", w_scale, x_q);
  check_epilogue_vector(op, "w_scale", w_scale, at::kFloat, n);
  if (bias.has_value()) {
    check_on_device_of(op, "bias", *bias, x_q);
    check_bias(op, *bias, n);
  }
}

Rounding parse_rounding(c10::string_view rounding) {
  if (rounding == "nearest") return Rounding::Nearest;
  if (rounding == "truncate") return Rounding::Truncate;
  TQ_CHECK(false, "rounding must be 'nearest' or 'truncate', got '", std::string(rounding), "'");
}

QuantFormat checked_format(int64_t bits, bool is_signed) {
  TQ_CHECK(bits >= 1 && bits <= 8, "bits must be in [1, 8], got ", bits);
  return quant_format(bits, is_signed);
}

QuantLayout checked_quant_layout(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                 std::optional<int64_t> axis) {
  TQ_CHECK(scale.device() == x.device() && zero_point.device() == x.device(),
              "scale and zero_point must be on x's device (", x.device(), "), got ", scale.device(), " and ",
              zero_point.device());
  TQ_CHECK(scale.scalar_type() == at::kFloat, "scale must be float32, got ", scale.scalar_type());
  TQ_CHECK(zero_point.scalar_type() == at::kInt, "zero_point must be int32, got ", zero_point.scalar_type());
  TQ_CHECK(scale.dim() <= 1 && zero_point.dim() <= 1, "scale and zero_point must be 1-D");
  TQ_CHECK(scale.numel() == zero_point.numel(), "scale and zero_point must have the same length, got ",
              scale.numel(), " and ", zero_point.numel());
  if (!axis.has_value()) {
    TQ_CHECK(scale.numel() == 1, "per-tensor scale must have 1 element, got ", scale.numel());
    return {1, std::max<int64_t>(x.numel(), 1), false};
  }
  const int64_t a = *axis;
  TQ_CHECK(a >= 0 && a < x.dim(), "axis must be in [0, ", x.dim(), ") for a ", x.dim(), "-d x, got ", a);
  TQ_CHECK(scale.numel() == x.size(a), "per-channel scale must have x.size(", a, ") = ", x.size(a),
              " elements, got ", scale.numel());
  int64_t inner = 1;
  for (int64_t d = a + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {std::max<int64_t>(x.size(a), 1), std::max<int64_t>(inner, 1), true};
}

}  // namespace torchquant
