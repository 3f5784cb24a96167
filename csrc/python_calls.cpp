// The fast path of the public quantize-family functions (torchquant/_ops/quantize.py): torchquant._C.quantize(x,
// scale, zero_point, axis, bits, signed, rounding) and its siblings take the wrapper's arguments as the user gave
// them (Python numbers or tensors), accept the common well-formed call, turn it into the op's arguments and make
// the typed dispatcher call (every device kernel, the autograd kernels, dispatch modes). The Python checks and
// torch.ops' argument boxing this replaces cost 1.5-3 us a call: more than the op itself on a few thousand elements.
//
// Anything else returns NotImplemented and the wrapper takes its checked Python path, which raises the error with
// its message or handles the rarer valid forms: a wrong argument, a float zero point, a zero point tensor that is
// not int32, a scale tensor that is not float32, an x, scale or zero point off the CPU (the wrapper checks device
// qparams' values), a tensor subclass or an active __torch_function__ mode. The accepted calls are a subset of what the
// wrapper accepts, converted exactly as it converts them; the kernels check the values of CPU scale and zero point
// tensors themselves. quantized_add's and quantized_mul's entries work alike; int8_mm's takes int8 operands on
// any one device (the op has no qparams to convert).
//
// The converted layers' entries (int8_linear_dynamic, quantized_layer_forward) take the arguments the layer prepared
// at convert / load / move time, on any device, and check only the caller's input; they decline what the layer's
// Python forward would treat differently, which then raises its errors.
#include <Python.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/MaybeOwned.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>

#include "cpu/gemm_ops.h"
#include "gemm_front.h"
#include "op_signatures.h"
#include "output_memory.h"
#include "quant_math.h"

namespace torchquant {
namespace {

// Tensors at least this large run without the GIL, so that other Python threads run meanwhile; below it, releasing
// and taking the GIL back costs more than it lets run.
constexpr int64_t kReleaseGilNumel = 1 << 16;

at::Tensor hold(const at::Tensor& t) { return t; }
at::Tensor hold(const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }
at::Tensor hold(const at::Tensor* t) { return t != nullptr ? *t : at::Tensor(); }

// call(), without the GIL where numel is large. The entries borrow their arguments' tensors, which `tensors` lists
// (every tensor the call reads): while the GIL is released they are held, a reference each, since another thread
// could otherwise swap a borrowed tensor's contents (torch.utils.swap_tensors refuses only a tensor with other
// references) and free the memory the op reads or writes.
template <class Call, class... Tensors>
auto call_op(int64_t numel, const Call& call, const Tensors&... tensors) {
  if (numel < kReleaseGilNumel) return call();
  [[maybe_unused]] const std::array<at::Tensor, sizeof...(Tensors)> held{hold(tensors)...};
  pybind11::gil_scoped_release no_gil;
  return call();
}

// HANDLE_TH_ERRORS / END_HANDLE_TH_ERRORS, with a failed allocation (a std::bad_alloc: a scratch buffer's, or an
// output's, whose message gives its size) raised as MemoryError(what()), as torch.ops raises it on the wrappers'
// other path (HANDLE_TH_ERRORS makes it a RuntimeError)
#define TQ_HANDLE_ERRORS HANDLE_TH_ERRORS try {
#define TQ_END_HANDLE_ERRORS                      \
  }                                               \
  catch (const std::bad_alloc& e) {               \
    PyErr_SetString(PyExc_MemoryError, e.what()); \
    throw python_error();                         \
  }                                               \
  END_HANDLE_TH_ERRORS

// The argument conversions below return null / nullopt / false for anything the fast path leaves to the wrapper.

// A torch.Tensor or nn.Parameter (no __torch_function__ of its own) while no __torch_function__ mode is active.
const at::Tensor* plain_tensor(PyObject* o) {
  if (!THPVariable_CheckExact(o) || at::impl::torch_function_mode_enabled()) return nullptr;
  return &THPVariable_Unpack(o);
}

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }
bool is_int8(at::ScalarType t) { return t == at::kChar || t == at::kByte; }

// An int (not a bool or an int subclass) in [low, high].
std::optional<int64_t> int_in(PyObject* o, int64_t low, int64_t high) {
  if (!PyLong_CheckExact(o)) return std::nullopt;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || v < low || v > high) return std::nullopt;
  return v;
}

// axis: None, or an int in [-x.dim(), x.dim()), made non-negative.
bool axis_arg(PyObject* o, const at::Tensor& x, std::optional<int64_t>& axis) {
  if (o == Py_None) return true;
  const auto a = int_in(o, -x.dim(), x.dim() - 1);
  if (a) axis = *a < 0 ? *a + x.dim() : *a;
  return a.has_value();
}

// rounding: "nearest" or "truncate".
std::optional<c10::string_view> rounding_arg(PyObject* o) {
  if (!PyUnicode_Check(o)) return std::nullopt;
  Py_ssize_t size = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &size);
  if (s == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  const c10::string_view r(s, size);
  if (r != "nearest" && r != "truncate") return std::nullopt;
  return r;
}

// Python-number scales and zero points of CPU calls as the CPU tensors the ops take, one per (value, length, dtype):
// building a tensor costs as much as quantizing a few thousand elements, and the ops only read these. (Not for
// other devices: a cached device tensor would outlive the stream and graph-capture pool it was made in.) A
// direct-mapped table (a new key replaces the one in its slot): one hash and one comparison a call, and a bounded
// size. Guarded by the GIL.
struct NumberKey {
  double value = 0;
  int64_t length = 0;
  at::ScalarType dtype = at::kFloat;
  bool operator==(const NumberKey& o) const {
    return value == o.value && length == o.length && dtype == o.dtype;
  }
};
struct NumberSlot {
  NumberKey key;
  at::Tensor tensor;  // undefined: an empty slot
};
constexpr size_t kNumberSlots = 1024;
// Longer tensors (a number broadcast to many channels) are made per call: 1024 slots of x.size(axis) floats each
// could hold gigabytes.
constexpr int64_t kCachedLengthMax = 4096;

