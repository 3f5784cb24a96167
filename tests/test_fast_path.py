"""The quantize family's fast path (torchquant._C.quantize and siblings, which the functional wrappers try first)
against the wrappers' checked Python path: the same results for every argument form it takes, NotImplemented (and
so the checked path, with its errors) for every other, and tensor subclasses, __torch_function__ and dispatch modes
and inference mode handled as before. Likewise QuantLinear's converted int8-dynamic forward
(torchquant._C.int8_linear_dynamic) against the op, and the converted forward of layers with a per-tensor
quantized input (torchquant._C.quantized_layer_forward, also a pipeline layer's integer op) against the layers'
Python path, and int8_mm's (torchquant._C.int8_mm) against its checked path. Every entry holds the tensors it
reads while it runs without the GIL."""
import threading
import time

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import torchquant as tq
import torchquant.functional as F
from torchquant import _C
from torchquant._ops import ops
from torchquant.config import QuantConfig, QuantSpec
from torchquant.nn import QuantConv2d, QuantLinear

from conftest import assert_same


class PassThrough(TorchFunctionMode):
    """A __torch_function__ mode that changes nothing: inside it every wrapper takes its checked path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def both_paths(fn):
    """fn() on the fast path and on the checked path, which must agree exactly."""
    fast = fn()
    with PassThrough():
        checked = fn()
    return fast, checked


def assert_declines(fast_path, good, i, bad):
    """fast_path (a torchquant._C entry) returns NotImplemented for the arguments `good` with argument i `bad`."""
    args = list(good)
    args[i] = bad
    assert fast_path(*args) is NotImplemented, (i, bad)


def x_of(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 4).to(dtype)


FAST_QUANTIZE_ARGS = [
    # (scale, zero_point, kwargs) with x [6, 5]
    (0.05, 3, {}),
    (1, 0, {}),                                                           # an int scale
    (0.3, -7, dict(bits=4)),
    (0.3, 9, dict(bits=4, signed=False)),
    (0.2, 0, dict(bits=1)),                                               # sign binarization
    (0.2, 1, dict(bits=1, signed=False)),
    (0.07, 2, dict(rounding="truncate")),
    (torch.tensor(0.05), torch.tensor(3, dtype=torch.int32), {}),        # 0-d tensors
    (torch.tensor([0.05]), torch.tensor([-3], dtype=torch.int32), {}),
    (torch.rand(6) + 0.01, torch.arange(6, dtype=torch.int32), dict(axis=0)),
    (torch.rand(5) + 0.01, torch.arange(5, dtype=torch.int32), dict(axis=-1)),
    (torch.rand(5, 1) + 0.01, torch.zeros(5, 1, dtype=torch.int32), dict(axis=1)),  # reshaped to [5]
    (0.05, 3, dict(axis=1)),                                              # numbers broadcast to every channel
    (torch.finfo(torch.float32).tiny, 0, {}),
    (torch.finfo(torch.float32).max, 0, {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale,zero_point,kwargs", FAST_QUANTIZE_ARGS)
def test_fast_path_matches_checked_path(scale, zero_point, kwargs, dtype):
    x = x_of((6, 5), dtype)
    axis = kwargs.get("axis")
    args = (x, scale, zero_point, axis, kwargs.get("bits", 8), kwargs.get("signed", True),
            kwargs.get("rounding", "nearest"))
    assert _C.quantize(*args) is not NotImplemented and _C.fake_quantize(*args) is not NotImplemented
    for fn in (F.quantize, F.fake_quantize):
        assert_same(*both_paths(lambda: fn(x, scale, zero_point, **kwargs)))
        assert_same(*both_paths(lambda: fn(x.t().contiguous().t(), scale, zero_point, **kwargs)))  # strided
    if kwargs.get("bits", 8) == 8 and "rounding" not in kwargs:
        q = F.quantize(x, scale, zero_point, signed=kwargs.get("signed", True), axis=axis)
        assert _C.dequantize(q, scale, zero_point, axis, dtype) is not NotImplemented
        assert_same(*both_paths(lambda: F.dequantize(q, scale, zero_point, axis=axis, dtype=dtype)))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 3, 16), (4, 0)])
def test_fast_path_per_token_matches_checked_path(shape, bits):
    x = x_of(shape)
    assert _C.quantize_per_token(x, bits) is not NotImplemented
    (q, s), (q_checked, s_checked) = both_paths(lambda: F.quantize_per_token(x, bits=bits))
    assert_same(q, q_checked)
    assert_same(s, s_checked)


# Valid calls the fast path leaves to the checked path: the same results through it.
SLOW_VALID = [  # 0.0625: exact in every float dtype
    dict(scale=torch.tensor([0.0625], dtype=torch.float64), zero_point=3),
    dict(scale=torch.tensor([0.0625], dtype=torch.float16), zero_point=3),
    dict(scale=0.0625, zero_point=torch.tensor([3])),                    # int64
    dict(scale=0.0625, zero_point=torch.tensor([3], dtype=torch.int8)),
    dict(scale=0.0625, zero_point=3.0),                                  # an integral float
    dict(scale=np.float64(0.0625), zero_point=3),                        # a float subclass
]


def test_int_scale_past_int64():
    x = x_of((6, 5)) * 1e22
    assert _C.quantize(x, 2**70, 0, None, 8, True, "nearest") is NotImplemented
    assert_same(F.quantize(x, 2**70), F.quantize(x, float(2**70)))
    assert_same(F.quantize(x, 2**62), F.quantize(x, float(2**62)))


@pytest.mark.parametrize("case", SLOW_VALID)
def test_forms_left_to_the_checked_path_give_the_same_results(case):
    x = x_of((6, 5))
    scale, zero_point = case["scale"], case["zero_point"]
    assert _C.quantize(x, scale, zero_point, None, 8, True, "nearest") is NotImplemented
    want = F.quantize(x, 0.0625, 3)
    assert_same(F.quantize(x, scale, zero_point), want)
    assert_same(F.fake_quantize(x, scale, zero_point), F.fake_quantize(x, 0.0625, 3))
    assert_same(F.dequantize(want, scale, zero_point), F.dequantize(want, 0.0625, 3))


# Bad calls: the fast path declines them all, so every error comes from the checked path with its message.
BAD_QUANTIZE = [
    (torch.zeros(4, dtype=torch.int32), 0.1, 0, None, 8, True, "nearest"),
    ([1.0, 2.0], 0.1, 0, None, 8, True, "nearest"),
    (torch.zeros(4), 0.0, 0, None, 8, True, "nearest"),
    (torch.zeros(4), float("nan"), 0, None, 8, True, "nearest"),
    (torch.zeros(4), float("inf"), 0, None, 8, True, "nearest"),
    (torch.zeros(4), 1e-39, 0, None, 8, True, "nearest"),
    (torch.zeros(4), 1e39, 0, None, 8, True, "nearest"),
    (torch.zeros(4), True, 0, None, 8, True, "nearest"),
    (torch.zeros(4), 2**200, 0, None, 8, True, "nearest"),
    (torch.zeros(4), "0.1", 0, None, 8, True, "nearest"),
    (torch.zeros(4), torch.ones(1, dtype=torch.int64), 0, None, 8, True, "nearest"),
    (torch.zeros(4), torch.ones(2), 0, None, 8, True, "nearest"),
    (torch.zeros(4), torch.ones(1, device="meta"), 0, None, 8, True, "nearest"),
    (torch.zeros(4), 0.1, 128, None, 8, True, "nearest"),
    (torch.zeros(4), 0.1, -1, None, 8, False, "nearest"),
    (torch.zeros(4), 0.1, 1, None, 1, True, "nearest"),
    (torch.zeros(4), 0.1, 2**70, None, 8, True, "nearest"),
    (torch.zeros(4), 0.1, True, None, 8, True, "nearest"),
    (torch.zeros(4), 0.1, 0.5, None, 8, True, "nearest"),
    (torch.zeros(4), 0.1, torch.zeros(1), None, 8, True, "nearest"),
    (torch.zeros(4), 0.1, 0, None, 0, True, "nearest"),
    (torch.zeros(4), 0.1, 0, None, 9, True, "nearest"),
    (torch.zeros(4), 0.1, 0, None, 8.0, True, "nearest"),
    (torch.zeros(4), 0.1, 0, None, True, True, "nearest"),
    (torch.zeros(4), 0.1, 0, None, 8, 1, "nearest"),
    (torch.zeros(4), 0.1, 0, None, 8, True, "floor"),
    (torch.zeros(4), 0.1, 0, None, 8, True, None),
    (torch.zeros(4, 3), 0.1, 0, 2, 8, True, "nearest"),
    (torch.zeros(4, 3), 0.1, 0, -3, 8, True, "nearest"),
    (torch.zeros(4, 3), 0.1, 0, 1.0, 8, True, "nearest"),
    (torch.zeros(4, 3), 0.1, 0, True, 8, True, "nearest"),
    (torch.zeros(()), 0.1, 0, 0, 8, True, "nearest"),
]


@pytest.mark.parametrize("args", BAD_QUANTIZE, ids=range(len(BAD_QUANTIZE)))
def test_fast_path_declines_bad_quantize_calls(args):
    x, scale, zero_point, axis, bits, signed, rounding = args
    for fast, public in ((_C.quantize, F.quantize), (_C.fake_quantize, F.fake_quantize)):
        assert fast(*args) is NotImplemented
        with pytest.raises((TypeError, ValueError)):
            public(x, scale, zero_point, axis=axis, bits=bits, signed=signed, rounding=rounding)


def test_fast_path_declines_bad_dequantize_and_per_token_calls():
    q = torch.zeros(4, dtype=torch.int8)
    for args in [(q.float(), 0.1, 0, None, torch.float32), (q, 0.1, 0, None, torch.int8), (q, 0.1, 0, None, "f"),
                 (q, 0.1, 128, None, torch.float32), (q.byte(), 0.1, -1, None, torch.float32),
                 (q, -0.1, 0, None, torch.float32), (q, 0.1, 0, 1, torch.float32)]:
        assert _C.dequantize(*args) is NotImplemented
        with pytest.raises((TypeError, ValueError)):
            F.dequantize(args[0], args[1], args[2], axis=args[3], dtype=args[4])
    for x, bits in [(torch.zeros(()), 8), (torch.zeros(3, dtype=torch.int8), 8), (torch.zeros(3), 1),
                    (torch.zeros(3), 9), (torch.zeros(3), 8.0), (torch.zeros(3), True)]:
        assert _C.quantize_per_token(x, bits) is NotImplemented
        with pytest.raises((TypeError, ValueError)):
            F.quantize_per_token(x, bits=bits)


def test_kernel_checks_the_values_of_cpu_qparam_tensors():
    # the fast path passes CPU tensors through; the kernel rejects bad values with its own message
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="scale must be positive and finite"):
        F.quantize(x, torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match=r"zero_point must be in \[-128, 127\]"):
        F.fake_quantize(x, 0.1, torch.tensor([200], dtype=torch.int32))


class Counting(torch.Tensor):
    """A tensor subclass with __torch_function__ of its own: calls reach it through torch.ops."""
    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(str(func))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class Recording(TorchDispatchMode):
    """A dispatch mode that records the ops it sees and changes nothing."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_subclasses_and_modes_see_the_op():
    x = x_of((4, 3)).as_subclass(Counting)
    Counting.calls.clear()
    assert _C.quantize(x, 0.1, 0, None, 8, True, "nearest") is NotImplemented
    F.quantize(x, 0.1, 0)
    F.fake_quantize(x, 0.1, 0)
    F.quantize_per_token(x)
    assert any("torchquant.quantize" in c for c in Counting.calls), Counting.calls
    assert any("torchquant.fake_quantize" in c for c in Counting.calls), Counting.calls
    assert any("torchquant.quantize_per_token" in c for c in Counting.calls), Counting.calls

    plain = x_of((4, 3))
    with Recording() as mode:
        F.quantize(plain, 0.125, 0)   # fast path: the dispatcher reaches the mode
        F.quantize(plain, 0.1234567, 0)  # a scale not seen before: built on the checked path, under the mode
    assert sum("torchquant.quantize" in op for op in mode.ops) == 2, mode.ops


