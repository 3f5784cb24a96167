"""Unusual and adversarial arguments to the public ops: each call either computes exactly what
torchquant.reference (or torch) computes, or raises a RuntimeError / ValueError / TypeError naming the argument.
Calls that once hung run in a child process with a time limit."""
import math
import os
import textwrap

import pytest
import torch

import torchquant.functional as F
from torchquant import reference
from torchquant._ops import ops

from conftest import randint8, run_python_child

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# ---------------------------------------------------------------------------------------------------------------
# quantized_max_pool2d: a left padding of up to half a huge kernel
# ---------------------------------------------------------------------------------------------------------------

POOL_HUGE_PADDING_CHILD = textwrap.dedent("""
    import sys, torch, torchquant.functional as F
    torch.manual_seed(0)
    for dtype in (torch.int8, torch.uint8):
        x = torch.randint(0, 100, (2, 3, 16, 16), dtype=dtype).contiguous(memory_format=torch.channels_last)
        x = x.to(sys.argv[1])
        # every window (kernel 2^30, left padding 2^29, stride 1) covers the whole input: 17 x 17 outputs, each the
        # maximum of its channel
        y = F.quantized_max_pool2d(x, 2**30, 1, 2**29)
        assert y.shape == (2, 3, 17, 17), y.shape
        assert torch.equal(y, x.amax((2, 3), keepdim=True).expand(2, 3, 17, 17)), y
        # a stride near 2^63 in ceil mode: one window
        y = F.quantized_max_pool2d(x, 2, 2**63 - 1, ceil_mode=True)
        assert torch.equal(y, x[:, :, :2, :2].amax((2, 3), keepdim=True)), y
    print("ok")
""")


def test_max_pool_huge_padding_does_not_step_through_it(device, isa):
    """The first tap inside the input is computed, not stepped to through the left padding one dilation at a time:
    a channels-last input with kernel 2^30 and padding 2^29 (valid by torch's rules) would loop 2^29 times per
    output (on the CPU; on CUDA, every input layout). A child process, so that a hang fails the test."""
    assert "ok" in run_python_child(POOL_HUGE_PADDING_CHILD, timeout=120, args=[device])


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_max_pool_padding_against_torch(ceil_mode, dilation, isa):
    """Windows that start in the left padding, with dilation, against torch's max_pool2d."""
    # 83 channels: the 64-, 32- and 16-byte loops and the byte tail of every instruction-set path
    x = randint8((2, 83, 9, 11), seed=dilation).contiguous(memory_format=torch.channels_last)
    for kernel, padding in ((3, 1), (5, 2), (7, 3), (2, 1)):
        for stride in (1, 2, 3):
            args = (kernel, stride, padding, dilation, ceil_mode)
            try:
                want = torch.nn.functional.max_pool2d(x.float(), *args).clamp(min=-128).to(torch.int8)
            except RuntimeError:
                with pytest.raises(RuntimeError, match="quantized_max_pool2d"):
                    F.quantized_max_pool2d(x, *args)
                continue
            assert torch.equal(F.quantized_max_pool2d(x, *args), want), args


def test_max_pool_dilations_near_int64_max(device, isa):
    """Tap counts and steps for dilations near 2^63, which torch's argument rules allow: no sum past INT64_MAX."""
    x = randint8((1, 3, 16, 16), seed=7).contiguous(memory_format=torch.channels_last).to(device)
    # ceil mode with a huge stride: one window, whose only tap inside is (0, 0)
    y = F.quantized_max_pool2d(x, 2, 2**63 - 1, 0, 2**63 - 2, ceil_mode=True)
    assert torch.equal(y, x[:, :, :1, :1]), y
    # kernel 1: each output is its own input pixel, the dilation never applies
    assert torch.equal(F.quantized_max_pool2d(x, 1, 1, 0, 2**63 - 1), x)


