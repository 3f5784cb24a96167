// CPU kernels of int8_mm, pack_int8_weight and int8_linear (schemas in csrc/ops.cpp) on the engine of gemm_core.
#include "check.h"
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cpu/gemm_core.h"
#include "cpu/gemm_ops.h"
#include "cpu/isa.h"

namespace torchquant::gemm {

namespace {

// The output kind of a validated out_dtype (see check_output_dtype).
OutKind out_kind(at::ScalarType out_dtype) {
  switch (out_dtype) {
    case at::kHalf: return OutKind::Float16;
    case at::kBFloat16: return OutKind::BFloat16;
    case at::kChar: return OutKind::Int8;
    case at::kByte: return OutKind::UInt8;
    default: return OutKind::Float32;
  }
}

}  // namespace

Epilogue EpilogueInputs::epilogue(at::ScalarType out_dtype, void* out, int64_t out_row_stride,
                                  std::optional<double> out_scale, int64_t out_zero_point) const {
  Epilogue ep;
  ep.kind = out_kind(out_dtype);
  ep.out = out;
  ep.out_row_stride = out_row_stride;
  ep.col_offset = col_offset.data_ptr<int32_t>();
  ep.row_scale = x_scale.data_ptr<float>();
  ep.per_row_scale = x_scale.numel() > 1;
  ep.col_scale = w_scale.data_ptr<float>();
  ep.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (out_scale.has_value()) {
    ep.inv_out_scale = 1.0f / static_cast<float>(*out_scale);
    ep.out_zero_point = static_cast<float>(out_zero_point);
    ep.qmin = ep.kind == OutKind::Int8 ? -128.0f : 0.0f;
    ep.qmax = ep.kind == OutKind::Int8 ? 127.0f : 255.0f;
  }
  return ep;
}

EpilogueInputs prepare_epilogue_inputs(const char* op, const at::Tensor& x_q, int64_t x_zero_point,
                                       const at::Tensor& x_scale, int64_t rows, const at::Tensor& w_sum,
                                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t n) {
  check_epilogue_inputs(op, x_q, x_zero_point, x_scale, rows, w_sum, w_scale, bias, n);
  const bool is_int8 = x_q.scalar_type() == at::kChar;
  EpilogueInputs in;
  if (bias.has_value()) {
    in.bias = bias->to(at::kFloat).contiguous();
  }
  in.x_scale = x_scale.contiguous();
  in.w_scale = w_scale.contiguous();
  check_scale_values(op, "x_scale", in.x_scale);
  check_scale_values(op, "w_scale", in.w_scale);
  // sum_k (x - zp) w = sum_k x_u8 w - (zp + shift) * w_sum, computed modulo 2^32 like the accumulators
  const uint32_t shift = static_cast<uint32_t>(x_zero_point + (is_int8 ? 128 : 0));
  in.col_offset = at::empty({n}, w_sum.options());
  const at::Tensor w_sum_c = w_sum.contiguous();
  const int32_t* sums = w_sum_c.data_ptr<int32_t>();
  int32_t* offsets = in.col_offset.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) offsets[i] = static_cast<int32_t>(shift * static_cast<uint32_t>(sums[i]));
  return in;
}

namespace {

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_int8_mm_operands(a, b);
  TQ_CHECK(a.device().is_cpu() && b.device().is_cpu(), "int8_mm: a and b must both be on the CPU, got ",
              a.device(), " and ", b.device());
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor out = at::empty({m, n}, a.options().dtype(at::kInt));
  if (m == 0 || n == 0) return out;
  if (k == 0) return out.zero_();
  const int64_t k4 = round_up(k, 4);
  const ScratchScope weights_scope(Scratch::Weights), activations_scope(Scratch::Activations);
  int8_t* b_packed = reinterpret_cast<int8_t*>(
      scratch_buffer(Scratch::Weights, checked_mul("int8_mm", "the packed b size", round_up(n, kPanelCols), k4)));
  std::vector<int32_t> col_offset(n);
  pack_weight(b.data_ptr<int8_t>(), n, k, b.stride(1), b.stride(0), k4, b_packed, col_offset.data());
  for (auto& c : col_offset) c = static_cast<int32_t>(128u * static_cast<uint32_t>(c));  // the +128 shift of a
  uint8_t* a_packed = scratch_buffer(Scratch::Activations, checked_mul("int8_mm", "the packed a size", m, k4));
  pack_activation_rows(reinterpret_cast<const uint8_t*>(a.data_ptr<int8_t>()), m, k, a.stride(0), a.stride(1), 0x80,
                       a_packed, k4);
  GemmArgs args;
  args.a = a_packed;
  args.lda = k4;
  args.b = b_packed;
  args.kp = k4;
  args.m = m;
  args.n = n;
  args.k = k;
  Epilogue ep;
  ep.kind = OutKind::Int32;
  ep.out = out.data_ptr<int32_t>();
  ep.out_row_stride = n;
  ep.col_offset = col_offset.data();
  gemm_u8s8(args, ep, cpu_isa());
  return out;
}

