// Argument checks shared by the CPU and CUDA kernels (see arg_checks.h for why they live in a host-compiled file).
#include "check.h"
#include <algorithm>
#include "arg_checks.h"
#include "output_memory.h"

#include <cfloat>
#include <cmath>
#include <limits>
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
  TQ_CHECK(w.dim() == 2 || w.dim() == 3 || w.dim() == 5,
           "pack_int8_weight: w must be [N, K], [G, N, K] or [G, N, KH, KW, C], got ", w.dim(), "-d");
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

PackedWeightLayout packed_weight_layout(const char* op, int64_t groups, int64_t n, int64_t k) {
  const int64_t kp = round_up(k, kPackAlign);
  const int64_t group_bytes = checked_mul(op, "the packed weight's size", round_up(n, kPackAlign), kp);
  checked_mul(op, "the packed weight's size", groups, group_bytes);
  return {groups, n, k, kp, group_bytes};
}

PackedWeightLayout packed_weight_layout(const at::Tensor& w) {
  const int64_t n_dim = w.dim() == 2 ? 0 : 1;
  int64_t k = 1;
  for (int64_t d = n_dim + 1; d < w.dim(); ++d) k = checked_mul("pack_int8_weight", "the weight's size", k, w.size(d));
  return packed_weight_layout("pack_int8_weight", n_dim == 1 ? w.size(0) : 1, w.size(n_dim), k);
}

at::Tensor empty_packed_weight(const at::Tensor& w, const PackedWeightLayout& layout, bool zeroed,
                               int64_t trailing_bytes) {
  const at::TensorOptions options = w.options();
  const int64_t bytes = layout.groups * layout.group_bytes + trailing_bytes;
  const at::Tensor buffer = zeroed ? at::zeros({bytes}, options) : at::empty({bytes}, options);
  const int64_t n_dim = w.dim() == 2 ? 0 : 1;
  std::vector<int64_t> strides(w.dim(), 1);
  for (int64_t d = w.dim() - 2; d > n_dim; --d) strides[d] = strides[d + 1] * w.size(d + 1);
  strides[n_dim] = layout.kp;
  if (n_dim == 1) strides[0] = layout.group_bytes;
  return at::empty({0}, options).set_(buffer.storage(), 0, w.sizes(), strides);
}

PackedWeightLayout check_packed_weight(const char* op, const at::Tensor& w_packed, const at::Tensor& x_q,
                                       int64_t groups, int64_t n, at::IntArrayRef k_dims, const char* needed) {
  check_on_device_of(op, "w_packed", w_packed, x_q, " (re-pack the weight with pack_int8_weight after moving it)");
  TQ_CHECK(w_packed.scalar_type() == at::kChar, op, ": w_packed must be int8 (from pack_int8_weight), got ",
           w_packed.scalar_type());
  std::vector<int64_t> want;
  if (groups > 0) want.push_back(groups);
  want.push_back(n);
  want.insert(want.end(), k_dims.begin(), k_dims.end());
  const at::IntArrayRef want_ref(want);
  TQ_CHECK(w_packed.sizes() == want_ref, op, ": w_packed holds a packed weight of shape ", w_packed.sizes(),
           " but this call needs ", want_ref, " ", needed);
  int64_t k = 1;
  for (const int64_t d : k_dims) k = checked_mul(op, "the packed weight's reduction size", k, d);
  const PackedWeightLayout layout = packed_weight_layout(op, std::max<int64_t>(groups, 1), n, k);
  // the padded layout: rows kp bytes apart, groups group_bytes apart, the reduction dims row-major in between
  // (strides of size-1 dims do not matter)
  const size_t n_dim = want.size() - k_dims.size() - 1;
  std::vector<int64_t> strides(want.size());
  strides[n_dim] = layout.kp;
  if (groups > 0) strides[0] = layout.group_bytes;
  int64_t inner = 1;
  for (size_t d = want.size() - 1; d > n_dim; --d) {
    strides[d] = inner;
    inner *= want[d];
  }
  bool layout_ok = w_packed.storage_offset() % layout.group_bytes == 0;
  for (size_t d = 0; d < want.size(); ++d) layout_ok = layout_ok && (want[d] == 1 || w_packed.stride(d) == strides[d]);
  const int64_t bytes = layout.groups * layout.group_bytes;
  const int64_t storage_bytes = static_cast<int64_t>(w_packed.storage().nbytes());
  TQ_CHECK(layout_ok, op, ": w_packed must be laid out as pack_int8_weight returns it (strides ", w_packed.strides(),
           ", storage offset ", w_packed.storage_offset(), "; expected strides ", at::IntArrayRef(strides),
           "): pack the weight again");
  TQ_CHECK(w_packed.storage_offset() <= storage_bytes - bytes, op,
           ": w_packed must be laid out as pack_int8_weight returns it, over ", bytes, " bytes of its storage from "
           "its offset; its storage holds ", storage_bytes - w_packed.storage_offset(),
           ". A copy of the packed tensor's view alone (clone(), contiguous(), or AOTInductor's copy of a buffer) "
           "loses the padding the kernels read: keep its whole storage (torchquant's layers register that as their "
           "w_packed buffer and view it in the traced graph), or pack the weight again");
  return layout;
}