def test_depthwise_conv_dilation_near_int64_max(device, isa):
    """A depthwise conv whose kernel rows lie 2^61 apart, in padding of 2^60 rows: every tap reads the zero point,
    so each sum of (x - zero point) * w is 0, and no row index past the kernel's is computed (3 * 2^61 would
    overflow)."""
    x = torch.randint(0, 256, (1, 16, 4, 4), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w = randint8((16, 1, 2, 3), seed=3)
    y = F.int8_conv2d(x.to(device), 1.0, 7, F.pack_conv_weight(w.to(device), 16),
                      w.sum((1, 2, 3), dtype=torch.int32).to(device), torch.ones(16, device=device), out_channels=16,
                      kernel_size=(2, 3), padding=(2**60, 1), dilation=(2**61, 1), groups=16)
    assert y.shape == (1, 16, 4, 4) and torch.equal(y.cpu(), torch.zeros(1, 16, 4, 4)), y


# ---------------------------------------------------------------------------------------------------------------
# zero points in unsigned and wide integer tensors
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,value", [(torch.uint32, 2**32 - 1), (torch.uint64, 2**32), (torch.uint64, 2**64 - 1),
                                         (torch.uint16, 2**16 - 1), (torch.int64, 2**32), (torch.int64, -2**63)])
@pytest.mark.parametrize("op", ["quantize", "fake_quantize", "dequantize"])
def test_wide_zero_point_tensors_are_not_wrapped(op, dtype, value):
    """A uint32 zero point 2^32 - 1 was converted to int32 -1 and a uint64 2^32 to 0: in range, so the call
    silently used another zero point."""
    zero_point = torch.tensor([value], dtype=dtype)
    if op == "dequantize":
        call = lambda: F.dequantize(torch.zeros(4, dtype=torch.int8), 0.5, zero_point)  # noqa: E731
    else:
        call = lambda: getattr(F, op)(torch.randn(4), 0.5, zero_point)  # noqa: E731
    with pytest.raises((RuntimeError, ValueError), match="zero_point must be in"):
        call()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.int64])
def test_unsigned_zero_point_tensors_in_range_work(dtype):
    x = torch.randn(3, 5) * 10
    zero_point = torch.tensor([0, 7, 100], dtype=dtype)
    scale = torch.tensor([0.1, 0.2, 0.3])
    want = reference.quantize(x, scale, zero_point.to(torch.int32), signed=False, axis=0)
    assert torch.equal(F.quantize(x, scale, zero_point, signed=False, axis=0), want)


NUMBER_CACHE_BOUND_CHILD = textwrap.dedent("""
    import ctypes
    # a fixed mmap threshold: glibc otherwise raises it to the size of a freed block, serves the next 4 MiB
    # blocks from its heap, and RSS then counts that heap's fragmentation besides what the process keeps
    M_MMAP_THRESHOLD = -3
    assert ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1
    import torch, torchquant.functional as F

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10

    x = torch.randn(2**20)
    y = torch.empty_like(x)
    F.fake_quantize(x, 0.5, 0, axis=0)
    before = rss()
    for i in range(64):  # a number scale broadcast to 2^20 channels, 64 values: 256 MiB if each were kept
        y = F.fake_quantize(x, 0.5 + i / 64, 0, axis=0)
    kept = rss() - before
    print(kept >> 20)
    assert kept < (16 << 20), f"the process kept {kept >> 20} MiB"  # 4 values' tensors
""")


@pytest.mark.skipif(os.environ.get("TORCHQUANT_SANITIZED") == "1",
                    reason="memory measurements do not apply under AddressSanitizer")
def test_number_scales_for_many_channels_are_not_kept():
    """The fast path keeps the tensors it makes of Python-number scales, 1024 of them: a number broadcast to a
    million channels kept 4 MiB per distinct value."""
    run_python_child(NUMBER_CACHE_BOUND_CHILD)


# ---------------------------------------------------------------------------------------------------------------
# integer arguments of the integer ops
# ---------------------------------------------------------------------------------------------------------------

def _linear():
    w = randint8((4, 8), seed=1)
    x = randint8((3, 8), seed=2)
    return x, w, F.pack_int8_weight(w), w.sum(1, dtype=torch.int32), torch.rand(4) + 0.1