size_t slot_of(const NumberKey& k) {
  uint64_t bits = 0;
  static_assert(sizeof(bits) == sizeof(k.value));
  std::memcpy(&bits, &k.value, sizeof(bits));
  uint64_t h = bits ^ (static_cast<uint64_t>(k.length) * 0x9E3779B97F4A7C15ull) ^
               (static_cast<uint64_t>(k.dtype) << 48);
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return h % kNumberSlots;
}

std::optional<at::Tensor> number_tensor(double value, int64_t length, at::ScalarType dtype) {
  // torch.jit.trace records how the tensor was made: a cached one would be a constant in one trace and an aten::full
  // in another, and trace's check that two runs record the same graph fails (the Python path makes one per call)
  if (torch::jit::tracer::isTracing()) return std::nullopt;
  if (length > kCachedLengthMax) {
    if (c10::impl::dispatch_mode_enabled()) return std::nullopt;
    return at::full({length}, value, at::TensorOptions().dtype(dtype));
  }
  static auto* slots = new NumberSlot[kNumberSlots];  // never destroyed: no tensor destructors at exit
  const NumberKey key{value, length, dtype};
  NumberSlot& slot = slots[slot_of(key)];
  if (slot.tensor.defined() && slot.key == key) return slot.tensor;
  if (c10::impl::dispatch_mode_enabled()) return std::nullopt;  // a dispatch mode would make it one of its own
  {
    c10::InferenceMode usable_in_and_out_of_inference_mode(false);
    slot.tensor = at::full({length}, value, at::TensorOptions().dtype(dtype));
  }
  slot.key = key;
  return slot.tensor;
}

// scale (dtype float32) or zero_point (int32) of x as the op takes it, with `length` entries (1 per tensor, x's
// channels per channel) for a CPU x: a number in [low, high] (the scale may be a float, the zero point only an int)
// as a cached tensor, or a CPU tensor of that dtype and length, as a 1-D view. Other devices take the Python path.
// A 1-D tensor argument is borrowed (it outlives the call; a copy costs two atomic reference counts; call_op holds it
// while the GIL is released); a cached number's tensor is owned, as the other qparam's lookup may replace its slot.
std::optional<c10::MaybeOwned<at::Tensor>> qparam_arg(PyObject* o, at::ScalarType dtype, double low, double high,
                                                      int64_t length, const at::Tensor& x) {
  // Numbers first: their exact-type tests are pointer comparisons, while THPVariable_Check on a non-tensor is an
  // isinstance call (a metaclass lookup) that costs tens of nanoseconds.
  double value = 0;
  if (dtype == at::kFloat && PyFloat_CheckExact(o)) {
    value = PyFloat_AS_DOUBLE(o);
  } else if (PyLong_CheckExact(o)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0) return std::nullopt;
    value = static_cast<double>(v);
  } else if (THPVariable_Check(o)) {
    const at::Tensor* t = plain_tensor(o);
    if (t == nullptr || t->scalar_type() != dtype || !t->is_cpu() || !x.is_cpu() || t->numel() != length)
      return std::nullopt;
    return t->dim() == 1 ? c10::MaybeOwned<at::Tensor>::borrowed(*t)
                         : c10::MaybeOwned<at::Tensor>::owned(t->reshape({length}));
  } else {
    return std::nullopt;
  }
  if (!(value >= low && value <= high)) return std::nullopt;  // also NaN
  if (!x.is_cpu()) return std::nullopt;
  auto tensor = number_tensor(value, length, dtype);
  if (!tensor) return std::nullopt;
  return c10::MaybeOwned<at::Tensor>::owned(std::move(*tensor));
}

// A scale: positive and finite as a float32, at least the smallest normal one (1 / scale stays finite).
std::optional<c10::MaybeOwned<at::Tensor>> scale_arg(PyObject* o, int64_t length, const at::Tensor& x) {
  return qparam_arg(o, at::kFloat, FLT_MIN, FLT_MAX, length, x);
}
std::optional<c10::MaybeOwned<at::Tensor>> zero_point_arg(PyObject* o, int64_t low, int64_t high, int64_t length,
                                                          const at::Tensor& x) {
  return qparam_arg(o, at::kInt, static_cast<double>(low), static_cast<double>(high), length, x);
}

void check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char* fn) {
  if (nargs != want)
    throw torch::TypeError(std::string(fn) + " takes " + std::to_string(want) + " arguments, got " +
                           std::to_string(nargs));
}

