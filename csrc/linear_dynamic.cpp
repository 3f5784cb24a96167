// int8_linear_dynamic and its .activation overload: the int8-dynamic Linear forward (per-token quantize_per_token +
// int8_linear, then the GELU) as one dispatcher call. The CPU has its own kernel, which fuses all steps
// (csrc/cpu/gemm.cpp); elsewhere this implementation, registered as CompositeExplicitAutograd, calls the steps through
// the dispatcher, so it runs the kernels of whichever device x is on, and torch's own gelu. Either way a forward pays
// for one op call instead of two or three (and of none of quantize_per_token's autograd handling).
#include "check.h"
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "gemm_front.h"
#include "op_signatures.h"

namespace torchquant {
namespace {

at::Tensor int8_linear_dynamic_with(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_sum,
                                    const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                    int64_t out_features, Gelu gelu) {
  TQ_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "int8_linear_dynamic: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TQ_CHECK(x.dim() >= 1, "int8_linear_dynamic: x must have at least 1 dimension [..., K]");
  // the device of every other argument is checked by int8_linear's kernel, with the same messages
  static const auto quantize_per_token = find_op<QuantizePerTokenFn>("torchquant::quantize_per_token");
  static const auto int8_linear = find_op<Int8LinearFn>("torchquant::int8_linear");
  const auto [x_q, x_scale] = quantize_per_token.call(x, 8);
  // x_scale keeps the shape x.shape[:-1]: int8_linear takes one scale per row in any shape
  at::Tensor y = int8_linear.call(x_q, x_scale, 0, w_packed, w_sum, w_scale, bias, out_features,
                                  gelu == Gelu::None ? x.scalar_type() : at::kFloat, std::nullopt, 0, std::nullopt,
                                  std::nullopt, 8);
  if (gelu == Gelu::None) return y;
  // the GELU of the float32 y, then the cast, as the CPU epilogue computes it
  return at::gelu_(y, gelu == Gelu::Tanh ? "tanh" : "none").to(x.scalar_type());
}

at::Tensor int8_linear_dynamic(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_sum,
                               const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                               int64_t out_features) {
  return int8_linear_dynamic_with(x, w_packed, w_sum, w_scale, bias, out_features, Gelu::None);
}

at::Tensor int8_linear_dynamic_activation(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_sum,
                                          const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                          int64_t out_features, c10::string_view activation) {
  const Gelu gelu = parse_activation("int8_linear_dynamic", activation);
  return int8_linear_dynamic_with(x, w_packed, w_sum, w_scale, bias, out_features, gelu);
}

// No gradient flows through integer kernels (quantize_per_token passes none to x), so the autograd step is to run
// below autograd, as an explicit kernel: the boxed not-implemented fallback it replaces cost ~5 us per call, more
// than the whole op at small sizes. The output does not require grad, as int8_linear's integer input never did.
// It calls the op itself again below autograd (not the composite above), so that the device's own kernel runs
// (the CPU one fuses both steps) and a traced graph (torch.compile, torch.export) holds one int8_linear_dynamic
// node per layer instead of its two steps.
at::Tensor int8_linear_dynamic_autograd(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_sum,
                                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                        int64_t out_features) {
  static const auto op = find_op<Int8LinearDynamicFn>("torchquant::int8_linear_dynamic");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, w_packed, w_sum, w_scale, bias, out_features);
}

at::Tensor int8_linear_dynamic_activation_autograd(const at::Tensor& x, const at::Tensor& w_packed,
                                                   const at::Tensor& w_sum, const at::Tensor& w_scale,
                                                   const std::optional<at::Tensor>& bias, int64_t out_features,
                                                   c10::string_view activation) {
  static const auto op =
      find_op<Int8LinearDynamicActivationFn>("torchquant::int8_linear_dynamic", "activation");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, w_packed, w_sum, w_scale, bias, out_features, activation);
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, CompositeExplicitAutograd, m) {
  m.impl("int8_linear_dynamic", &torchquant::int8_linear_dynamic);
  m.impl("int8_linear_dynamic.activation", &torchquant::int8_linear_dynamic_activation);
}

TORCH_LIBRARY_IMPL(torchquant, Autograd, m) {
  m.impl("int8_linear_dynamic", &torchquant::int8_linear_dynamic_autograd);
  m.impl("int8_linear_dynamic.activation", &torchquant::int8_linear_dynamic_activation_autograd);
}
