// The schemas of torchquant's ops (csrc/ops.cpp) as C++ signatures, for the C++ code that calls ops through the
// dispatcher (c10::TypedOperatorHandle): the autograd functions, the composite int8_linear_dynamic and the Python
// fast entries. One declaration per op: when a schema changes and its signature with it, a call left with the old
// arguments fails to compile rather than when it runs.
#pragma once
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace torchquant {

// quantize and fake_quantize
using QuantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<int64_t>, int64_t,
                              bool, c10::string_view);
using DequantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<int64_t>,
                                at::ScalarType);
using FakeQuantizeBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          std::optional<int64_t>, int64_t, bool, c10::string_view);
using QuantizePerTokenFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t);
using Int8MmFn = at::Tensor(const at::Tensor&, const at::Tensor&);
using Int8LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const std::optional<at::Tensor>&, int64_t, at::ScalarType,
                                std::optional<double>, int64_t, std::optional<double>, std::optional<double>,
                                int64_t);
using Int8LinearDynamicFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const std::optional<at::Tensor>&, int64_t);
using Int8LinearDynamicActivationFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                                 c10::string_view);
using Int8Conv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const std::optional<at::Tensor>&, int64_t, at::IntArrayRef,
                                at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, at::ScalarType,
                                std::optional<double>, int64_t, std::optional<double>, std::optional<double>,
                                int64_t);
using QuantizedAddFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
                                  int64_t, at::ScalarType, std::optional<double>, int64_t, bool, int64_t);
using QuantizedMulFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
                                  int64_t, at::ScalarType, std::optional<double>, int64_t, int64_t);
using QuantizedMaxPool2dFn = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                       at::IntArrayRef, bool);

// The handle of op `name` (with its overload) typed as Fn.
template <class Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Fn>();
}

}  // namespace torchquant