// quantize / fake_quantize (x, scale, zero_point, axis, bits, signed, rounding) -> Tensor
template <const char* Name>
PyObject* call_quantize_like(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 7, Name);
  const at::Tensor* x = plain_tensor(args[0]);
  std::optional<int64_t> axis;
  const auto bits = int_in(args[4], 1, 8);
  const auto rounding = rounding_arg(args[6]);
  if (x == nullptr || !is_float(x->scalar_type()) || !axis_arg(args[3], *x, axis) || !bits || !PyBool_Check(args[5]) ||
      !rounding)
    Py_RETURN_NOTIMPLEMENTED;
  const bool is_signed = args[5] == Py_True;
  const int64_t length = axis ? x->size(*axis) : 1;
  const QuantFormat f = quant_format(*bits, is_signed);  // sign binarization: zero point 0 only
  const auto scale = scale_arg(args[1], length, *x);
  const auto zero_point = zero_point_arg(args[2], f.binary ? 0 : static_cast<int64_t>(f.qmin),
                                         f.binary ? 0 : static_cast<int64_t>(f.qmax), length, *x);
  if (!scale || !zero_point) Py_RETURN_NOTIMPLEMENTED;
  static const auto op = find_op<QuantizeFn>(Name);
  return THPVariable_Wrap(
      call_op(x->numel(), [&] { return op.call(*x, **scale, **zero_point, axis, *bits, is_signed, *rounding); }, *x,
              **scale, **zero_point));
  TQ_END_HANDLE_ERRORS
}

constexpr char kQuantize[] = "torchquant::quantize";
constexpr char kFakeQuantize[] = "torchquant::fake_quantize";

// dequantize(q, scale, zero_point, axis, dtype) -> Tensor
PyObject* call_dequantize(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 5, "dequantize");
  const at::Tensor* q = plain_tensor(args[0]);
  std::optional<int64_t> axis;
  if (q == nullptr || !is_int8(q->scalar_type()) ||
      !axis_arg(args[3], *q, axis) || !THPDtype_Check(args[4]))
    Py_RETURN_NOTIMPLEMENTED;
  const at::ScalarType dtype = reinterpret_cast<THPDtype*>(args[4])->scalar_type;
  if (!is_float(dtype)) Py_RETURN_NOTIMPLEMENTED;
  const bool is_signed = q->scalar_type() == at::kChar;
  const int64_t length = axis ? q->size(*axis) : 1;
  const auto scale = scale_arg(args[1], length, *q);
  const auto zero_point = zero_point_arg(args[2], is_signed ? -128 : 0, is_signed ? 127 : 255, length, *q);
  if (!scale || !zero_point) Py_RETURN_NOTIMPLEMENTED;
  static const auto op = find_op<DequantizeFn>("torchquant::dequantize");
  return THPVariable_Wrap(
      call_op(q->numel(), [&] { return op.call(*q, **scale, **zero_point, axis, dtype); }, *q, **scale, **zero_point));
  TQ_END_HANDLE_ERRORS
}

// quantize_per_token(x, bits) -> (q, scale)
PyObject* call_quantize_per_token(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 2, "quantize_per_token");
  const at::Tensor* x = plain_tensor(args[0]);
  const auto bits = int_in(args[1], 2, 8);
  if (x == nullptr || !is_float(x->scalar_type()) || x->dim() == 0 || !bits) Py_RETURN_NOTIMPLEMENTED;
  static const auto op = find_op<QuantizePerTokenFn>("torchquant::quantize_per_token");
  auto [q, scale] = call_op(x->numel(), [&] { return op.call(*x, *bits); }, *x);
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) throw python_error();
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(q)));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(scale)));
  return result;
  TQ_END_HANDLE_ERRORS
}

// int8_mm(a, b) -> Tensor: int8 matrices [M, K] and [K, N] on one device (the op checks nothing else the wrapper
// would). Its Python checks cost about a microsecond, a third of a small product's call.
PyObject* call_int8_mm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 2, "int8_mm");
  const at::Tensor* a = plain_tensor(args[0]);
  const at::Tensor* b = plain_tensor(args[1]);
  if (a == nullptr || b == nullptr || a->scalar_type() != at::kChar || b->scalar_type() != at::kChar ||
      a->dim() != 2 || b->dim() != 2 || a->size(1) != b->size(0) || a->device() != b->device())
    Py_RETURN_NOTIMPLEMENTED;
  // the GIL released by the work's size: a packs, b packs (every call) and the output (saturated: expanded operands)
  const int64_t m = a->size(0), n = b->size(1);
  const int64_t out_numel = n != 0 && m > INT64_MAX / n ? INT64_MAX : m * n;
  static const auto op = find_op<Int8MmFn>("torchquant::int8_mm");
  return THPVariable_Wrap(
      call_op(std::max({a->numel(), b->numel(), out_numel}), [&] { return op.call(*a, *b); }, *a, *b));
  TQ_END_HANDLE_ERRORS
}