at::Tensor pack_int8_weight_cpu(const at::Tensor& w) {
  check_weight_to_pack(w);
  const PackedWeightLayout layout = packed_weight_layout(w);
  at::Tensor packed = empty_packed_weight(w, layout);
  int8_t* dst = packed.data_ptr<int8_t>();
  for (int64_t g = 0; g < layout.groups; ++g) {
    const int8_t* src = w.data_ptr<int8_t>() + (w.dim() == 3 ? g * w.stride(0) : 0);
    pack_weight(src, layout.n, layout.k, w.stride(-2), w.stride(-1), layout.kp, dst + g * layout.group_bytes, nullptr);
  }
  return packed;
}

at::Tensor int8_linear_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                           const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, int64_t out_features, at::ScalarType out_dtype,
                           std::optional<double> out_scale, int64_t out_zero_point, std::optional<double> clamp_min,
                           std::optional<double> clamp_max) {
  constexpr const char* op = "int8_linear";
  TQ_CHECK(x_q.dim() >= 1, op, ": x_q must have at least 1 dimension [..., K]");
  TQ_CHECK(out_features >= 1, op, ": out_features must be >= 1, got ", out_features);
  const int64_t k = x_q.size(-1), n = out_features;
  TQ_CHECK(k >= 1, op, ": x_q's last dimension (K) must be >= 1");
  const int64_t m = x_q.numel() / k;
  const int64_t kp = check_packed_weight(op, w_packed, x_q, 0, n, {k}, kLinearWeightShape);
  const EpilogueInputs in = prepare_epilogue_inputs(op, x_q, x_zero_point, x_scale, m, w_sum, w_scale, bias, n);

  check_output_dtype(op, out_dtype, out_scale, out_zero_point);
  const ActivationClamp clamp = check_activation_clamp(op, clamp_min, clamp_max);

  std::vector<int64_t> out_shape(x_q.sizes().begin(), x_q.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x_q.options().dtype(out_dtype));
  if (m == 0) return out;

  const at::Tensor x2 = x_q.reshape({m, k});
  const uint8_t flip = activation_flip(x_q);
  const uint8_t* x_bytes = static_cast<const uint8_t*>(x2.data_ptr());
  GemmArgs args;
  const ScratchScope activations_scope(Scratch::Activations);
  if (flip == 0 && k % 4 == 0 && x2.stride(1) == 1) {  // uint8 rows are read in place
    args.a = x_bytes;
    args.lda = x2.stride(0);
  } else {
    args.lda = round_up(k, 4);
    uint8_t* a_packed = scratch_buffer(Scratch::Activations, checked_mul(op, "the packed x_q size", m, args.lda));
    pack_activation_rows(x_bytes, m, k, x2.stride(0), x2.stride(1), flip, a_packed, args.lda);
    args.a = a_packed;
  }
  args.b = w_packed.data_ptr<int8_t>();
  args.kp = kp;
  args.m = m;
  args.n = n;
  args.k = k;
  Epilogue ep = in.epilogue(out_dtype, out.data_ptr(), n, out_scale, out_zero_point);
  ep.clamp = clamp;
  gemm_u8s8(args, ep, cpu_isa());
  return out;
}

}  // namespace
}  // namespace torchquant::gemm

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("int8_mm", &torchquant::gemm::int8_mm_cpu);
  m.impl("pack_int8_weight", &torchquant::gemm::pack_int8_weight_cpu);
  m.impl("int8_linear", &torchquant::gemm::int8_linear_cpu);
}
