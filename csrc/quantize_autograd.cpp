// Autograd kernels of the quantize family, for every device (the device kernels are reached through the
// dispatcher). Each op has an explicit kernel here because what it replaces cost more than a small op itself:
// torch's boxed not-implemented fallback (~5 us a call) and torch.library's Python autograd wrapper (~8 us a call,
// paid even when nothing requires grad). When grad mode is off or no input requires grad, every kernel calls the
// op below autograd directly: a redispatch with the call's own dispatch keys, below autograd and ADInplaceOrView
// (which the guard also excludes for anything the kernels call).
//
//   quantize:                integer output, never differentiable.
//   fake_quantize:           straight-through gradient to x (grad where x quantizes inside [qmin, qmax], 0 elsewhere),
//                            recomputed from x by fake_quantize_backward; none to scale or zero_point.
//   dequantize,
//   quantize_per_token:      no gradient reaches the inputs, but their float outputs stay in the graph when an input
//                            requires grad (their gradient is zero), so a loss through them can still be
//                            differentiated with respect to the rest of the graph.
//   fake_quantize_backward:  not differentiable (no double backward).
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_signatures.h"

namespace torchquant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::TypedOperatorHandle<QuantizeFn>& quantize_op() {
  static const auto handle = find_op<QuantizeFn>("torchquant::quantize");
  return handle;
}
const c10::TypedOperatorHandle<QuantizeFn>& fake_quantize_op() {
  static const auto handle = find_op<QuantizeFn>("torchquant::fake_quantize");
  return handle;
}
const c10::TypedOperatorHandle<DequantizeFn>& dequantize_op() {
  static const auto handle = find_op<DequantizeFn>("torchquant::dequantize");
  return handle;
}
const c10::TypedOperatorHandle<FakeQuantizeBackwardFn>& fake_quantize_backward_op() {
  static const auto handle = find_op<FakeQuantizeBackwardFn>("torchquant::fake_quantize_backward");
  return handle;
}
const c10::TypedOperatorHandle<QuantizePerTokenFn>& quantize_per_token_op() {
  static const auto handle = find_op<QuantizePerTokenFn>("torchquant::quantize_per_token");
  return handle;
}

// Whether autograd has to record this call: grad mode on and some input requiring grad.
template <class... Tensors>
bool records_grad(const Tensors&... inputs) {
  return at::GradMode::is_enabled() && (inputs.requires_grad() || ...);
}

struct FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, std::optional<int64_t> axis, int64_t bits, bool is_signed,
                            c10::string_view rounding) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, scale, zero_point});
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["signed"] = is_signed;
    ctx->saved_data["rounding"] = std::string(rounding);
    return fake_quantize_op().call(x, scale, zero_point, axis, bits, is_signed, rounding);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::string rounding = ctx->saved_data["rounding"].toStringRef();
    const at::Tensor grad_x = fake_quantize_backward_op().call(
        grads[0], saved[0], saved[1], saved[2], ctx->saved_data["axis"].toOptional<int64_t>(),
        ctx->saved_data["bits"].toInt(), ctx->saved_data["signed"].toBool(), rounding);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct DequantizeFunction : public torch::autograd::Function<DequantizeFunction> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& q, const at::Tensor& scale,
                            const at::Tensor& zero_point, std::optional<int64_t> axis, at::ScalarType dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dequantize_op().call(q, scale, zero_point, axis, dtype);
  }
  static variable_list backward(AutogradContext*, variable_list) { return variable_list(5); }
};

struct QuantizePerTokenFunction : public torch::autograd::Function<QuantizePerTokenFunction> {
  static variable_list forward(AutogradContext*, const at::Tensor& x, int64_t bits) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [q, scale] = quantize_per_token_op().call(x, bits);
    return {q, scale};
  }
  static variable_list backward(AutogradContext*, variable_list) { return variable_list(2); }
};

constexpr c10::DispatchKeySet kBelowAutograd = c10::after_ADInplaceOrView_keyset;

at::Tensor quantize_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& scale,
                             const at::Tensor& zero_point, std::optional<int64_t> axis, int64_t bits, bool is_signed,
                             c10::string_view rounding) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return quantize_op().redispatch(ks & kBelowAutograd, x, scale, zero_point, axis, bits, is_signed, rounding);
}

at::Tensor fake_quantize_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& zero_point, std::optional<int64_t> axis, int64_t bits,
                                  bool is_signed, c10::string_view rounding) {
  if (records_grad(x, scale, zero_point))
    return FakeQuantizeFunction::apply(x, scale, zero_point, axis, bits, is_signed, rounding);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fake_quantize_op().redispatch(ks & kBelowAutograd, x, scale, zero_point, axis, bits, is_signed, rounding);
}

at::Tensor dequantize_autograd(c10::DispatchKeySet ks, const at::Tensor& q, const at::Tensor& scale,
                               const at::Tensor& zero_point, std::optional<int64_t> axis, at::ScalarType dtype) {
  if (records_grad(q, scale, zero_point)) return DequantizeFunction::apply(q, scale, zero_point, axis, dtype);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return dequantize_op().redispatch(ks & kBelowAutograd, q, scale, zero_point, axis, dtype);
}

at::Tensor fake_quantize_backward_autograd(c10::DispatchKeySet ks, const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& scale, const at::Tensor& zero_point,
                                           std::optional<int64_t> axis, int64_t bits, bool is_signed,
                                           c10::string_view rounding) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fake_quantize_backward_op().redispatch(ks & kBelowAutograd, grad, x, scale, zero_point, axis, bits,
                                                is_signed, rounding);
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_autograd(c10::DispatchKeySet ks, const at::Tensor& x,
                                                                int64_t bits) {
  if (records_grad(x)) {
    const variable_list out = QuantizePerTokenFunction::apply(x, bits);
    return {out[0], out[1]};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return quantize_per_token_op().redispatch(ks & kBelowAutograd, x, bits);
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, Autograd, m) {
  m.impl("quantize", &torchquant::quantize_autograd);
  m.impl("dequantize", &torchquant::dequantize_autograd);
  m.impl("fake_quantize", &torchquant::fake_quantize_autograd);
  m.impl("fake_quantize_backward", &torchquant::fake_quantize_backward_autograd);
  m.impl("quantize_per_token", &torchquant::quantize_per_token_autograd);
}
