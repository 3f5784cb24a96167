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
#include "sizes.h"

namespace torchquant {

// int8_mm: a and b int8, 2-d, with a.size(1) == b.size(0) (devices are checked by each kernel).
void check_int8_mm_operands(const at::Tensor& a, const at::Tensor& b);

// pack_int8_weight: w int8, non-empty [N, K], [G, N, K] or a conv weight [G, N, KH, KW, C] (packed as [G, N, K]
// with K = KH * KW * C, keeping its shape).
void check_weight_to_pack(const at::Tensor& w);

// How pack_int8_weight lays out w [N, K] or [G, N, K]: the packed tensor has w's (logical) shape, and its bytes fill
// a [G, round_up(N, kPackAlign), round_up(K, kPackAlign)] buffer zero padded in both dims, whose order inside each
// group is the device's own (CPU: VNNI panels, CUDA: row-major, so that there the logical view reads the weight
// itself).
struct PackedWeightLayout {
  int64_t groups, n, k;
  int64_t kp;           // round_up(k, kPackAlign): the bytes between rows (the packed tensor's stride(-2))
  int64_t group_bytes;  // round_up(n, kPackAlign) * kp (stride(0) of a grouped one)
};
PackedWeightLayout packed_weight_layout(const at::Tensor& w);
// The layout of `groups` packed [n, k] weights; `op` names the operator in the message of a size overflow.
PackedWeightLayout packed_weight_layout(const char* op, int64_t groups, int64_t n, int64_t k);

// An uninitialized (or zeroed) packed weight for w: shape w.sizes(), strides [group_bytes?, kp, (k dims row-major)],
// over a buffer of groups * group_bytes bytes followed by trailing_bytes more (a device's own extras).
at::Tensor empty_packed_weight(const at::Tensor& w, const PackedWeightLayout& layout, bool zeroed = false,
                               int64_t trailing_bytes = 0);

// What int8_linear's and int8_conv2d's packed weights must match, for check_packed_weight's message.
constexpr const char* kLinearWeightShape = "[out_features, x_q.size(-1)]";
constexpr const char* kConvWeightShape = "[groups, out_channels / groups, *kernel_size, x_q.size(1) / groups]";

// t must have dtype `dtype` and shape [n]; `op` and `name` name the operator and argument in the message.
void check_epilogue_vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t n);

// bias must be a float tensor of shape [n].
void check_bias(const char* op, const at::Tensor& bias, int64_t n);

// w_packed must be a packed weight as pack_int8_weight returns it, on x_q's device: int8 of the logical shape
// [groups, n, *k_dims] ([n, *k_dims] when groups is 0, i.e. ungrouped) laid out as PackedWeightLayout says, k the
// product of k_dims (int8_linear: [K]; int8_conv2d: [KH, KW, C/G]). `needed` says where the wanted shape comes
// from. Returns the layout.
PackedWeightLayout check_packed_weight(const char* op, const at::Tensor& w_packed, const at::Tensor& x_q,
                                       int64_t groups, int64_t n, at::IntArrayRef k_dims, const char* needed);

// out_dtype must be float32, float16 or bfloat16.
void check_float_out_dtype(const char* op, at::ScalarType out_dtype);

// int8_linear's and int8_conv2d's out_dtype with out_scale, out_zero_point and out_bits: a float dtype without
// out_scale (out_bits 8), or int8/uint8 with a positive finite out_scale (a normal float32), out_bits in [2, 8] and
// out_zero_point in the range of (out_bits, signed as out_dtype): [0, 2^out_bits - 1] for uint8, [-2^(out_bits - 1),
// 2^(out_bits - 1) - 1] for int8. Returns that range, which requantized outputs are clamped to.
QuantFormat check_output_dtype(const char* op, at::ScalarType out_dtype, std::optional<double> out_scale,
                               int64_t out_zero_point, int64_t out_bits);

// int8_linear's and int8_conv2d's fused activation clamp: clamp_min / clamp_max, each optional, finite as float32
// and clamp_min <= clamp_max; the absent bounds are -inf / +inf.
ActivationClamp check_activation_clamp(const char* op, std::optional<double> clamp_min,
                                       std::optional<double> clamp_max);