@pytest.mark.parametrize("value", [0.5, math.nan, math.inf, "3", True, torch.tensor(1.5), None])
def test_int8_linear_zero_point_must_be_an_integer(value):
    """int(x_zero_point) truncated 0.5 to 0 (a silently different zero point) and failed on NaN without naming
    the argument."""
    x, _, packed, w_sum, w_scale = _linear()
    with pytest.raises(TypeError, match="int8_linear: x_zero_point must be an integer"):
        F.int8_linear(x, 0.1, value, packed, w_sum, w_scale, out_features=4)


@pytest.mark.parametrize("name", ["x_zero_point", "out_zero_point"])
def test_int8_linear_integers_past_int64(name):
    x, _, packed, w_sum, w_scale = _linear()
    kwargs = {"x_zero_point": 0, "out_zero_point": 0, "out_dtype": torch.int8, "out_scale": 1.0, name: 2**70}
    zp = kwargs.pop("x_zero_point")
    with pytest.raises(ValueError, match=f"int8_linear: {name} is out of range, got {2**70}"):
        F.int8_linear(x, 0.1, zp, packed, w_sum, w_scale, out_features=4, **kwargs)


def test_int8_linear_integer_forms_compute_exactly():
    """Integral floats, numpy integers and one-element integer tensors are the integers they hold."""
    import numpy as np
    x, w, packed, w_sum, w_scale = _linear()
    want = reference.int8_linear(x, 0.1, 3, w, w_scale)
    for zp in (3, 3.0, np.int64(3), np.uint8(3), torch.tensor(3), torch.tensor([3], dtype=torch.int16)):
        got = F.int8_linear(x, 0.1, zp, packed, w_sum, w_scale, out_features=4.0 if isinstance(zp, float) else 4)
        assert torch.equal(got, want), zp


def test_out_features_and_out_channels_must_be_integers():
    x, _, packed, w_sum, w_scale = _linear()
    with pytest.raises(TypeError, match="int8_linear: out_features must be an integer, got 4.5"):
        F.int8_linear(x, 0.1, 0, packed, w_sum, w_scale, out_features=4.5)
    with pytest.raises(TypeError, match="dynamic_int8_linear: out_features must be an integer"):
        F.dynamic_int8_linear(torch.randn(2, 8), packed, w_sum, w_scale, out_features=4.5)
    w = randint8((4, 2, 3, 3), seed=3)
    x_q = randint8((1, 2, 5, 5), seed=4)
    with pytest.raises(TypeError, match="int8_conv2d: out_channels must be an integer, got 4.5"):
        F.int8_conv2d(x_q, 0.1, 0, F.pack_conv_weight(w), w.sum((1, 2, 3), dtype=torch.int32), torch.ones(4),
                      out_channels=4.5, kernel_size=3)
    with pytest.raises(TypeError, match="int8_conv2d: x_zero_point must be an integer"):
        F.int8_conv2d(x_q, 0.1, 0.25, F.pack_conv_weight(w), w.sum((1, 2, 3), dtype=torch.int32), torch.ones(4),
                      out_channels=4, kernel_size=3)


def test_tensor_arguments_of_another_kind_are_type_errors():
    """A bias (or dynamic_int8_linear's weight tensors) that is not a tensor raised an AttributeError ('float'
    object has no attribute 'device')."""
    x, _, packed, w_sum, w_scale = _linear()
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got float"):
        F.int8_linear(x, 0.1, 0, packed, w_sum, w_scale, 0.5, out_features=4)
    with pytest.raises(TypeError, match="w_scale must be a torch.Tensor, got NoneType"):
        F.dynamic_int8_linear(torch.randn(2, 8), packed, w_sum, None, out_features=4)
    with pytest.raises(TypeError, match="w_sum must be a torch.Tensor, got list"):
        F.dynamic_int8_linear(torch.randn(2, 8), packed, [1, 2], w_scale, out_features=4)