def test_number_qparams_made_in_inference_mode_serve_autograd():
    # the cached tensor of a Python-number scale is first built inside inference mode, then saved for backward
    x = x_of((5, 4))
    scale = 0.0371234  # a value no other test uses, so that the first call builds its tensor
    with torch.inference_mode():
        F.fake_quantize(x, scale, 1, axis=0)
        F.fake_quantize(x, scale, 1)
    for axis in (None, 0):
        xg = x.clone().requires_grad_()
        F.fake_quantize(xg, scale, 1, axis=axis).sum().backward()
        x_want = x.clone().requires_grad_()
        length = 1 if axis is None else x.shape[axis]
        F.fake_quantize(x_want, torch.full((length,), scale), torch.ones(length, dtype=torch.int32),
                        axis=axis).sum().backward()
        assert_same(xg.grad, x_want.grad)


def test_fast_path_keeps_autograd():
    x = x_of((6, 5)).requires_grad_()
    scale, zp = torch.rand(6) + 0.05, torch.zeros(6, dtype=torch.int32)
    y = F.fake_quantize(x, scale, zp, axis=0)
    assert y.requires_grad and y.grad_fn is not None
    grad = torch.randn(6, 5)
    y.backward(grad)
    want = ops.fake_quantize_backward(grad, x.detach(), scale, zp, 0, 8, True, "nearest")
    assert_same(x.grad, want)
    assert not F.quantize(x, 0.1).requires_grad