// int8_linear_dynamic(x, in_features, w_packed, w_sum, w_scale, bias, out_features, activation) -> Tensor:
// QuantLinear's converted int8-dynamic forward, whose weight-side arguments the layer prepared (the op's arguments
// but for in_features; activation None or a str). Only x comes from the caller: it must be a float tensor
// [..., in_features] on the weight's device.
PyObject* call_int8_linear_dynamic(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 8, "int8_linear_dynamic");
  const at::Tensor* x = plain_tensor(args[0]);
  const auto in_features = int_in(args[1], 0, INT64_MAX);
  const at::Tensor* w_packed = plain_tensor(args[2]);
  const at::Tensor* w_sum = plain_tensor(args[3]);
  const at::Tensor* w_scale = plain_tensor(args[4]);
  const at::Tensor* bias = args[5] == Py_None ? nullptr : plain_tensor(args[5]);
  const auto out_features = int_in(args[6], 0, INT64_MAX);
  c10::string_view activation;  // empty: None
  if (args[7] != Py_None) {
    if (!PyUnicode_Check(args[7])) Py_RETURN_NOTIMPLEMENTED;
    Py_ssize_t size = 0;
    const char* text = PyUnicode_AsUTF8AndSize(args[7], &size);
    if (text == nullptr) throw python_error();
    if (size == 0) Py_RETURN_NOTIMPLEMENTED;
    activation = c10::string_view(text, static_cast<size_t>(size));
  }
  if (x == nullptr || !in_features || w_packed == nullptr || w_sum == nullptr || w_scale == nullptr ||
      (bias == nullptr && args[5] != Py_None) || !out_features || !is_float(x->scalar_type()) || x->dim() == 0 ||
      x->size(-1) != *in_features || x->device() != w_packed->device())
    Py_RETURN_NOTIMPLEMENTED;
  static const auto op = find_op<Int8LinearDynamicFn>("torchquant::int8_linear_dynamic");
  static const auto op_activation =
      find_op<Int8LinearDynamicActivationFn>("torchquant::int8_linear_dynamic", "activation");
  const std::optional<at::Tensor> bias_arg = bias == nullptr ? std::nullopt : std::optional<at::Tensor>(*bias);
  return THPVariable_Wrap(call_op(
      x->numel(),
      [&] {
        if (activation.empty()) return op.call(*x, *w_packed, *w_sum, *w_scale, bias_arg, *out_features);
        return op_activation.call(*x, *w_packed, *w_sum, *w_scale, bias_arg, *out_features, activation);
      },
      *x, *w_packed, *w_sum, *w_scale, bias_arg));
  TQ_END_HANDLE_ERRORS
}

// A clamp bound or an output scale: None, or a float.
bool optional_float_arg(PyObject* o, std::optional<double>& bound) {
  if (o == Py_None) return true;
  if (!PyFloat_CheckExact(o)) return false;
  bound = PyFloat_AS_DOUBLE(o);
  return true;
}

// quantized_add(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_dtype, out_scale, out_zero_point, relu,
// out_bits) -> Tensor and quantized_mul(the same but relu) -> Tensor: CPU a and b (of one shape for the add,
// broadcast for the product: the op checks), Python-number or float32 [1] scales, int zero points and out_bits (the
// kernel checks their ranges), an out_scale that is None or a float, relu a bool.
// Whether shapes a and b broadcast (torch's rules: aligned at the last dim, each pair equal or one of them 1).
bool broadcastable(at::IntArrayRef a, at::IntArrayRef b) {
  for (size_t i = 1; i <= std::min(a.size(), b.size()); ++i)
    if (a[a.size() - i] != b[b.size() - i] && a[a.size() - i] != 1 && b[b.size() - i] != 1) return false;
  return true;
}

template <BinaryOp Op>
PyObject* call_quantized_binary(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  constexpr bool add = Op == BinaryOp::Add;
  check_nargs(nargs, add ? 11 : 10, add ? "quantized_add" : "quantized_mul");
  const at::Tensor* a = plain_tensor(args[0]);
  const at::Tensor* b = plain_tensor(args[3]);
  const auto a_zero_point = int_in(args[2], INT64_MIN, INT64_MAX);
  const auto b_zero_point = int_in(args[5], INT64_MIN, INT64_MAX);
  const auto out_zero_point = int_in(args[8], INT64_MIN, INT64_MAX);
  const auto out_bits = int_in(args[add ? 10 : 9], INT64_MIN, INT64_MAX);
  std::optional<double> out_scale;
  if (a == nullptr || b == nullptr || !is_int8(a->scalar_type()) || !is_int8(b->scalar_type()) ||
      !a->is_cpu() || !b->is_cpu() || !(add ? a->sizes() == b->sizes() : broadcastable(a->sizes(), b->sizes())) ||
      !a_zero_point || !b_zero_point ||
      !out_zero_point || !out_bits || !THPDtype_Check(args[6]) || !optional_float_arg(args[7], out_scale) ||
      (add && !PyBool_Check(args[9])))
    Py_RETURN_NOTIMPLEMENTED;
  const at::ScalarType out_dtype = reinterpret_cast<THPDtype*>(args[6])->scalar_type;
  if (!is_float(out_dtype) && !is_int8(out_dtype)) Py_RETURN_NOTIMPLEMENTED;
  const auto a_scale = scale_arg(args[1], 1, *a);
  const auto b_scale = scale_arg(args[4], 1, *a);
  if (!a_scale || !b_scale) Py_RETURN_NOTIMPLEMENTED;
  if constexpr (add) {
    static const auto op = find_op<QuantizedAddFn>("torchquant::quantized_add");
    return THPVariable_Wrap(call_op(
        a->numel(),
        [&] {
          return op.call(*a, **a_scale, *a_zero_point, *b, **b_scale, *b_zero_point, out_dtype, out_scale,
                         *out_zero_point, args[9] == Py_True, *out_bits);
        },
        *a, **a_scale, *b, **b_scale));
  } else {
    static const auto op = find_op<QuantizedMulFn>("torchquant::quantized_mul");
    return THPVariable_Wrap(call_op(
        std::max(a->numel(), b->numel()),
        [&] {
          return op.call(*a, **a_scale, *a_zero_point, *b, **b_scale, *b_zero_point, out_dtype, out_scale,
                         *out_zero_point, *out_bits);
        },
        *a, **a_scale, *b, **b_scale));
  }
  TQ_END_HANDLE_ERRORS
}

