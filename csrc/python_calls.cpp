// Direct Python entry points of the quantize family: torchquant._C.quantize(...) etc. call the same dispatcher ops
// as torch.ops.torchquant.* (every device kernel, the autograd kernels, tensor subclasses and dispatch modes), but
// through the typed (unboxed) call, without torch.ops' Python layer and argument boxing, which cost ~2 us a call:
// as much as the whole op on a few thousand elements. The Python wrappers (torchquant/_ops/quantize.py) validate
// the arguments first and use torch.ops instead under torch.compile or __torch_function__ overrides.
#include <Python.h>

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

namespace torchquant {
namespace {

using QuantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<int64_t>, int64_t,
                              bool, c10::string_view);
using DequantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<int64_t>,
                                at::ScalarType);
using QuantizePerTokenFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t);

template <class Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Argument conversions: a TypeError naming the argument on anything else.
const at::Tensor& tensor_arg(PyObject* o, const char* name) {
  if (!THPVariable_Check(o)) throw torch::TypeError(std::string(name) + " must be a Tensor");
  return THPVariable_Unpack(o);
}
int64_t int_arg(PyObject* o, const char* name) {
  if (!PyLong_Check(o) || PyBool_Check(o)) throw torch::TypeError(std::string(name) + " must be an int");
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}
std::optional<int64_t> axis_arg(PyObject* o) {
  if (o == Py_None) return std::nullopt;
  return int_arg(o, "axis");
}
bool bool_arg(PyObject* o, const char* name) {
  if (!PyBool_Check(o)) throw torch::TypeError(std::string(name) + " must be a bool");
  return o == Py_True;
}
c10::string_view str_arg(PyObject* o, const char* name) {
  Py_ssize_t size = 0;
  const char* s = PyUnicode_Check(o) ? PyUnicode_AsUTF8AndSize(o, &size) : nullptr;
  if (s == nullptr) throw torch::TypeError(std::string(name) + " must be a str");
  return c10::string_view(s, size);
}
void check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char* fn) {
  if (nargs != want) throw torch::TypeError(std::string(fn) + " takes " + std::to_string(want) + " arguments, got " + std::to_string(nargs));
}

// quantize / fake_quantize (x, scale, zero_point, axis, bits, signed, rounding) -> Tensor
template <const char* Name>
PyObject* call_quantize_like(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 7, Name);
  const at::Tensor& x = tensor_arg(args[0], "x");
  const at::Tensor& scale = tensor_arg(args[1], "scale");
  const at::Tensor& zero_point = tensor_arg(args[2], "zero_point");
  const auto axis = axis_arg(args[3]);
  const int64_t bits = int_arg(args[4], "bits");
  const bool is_signed = bool_arg(args[5], "signed");
  const c10::string_view rounding = str_arg(args[6], "rounding");
  static const auto op = find_op<QuantizeFn>(Name);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(x, scale, zero_point, axis, bits, is_signed, rounding);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

constexpr char kQuantize[] = "torchquant::quantize";
constexpr char kFakeQuantize[] = "torchquant::fake_quantize";

// dequantize(q, scale, zero_point, axis, dtype) -> Tensor
PyObject* call_dequantize(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 5, "dequantize");
  const at::Tensor& q = tensor_arg(args[0], "q");
  const at::Tensor& scale = tensor_arg(args[1], "scale");
  const at::Tensor& zero_point = tensor_arg(args[2], "zero_point");
  const auto axis = axis_arg(args[3]);
  if (!THPDtype_Check(args[4])) throw torch::TypeError(std::string("dtype must be a torch.dtype"));
  const at::ScalarType dtype = reinterpret_cast<THPDtype*>(args[4])->scalar_type;
  static const auto op = find_op<DequantizeFn>("torchquant::dequantize");
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(q, scale, zero_point, axis, dtype);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// quantize_per_token(x, bits) -> (q, scale)
PyObject* call_quantize_per_token(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 2, "quantize_per_token");
  const at::Tensor& x = tensor_arg(args[0], "x");
  const int64_t bits = int_arg(args[1], "bits");
  static const auto op = find_op<QuantizePerTokenFn>("torchquant::quantize_per_token");
  std::tuple<at::Tensor, at::Tensor> out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(x, bits);
  }
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) throw python_error();
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(std::get<0>(out))));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(std::get<1>(out))));
  return result;
  END_HANDLE_TH_ERRORS
}

}  // namespace
}  // namespace torchquant

PyMethodDef torchquant_python_calls[] = {
    {"quantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                     &torchquant::call_quantize_like<torchquant::kQuantize>)),
     METH_FASTCALL, "torch.ops.torchquant.quantize without torch.ops' Python layer"},
    {"fake_quantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                          &torchquant::call_quantize_like<torchquant::kFakeQuantize>)),
     METH_FASTCALL, "torch.ops.torchquant.fake_quantize without torch.ops' Python layer"},
    {"dequantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_dequantize)),
     METH_FASTCALL, "torch.ops.torchquant.dequantize without torch.ops' Python layer"},
    {"quantize_per_token",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&torchquant::call_quantize_per_token)), METH_FASTCALL,
     "torch.ops.torchquant.quantize_per_token without torch.ops' Python layer"},
    {nullptr, nullptr, 0, nullptr}};