def converted_linear(in_features=7, out_features=5, bias=True):
    torch.manual_seed(0)
    return QuantLinear(in_features, out_features, bias).convert()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (7,), (2, 0, 7), (2, 3, 7)])
def test_quant_linear_fast_path_matches_the_op(shape, dtype, bias):
    layer = converted_linear(bias=bias)
    x = x_of(shape, dtype)
    fast = _C.int8_linear_dynamic(x, layer.in_features, *layer._kernel_args, None)
    assert fast is not NotImplemented
    want = ops.int8_linear_dynamic(x, *layer._kernel_args)
    assert_same(fast, want)
    assert_same(layer(x), want)
    with PassThrough():  # the layer's Python path
        assert_same(layer(x), want)
    x_t = x_of((shape[-1], 4), dtype).t()  # non-contiguous
    assert_same(layer(x_t), ops.int8_linear_dynamic(x_t.contiguous(), *layer._kernel_args))


def test_quant_linear_fast_path_declines_bad_inputs():
    layer = converted_linear()
    args = layer._kernel_args
    for x in [torch.zeros(3, 6), torch.zeros(()), torch.zeros(3, 7, dtype=torch.int8), torch.zeros(3, 7).to("meta"),
              x_of((3, 7)).as_subclass(Counting), [1.0] * 7]:
        assert _C.int8_linear_dynamic(x, 7, *args, None) is NotImplemented
    assert _C.int8_linear_dynamic(torch.zeros(3, 7), 7, args[0], args[1], args[2], 1.0, 5, None) is NotImplemented
    assert _C.int8_linear_dynamic(torch.zeros(3, 7), 7, *args[:-1], True, None) is NotImplemented
    assert _C.int8_linear_dynamic(torch.zeros(3, 7), 7, *args, 1) is NotImplemented  # activation: None or a str
    with pytest.raises(TypeError, match="takes 8 arguments"):
        _C.int8_linear_dynamic(torch.zeros(3, 7), *args, None)
    # (the layer then raises its general path's messages: test_nn's test_converted_bad_input)


def test_quant_linear_fast_path_subclasses_and_autograd():
    layer = converted_linear()
    x = x_of((3, 7)).as_subclass(Counting)
    Counting.calls.clear()
    layer(x)
    assert any("torchquant.int8_linear_dynamic" in c for c in Counting.calls), Counting.calls
    xg = x_of((3, 7)).requires_grad_()
    y = layer(xg)  # no gradient flows through the integer kernel, as on the op
    assert not y.requires_grad
    assert_same(y, ops.int8_linear_dynamic(xg.detach(), *layer._kernel_args))


# ---- converted layers with a per-tensor quantized input: torchquant._C.quantized_layer_forward ----

LAYER_CONFIGS = {
    "int8-static": "int8-static",
    "static-int4-signed-truncate": QuantConfig(QuantSpec(bits=5), QuantSpec(bits=4, granularity="per_tensor",
                                                                            rounding="truncate")),
    "dynamic-tensor": QuantConfig(QuantSpec(), QuantSpec(granularity="per_tensor", dynamic=True)),
    "dynamic-tensor-6bit-truncate": QuantConfig(QuantSpec(bits=4), QuantSpec(bits=6, granularity="per_tensor",
                                                                             dynamic=True, rounding="truncate")),
}


def converted_layer(kind, config, clamp=None):
    torch.manual_seed(0)
    if kind == "linear":
        layer, shape = QuantLinear(11, 6, config=config), (5, 11)
    elif kind == "conv":
        layer, shape = QuantConv2d(5, 7, 3, stride=2, padding=1, config=config), (2, 5, 9, 8)
    else:  # depthwise
        layer, shape = QuantConv2d(6, 6, 3, padding=1, groups=6, bias=False, config=config), (2, 6, 7, 7)
    tq.calibrate(layer, [x_of(shape, seed=s) for s in range(3)], progress=False)
    if clamp is not None:
        layer.set_activation_clamp(*clamp)
    return layer.eval().convert(), shape


def layer_inputs(shape, dtype):
    x = x_of(shape, dtype, seed=7)
    inputs = [x, x_of(shape[:-1] + (2 * shape[-1],), dtype, seed=8)[..., ::2],  # non-contiguous
              torch.zeros((0,) + shape[1:], dtype=dtype)]
    if len(shape) == 4:
        inputs.append(x.to(memory_format=torch.channels_last))
    else:
        inputs.append(x_of((2,) + shape, dtype, seed=9))  # extra leading dims
    return inputs


@pytest.mark.parametrize("clamp", [None, (0.0, None), (-0.5, 1.5)], ids=["none", "relu", "clamp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(LAYER_CONFIGS))
@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise"])
def test_quantized_layer_fast_path_matches_the_python_path(kind, config, dtype, clamp):
    layer, shape = converted_layer(kind, LAYER_CONFIGS[config], clamp)
    assert layer._quantized_call_args is not None
    for x in layer_inputs(shape, dtype):
        fast = _C.quantized_layer_forward(x, layer._quantized_call_args, layer.clamp_min, layer.clamp_max)
        assert fast is not NotImplemented
        with PassThrough():  # the layer's Python path
            checked = layer(x)
        assert_same(fast, checked)
        assert_same(layer(x), checked)
        assert fast.dtype == dtype and fast.shape == checked.shape and fast.stride() == checked.stride()


# The kernels write channels-last; a contiguous float output is transposed by the entry in 16-byte tiles (4 float32
# or 8 half channels by as many pixels, single elements past them), the same values as torch's copy.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_channels,batch,h,w", [(1, 1, 3, 5), (3, 2, 4, 4), (5, 1, 9, 7), (8, 3, 5, 6),
                                                      (17, 1, 16, 17), (64, 2, 7, 7)])