// Two ints: a list or tuple of two, or one int for both (a conv's kernel_size, stride, padding or dilation as
// QuantConv2d keeps them; a max-pool's as F.max_pool2d takes them).
bool pair_arg(PyObject* o, std::array<int64_t, 2>& pair) {
  if (const auto v = int_in(o, INT64_MIN, INT64_MAX)) {
    pair = {*v, *v};
    return true;
  }
  const bool list = PyList_CheckExact(o);
  if (!(list || PyTuple_CheckExact(o)) || Py_SIZE(o) != 2) return false;
  for (int i = 0; i < 2; ++i) {
    const auto v = int_in(list ? PyList_GET_ITEM(o, i) : PyTuple_GET_ITEM(o, i), INT64_MIN, INT64_MAX);
    if (!v) return false;
    pair[i] = *v;
  }
  return true;
}

// quantized_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode) -> Tensor: a CPU int8/uint8 x, each
// size one int or two (stride None: the kernel size), ceil_mode a bool; the op checks the rest. The wrapper's
// argument conversions and the op call from Python cost more than the pooling of a small CNN's feature map.
PyObject* call_quantized_max_pool2d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 6, "quantized_max_pool2d");
  const at::Tensor* x = plain_tensor(args[0]);
  std::array<int64_t, 2> kernel{}, stride{}, padding{}, dilation{};
  if (x == nullptr || !is_int8(x->scalar_type()) || !x->is_cpu() || !pair_arg(args[1], kernel) ||
      !pair_arg(args[3], padding) || !pair_arg(args[4], dilation) || !PyBool_Check(args[5]))
    Py_RETURN_NOTIMPLEMENTED;
  if (args[2] == Py_None) stride = kernel;
  else if (!pair_arg(args[2], stride)) Py_RETURN_NOTIMPLEMENTED;
  static const auto op = find_op<QuantizedMaxPool2dFn>("torchquant::quantized_max_pool2d");
  return THPVariable_Wrap(
      call_op(x->numel(), [&] { return op.call(*x, kernel, stride, padding, dilation, args[5] == Py_True); }, *x));
  TQ_END_HANDLE_ERRORS
}

// The arguments functional.int8_linear and int8_conv2d share, as given, on the fast path's terms (CPU tensors;
// anything else declines): the kernel checks sizes, ranges and the values of scale tensors, as on the checked path.
// The tensors are owned, a reference each, as call_op holds borrowed ones.
struct IntegerOpArgs {
  at::Tensor x_q, x_scale;
  int64_t x_zero_point = 0;
  at::Tensor w_packed, w_sum, w_scale;
  std::optional<at::Tensor> bias;
  int64_t out_features = 0;
  at::ScalarType out_dtype = at::kFloat;
  std::optional<double> out_scale, clamp_min, clamp_max;
  int64_t out_zero_point = 0, out_bits = 8;
};

// A fused activation bound: None or a finite float (the checked path rejects the others with its message).
bool clamp_arg(PyObject* o, std::optional<double>& bound) {
  return optional_float_arg(o, bound) && (!bound || std::isfinite(*bound));
}

// args[0..6] (x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias), then out_features (or out_channels) at
// args[i], and out_dtype, out_scale, out_zero_point, clamp_min, clamp_max, out_bits at args[j..j + 5]. x_scale: a
// Python number (positive and finite in float32: a cached tensor) or a float32 tensor, flattened.
std::optional<IntegerOpArgs> integer_op_args(PyObject* const* args, Py_ssize_t i, Py_ssize_t j) {
  // a CPU tensor of torch's strided layout (a sparse scale fails the checked path's reshape with its own message)
  const auto cpu_tensor = [](PyObject* o) {
    const at::Tensor* t = plain_tensor(o);
    return t != nullptr && t->is_cpu() && t->layout() == at::kStrided ? t : nullptr;
  };
  IntegerOpArgs a;
  const at::Tensor* x_q = cpu_tensor(args[0]);
  if (x_q == nullptr || !is_int8(x_q->scalar_type()) || x_q->dim() == 0) return std::nullopt;
  a.x_q = *x_q;
  if (THPVariable_Check(args[1])) {
    const at::Tensor* scale = cpu_tensor(args[1]);
    if (scale == nullptr || scale->scalar_type() != at::kFloat) return std::nullopt;
    a.x_scale = scale->dim() == 1 ? *scale : scale->reshape({-1});
  } else if (PyFloat_CheckExact(args[1]) || PyLong_CheckExact(args[1])) {
    auto number = scale_arg(args[1], 1, *x_q);
    if (!number) return std::nullopt;
    a.x_scale = **number;
  } else {
    return std::nullopt;
  }
  const auto x_zero_point = int_in(args[2], INT64_MIN, INT64_MAX);
  const at::Tensor* w_packed = cpu_tensor(args[3]);
  const at::Tensor* w_sum = cpu_tensor(args[4]);
  const at::Tensor* w_scale = cpu_tensor(args[5]);
  const at::Tensor* bias = args[6] == Py_None ? nullptr : cpu_tensor(args[6]);
  const auto out_features = int_in(args[i], INT64_MIN, INT64_MAX);
  const auto out_zero_point = int_in(args[j + 2], INT64_MIN, INT64_MAX);
  const auto out_bits = int_in(args[j + 5], INT64_MIN, INT64_MAX);
  if (!x_zero_point || w_packed == nullptr || w_sum == nullptr || w_scale == nullptr ||
      (args[6] != Py_None && bias == nullptr) || !out_features || !THPDtype_Check(args[j]) ||
      !optional_float_arg(args[j + 1], a.out_scale) || !out_zero_point || !clamp_arg(args[j + 3], a.clamp_min) ||
      !clamp_arg(args[j + 4], a.clamp_max) || !out_bits)
    return std::nullopt;
  a.out_dtype = reinterpret_cast<THPDtype*>(args[j])->scalar_type;
  if (!is_float(a.out_dtype) && !is_int8(a.out_dtype)) return std::nullopt;
  a.w_packed = *w_packed;
  a.w_sum = *w_sum;
  a.w_scale = *w_scale;
  a.x_zero_point = *x_zero_point;
  if (bias != nullptr) a.bias = *bias;
  a.out_features = *out_features;
  a.out_zero_point = *out_zero_point;
  a.out_bits = *out_bits;
  return a;
}