void check_float_out_dtype(const char* op, at::ScalarType out_dtype) {
  TQ_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
}

QuantFormat check_output_dtype(const char* op, at::ScalarType out_dtype, std::optional<double> out_scale,
                               int64_t out_zero_point, int64_t out_bits) {
  if (out_dtype == at::kChar || out_dtype == at::kByte) {
    TQ_CHECK(out_scale.has_value(), op, ": out_dtype ", out_dtype, " (requantized output) needs out_scale");
    // a normal float32 keeps 1 / out_scale finite (y * inf would turn a zero into NaN)
    TQ_CHECK(std::isfinite(static_cast<float>(*out_scale)) && static_cast<float>(*out_scale) >= FLT_MIN, op,
             ": out_scale must be positive and finite (at least 1.17549e-38 as float32), got ", *out_scale);
    TQ_CHECK(out_bits >= 2 && out_bits <= 8, op, ": out_bits must be in [2, 8], got ", out_bits);
    const QuantFormat f = quant_format(out_bits, out_dtype == at::kChar);
    const auto qmin = static_cast<int64_t>(f.qmin), qmax = static_cast<int64_t>(f.qmax);
    TQ_CHECK(out_zero_point >= qmin && out_zero_point <= qmax, op, ": out_zero_point must lie in [", qmin, ", ",
             qmax, "] for ", out_dtype, " output of ", out_bits, " bits, got ", out_zero_point);
    return f;
  }
  TQ_CHECK(!out_scale.has_value(), op, ": out_scale is only for int8/uint8 out_dtype, got out_dtype ", out_dtype);
  TQ_CHECK(out_bits == 8, op, ": out_bits is only for int8/uint8 out_dtype (8 otherwise), got ", out_bits,
           " with out_dtype ", out_dtype);
  check_float_out_dtype(op, out_dtype);
  return quant_format(8, true);  // (unused by float outputs)
}

