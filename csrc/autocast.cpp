// Autocast kernels of the integer layer ops (int8_linear, int8_linear_dynamic, int8_conv2d and their overloads).
// Inside torch.autocast, nn.Linear and nn.Conv2d return autocast's dtype (F.linear and F.conv2d are its
// lower-precision ops); a converted layer's float output takes that dtype too. The integer math and its float32
// epilogue are unchanged: only the output conversion is, as if the output were cast afterwards (a requested
// int8/uint8 output stays integer). The inputs are not cast: the quantizer reads x as given, so the integers are
// those outside autocast. One boxed kernel serves every op: it rewrites the op's out_dtype argument (or casts the
// output of the ops without one, which return x's dtype) and calls the op again below autocast.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace torchquant {
namespace {

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

template <c10::DeviceType Device>
void autocast_layer_op(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(Device);
  const auto& schema = op.schema();
  const auto out_dtype = schema.argumentIndexWithName("out_dtype");
  if (out_dtype) {
    c10::IValue& arg = (*stack)[stack->size() - schema.arguments().size() + *out_dtype];
    if (is_float(arg.toScalarType())) arg = dtype;
  }
  {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(Device));
    op.callBoxed(stack);
  }
  if (!out_dtype) stack->back() = stack->back().toTensor().to(dtype);
}

template <c10::DeviceType Device>
void register_autocast(torch::Library& m) {
  for (const char* name : {"int8_linear", "int8_linear_dynamic", "int8_linear_dynamic.activation", "int8_conv2d",
                           "int8_conv2d.residual"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_layer_op<Device>>());
}

}  // namespace
}  // namespace torchquant

TORCH_LIBRARY_IMPL(torchquant, AutocastCPU, m) { torchquant::register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(torchquant, AutocastCUDA, m) { torchquant::register_autocast<c10::DeviceType::CUDA>(m); }