// int8_linear(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_features, out_dtype, out_scale,
// out_zero_point, clamp_min, clamp_max, out_bits) -> Tensor: functional.int8_linear's arguments (IntegerOpArgs).
// Its Python checks and the op's 14 boxed arguments cost about 6 us a call, more than a small layer's products.
PyObject* call_int8_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 14, "int8_linear");
  const auto a = integer_op_args(args, 7, 8);
  if (!a) Py_RETURN_NOTIMPLEMENTED;
  static const auto op = find_op<Int8LinearFn>("torchquant::int8_linear");
  return THPVariable_Wrap(call_op(std::max(a->x_q.numel(), a->w_packed.numel()), [&] {
    return op.call(a->x_q, a->x_scale, a->x_zero_point, a->w_packed, a->w_sum, a->w_scale, a->bias, a->out_features,
                   a->out_dtype, a->out_scale, a->out_zero_point, a->clamp_min, a->clamp_max, a->out_bits);
  }));
  TQ_END_HANDLE_ERRORS
}

// int8_conv2d(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels, kernel_size, stride,
// padding, dilation, groups, out_dtype, out_scale, out_zero_point, clamp_min, clamp_max, out_bits) -> Tensor:
// functional.int8_conv2d's arguments without a residual (IntegerOpArgs; x_q 4-d, each size one int or two, groups a
// positive int dividing the input channels and out_channels).
PyObject* call_int8_conv2d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 19, "int8_conv2d");
  const auto a = integer_op_args(args, 7, 13);
  std::array<int64_t, 2> kernel{}, stride{}, padding{}, dilation{};
  const auto groups = int_in(args[12], 1, INT64_MAX);
  if (!a || a->x_q.dim() != 4 || !pair_arg(args[8], kernel) || !pair_arg(args[9], stride) ||
      !pair_arg(args[10], padding) || !pair_arg(args[11], dilation) || !groups || a->x_q.size(1) % *groups != 0 ||
      a->out_features % *groups != 0)
    Py_RETURN_NOTIMPLEMENTED;
  static const auto op = find_op<Int8Conv2dFn>("torchquant::int8_conv2d");
  return THPVariable_Wrap(call_op(std::max(a->x_q.numel(), a->w_packed.numel()), [&] {
    return op.call(a->x_q, a->x_scale, a->x_zero_point, a->w_packed, a->w_sum, a->w_scale, a->bias, a->out_features,
                   kernel, stride, padding, dilation, *groups, a->out_dtype, a->out_scale, a->out_zero_point,
                   a->clamp_min, a->clamp_max, a->out_bits);
  }));
  TQ_END_HANDLE_ERRORS
}