ActivationClamp check_activation_clamp(const char* op, std::optional<double> clamp_min,
                                       std::optional<double> clamp_max) {
  ActivationClamp c;
  if (clamp_min.has_value()) {
    c.lo = static_cast<float>(*clamp_min);
    TQ_CHECK(std::isfinite(c.lo), op, ": clamp_min must be finite (as float32), got ", *clamp_min);
  }
  if (clamp_max.has_value()) {
    c.hi = static_cast<float>(*clamp_max);
    TQ_CHECK(std::isfinite(c.hi), op, ": clamp_max must be finite (as float32), got ", *clamp_max);
  }
  TQ_CHECK(c.lo <= c.hi, op, ": clamp_min (", *clamp_min, ") must not exceed clamp_max (", *clamp_max, ")");
  return c;
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
  // every size below is formed with checked arithmetic: a wrapped product (kernel_size 2^62 + 1 times 4 channels
  // is 4 modulo 2^64) would pass the checks against a small packed weight and then write past the buffers
  int64_t out_size[2];
  for (int d = 0; d < 2; ++d) {
    const int64_t padded =
        checked_add(op, "the padded input size", x_q.size(2 + d), checked_mul(op, "the padding", 2, padding[d]));
    const int64_t extent =
        checked_add(op, "the dilated kernel size", checked_mul(op, "the dilated kernel size", dilation[d],
                                                              kernel_size[d] - 1), 1);
    TQ_CHECK(padded >= extent, op, ": the (dilated) kernel ", kernel_size, " with dilation ", dilation,
             " is larger than the padded input ", x_q.sizes().slice(2), " with padding ", padding);
    out_size[d] = (padded - extent) / stride[d] + 1;
  }
  ConvGeometry g{x_q.size(0), channels, x_q.size(2), x_q.size(3), groups,
                 kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                 out_size[0], out_size[1], 0, 0};
  g.window = checked_mul(op, "the kernel window (kernel_size[0] * kernel_size[1] * channels / groups)",
                         checked_mul(op, "the kernel window", g.kh, g.kw), channels / groups);
  g.rows = checked_mul(op, "the output size (batch * out_height * out_width)",
                       checked_mul(op, "the output size", g.batch, g.out_h), g.out_w);
  checked_mul(op, "the output size (batch * out_height * out_width * out_channels)", g.rows, out_channels);
  return g;
}

void check_quantized_operand(const char* op, const char* name, const at::Tensor& t, const char* scale_name,
                             const at::Tensor& scale, int64_t zero_point, const char* anchor_name,
                             const at::Tensor& anchor) {
  const bool is_int8 = t.scalar_type() == at::kChar;
  TQ_CHECK(is_int8 || t.scalar_type() == at::kByte, op, ": ", name, " must be int8 or uint8, got ", t.scalar_type());
  TQ_CHECK(t.device() == anchor.device(), op, ": ", name, " must be on ", anchor_name, "'s device (", anchor.device(),
           "), got ", t.device());
  const int64_t zp_min = is_int8 ? -128 : 0, zp_max = is_int8 ? 127 : 255;
  TQ_CHECK(zero_point >= zp_min && zero_point <= zp_max, op, ": ", name, "_zero_point must lie in [", zp_min, ", ",
           zp_max, "] for ", t.scalar_type(), " ", name, ", got ", zero_point);
  TQ_CHECK(scale.device() == anchor.device(), op, ": ", scale_name, " must be on ", anchor_name, "'s device (",
           anchor.device(), "), got ", scale.device());
  TQ_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, op, ": ", scale_name,
           " must be a float32 tensor of 1 element, got ", scale.scalar_type(), " of shape ", scale.sizes());
}

void check_conv_residual(const at::Tensor& x_q, at::IntArrayRef out_sizes, const at::Tensor& residual,
                         const at::Tensor& residual_scale, int64_t residual_zero_point) {
  check_quantized_operand("int8_conv2d", "residual", residual, "residual_scale", residual_scale, residual_zero_point,
                          "x_q", x_q);
  TQ_CHECK(residual.sizes() == out_sizes, "int8_conv2d: residual must have the output's shape ", out_sizes,
           " (no broadcasting), got ", residual.sizes());
}