def _out_scale_calls():
    """A call of each op with a requantized output, as a function of out_scale."""
    x, _, packed, w_sum, w_scale = _linear()
    w = randint8((4, 2, 3, 3), seed=3)
    x_q, a = randint8((1, 2, 5, 5), seed=4), randint8((5,), seed=5)
    return {
        "int8_linear": lambda s: F.int8_linear(x, 0.1, 0, packed, w_sum, w_scale, out_features=4,
                                               out_dtype=torch.int8, out_scale=s),
        "int8_conv2d": lambda s: F.int8_conv2d(x_q, 0.1, 0, F.pack_conv_weight(w), w.sum((1, 2, 3), dtype=torch.int32),
                                               torch.ones(4), out_channels=4, kernel_size=3, out_dtype=torch.int8,
                                               out_scale=s),
        "quantized_add": lambda s: F.quantized_add(a, 0.1, 0, a, 0.2, 0, torch.int8, s),
    }


@pytest.mark.parametrize("op", ["int8_linear", "int8_conv2d", "quantized_add"])
def test_out_scale_must_be_a_number(op):
    """float(out_scale) took True as 1.0 and "0.5" as 0.5, and failed on "x" or a 2-element tensor with a message
    that did not name out_scale."""
    import numpy as np
    call = _out_scale_calls()[op]
    for bad in (True, "0.5", "x", [0.5], torch.tensor([0.5, 0.25]), torch.tensor(True)):
        with pytest.raises(TypeError, match=f"{op}: out_scale must be a number or None, got"):
            call(bad)
    want = call(0.5)
    for same in (np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64)):
        assert torch.equal(call(same), want), same


@pytest.mark.parametrize("name", ["a_zero_point", "b_zero_point", "out_zero_point"])
def test_quantized_add_zero_points_must_be_integers(name):
    a = randint8((5,), seed=5)
    kwargs = {"a_zero_point": 0, "b_zero_point": 0, "out_zero_point": 0, name: 0.5}
    with pytest.raises(TypeError, match=f"quantized_add: {name} must be an integer, got 0.5"):
        F.quantized_add(a, 0.1, kwargs["a_zero_point"], a, 0.2, kwargs["b_zero_point"], torch.int8, 0.3,
                        kwargs["out_zero_point"])


@pytest.mark.parametrize("value", ["no", None, 2, 0.5])
def test_flags_must_be_bools(value):
    a = randint8((5,), seed=5)
    with pytest.raises(TypeError, match=f"quantized_add: relu must be a bool, got {value!r}"):
        F.quantized_add(a, 0.1, 0, a, 0.2, 0, torch.int8, 0.3, 0, relu=value)
    x = randint8((1, 2, 5, 5), seed=6)
    with pytest.raises(TypeError, match=f"quantized_max_pool2d: ceil_mode must be a bool, got {value!r}"):
        F.quantized_max_pool2d(x, 2, ceil_mode=value)


def test_flags_take_bools_and_0_or_1():
    import numpy as np
    a = randint8((5,), seed=5)
    on = F.quantized_add(a, 0.1, 0, a, 0.2, 0, torch.int8, 0.3, 0, relu=True)
    for flag in (1, np.True_, torch.tensor(True)):
        assert torch.equal(F.quantized_add(a, 0.1, 0, a, 0.2, 0, torch.int8, 0.3, 0, relu=flag), on), flag
    off = F.quantized_add(a, 0.1, 0, a, 0.2, 0, torch.int8, 0.3, 0, relu=np.False_)
    assert torch.equal(off, F.quantized_add(a, 0.1, 0, a, 0.2, 0, torch.int8, 0.3, 0)) and not torch.equal(off, on)
    x = randint8((1, 2, 5, 5), seed=6)
    assert F.quantized_max_pool2d(x, 2, ceil_mode=0).shape == F.quantized_max_pool2d(x, 2, ceil_mode=False).shape
    assert F.quantized_max_pool2d(x, 2, ceil_mode=1).shape[-1] == 3