def test_conv_contiguous_output_is_transposed_exactly(dtype, out_channels, batch, h, w):
    torch.manual_seed(out_channels)
    layer = QuantConv2d(6, out_channels, 3, padding=1, config="int8-static")
    x = x_of((batch, 6, h, w), dtype, seed=5)
    tq.calibrate(layer, [x.float()], progress=False)
    layer.eval().convert()
    layer.set_output_memory_format(torch.channels_last)
    want = layer(x).contiguous()
    layer.set_output_memory_format(torch.contiguous_format)
    got = layer(x)
    assert got.is_contiguous() and got.dtype == dtype
    assert_same(got, want)


# contiguous_output (a pipeline conv's float output where the graph needs it contiguous, and QuantConv2d's Python
# path) transposes a channels-last float tensor with the kernels' tiles: torch's copy's values and layout for every
# float dtype, channel count (under a tile: torch's copy) and layout; tensors that record gradients, subclasses,
# modes and tracers get Tensor.contiguous() itself.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 3, 4, 4), (1, 4, 9, 7), (3, 17, 5, 6), (2, 64, 7, 7),
                                   (0, 16, 3, 3)])
def test_contiguous_output_is_torch_contiguous(dtype, shape):
    from torchquant.nn.conv import contiguous_output
    y = torch.randn(shape).to(dtype)
    for layout in (y.to(memory_format=torch.channels_last), y, y.transpose(2, 3), y[..., ::2]):
        got = contiguous_output(layout)
        assert got.is_contiguous() and got.dtype == dtype
        assert_same(got, layout.contiguous())
    nhwc = y.to(memory_format=torch.channels_last)
    if nhwc.size(1) >= 4 and nhwc.numel() > 0:  # the tile transposes: a new tensor, not the input
        assert _C.contiguous_from_channels_last(nhwc).data_ptr() != nhwc.data_ptr()


def test_contiguous_output_leaves_autograd_subclasses_and_modes_to_torch():
    from torchquant.nn.conv import contiguous_output
    nhwc = torch.randn(2, 16, 5, 5).to(memory_format=torch.channels_last)
    assert _C.contiguous_from_channels_last(nhwc.clone().requires_grad_()) is NotImplemented
    assert _C.contiguous_from_channels_last(nhwc.as_subclass(Counting)) is NotImplemented
    with pytest.raises(TypeError, match="takes 1 arguments, got 2"):
        _C.contiguous_from_channels_last(nhwc, nhwc)
    xg = nhwc.clone().requires_grad_()
    got = contiguous_output(xg)
    got.sum().backward()  # torch's copy, which autograd records
    assert got.is_contiguous() and torch.equal(xg.grad, torch.ones_like(xg))
    with PassThrough():
        assert _C.contiguous_from_channels_last(nhwc) is NotImplemented
    with Recording() as mode:
        assert _C.contiguous_from_channels_last(nhwc) is NotImplemented
        assert_same(contiguous_output(nhwc), nhwc.contiguous())
    assert any("clone" in op or "copy" in op for op in mode.ops), mode.ops


@pytest.mark.parametrize("out", ["float", "uint8", "int8"])
@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise"])
def test_pipeline_op_fast_path_matches_the_op(kind, out):
    layer, shape = converted_layer(kind, "int8-static", clamp=(0.0, None))
    g = torch.Generator().manual_seed(3)
    x_q = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    inputs = [x_q, x_q[:0]] + ([x_q.to(memory_format=torch.channels_last)] if len(shape) == 4 else [])
    # (out_dtype, out_scale, out_zero_point, out_bits): integers of fewer bits too
    out_args = {"float": (torch.float32, None, 0, 8), "uint8": (torch.uint8, 0.037, 11, 7),
                "int8": (torch.int8, 0.05, -3, 6)}[out]
    for x in inputs:
        fast = _C.quantized_layer_forward(x, layer._quantized_call_args, layer.clamp_min, layer.clamp_max,
                                          *out_args)
        assert fast is not NotImplemented
        want = layer._int_op(x, layer._static_scale, layer.input_zero_point, *out_args)
        assert_same(fast, want)
        assert_same(layer.pipeline_op(x, *out_args), want)


def test_quantized_layer_fast_path_follows_a_later_clamp():
    layer, shape = converted_layer("conv", "int8-static")
    x = x_of(shape)
    unclamped = layer(x)
    assert unclamped.min() < 0
    layer.set_activation_clamp(0.0, None)
    with PassThrough():
        want = layer(x)
    assert want.min() == 0
    assert_same(layer(x), want)


def test_quantized_layer_fast_path_declines_what_it_does_not_take():
    layer, shape = converted_layer("conv", "int8-static")
    args = layer._quantized_call_args
    x = x_of(shape)
    for bad in [x[:, :4], x[0, :4], x[None], x.to(torch.int32), x.to("meta"), x.as_subclass(Counting), [1.0]]:
        assert _C.quantized_layer_forward(bad, args, None, None) is NotImplemented
    assert _C.quantized_layer_forward(x, args[:-1], None, None) is NotImplemented  # not a layer's tuple
    assert _C.quantized_layer_forward(x, list(args), None, None) is NotImplemented
    assert _C.quantized_layer_forward(x, args, 0, None) is NotImplemented  # a clamp that is not a float
    # the pipeline form takes integers at a static scale only
    assert _C.quantized_layer_forward(x, args, None, None, torch.float32, None, 0, 8) is NotImplemented
    x_q = torch.zeros(shape, dtype=torch.uint8)
    assert _C.quantized_layer_forward(x_q, args, None, None) is NotImplemented
    assert _C.quantized_layer_forward(x_q, args, None, None, torch.uint8, 0.1, 0, 8) is not NotImplemented
    assert _C.quantized_layer_forward(x_q, args, None, None, "float32", None, 0, 8) is NotImplemented
    assert _C.quantized_layer_forward(x_q, args, None, None, torch.uint8, 1, 0, 8) is NotImplemented
    assert _C.quantized_layer_forward(x_q, args, None, None, torch.uint8, 0.1, 0, 7.0) is NotImplemented
    dynamic, _ = converted_layer("conv", LAYER_CONFIGS["dynamic-tensor"])
    assert _C.quantized_layer_forward(x_q, dynamic._quantized_call_args, None, None, torch.uint8, 0.1,
                                      0, 8) is NotImplemented
    with pytest.raises(TypeError, match="takes 4 arguments"):
        _C.quantized_layer_forward(x_q, args, None, None, torch.uint8, 0.1, 0)
    with pytest.raises(TypeError, match="takes 4 arguments"):
        _C.quantized_layer_forward(x, args)
    # and the layer raises its Python path's messages
    with pytest.raises(ValueError, match=r"input must have shape \[batch, 5, height, width\]"):
        layer(x[:, :4])
    with pytest.raises(TypeError, match="input must be float32, float16 or bfloat16"):
        layer(x.to(torch.int32))