BinaryTensors prepare_quantized_binary(const char* op, BinaryOp kind, const at::Tensor& a, const at::Tensor& a_scale,
                                       int64_t a_zero_point, const at::Tensor& b, const at::Tensor& b_scale,
                                       int64_t b_zero_point, at::ScalarType out_dtype,
                                       std::optional<double> out_scale, int64_t out_zero_point, int64_t out_bits,
                                       bool relu, bool keep_broadcast) {
  check_quantized_operand(op, "a", a, "a_scale", a_scale, a_zero_point, "a", a);
  check_quantized_operand(op, "b", b, "b_scale", b_scale, b_zero_point, "a", a);
  std::vector<int64_t> shape = a.sizes().vec();
  if (kind == BinaryOp::Add) {
    TQ_CHECK(a.sizes() == b.sizes(), op, ": a and b must have the same shape (no broadcasting), got ", a.sizes(),
             " and ", b.sizes());
  } else {  // torch's broadcasting: sizes aligned at the last dim, each pair equal or one of them 1
    if (b.dim() > a.dim()) shape = b.sizes().vec();
    for (int64_t i = 1; i <= std::min(a.dim(), b.dim()); ++i) {
      const int64_t sa = a.size(-i), sb = b.size(-i);
      TQ_CHECK(sa == sb || sa == 1 || sb == 1, op, ": a and b must broadcast to one shape, got ", a.sizes(), " and ",
               b.sizes());
      shape[shape.size() - i] = sa == 1 ? sb : sa;
    }
  }
  BinaryTensors t;
  t.map = binary_map(op, kind, a_zero_point, b_zero_point, out_dtype, out_scale, out_zero_point, out_bits, relu);
  // the operand of the output's shape (a where both are) gives it its memory format; with both broadcast,
  // empty_like of a's expansion
  const bool a_full = a.sizes() == at::IntArrayRef(shape), b_full = b.sizes() == at::IntArrayRef(shape);
  const at::Tensor& like = a_full || !b_full ? a : b;
  t.out = empty_like_output(like.expand(shape), a.options().dtype(out_dtype));
  const bool keep_a = keep_broadcast && !a_full, keep_b = keep_broadcast && a_full && !b_full;
  t.a = keep_a ? a.expand(shape) : laid_out_as(a.expand(shape), t.out);
  t.b = keep_b ? b.expand(shape) : laid_out_as(b.expand(shape), t.out);
  return t;
}

at::Tensor laid_out_as(const at::Tensor& x, const at::Tensor& out) {
  return x.strides() == out.strides() ? x : at::empty_like(out, x.options()).copy_(x);
}

BinaryMap binary_map(const char* op_name, BinaryOp op, int64_t a_zero_point, int64_t b_zero_point,
                     at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                     int64_t out_bits, bool relu) {
  BinaryMap map;
  map.out_format = check_output_dtype(op_name, out_dtype, out_scale, out_zero_point, out_bits);
  map.op = op;
  map.a_zero_point = static_cast<float>(a_zero_point);
  map.b_zero_point = static_cast<float>(b_zero_point);
  if (relu) map.clamp.lo = 0.0f;
  map.inv_out_scale = out_scale.has_value() ? 1.0f / static_cast<float>(*out_scale) : 1.0f;
  map.out_zero_point = static_cast<float>(out_zero_point);
  return map;
}

LookupTensors prepare_quantized_lookup(const at::Tensor& x, const at::Tensor& table) {
  constexpr const char* op = "quantized_lookup";
  TQ_CHECK(x.scalar_type() == at::kChar || x.scalar_type() == at::kByte, op, ": x must be int8 or uint8, got ",
           x.scalar_type());
  TQ_CHECK(table.scalar_type() == at::kChar || table.scalar_type() == at::kByte, op,
           ": table must be int8 or uint8, got ", table.scalar_type());
  TQ_CHECK(table.dim() == 1 && table.size(0) == 256, op, ": table must be 1-d with 256 entries, got shape ",
           table.sizes());
  TQ_CHECK(table.device() == x.device(), op, ": table must be on x's device (", x.device(), "), got ",
           table.device());
  LookupTensors t;
  t.out = empty_like_output(x, x.options().dtype(table.scalar_type()));
  t.x = laid_out_as(x, t.out);
  t.table = table.contiguous();
  t.x_bytes = static_cast<const uint8_t*>(t.x.const_data_ptr());
  t.table_bytes = static_cast<const uint8_t*>(t.table.const_data_ptr());
  t.out_bytes = static_cast<uint8_t*>(t.out.data_ptr());
  t.numel = t.out.numel();
  return t;
}