// quantized_layer_forward(x, layer_args, clamp_min, clamp_max) -> Tensor: the converted forward of a QuantLinear or
// QuantConv2d whose input is quantized per tensor (static, or dynamic on the CPU) and runs int8_linear /
// int8_conv2d with a float output of x's dtype (a conv's x [N, C, H, W], or unbatched [C, H, W] as nn.Conv2d
// takes it). layer_args is the tuple the layer prepared (_quantized_call_args):
// (in_features or in_channels, static scale or None (dynamic), zero point tensor, zero point, bits, signed, rounding,
// the integer op's weight-side arguments, and for a conv its output's memory format: True channels-last, False
// contiguous, None the one torch suggests for the input); the clamps are read on every call (set_activation_clamp
// may change them). It makes the calls of the layer's Python path (QuantLayerBase._converted_forward) from C++: their
// Python method calls and the op calls' argument boxing cost 5-6 us, more than both kernels at batch 1.
// quantized_layer_forward(x_q, layer_args, clamp_min, clamp_max, out_dtype, out_scale, out_zero_point, out_bits) ->
// Tensor: the same layer in an integer pipeline (QuantLayerBase.pipeline_op): x_q int8/uint8 already at the layer's
// static input scale, the integer op's output of out_dtype (requantized with out_scale, out_zero_point and out_bits
// when int8/uint8).
PyObject* call_quantized_layer_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  if (nargs != 4 && nargs != 8) check_nargs(nargs, 4, "quantized_layer_forward");
  const bool pipeline = nargs == 8;
  PyObject* layer = args[1];
  constexpr Py_ssize_t kLinearArgs = 12, kConvArgs = 18;
  if (!PyTuple_CheckExact(layer)) Py_RETURN_NOTIMPLEMENTED;
  const Py_ssize_t n = PyTuple_GET_SIZE(layer);
  if (n != kLinearArgs && n != kConvArgs) Py_RETURN_NOTIMPLEMENTED;
  const bool conv = n == kConvArgs;
  auto item = [&](int i) { return PyTuple_GET_ITEM(layer, i); };
  const at::Tensor* x = plain_tensor(args[0]);
  const auto in_dim = int_in(item(0), 0, INT64_MAX);
  PyObject* scale_o = item(1);
  const at::Tensor* static_scale = scale_o == Py_None ? nullptr : plain_tensor(scale_o);
  const at::Tensor* zero_point_t = plain_tensor(item(2));
  const auto zero_point = int_in(item(3), -128, 255);
  const auto bits = int_in(item(4), 1, 8);
  const auto rounding = rounding_arg(item(6));
  const at::Tensor* w_packed = plain_tensor(item(7));
  const at::Tensor* w_sum = plain_tensor(item(8));
  const at::Tensor* w_scale = plain_tensor(item(9));
  const at::Tensor* bias = item(10) == Py_None ? nullptr : plain_tensor(item(10));
  const auto out_features = int_in(item(11), 0, INT64_MAX);
  std::optional<double> clamp_min, clamp_max;
  if (x == nullptr || !in_dim || (static_scale == nullptr && scale_o != Py_None) || zero_point_t == nullptr ||
      !zero_point || !bits || !PyBool_Check(item(5)) || !rounding || w_packed == nullptr || w_sum == nullptr ||
      w_scale == nullptr || (bias == nullptr && item(10) != Py_None) || !out_features ||
      !optional_float_arg(args[2], clamp_min) || !optional_float_arg(args[3], clamp_max) ||
      x->device() != w_packed->device())
    Py_RETURN_NOTIMPLEMENTED;
  at::ScalarType out_dtype = x->scalar_type();
  std::optional<double> out_scale;
  std::optional<int64_t> out_zero_point = 0, out_bits = 8;
  if (pipeline) {
    if (!is_int8(x->scalar_type()) || static_scale == nullptr ||
        !THPDtype_Check(args[4]) || !optional_float_arg(args[5], out_scale))
      Py_RETURN_NOTIMPLEMENTED;
    out_dtype = reinterpret_cast<THPDtype*>(args[4])->scalar_type;
    out_zero_point = int_in(args[6], INT64_MIN, INT64_MAX);
    out_bits = int_in(args[7], INT64_MIN, INT64_MAX);
    if (!out_zero_point || !out_bits) Py_RETURN_NOTIMPLEMENTED;
  } else if (!is_float(x->scalar_type())) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  // an unbatched conv input [C, H, W], as nn.Conv2d takes it: the batch of one it is, with an unbatched output
  const bool unbatched = conv && x->dim() == 3;
  if (conv ? (x->dim() != 4 && !unbatched) || x->size(unbatched ? 0 : 1) != *in_dim
           : x->dim() == 0 || x->size(-1) != *in_dim)
    Py_RETURN_NOTIMPLEMENTED;
  // the dynamic scale as InputQuantizer.dynamic_qparams computes it on the CPU; the other cases take its Python path
  if (static_scale == nullptr && (!x->is_cpu() || *bits == 1)) Py_RETURN_NOTIMPLEMENTED;
  std::array<int64_t, 2> kernel{}, stride{}, padding{}, dilation{};
  std::optional<int64_t> groups;
  if (conv) {
    groups = int_in(item(16), 1, INT64_MAX);
    if (!pair_arg(item(12), kernel) || !pair_arg(item(13), stride) || !pair_arg(item(14), padding) ||
        !pair_arg(item(15), dilation) || !groups || !(PyBool_Check(item(17)) || item(17) == Py_None))
      Py_RETURN_NOTIMPLEMENTED;
  }
  const bool is_signed = item(5) == Py_True;
  const std::optional<at::Tensor> bias_arg = bias == nullptr ? std::nullopt : std::optional<at::Tensor>(*bias);
  static const auto quantize = find_op<QuantizeFn>("torchquant::quantize");
  static const auto quantize_per_token = find_op<QuantizePerTokenFn>("torchquant::quantize_per_token");
  static const auto int8_linear = find_op<Int8LinearFn>("torchquant::int8_linear");
  static const auto int8_conv2d = find_op<Int8Conv2dFn>("torchquant::int8_conv2d");
  return THPVariable_Wrap(call_op(x->numel(), [&] {
    const auto x_in = unbatched ? c10::MaybeOwned<at::Tensor>::owned(x->unsqueeze(0))
                                : c10::MaybeOwned<at::Tensor>::borrowed(*x);
    // per-tensor quantization is elementwise: a channels-last input is taken as the NHWC tensor it is in memory,
    // whose dynamic scale's reshape to one row is a view, not a copy (quantize keeps either layout)
    const bool channels_last =
        !pipeline && conv && !x_in->is_contiguous() && x_in->is_contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor x_flat = channels_last ? x_in->permute({0, 2, 3, 1}) : *x_in;
    at::Tensor scale;
    if (static_scale != nullptr) {
      scale = *static_scale;
    } else {  // choose_qparams' symmetric signed scale: the per-token scale of x as one row, at least FLT_MIN
      // (an empty x gets some scale, which quantizes it to nothing)
      scale = std::get<1>(quantize_per_token.call(x_flat.detach().reshape({1, -1}), *bits)).clamp_min_(FLT_MIN);
    }
    at::Tensor x_q = pipeline ? *x_in : quantize.call(x_flat, scale, *zero_point_t, std::nullopt, *bits, is_signed,
                                                   *rounding);
    if (channels_last) x_q = x_q.permute({0, 3, 1, 2});
    if (!conv)
      return int8_linear.call(x_q, scale, *zero_point, *w_packed, *w_sum, *w_scale, bias_arg, *out_features,
                              out_dtype, out_scale, *out_zero_point, clamp_min, clamp_max, *out_bits);
    at::Tensor y = int8_conv2d.call(x_q, scale, *zero_point, *w_packed, *w_sum, *w_scale, bias_arg, *out_features,
                                    kernel, stride, padding, dilation, *groups, out_dtype, out_scale,
                                    *out_zero_point, clamp_min, clamp_max, *out_bits);
    // the kernel writes channels-last: kept in a pipeline (graph.integer_layer decides) and where the layer says
    // so, else contiguous where the layer says so or the input is not channels-last
    // (QuantConv2d._converted_forward, set_output_memory_format); a layer's unbatched output is contiguous (3-D
    // tensors have no channels-last form)
    PyObject* layout = item(17);
    const bool keep = pipeline || (!unbatched && (layout == Py_True ||
                                                  (layout == Py_None &&
                                                   x->suggest_memory_format() == at::MemoryFormat::ChannelsLast)));
    if (!keep) y = gemm::contiguous_from_channels_last(y);
    return unbatched ? y.squeeze(0) : y;
  }, *x, static_scale, *zero_point_t, *w_packed, *w_sum, *w_scale, bias_arg));
  TQ_END_HANDLE_ERRORS
}