@pytest.mark.parametrize("config", ["int8-dynamic", "weight-only", "binary-dynamic"])
def test_quantized_layer_fast_path_not_prepared_for_other_forwards(config):
    configs = {"int8-dynamic": "int8-dynamic", "weight-only": QuantConfig(QuantSpec(bits=4), None),
               "binary-dynamic": QuantConfig(QuantSpec(), QuantSpec(bits=1, granularity="per_tensor",
                                                                    dynamic=True))}
    layer, shape = converted_layer("linear", configs[config])
    assert layer._quantized_call_args is None
    conv, _ = converted_layer("conv", configs[config])
    assert (conv._quantized_call_args is None) == (config != "int8-dynamic")  # a conv's dynamic input is per tensor


def test_quantized_layer_fast_path_subclasses_and_autograd():
    layer, shape = converted_layer("linear", "int8-static")
    Counting.calls.clear()
    layer(x_of(shape).as_subclass(Counting))  # the Python path: the subclass sees the quantize op
    assert any("torchquant.quantize" in c for c in Counting.calls), Counting.calls
    xg = x_of(shape).requires_grad_()
    with PassThrough():
        want = layer(xg)
    got = layer(xg)
    assert got.requires_grad == want.requires_grad
    assert_same(got.detach(), want.detach())


# ---- quantized_add ----

ADD_ARGS = [
    # (a_scale, a_zero_point, b_scale, b_zero_point, out_dtype, out_scale, out_zero_point, relu, out_bits)
    (0.1, 3, 0.05, -4, torch.float32, None, 0, False, 8),
    (torch.tensor([0.1]), 3, torch.tensor(0.05), 0, torch.uint8, 0.2, 7, True, 8),
    (torch.tensor([0.1]), 3, torch.tensor(0.05), 0, torch.uint8, 0.2, 7, True, 7),
    (1, 0, 2, 0, torch.int8, 0.5, -3, False, 8),                               # int scales
    (1, 0, 2, 0, torch.int8, 0.5, -3, False, 4),
    (0.1, 0, 0.1, 0, torch.bfloat16, None, 0, True, 8),
    (0.1, 0, 0.1, 0, torch.float16, None, 0, False, 8),
]


@pytest.mark.parametrize("args", ADD_ARGS, ids=range(len(ADD_ARGS)))
@pytest.mark.parametrize("dtypes", [(torch.uint8, torch.uint8), (torch.int8, torch.uint8), (torch.int8, torch.int8)])
def test_quantized_add_fast_path_matches_the_checked_path(dtypes, args):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (2, 5, 3, 4), generator=g, dtype=torch.int16)
    b = torch.randint(-128, 128, (2, 5, 3, 4), generator=g, dtype=torch.int16)
    a, b = (t.clamp(*((0, 255) if d == torch.uint8 else (-128, 127))).to(d) for t, d in zip((a, b), dtypes))
    a_scale, a_zp, b_scale, b_zp, out_dtype, out_scale, out_zp, relu, out_bits = args
    if dtypes[1] == torch.uint8:
        b_zp = abs(b_zp)
    for x, y in [(a, b), (a.to(memory_format=torch.channels_last), b), (a[:, ::2], b[:, ::2]), (a[:0], b[:0])]:
        assert _C.quantized_add(x, a_scale, a_zp, y, b_scale, b_zp, out_dtype, out_scale, out_zp,
                                relu, out_bits) is not NotImplemented
        fast, checked = both_paths(lambda: F.quantized_add(x, a_scale, a_zp, y, b_scale, b_zp, out_dtype, out_scale,
                                                           out_zp, relu, out_bits))
        assert_same(fast, checked)
        assert fast.stride() == checked.stride()


def test_quantized_add_fast_path_declines_what_the_checked_path_handles():
    a = torch.zeros(3, 4, dtype=torch.uint8)
    good = (a, 0.1, 0, a, 0.1, 0, torch.float32, None, 0, False, 8)
    assert _C.quantized_add(*good) is not NotImplemented
    for i, bad in [(0, a.float()), (3, a[:2]), (3, a.as_subclass(Counting)), (0, a.to("meta")), (1, -0.1),
                   (1, float("nan")), (1, torch.tensor([0.1, 0.2])), (1, torch.tensor([0.1], dtype=torch.float64)),
                   (2, 1.0), (2, True), (6, torch.int32), (6, "float32"), (7, 1), (9, 1), (8, 2**70), (10, 8.0),
                   (10, 2**70)]:
        assert_declines(_C.quantized_add, good, i, bad)
    with pytest.raises(TypeError, match="takes 11 arguments"):
        _C.quantized_add(*good[:-1])
    # the checked path keeps its messages, and the kernel its own for values
    with pytest.raises(ValueError, match="same shape"):
        F.quantized_add(a, 0.1, 0, a[:2], 0.1, 0)
    with pytest.raises(ValueError, match="a_scale must be positive and finite"):
        F.quantized_add(a, -0.1, 0, a, 0.1, 0)
    with pytest.raises(RuntimeError, match="zero_point"):
        F.quantized_add(a, 0.1, 300, a, 0.1, 0)
    assert_same(F.quantized_add(a, 0.1, 2.0, a, 0.1, 0, out_dtype=torch.uint8, out_scale=1, relu=1),
                F.quantized_add(a, 0.1, 2, a, 0.1, 0, out_dtype=torch.uint8, out_scale=1.0, relu=True))


# ---- quantized_mul ----

@pytest.mark.parametrize("args", ADD_ARGS, ids=range(len(ADD_ARGS)))
@pytest.mark.parametrize("dtypes", [(torch.uint8, torch.uint8), (torch.int8, torch.uint8), (torch.uint8, torch.int8)])
def test_quantized_mul_fast_path_matches_the_checked_path(dtypes, args):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 128, (2, 5, 3, 4), generator=g, dtype=torch.int16).to(dtypes[0])
    b = torch.randint(0, 128, (2, 5, 1, 1), generator=g, dtype=torch.int16).to(dtypes[1])
    a_scale, a_zp, b_scale, b_zp, out_dtype, out_scale, out_zp, _, out_bits = args
    a_zp, b_zp = abs(a_zp), abs(b_zp)
    a_cl = a.to(memory_format=torch.channels_last)
    for x, y in [(a, b), (a_cl, b), (b, a_cl), (a[:, ::2], b[:, ::2]), (a[:0], b[:1]), (a, b[0])]:
        assert _C.quantized_mul(x, a_scale, a_zp, y, b_scale, b_zp, out_dtype, out_scale, out_zp,
                                out_bits) is not NotImplemented
        fast, checked = both_paths(lambda: F.quantized_mul(x, a_scale, a_zp, y, b_scale, b_zp, out_dtype, out_scale,
                                                           out_zp, out_bits))
        assert_same(fast, checked)
        assert fast.stride() == checked.stride()