def test_sizes_take_numpy_integers_and_refuse_bools():
    """kernel_size, stride, padding, dilation and groups: numpy integers are the sizes they hold; True is not a
    size (it was taken as 1)."""
    import numpy as np
    x = randint8((1, 2, 6, 6), seed=8)
    want = F.quantized_max_pool2d(x, 3, 2, 1)
    assert torch.equal(F.quantized_max_pool2d(x, np.int64(3), (np.int32(2), 2), np.uint8(1)), want)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints, got True"):
        F.quantized_max_pool2d(x, True)
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints, got \(2, False\)"):
        F.quantized_max_pool2d(x, 2, (2, False))
    w = randint8((4, 2, 3, 3), seed=9)
    assert torch.equal(F.pack_conv_weight(w, np.int64(2)), F.pack_conv_weight(w, 2))
    with pytest.raises(ValueError, match="pack_conv_weight: groups must be a positive int dividing out_channels"):
        F.pack_conv_weight(w, True)
    packed, w_sum, w_scale = F.pack_conv_weight(w), w.sum((1, 2, 3), dtype=torch.int32), torch.ones(4)
    want = F.int8_conv2d(x, 0.1, 0, packed, w_sum, w_scale, out_channels=4, kernel_size=3)
    got = F.int8_conv2d(x, 0.1, 0, packed, w_sum, w_scale, out_channels=4, kernel_size=np.int64(3),
                        groups=np.int64(1))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="int8_conv2d: groups must be a positive int"):
        F.int8_conv2d(x, 0.1, 0, packed, w_sum, w_scale, out_channels=4, kernel_size=3, groups=True)


# ---------------------------------------------------------------------------------------------------------------
# meta tensors: shapes out, or the kernels' errors; never an IndexError or a value read
# ---------------------------------------------------------------------------------------------------------------

def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_meta_functional_calls_give_shapes():
    """The wrappers' value checks of scales on other devices read meta tensors' values (which they have none of)."""
    x_q, w_packed = meta(3, 8, dtype=torch.int8), ops.pack_int8_weight(meta(4, 8, dtype=torch.int8))
    w_sum, w_scale = meta(4, dtype=torch.int32), meta(4)
    assert F.int8_linear(x_q, meta(1), 0, w_packed, w_sum, w_scale, out_features=4).shape == (3, 4)
    assert F.dynamic_int8_linear(meta(2, 8), w_packed, w_sum, w_scale, out_features=4).shape == (2, 4)
    zp = meta(5, dtype=torch.int32)
    assert F.quantize(meta(2, 5), meta(5), zp, axis=1).dtype == torch.int8
    assert F.fake_quantize(meta(2, 5), meta(5), zp, axis=-1).shape == (2, 5)
    assert F.dequantize(meta(2, 5, dtype=torch.uint8), meta(5), zp, axis=1).shape == (2, 5)
    w = ops.pack_int8_weight(meta(1, 3, 18, dtype=torch.int8)).unflatten(-1, (3, 3, 2))
    y = F.int8_conv2d(meta(1, 2, 5, 5, dtype=torch.int8), meta(1), 0, w, meta(3, dtype=torch.int32), meta(3),
                      out_channels=3, kernel_size=3, padding=1)
    assert y.shape == (1, 3, 5, 5)