// The shape of an int8_conv2d: input [batch, channels, height, width], kernel, stride, padding, dilation, groups
// and the output size.
struct ConvGeometry {
  int64_t batch, channels, height, width;  // input
  int64_t groups, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;
  int64_t window;  // kh * kw * channels / groups: the reduction size
  int64_t rows;    // batch * out_h * out_w: the GEMM's rows

  // The offset of input pixel (b, ih, iw)'s first channel in the channels-last input.
  int64_t pixel_offset(int64_t b, int64_t ih, int64_t iw) const { return ((b * height + ih) * width + iw) * channels; }
};

// int8_conv2d: x_q 4-d, positive groups dividing both channel counts, 2-entry kernel_size >= 1, stride >= 1,
// padding >= 0, dilation >= 1, and a dilated kernel no larger than the padded input, with every size derived from
// them (padded input, dilated kernel, window, output rows and elements) below 2^63; returns the geometry.
ConvGeometry check_conv_arguments(const char* op, const at::Tensor& x_q, int64_t out_channels, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// A quantized operand of an element-wise step (quantized_add's a and b, int8_conv2d.residual's residual): t int8
// or uint8 on anchor's device, zero_point in t's range, scale a float32 tensor of 1 element on that device (its
// value is checked by each kernel). Messages name op, name, scale_name and anchor_name.
void check_quantized_operand(const char* op, const char* name, const at::Tensor& t, const char* scale_name,
                             const at::Tensor& scale, int64_t zero_point, const char* anchor_name,
                             const at::Tensor& anchor);

// int8_conv2d.residual's residual as check_quantized_operand wants it (anchor x_q), of the output's sizes.
void check_conv_residual(const at::Tensor& x_q, at::IntArrayRef out_sizes, const at::Tensor& residual,
                         const at::Tensor& residual_scale, int64_t residual_zero_point);

// quantized_add's and quantized_mul's tensors as their kernels read them: the output (of a's shape and memory
// format, at::empty_like's Preserve; quantized_mul: of the broadcast shape, in the memory format of the operand of
// that shape, a's where both are) and a and b laid out alike (out's strides; an operand in another layout, or
// broadcast, is copied), except where the caller keeps one broadcast operand (keep_broadcast): a where it is
// broadcast, else b, as its expansion to the output's shape (strides 0 where it repeats); the other is laid out.
struct BinaryTensors {
  at::Tensor out, a, b;
  BinaryMap map;
};

// Checks the arguments of quantized_add (op Add: a and b of the same shape) or quantized_mul (op Multiply: a and b
// broadcast), named op in messages: a and b int8 or uint8 on one device, zero points in their ranges, a_scale and
// b_scale float32 tensors of 1 element on that device, and out_dtype / out_scale / out_zero_point / out_bits as
// check_output_dtype wants them (scale values are checked by each kernel); allocates the output on the current
// device and sets up the element map.
BinaryTensors prepare_quantized_binary(const char* op, BinaryOp kind, const at::Tensor& a, const at::Tensor& a_scale,
                                       int64_t a_zero_point, const at::Tensor& b, const at::Tensor& b_scale,
                                       int64_t b_zero_point, at::ScalarType out_dtype,
                                       std::optional<double> out_scale, int64_t out_zero_point, int64_t out_bits,
                                       bool relu, bool keep_broadcast = false);

// x (of out's shape) as an element-wise kernel reads it beside out: x itself where its strides are out's, else a copy
// with out's strides.
at::Tensor laid_out_as(const at::Tensor& x, const at::Tensor& out);

// The element map of quantized_add / quantized_mul (op) for those zero points, output and ReLU (out_dtype,
// out_scale, out_zero_point and out_bits checked here, as check_output_dtype wants them).
BinaryMap binary_map(const char* op_name, BinaryOp op, int64_t a_zero_point, int64_t b_zero_point,
                     at::ScalarType out_dtype, std::optional<double> out_scale, int64_t out_zero_point,
                     int64_t out_bits, bool relu);

// quantized_lookup's tensors: the output (x's shape and memory format, the table's dtype), x laid out as the output
// is (so both are read and written as one dense span) and the table, contiguous; with their bytes (int8 and uint8
// alike) and the element count.
struct LookupTensors {
  at::Tensor out, x, table;
  const uint8_t* x_bytes;
  const uint8_t* table_bytes;
  uint8_t* out_bytes;
  int64_t numel;
};

// Checks quantized_lookup's arguments (x int8 or uint8; table int8 or uint8, 1-d with 256 entries, on x's device) and
// allocates the output on the current device.
LookupTensors prepare_quantized_lookup(const at::Tensor& x, const at::Tensor& table);

// The shape of a max_pool2d over x [B?, C, H, W]: torch's rules for the output size (ceil_mode: a last window that
// starts in the input or its left padding) and for the arguments.
struct PoolGeometry {
  int64_t batch, channels, height, width;
  int64_t kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;
};

// quantized_max_pool2d and quantized_avg_pool2d (op, for the messages): x int8 or uint8, 3-d or 4-d and not empty
// in C, H, W; 2-entry kernel_size, stride, dilation >= 1, padding >= 0 and at most half the kernel; an output of at
// least 1 x 1 (torch's rules).
PoolGeometry check_pool2d_arguments(const char* op, const at::Tensor& x, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    bool ceil_mode);

// quantized_avg_pool2d's own rules beside those: scale positive and finite in float32, zero_point in x's range,
// divisor_override not 0, and a window of at most kMaxExactWindow elements (its float32 sums on other devices are
// exact below 2**24).
constexpr int64_t kMaxExactWindow = ((int64_t{1} << 24) - 1) / 255;
PoolGeometry check_avg_pool2d_arguments(const at::Tensor& x, double scale, int64_t zero_point,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                        bool ceil_mode, std::optional<int64_t> divisor_override);

// quantized_adaptive_avg_pool2d's arguments: x int8 or uint8, 3-d or 4-d; output_size two sizes >= 0 (torch's
// adaptive pool checks the rest); scale and zero_point as quantized_avg_pool2d's.
void check_adaptive_avg_pool2d_arguments(const at::Tensor& x, double scale, int64_t zero_point,
                                         at::IntArrayRef output_size);

// fake_quantize backward: grad must have x's device, shape and dtype.
void check_grad_like(const at::Tensor& grad, const at::Tensor& x);

// CUDA kernels: t must be on x_q's device.
void check_on_device_of(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x_q,
                        const char* hint = "");

// int8_linear / int8_conv2d epilogue inputs: x_q int8 or uint8 with x_zero_point in its range, x_scale float32 with
// 1 or `rows` elements, w_sum int32 [n], w_scale float32 [n], bias float [n] or none, all on x_q's device.
void check_epilogue_inputs(const char* op, const at::Tensor& x_q, int64_t x_zero_point, const at::Tensor& x_scale,
                           int64_t rows, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, int64_t n);

// int8_linear / int8_conv2d (CPU): every element of `scale` (float32, contiguous) must be finite and > 0.
void check_scale_values(const char* op, const char* name, const at::Tensor& scale);

// ---- quantize family ----

Rounding parse_rounding(c10::string_view rounding);
// fake_quantize_error: rows float32 [C, R]; scale float32 and zero_point int32, both [F, C]; all on rows' device
void check_fake_quantize_error_args(const at::Tensor& rows, const at::Tensor& scale, const at::Tensor& zero_point);
// bits in [1, 8] -> the format's integer range
QuantFormat checked_format(int64_t bits, bool is_signed);

// A non-overlapping, dense x's memory (memory_order.h) viewed as [outer, channels, inner] for its per-tensor
// (channels 1) or per-channel parameters: the element at offset i from x.data_ptr() has channel (i / inner) %
// channels, inner being the stride of the channel axis.
struct QuantLayout {
  int64_t channels;
  int64_t inner;
  bool per_channel;
};
// Checks scale (float32) and zero_point (int32), 1-D, of one element (axis none) or x.size(axis), on x's device.
QuantLayout checked_quant_layout(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                 std::optional<int64_t> axis);

}  // namespace torchquant