def test_quantized_mul_fast_path_declines_what_the_checked_path_handles():
    a = torch.zeros(3, 4, dtype=torch.uint8)
    good = (a, 0.1, 0, a[:1], 0.1, 0, torch.float32, None, 0, 8)
    assert _C.quantized_mul(*good) is not NotImplemented
    for i, bad in [(0, a.float()), (3, a[:2]), (3, a.as_subclass(Counting)), (0, a.to("meta")), (1, -0.1),
                   (4, float("inf")), (1, torch.tensor([0.1, 0.2])), (2, 1.0), (6, torch.int32), (7, 1),
                   (8, 2**70), (9, "8")]:
        assert_declines(_C.quantized_mul, good, i, bad)
    with pytest.raises(TypeError, match="takes 10 arguments"):
        _C.quantized_mul(*good[:-1])
    with pytest.raises(ValueError, match="must broadcast to one shape"):
        F.quantized_mul(a, 0.1, 0, a[:2], 0.1, 0)
    with pytest.raises(ValueError, match="b_scale must be positive and finite"):
        F.quantized_mul(a, 0.1, 0, a, -1, 0)
    assert_same(F.quantized_mul(a, 0.1, 2.0, a, 0.1, 0, out_dtype=torch.uint8, out_scale=1),
                F.quantized_mul(a, 0.1, 2, a, 0.1, 0, out_dtype=torch.uint8, out_scale=1.0))


# ---- quantized_max_pool2d ----

POOL_ARGS = [  # (kernel_size, stride, padding, dilation, ceil_mode)
    (2, None, 0, 1, False),
    (3, 2, 1, 1, True),
    ((3, 2), [2, 1], (1, 0), [2, 1], False),  # tuples and lists
    ((1, 3), (1, 2), (0, 1), (1, 1), False),  # as quantized_max_pool1d calls it
]


@pytest.mark.parametrize("args", POOL_ARGS, ids=range(len(POOL_ARGS)))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8], ids=str)
def test_quantized_max_pool2d_fast_path_matches_the_checked_path(dtype, args):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (2, 5, 9, 8), generator=g, dtype=torch.int16)
    a = a.clamp(*((0, 255) if dtype == torch.uint8 else (-128, 127))).to(dtype)
    for x in [a, a.to(memory_format=torch.channels_last), a[:, ::2], a[0], a[:0]]:
        assert _C.quantized_max_pool2d(x, *args) is not NotImplemented
        fast, checked = both_paths(lambda: F.quantized_max_pool2d(x, *args))
        assert_same(fast, checked)
        assert fast.stride() == checked.stride()


def test_quantized_max_pool2d_fast_path_declines_what_the_checked_path_handles():
    a = torch.zeros(1, 2, 6, 6, dtype=torch.uint8)
    good = (a, 2, None, 0, 1, False)
    assert _C.quantized_max_pool2d(*good) is not NotImplemented
    for i, bad in [(0, a.float()), (0, a.as_subclass(Counting)), (0, a.to("meta")), (1, (2, 2, 2)), (1, True),
                   (1, 2.0), (1, (2, "2")), (2, [2]), (3, 2**70), (4, None), (5, 1), (5, None)]:
        assert_declines(_C.quantized_max_pool2d, good, i, bad)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        _C.quantized_max_pool2d(*good[:-1])
    # the checked path keeps its messages and takes the rarer forms, the kernel checks the values
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        F.quantized_max_pool2d(a, (2, 2, 2))
    with pytest.raises(RuntimeError, match="quantized_max_pool2d: stride must be >= 1"):
        F.quantized_max_pool2d(a, 2, 0)
    assert_same(F.quantized_max_pool2d(a, np.int64(2), ceil_mode=1), F.quantized_max_pool2d(a, 2))


def test_int8_mm_fast_path_matches_the_checked_path():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (17, 129), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (129, 33), generator=g, dtype=torch.int8)
    for x, y in [(a, b), (a[:, ::2], b[::2]), (a, torch.randint(-128, 128, (33, 129), generator=g,
                                                                  dtype=torch.int8).t()),
                 (a[:0], b), (a[:, :0], b[:0]), (torch.nn.Parameter(a, requires_grad=False), b)]:
        assert _C.int8_mm(x, y) is not NotImplemented
        fast, checked = both_paths(lambda: F.int8_mm(x, y))
        assert_same(fast, checked)
        assert torch.equal(fast, x.int() @ y.int())
    with Recording() as mode:
        F.int8_mm(a, b)  # the dispatcher reaches the mode
    assert mode.ops == ["torchquant.int8_mm.default"], mode.ops


def test_int8_mm_compiles_whole():
    # under torch.compile the wrapper takes the op (the fast entry is opaque to dynamo: fullgraph would fail on it)
    a, b = torch.randint(-128, 128, (5, 70), dtype=torch.int8), torch.randint(-128, 128, (70, 9), dtype=torch.int8)
    compiled = torch.compile(F.int8_mm, fullgraph=True, backend="eager")
    assert torch.equal(compiled(a, b), a.int() @ b.int())


def test_int8_mm_fast_path_declines_what_the_checked_path_handles():
    a, b = torch.zeros(3, 4, dtype=torch.int8), torch.zeros(4, 5, dtype=torch.int8)
    good = (a, b)
    for i, bad in [(0, a.float()), (1, b.byte()), (0, a.as_subclass(Counting)), (0, a[0]), (1, b[None]),
                   (1, b[:3]), (0, a.to("meta")), (0, a.tolist())]:
        assert_declines(_C.int8_mm, good, i, bad)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        _C.int8_mm(a)
    # the checked path keeps its messages
    with pytest.raises(TypeError, match="b must be int8"):
        F.int8_mm(a, b.byte())
    with pytest.raises(ValueError, match="inner sizes differ"):
        F.int8_mm(a, b[:3])
    with pytest.raises(ValueError, match="must be 2-d"):
        F.int8_mm(a[0], b)
    # a failed allocation (2 x 2^40 bytes of packed rows) is a MemoryError on both paths
    one = torch.ones(1, 1, dtype=torch.int8)
    huge_a, huge_b = one.expand(2, 2**40), one.expand(2**40, 2)
    with pytest.raises(MemoryError, match="bad_alloc"):
        F.int8_mm(huge_a, huge_b)
    with PassThrough(), pytest.raises(MemoryError, match="bad_alloc"):
        F.int8_mm(huge_a, huge_b)