PoolGeometry check_pool2d_arguments(const char* op, const at::Tensor& x, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    bool ceil_mode) {
  TQ_CHECK(x.scalar_type() == at::kChar || x.scalar_type() == at::kByte, op, ": x must be int8 or uint8, got ",
           x.scalar_type());
  TQ_CHECK(x.dim() == 3 || x.dim() == 4, op, ": x must be 3-d [C, H, W] or 4-d [B, C, H, W], got ", x.dim(), "-d");
  TQ_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
           ": kernel_size, stride, padding and dilation must have 2 entries each");
  TQ_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1, op, ": kernel_size must be >= 1, got ", kernel_size);
  TQ_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TQ_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  const int64_t d = x.dim();
  PoolGeometry g{d == 4 ? x.size(0) : 1, x.size(d - 3), x.size(d - 2), x.size(d - 1), kernel_size[0], kernel_size[1],
                 stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  TQ_CHECK(g.channels >= 1 && g.height >= 1 && g.width >= 1, op, ": x must have non-empty channel and spatial "
           "dimensions, got shape ", x.sizes());
  int64_t out[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t in = x.size(d - 2 + i);
    // the dilated kernel (and everything below) is formed with checked arithmetic
    const int64_t extent = checked_add(op, "the dilated kernel size",
                                       checked_mul(op, "the dilated kernel size", dilation[i], kernel_size[i] - 1), 1);
    TQ_CHECK(padding[i] >= 0 && padding[i] <= kernel_size[i] / 2, op, ": padding must be >= 0 and at most half the "
             "kernel size, got padding ", padding, " with kernel_size ", kernel_size);
    // torch's output size: floor((in + 2 pad - extent (+ stride - 1 in ceil mode)) / stride) + 1, less one in ceil
    // mode when the last window would start past the input and its left padding ((o - 1) * stride >= in + pad),
    // in divisions that cannot overflow for any stride
    const int64_t span = checked_add(op, "the padded input size", in, 2 * padding[i]) - extent;
    int64_t o = (ceil_mode ? ceil_div(span, stride[i]) : floor_div(span, stride[i])) + 1;
    if (ceil_mode && o - 1 >= ceil_div(in + padding[i], stride[i])) --o;
    TQ_CHECK(o >= 1, op, ": the output would be empty: the (dilated) kernel ", kernel_size, " with dilation ",
             dilation, " does not fit the input ", x.sizes().slice(d - 2), " with padding ", padding);
    out[i] = o;
  }
  g.out_h = out[0];
  g.out_w = out[1];
  checked_mul(op, "the output size", checked_mul(op, "the output size", g.batch * g.channels, g.out_h), g.out_w);
  return g;
}

// An average pool's scale (positive and finite as a float32) and the zero point of its int8/uint8 x.
void check_pool_scale_and_zero_point(const char* op, const at::Tensor& x, double scale, int64_t zero_point) {
  const float scale_f = static_cast<float>(scale);
  TQ_CHECK(std::isfinite(scale_f) && scale_f > 0.0f, op, ": scale must be positive and finite (as a float32), got ",
           scale);
  const bool is_int8 = x.scalar_type() == at::kChar;
  const int64_t lo = is_int8 ? -128 : 0, hi = is_int8 ? 127 : 255;
  TQ_CHECK(zero_point >= lo && zero_point <= hi, op, ": zero_point must lie in [", lo, ", ", hi, "] for ",
           x.scalar_type(), " x, got ", zero_point);
}