@pytest.mark.parametrize("shape", [(), (5,), (2, 2, 2, 2), (0, 3)])
def test_meta_pack_rejects_what_the_kernel_rejects(shape):
    """The fake kernel of pack_int8_weight indexed the shape (IndexError for 0-d and 1-d) or built bad strides."""
    with pytest.raises(RuntimeError,
                       match=r"pack_int8_weight: w must be a non-empty \[N, K\], \[G, N, K\] or \[G, N, KH, KW, C\]"):
        ops.pack_int8_weight(meta(*shape, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="pack_int8_weight: w must be int8, got torch.float32"):
        ops.pack_int8_weight(meta(4, 4))


def _raw_meta_conv(x, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    w = meta(1, 3, 3, 3, 2, dtype=torch.int8)
    return ops.int8_conv2d(x, meta(1), 0, w, meta(3, dtype=torch.int32), meta(3), None, 3, list(kernel_size),
                           list(stride), list(padding), list(dilation), 1, torch.float32)


@pytest.mark.parametrize("kwargs,match", [
    ({"stride": (0, 1)}, "stride and dilation must be >= 1"),
    ({"kernel_size": (3,)}, "must have 2 entries each"),
    ({"dilation": (1, 0)}, "stride and dilation must be >= 1"),
    ({"padding": (-1, 0)}, "padding >= 0"),
    ({"kernel_size": (9, 3)}, "larger than the padded input"),  # not an empty output
])
def test_meta_conv_rejects_bad_geometry(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        _raw_meta_conv(meta(1, 2, 5, 5, dtype=torch.int8), **kwargs)


def test_meta_ops_check_ranks_and_dtypes():
    with pytest.raises(RuntimeError, match="int8_conv2d: x_q must be 4-d"):
        _raw_meta_conv(meta(2, 5, 5, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8_conv2d: x_q must be int8 or uint8"):
        _raw_meta_conv(meta(1, 2, 5, 5))
    w_packed = ops.pack_int8_weight(meta(4, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8_linear: x_q must be int8 or uint8, got torch.int32"):
        ops.int8_linear(meta(2, 8, dtype=torch.int32), meta(1), 0, w_packed, meta(4, dtype=torch.int32), meta(4),
                        None, 4, torch.float32)
    with pytest.raises(RuntimeError, match="int8_mm: a must be int8"):
        ops.int8_mm(meta(2, 8, dtype=torch.int32), meta(8, 2, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="quantize_per_token: x must have at least 1 dimension"):
        ops.quantize_per_token(meta(), 8)
    with pytest.raises(RuntimeError, match="quantize: x must be float32 or float16 or bfloat16, got torch.int64"):
        ops.quantize(meta(3, dtype=torch.int64), meta(1), meta(1, dtype=torch.int32), None, 8, True, "nearest")
    with pytest.raises(RuntimeError, match="quantized_add: a must be int8 or uint8"):
        ops.quantized_add(meta(3), meta(1), 0, meta(3), meta(1), 0, torch.float32)
    with pytest.raises(RuntimeError, match="quantized_max_pool2d: x must be int8 or uint8"):
        ops.quantized_max_pool2d(meta(1, 1, 4, 4), [2, 2], [2, 2], [0, 0], [1, 1], False)


# ---------------------------------------------------------------------------------------------------------------
# layers and models
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("kind,sizes", [("Linear", (0, 4)), ("Linear", (4, 0)), ("Conv2d", (2, 0, 3))])
def test_empty_layers_are_rejected_and_the_model_kept(kind, sizes):
    """An empty weight failed deep inside conversion ("cannot reshape tensor of 0 elements", "observer input must
    not be empty"); now prepare names the layer and the problem before it changes anything."""
    import torchquant as tq
    layer = getattr(torch.nn, kind)(*sizes)
    model = torch.nn.Sequential(torch.nn.Identity(), layer)
    with pytest.raises(ValueError, match=r"cannot quantize an empty weight \(shape \[.*0.*\]\)"):
        tq.quantize_model(model, "int8-static", calibration=[torch.randn(2, 2, 5, 5)])
    assert model[1] is layer


def test_static_converted_model_moves_to_meta():
    """Moving a converted int8-static layer to the meta device read its (meta) input scale's values."""
    import torchquant as tq
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    tq.quantize_model(model, "int8-static", calibration=[torch.randn(5, 4)])
    model.to("meta")
    y = model(meta(2, 4))
    assert y.shape == (2, 3) and y.is_meta


def test_float64_layers_are_rejected_by_prepare_and_the_model_kept():
    """A float64 layer is refused when it is built, naming the dtype, before prepare changes the model (not at its
    first forward, with a message about a kernel's input)."""
    import torchquant as tq
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    with pytest.raises(TypeError, match=r"QuantLinear: the weight must be float32, float16 or bfloat16, got "
                                        r"torch.float64 \(convert the model with .float\(\) first\)"):
        tq.quantize_model(model, "int8-dynamic")
    assert type(model[0]) is torch.nn.Linear
    with pytest.raises(TypeError, match="QuantConv2d: the weight must be float32"):
        tq.nn.QuantConv2d(2, 3, 3, dtype=torch.float64)