def _linear_operands(k=40, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return (F.pack_int8_weight(w), w.sum(1, dtype=torch.int32), torch.rand(n, generator=g) * 0.01 + 0.001,
            torch.randn(n, generator=g))


def _linear_args(x, x_scale, x_zp, bias, out):
    w_packed, w_sum, w_scale, b = _linear_operands(x.shape[-1])
    return (x, x_scale, x_zp, w_packed, w_sum, w_scale, b if bias else None, 24, out.get("out_dtype", torch.float32),
            out.get("out_scale"), out.get("out_zero_point", 0), out.get("clamp_min"), out.get("clamp_max"),
            out.get("out_bits", 8))


LINEAR_OUTS = [{}, dict(out_dtype=torch.bfloat16), dict(out_dtype=torch.float16, clamp_min=0.0),
               dict(out_dtype=torch.uint8, out_scale=0.05, out_zero_point=3, clamp_min=0.0, clamp_max=6.0),
               dict(out_dtype=torch.int8, out_scale=0.1), dict(out_dtype=torch.uint8, out_scale=0.05, out_bits=7)]


@pytest.mark.parametrize("out", LINEAR_OUTS, ids=range(len(LINEAR_OUTS)))
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_fast_path_matches_the_checked_path(out, bias):
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (2, 5, 40), generator=g, dtype=torch.uint8)
    s = torch.randint(-128, 128, (3, 40), generator=g, dtype=torch.int8)
    for x, x_scale, x_zp in [(u, 0.02, 128), (u, 1, 3), (s, torch.tensor([0.03]), 0), (s, torch.tensor(0.03), -5),
                             (u, torch.rand(2, 5, generator=g) + 0.01, 128), (s[:, ::2], 0.02, 0), (u[:0], 0.02, 0)]:
        args = _linear_args(x, x_scale, x_zp, bias, out)
        assert _C.int8_linear(*args) is not NotImplemented
        kwargs = dict(out_features=24, **out)
        fast, checked = both_paths(lambda: F.int8_linear(*args[:7], **kwargs))
        assert_same(fast, checked)


def test_int8_linear_fast_path_declines_what_the_checked_path_handles():
    x = torch.zeros(3, 40, dtype=torch.uint8)
    good = _linear_args(x, 0.02, 128, True, {})
    assert _C.int8_linear(*good) is not NotImplemented
    w_packed = good[3]
    for i, bad in [(0, x.float()), (0, x[0, 0]), (0, x.as_subclass(Counting)), (1, -0.1), (1, float("inf")),
                   (1, True), (1, np.float64(0.1)), (1, torch.tensor([0.1], dtype=torch.float64)), (2, 1.0),
                   (2, 2**70), (3, w_packed.to("meta")), (6, torch.zeros(24).to("meta")), (6, [0.0] * 24),
                   (7, 24.0), (8, torch.int32), (8, "float32"), (9, 1), (10, None), (11, float("inf")),
                   (12, float("nan")), (11, 0), (1, torch.tensor([0.1]).to_sparse()), (4, good[4].to_sparse()),
                   (13, 8.0), (13, None)]:
        assert_declines(_C.int8_linear, good, i, bad)
    with pytest.raises(TypeError, match="takes 14 arguments"):
        _C.int8_linear(*good[:-1])
    # the checked path keeps its messages and takes the rarer forms
    with pytest.raises(ValueError, match="x_scale must be positive and finite"):
        F.int8_linear(x, -0.1, 128, *good[3:7], out_features=24)
    with pytest.raises(ValueError, match="clamp_max must be finite"):
        F.int8_linear(x, 0.02, 128, *good[3:7], out_features=24, clamp_max=float("inf"))
    with pytest.raises(TypeError, match="out_dtype must be"):
        F.int8_linear(x, 0.02, 128, *good[3:7], out_features=24, out_dtype=torch.int32)
    assert_same(F.int8_linear(x, np.float64(0.02), np.int64(128), *good[3:7], out_features=24.0),
                F.int8_linear(x, 0.02, 128, *good[3:7], out_features=24))


CONV_FORMS = [
    # (kernel_size, stride, padding, dilation, groups, out)
    (3, 1, 1, 1, 1, {}),
    ((3, 2), [2, 1], (1, 0), [1, 2], 1, dict(out_dtype=torch.uint8, out_scale=0.5, clamp_min=0.0)),
    (1, 1, 0, 1, 2, dict(out_dtype=torch.bfloat16)),
    (3, 2, 1, 1, 4, dict(out_dtype=torch.int8, out_scale=0.3, out_zero_point=-2)),
    (3, 2, 1, 1, 4, dict(out_dtype=torch.int8, out_scale=0.3, out_zero_point=-2, out_bits=5)),
]