PoolGeometry check_avg_pool2d_arguments(const at::Tensor& x, double scale, int64_t zero_point,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                        bool ceil_mode, std::optional<int64_t> divisor_override) {
  constexpr const char* op = "quantized_avg_pool2d";
  const int64_t dilation[2] = {1, 1};
  const PoolGeometry g = check_pool2d_arguments(op, x, kernel_size, stride, padding, dilation, ceil_mode);
  check_pool_scale_and_zero_point(op, x, scale, zero_point);
  TQ_CHECK(!divisor_override.has_value() || *divisor_override != 0, op, ": divisor_override must not be 0");
  TQ_CHECK(g.kh <= kMaxExactWindow && g.kw <= kMaxExactWindow / g.kh, op, ": the window may have at most ",
           kMaxExactWindow, " elements (exact float32 sums), got kernel_size ", kernel_size);
  return g;
}

void check_adaptive_avg_pool2d_arguments(const at::Tensor& x, double scale, int64_t zero_point,
                                         at::IntArrayRef output_size) {
  constexpr const char* op = "quantized_adaptive_avg_pool2d";
  TQ_CHECK(x.scalar_type() == at::kChar || x.scalar_type() == at::kByte, op, ": x must be int8 or uint8, got ",
           x.scalar_type());
  TQ_CHECK(x.dim() == 3 || x.dim() == 4, op, ": x must be 3-d [C, H, W] or 4-d [B, C, H, W], got ", x.dim(), "-d");
  TQ_CHECK(output_size.size() == 2 && output_size[0] >= 0 && output_size[1] >= 0, op,
           ": output_size must be 2 sizes >= 0, got ", output_size);
  check_pool_scale_and_zero_point(op, x, scale, zero_point);
}

void check_grad_like(const at::Tensor& grad, const at::Tensor& x) {
  TQ_CHECK(grad.device() == x.device(), "grad must be on x's device (", x.device(), "), got ", grad.device());
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

void check_scale_values(const char* op, const char* name, const at::Tensor& scale) {
  const float* v = scale.data_ptr<float>();
  // a branch-free pass first (it vectorizes: a weight's scales are read on every call of an op), the search for
  // the bad value only when there is one; NaN fails both comparisons
  const int64_t n = scale.numel();
  int all_ok = 1;
  for (int64_t i = 0; i < n; ++i) all_ok &= (v[i] > 0) & (v[i] <= std::numeric_limits<float>::max());
  if (all_ok) return;
  for (int64_t i = 0; i < n; ++i)
    TQ_CHECK(std::isfinite(v[i]) && v[i] > 0, op, ": ", name, " must be positive and finite, got ", v[i],
             " at index ", i);
}

Rounding parse_rounding(c10::string_view rounding) {
  if (rounding == "nearest") return Rounding::Nearest;
  if (rounding == "truncate") return Rounding::Truncate;
  TQ_CHECK(false, "rounding must be 'nearest' or 'truncate', got '", std::string(rounding), "'");
}

void check_fake_quantize_error_args(const at::Tensor& rows, const at::Tensor& scale, const at::Tensor& zero_point) {
  TQ_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kFloat,
           "fake_quantize_error: rows must be a 2-D float32 tensor [channels, length], got ", rows.scalar_type(),
           " of shape ", rows.sizes());
  TQ_CHECK(scale.dim() == 2 && scale.size(1) == rows.size(0) && scale.scalar_type() == at::kFloat,
           "fake_quantize_error: scale must be float32 [candidates, ", rows.size(0), "], got ", scale.scalar_type(),
           " of shape ", scale.sizes());
  TQ_CHECK(zero_point.sizes() == scale.sizes() && zero_point.scalar_type() == at::kInt,
           "fake_quantize_error: zero_point must be int32 of scale's shape ", scale.sizes(), ", got ",
           zero_point.scalar_type(), " of shape ", zero_point.sizes());
  TQ_CHECK(scale.device() == rows.device() && zero_point.device() == rows.device(),
           "fake_quantize_error: scale and zero_point must be on rows' device (", rows.device(), "), got ",
           scale.device(), " and ", zero_point.device());
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
  if (x.size(a) <= 1) return {1, std::max<int64_t>(x.numel(), 1), true};  // (any stride for a dimension of size 1)
  return {x.size(a), x.stride(a), true};
}

}  // namespace torchquant