// contiguous_from_channels_last (y) -> Tensor: a conv's channels-last float output made contiguous by the tile
// transposes of the CPU kernels (Tensor.contiguous() for the other layouts and devices); NotImplemented where the
// caller's y.contiguous() must run instead: a tensor that records gradients, a tensor subclass, a mode or a tracer.
PyObject* call_contiguous_from_channels_last(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TQ_HANDLE_ERRORS
  check_nargs(nargs, 1, "contiguous_from_channels_last");
  const at::Tensor* y = plain_tensor(args[0]);
  if (y == nullptr || y->requires_grad() || c10::impl::dispatch_mode_enabled() || torch::jit::tracer::isTracing())
    Py_RETURN_NOTIMPLEMENTED;
  return THPVariable_Wrap(call_op(y->numel(), [&] { return gemm::contiguous_from_channels_last(*y); }, *y));
  TQ_END_HANDLE_ERRORS
}

// cpu_output_cache_info() -> dict: the state of the CPU ops' output cache (output_memory.h).
PyObject* call_cpu_output_cache_info(PyObject*, PyObject*) {
  TQ_HANDLE_ERRORS
  const OutputCacheInfo info = output_cache_info();
  return Py_BuildValue("{sLsLsLsLsL}", "limit", static_cast<long long>(info.limit), "cached_bytes",
                       static_cast<long long>(info.cached_bytes), "cached_blocks",
                       static_cast<long long>(info.cached_blocks), "reused", static_cast<long long>(info.reused),
                       "allocated", static_cast<long long>(info.allocated));
  TQ_END_HANDLE_ERRORS
}

// set_cpu_output_cache(max_bytes: int) -> None
PyObject* call_set_cpu_output_cache(PyObject*, PyObject* arg) {
  TQ_HANDLE_ERRORS
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  set_output_cache_limit(bytes);
  Py_RETURN_NONE;
  TQ_END_HANDLE_ERRORS
}

}  // namespace
}  // namespace torchquant

PyMethodDef torchquant_python_calls[] = {
    {"quantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                     &torchquant::call_quantize_like<torchquant::kQuantize>)),
     METH_FASTCALL, "functional.quantize's fast path: the op's result, or NotImplemented"},
    {"fake_quantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                          &torchquant::call_quantize_like<torchquant::kFakeQuantize>)),
     METH_FASTCALL, "functional.fake_quantize's fast path: the op's result, or NotImplemented"},
    {"dequantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_dequantize)),
     METH_FASTCALL, "functional.dequantize's fast path: the op's result, or NotImplemented"},
    {"quantize_per_token",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_quantize_per_token)), METH_FASTCALL,
     "functional.quantize_per_token's fast path: the op's result, or NotImplemented"},
    {"int8_mm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_int8_mm)), METH_FASTCALL,
     "functional.int8_mm's fast path: the op's result, or NotImplemented"},
    {"int8_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_int8_linear)),
     METH_FASTCALL, "functional.int8_linear's fast path: the op's result, or NotImplemented"},
    {"int8_conv2d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_int8_conv2d)),
     METH_FASTCALL, "functional.int8_conv2d's fast path (no residual): the op's result, or NotImplemented"},
    {"int8_linear_dynamic",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_int8_linear_dynamic)),
     METH_FASTCALL, "QuantLinear's converted int8-dynamic forward: the op's result, or NotImplemented"},
    {"quantized_add",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(&torchquant::call_quantized_binary<torchquant::BinaryOp::Add>)),
     METH_FASTCALL, "functional.quantized_add's fast path: the op's result, or NotImplemented"},
    {"quantized_mul",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(&torchquant::call_quantized_binary<torchquant::BinaryOp::Multiply>)),
     METH_FASTCALL, "functional.quantized_mul's fast path: the op's result, or NotImplemented"},
    {"quantized_max_pool2d",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_quantized_max_pool2d)),
     METH_FASTCALL, "functional.quantized_max_pool2d's fast path: the op's result, or NotImplemented"},
    {"quantized_layer_forward",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_quantized_layer_forward)),
     METH_FASTCALL,
     "the converted forward of a layer with a per-tensor quantized input: the op's result, or NotImplemented"},
    {"contiguous_from_channels_last",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_contiguous_from_channels_last)),
     METH_FASTCALL, "a channels-last conv output made contiguous by the CPU kernels' transposes, or NotImplemented"},
    {"cpu_output_cache_info", &torchquant::call_cpu_output_cache_info, METH_NOARGS,
     "the CPU output cache's limit, kept bytes and blocks, and counts of reused and newly allocated outputs"},
    {"set_cpu_output_cache", &torchquant::call_set_cpu_output_cache, METH_O,
     "sets the bytes of freed CPU outputs kept for reuse (0: none)"},
    {nullptr, nullptr, 0, nullptr}};