@pytest.mark.parametrize("form", CONV_FORMS, ids=range(len(CONV_FORMS)))
def test_int8_conv2d_fast_path_matches_the_checked_path(form):
    kernel_size, stride, padding, dilation, groups, out = form
    g = torch.Generator().manual_seed(2)
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    w = torch.randint(-127, 128, (8, 8 // groups, kh, kw), generator=g, dtype=torch.int8)
    operands = (F.pack_conv_weight(w, groups=groups), w.sum((1, 2, 3), dtype=torch.int32),
                torch.rand(8, generator=g) * 0.01 + 0.001, torch.randn(8, generator=g))
    x = torch.randint(0, 256, (2, 8, 7, 9), generator=g, dtype=torch.uint8)
    for x_q in [x, x.to(memory_format=torch.channels_last), x[:0]]:
        args = (x_q, 0.02, 128, *operands, 8, kernel_size, stride, padding, dilation, groups,
                out.get("out_dtype", torch.float32), out.get("out_scale"), out.get("out_zero_point", 0),
                out.get("clamp_min"), None, out.get("out_bits", 8))
        assert _C.int8_conv2d(*args) is not NotImplemented
        kwargs = dict(out_channels=8, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, **out)
        fast, checked = both_paths(lambda: F.int8_conv2d(x_q, 0.02, 128, *operands, **kwargs))
        assert_same(fast, checked)
        assert fast.stride() == checked.stride()


def test_int8_conv2d_fast_path_declines_what_the_checked_path_handles():
    w = torch.zeros(4, 2, 3, 3, dtype=torch.int8)
    operands = (F.pack_conv_weight(w, groups=2), w.sum((1, 2, 3), dtype=torch.int32), torch.ones(4), None)
    x = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    good = (x, 0.1, 0, *operands, 4, 3, 1, 1, 1, 2, torch.float32, None, 0, None, None, 8)
    assert _C.int8_conv2d(*good) is not NotImplemented
    for i, bad in [(0, x[0]), (0, x.float()), (8, (3, 3, 3)), (9, 1.0), (10, [1]), (11, None), (12, 3), (12, 0),
                   (12, True), (7, 5), (18, 8.0)]:
        assert_declines(_C.int8_conv2d, good, i, bad)
    with pytest.raises(ValueError, match="groups must be a positive int dividing"):
        F.int8_conv2d(x, 0.1, 0, *operands, out_channels=4, kernel_size=3, groups=3)
    with pytest.raises(ValueError, match="x_q must be 4-d"):
        F.int8_conv2d(x[0], 0.1, 0, *operands, out_channels=4, kernel_size=3, groups=2)
    # a residual takes the checked path
    residual = torch.zeros(1, 4, 3, 3, dtype=torch.uint8)
    with Recording() as mode:
        F.int8_conv2d(x, 0.1, 0, *operands, out_channels=4, kernel_size=3, groups=2, residual=residual,
                      residual_scale=0.1, relu=True)
    assert [op for op in mode.ops if op.startswith("torchquant")] == ["torchquant.int8_conv2d.residual"], mode.ops


def test_integer_ops_compile_whole():
    x = torch.randint(0, 256, (3, 40), dtype=torch.uint8)
    args = _linear_args(x, 0.02, 128, True, {})[:7]
    compiled = torch.compile(lambda x: F.int8_linear(x, *args[1:], out_features=24), fullgraph=True, backend="eager")
    assert_same(compiled(x), F.int8_linear(*args, out_features=24))


def _reference_counts_seen(call, tensors, seconds=10.0):
    """The largest reference count (Tensor._use_count) of each tensor that a second thread sees while call() runs
    again and again (until every count has risen, or for `seconds`), against each one's count before. The op runs on
    one thread, so that the watching thread has a core while it runs."""
    before = [t._use_count() for t in tensors]
    seen = list(before)
    done = threading.Event()

    def watch():
        while not done.is_set():
            for i, t in enumerate(tensors):
                seen[i] = max(seen[i], t._use_count())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not all(s > b for s, b in zip(seen, before)):
            assert call() is not NotImplemented
    finally:
        done.set()
        watcher.join()
        torch.set_num_threads(threads)
    return before, seen


def _fast_entries_on_large_operands():
    """{name: (call, tensors it reads)} for every fast entry, on operands over the size at which it releases the
    GIL."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g)
    scale, zero_point = torch.tensor([0.05]), torch.tensor([3], dtype=torch.int32)
    q = torch.randint(0, 256, (512, 256), generator=g, dtype=torch.uint8)
    q2 = torch.randint(0, 256, (512, 256), generator=g, dtype=torch.uint8)
    a8 = torch.randint(-128, 128, (256, 256), generator=g, dtype=torch.int8)
    dynamic = QuantLinear(256, 256, config="int8-dynamic").convert()
    static = QuantLinear(256, 256, config="int8-static")
    tq.calibrate(static, [x], progress=False)
    static.eval().convert()
    layer_tensors = [t for t in static._quantized_call_args if isinstance(t, torch.Tensor)]
    conv_out = torch.randn(2, 64, 32, 32, generator=g).to(memory_format=torch.channels_last)
    w_packed, w_sum, w_scale, bias = _linear_operands(k=256, n=24)
    linear_args = (q, scale, 3, w_packed, w_sum, w_scale, bias, 24, torch.float32, None, 0, None, None, 8)
    return {
        "quantize": (lambda: _C.quantize(x, scale, zero_point, None, 8, True, "nearest"), [x, scale, zero_point]),
        "fake_quantize": (lambda: _C.fake_quantize(x, scale, zero_point, None, 8, True, "nearest"),
                          [x, scale, zero_point]),
        "dequantize": (lambda: _C.dequantize(q, scale, zero_point, None, torch.float32), [q, scale, zero_point]),
        "quantize_per_token": (lambda: _C.quantize_per_token(x, 8), [x]),
        "int8_mm": (lambda: _C.int8_mm(a8, a8.t()), [a8]),
        "int8_linear_dynamic": (lambda: _C.int8_linear_dynamic(x, 256, *dynamic._kernel_args, None),
                                [x] + [t for t in dynamic._kernel_args if isinstance(t, torch.Tensor)]),
        "quantized_add": (lambda: _C.quantized_add(q, scale, 3, q2, scale, 5, torch.float32, None, 0, False, 8),
                          [q, q2, scale]),
        "quantized_mul": (lambda: _C.quantized_mul(q, scale, 3, q2, scale, 5, torch.float32, None, 0, 8),
                          [q, q2, scale]),
        "quantized_max_pool2d": (lambda: _C.quantized_max_pool2d(q.view(1, 2, 256, 256), 2, None, 0, 1, False), [q]),
        "quantized_layer_forward": (lambda: _C.quantized_layer_forward(x, static._quantized_call_args, None, None),
                                    [x] + layer_tensors),
        "contiguous_from_channels_last": (lambda: _C.contiguous_from_channels_last(conv_out), [conv_out]),
        "int8_linear": (lambda: _C.int8_linear(*linear_args), [q, scale, w_packed, w_sum, w_scale, bias]),
    }


@pytest.mark.parametrize("entry", ["quantize", "fake_quantize", "dequantize", "quantize_per_token", "int8_mm",
                                   "int8_linear_dynamic", "quantized_add", "quantized_mul", "quantized_max_pool2d",
                                   "quantized_layer_forward", "contiguous_from_channels_last", "int8_linear"])
def test_fast_entries_hold_their_tensors_while_the_gil_is_released(entry):
    """Each fast entry holds a reference to every tensor it reads while it runs without the GIL, so that another
    thread's torch.utils.swap_tensors refuses them (it refuses a tensor with other references) rather than freeing
    memory the op still reads."""
    call, tensors = _fast_entries_on_large_operands()[entry]
    before, seen = _reference_counts_seen(call, tensors)
    assert all(s > b for s, b in zip(seen, before)), (before, seen)
