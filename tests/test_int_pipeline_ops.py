"""The kernels of an integer pipeline: the fused activation clamp of int8_linear / int8_conv2d, quantized_add,
quantized_mul, quantized_lookup, quantized_max_pool1d, quantized_max_pool2d, quantized_sum, quantized_avg_pool1d / 2d and
quantized_adaptive_avg_pool1d / 2d.

Integers and float outputs are compared bit for bit with torchquant.reference (the same float32 operations in the
same order) and, within the requantization error, with a float64 reference of the unfused ops; every CPU
instruction-set path gives the same bits as the scalar one.
"""
import math

import pytest
import torch

import torchquant.functional as F
from torchquant import reference
from torchquant._ops import FLOAT_DTYPES, ops

from conftest import SUPPORTED_ISAS, assert_same, bit_patterns, cuda_ready, randint8

ALL_OUT_DTYPES = FLOAT_DTYPES + (torch.int8, torch.uint8)
CLAMPS = [(0.0, None), (0.0, 6.0), (None, 0.5), (-1.0, 1.0), (0.25, 0.25)]  # ReLU, ReLU6, ..., a point


def linear_case(m, k, n, seed, device, x_dtype=torch.int8):
    g = torch.Generator().manual_seed(seed)
    x_q = randint8((m, k), generator=g, dtype=x_dtype)
    w = randint8((n, k), generator=g)
    x_scale = torch.rand(m, generator=g) * 0.02 + 0.001
    w_scale = torch.rand(n, generator=g) * 0.02 + 0.001
    bias = torch.randn(n, generator=g)
    packed = F.pack_int8_weight(w.to(device))
    return x_q.to(device), x_scale.to(device), w, packed, w.sum(1, dtype=torch.int32).to(device), w_scale.to(device), \
        bias.to(device)


def out_kwargs(out_dtype, y):
    """Requantization parameters that make some outputs clamp at the type's ends."""
    if out_dtype.is_floating_point:
        return {}
    return dict(out_scale=float(y.abs().max()) / 100, out_zero_point=-3 if out_dtype == torch.int8 else 120)


def float64_linear(x_q, x_scale, x_zp, w, w_scale, bias):
    acc = (x_q.cpu().double() - x_zp) @ w.double().t()
    return acc * x_scale.cpu().double().reshape(-1, 1) * w_scale.cpu().double() + bias.cpu().double()


# ---------------------------------------------------------------------------------------------------------------
# Fused activation clamp: int8_linear
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clamp", CLAMPS, ids=lambda c: f"{c}")
@pytest.mark.parametrize("out_dtype", ALL_OUT_DTYPES, ids=str)
def test_int8_linear_clamp(device, isa, clamp, out_dtype):
    m, k, n = 37, 150, 130  # a partial row chunk and a partial weight panel
    x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(m, k, n, 1, device)
    y = reference.int8_linear(x_q, x_scale, 0, w, w_scale, bias)
    kw = out_kwargs(out_dtype, y)
    got = F.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, bias, out_features=n, out_dtype=out_dtype,
                        clamp_min=clamp[0], clamp_max=clamp[1], **kw)
    want = reference.int8_linear(x_q, x_scale, 0, w, w_scale, bias, out_dtype=out_dtype, clamp_min=clamp[0],
                                 clamp_max=clamp[1], **kw)
    if device == "cpu":
        assert_same(got, want)  # the same float32 operations in the same order
    else:  # a rounding tie of the requantization may move by one where the device's float y differs in its last bit
        assert got.dtype == want.dtype and got.shape == want.shape
        error = (got.cpu().double() - want.cpu().double()).abs().max()
        assert error <= (1 if not out_dtype.is_floating_point else 1e-2)
    # against float64 of the unfused ops: the clamp happens before the conversion
    y64 = float64_linear(x_q, x_scale, 0, w, w_scale, bias)
    lo = -math.inf if clamp[0] is None else clamp[0]
    hi = math.inf if clamp[1] is None else clamp[1]
    y64 = y64.clamp(lo, hi)
    if out_dtype.is_floating_point:
        torch.testing.assert_close(got.cpu().double(), y64, atol=1e-2 * max(1.0, float(y64.abs().max())), rtol=1e-2)
    else:
        info = torch.iinfo(out_dtype)
        q64 = torch.round(y64 / kw["out_scale"]) + kw["out_zero_point"]
        assert (got.cpu().double() - q64.clamp(info.min, info.max)).abs().max() <= 1


def test_int8_linear_relu_matches_unfused(device, isa):
    """ReLU fused into the epilogue equals relu of the unfused float output, and requantizing after it equals
    requantizing the clamped float output (both bit for bit)."""
    x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(20, 64, 70, 2, device, torch.uint8)
    args = (x_q, x_scale, 7, packed, w_sum, w_scale, bias)
    plain = F.int8_linear(*args, out_features=70)
    assert_same(F.int8_linear(*args, out_features=70, clamp_min=0.0), torch.relu(plain))
    assert_same(F.int8_linear(*args, out_features=70, clamp_min=0.0, clamp_max=6.0),
                torch.nn.functional.relu6(plain))
    q = F.int8_linear(*args, out_features=70, out_dtype=torch.uint8, out_scale=0.01, clamp_min=0.0)
    assert_same(q, reference._requantize(torch.relu(plain).cpu(), 0.01, 0, torch.uint8).to(device))


def test_int8_linear_clamp_ties(device, isa):
    """Unit scales, zero bias and out_scale 2: every odd y is a tie of the requantization (round half to even),
    including at the clamp bounds."""
    g = torch.Generator().manual_seed(5)
    x_q, w = randint8((16, 4), generator=g), torch.randint(-2, 3, (64, 4), generator=g, dtype=torch.int8)
    packed, w_sum = F.pack_int8_weight(w.to(device)), w.sum(1, dtype=torch.int32).to(device)
    ones = torch.ones(64, device=device)
    for out_dtype in (torch.int8, torch.uint8):
        zp = 0 if out_dtype == torch.int8 else 100
        got = F.int8_linear(x_q.to(device), 1.0, 0, packed, w_sum, ones, out_features=64, out_dtype=out_dtype,
                            out_scale=2.0, out_zero_point=zp, clamp_min=-51.0, clamp_max=101.0)
        y = (x_q.long() @ w.long().t()).float().clamp(-51, 101)
        assert (y % 2 == 1).any()  # ties present
        info = torch.iinfo(out_dtype)
        assert_same(got, (torch.round(y / 2) + zp).clamp(info.min, info.max).to(out_dtype))


def test_int8_linear_clamp_special_values_all_paths(monkeypatch):
    """NaN and infinite biases through the clamp (NaN stays NaN, then the zero point when requantized; +-inf go to
    the bounds) and -0.0 at a bound of 0, bit for bit the same on every CPU path."""
    x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(13, 40, 80, 3, "cpu")
    bias[0], bias[1], bias[2], bias[3] = float("nan"), float("inf"), -float("inf"), -0.0
    x_q[:, :] = torch.where(torch.arange(40) < 20, 0, x_q)  # some rows near zero
    results = {}
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        for out_dtype in ALL_OUT_DTYPES:
            kw = {} if out_dtype.is_floating_point else dict(out_scale=0.05, out_zero_point=9)
            for clamp in CLAMPS + [(None, None)]:
                out = F.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, bias, out_features=80,
                                    out_dtype=out_dtype, clamp_min=clamp[0], clamp_max=clamp[1], **kw)
                results.setdefault((out_dtype, clamp), []).append((isa, out))
    for (out_dtype, clamp), outs in results.items():
        want = reference.int8_linear(x_q, x_scale, 0, w, w_scale, bias, out_dtype=out_dtype, clamp_min=clamp[0],
                                     clamp_max=clamp[1],
                                     **({} if out_dtype.is_floating_point else dict(out_scale=0.05, out_zero_point=9)))
        for isa, out in outs:
            assert torch.equal(bit_patterns(out), bit_patterns(outs[0][1])), f"{isa} differs: {out_dtype} {clamp}"
            assert_same(out, want)
        if out_dtype.is_floating_point and clamp != (None, None):
            assert torch.isnan(outs[0][1][:, 0]).all()


# The AVX-512 path multiplies a full 64-column weight panel whose k fits one 1024-byte block and stores it in one
# pass (sums in registers, the activation clamp folded into the requantization, a row of int8/uint8 packed into
# one store); other panels go through an int32 tile. Row counts cover every kernel height (1-6, and the 4 + 3 / 4 +
# 4 split of 7 and 8 rows), n a partial panel after full ones, k both sides of the block.
FUSED_SHAPES = [(1, 4, 64), (5, 64, 64), (7, 64, 128), (8, 1024, 150), (13, 1028, 64), (97, 36, 192)]


@pytest.mark.parametrize("m,k,n", FUSED_SHAPES, ids=lambda v: str(v))
def test_int8_linear_fused_panels_all_paths(monkeypatch, m, k, n):
    """Every output kind and clamp, with NaN, infinite and -0.0 biases: the reference's values (NaN as NaN), and the
    same bits on every path."""
    x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(m, k, n, m + k, "cpu", torch.uint8)
    bias[0], bias[1], bias[2], bias[3] = float("nan"), float("inf"), -float("inf"), -0.0
    bias[n - 1] = float("nan")  # in the last panel
    y = reference.int8_linear(x_q, x_scale, 7, w, w_scale, bias[4:].repeat(2)[:n].nan_to_num())
    first = {}
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        for out_dtype in ALL_OUT_DTYPES:
            kw = out_kwargs(out_dtype, y[y.isfinite()])
            for clamp in CLAMPS + [(None, None), (None, -1e30), (1e30, None)]:  # the last two: below / above the range
                for b in (bias, None):
                    got = F.int8_linear(x_q, x_scale, 7, packed, w_sum, w_scale, b, out_features=n,
                                        out_dtype=out_dtype, clamp_min=clamp[0], clamp_max=clamp[1], **kw)
                    want = reference.int8_linear(x_q, x_scale, 7, w, w_scale, b, out_dtype=out_dtype,
                                                 clamp_min=clamp[0], clamp_max=clamp[1], **kw)
                    assert_same(got, want)
                    bits = first.setdefault((out_dtype, clamp, b is None), bit_patterns(got))
                    assert torch.equal(bit_patterns(got), bits), (isa, out_dtype, clamp, b is None)


# uint8 convs with up to 128 output channels read their windows in place, full 64-channel panels summing the kernel
# rows in registers (100 channels: a full panel and a partial one);
# rows of output pixels whose windows reach into the padding come from im2col. Output widths leave every remainder
# of the 6-row kernel. 3-channel 7x7 kernels (a ResNet stem) read their 21-byte kernel rows as 24 against zero
# weights, but from im2col where that would read past the input's end (the last row, without padding).
FUSED_CONVS = [(2, 8, 9, 13, (3, 3), 1, 1), (1, 16, 8, 25, (3, 3), 2, 1), (1, 4, 7, 17, (5, 3), 1, (2, 1)),
               (2, 64, 5, 7, (1, 1), 1, 0), (2, 3, 23, 20, (7, 7), 2, 3), (1, 3, 9, 11, (7, 7), 1, 0)]


@pytest.mark.parametrize("conv", FUSED_CONVS, ids=lambda v: str(v))
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int8], ids=str)
@pytest.mark.parametrize("oc", [64, 100])
def test_int8_conv2d_fused_panels_all_paths(monkeypatch, conv, x_dtype, oc):
    b, c, h, w_, kernel, stride, padding = conv
    g = torch.Generator().manual_seed(c + h)
    x_q = randint8((b, c, h, w_), generator=g, dtype=x_dtype)
    w_q = randint8((oc, c, *kernel), generator=g)
    w_scale = torch.rand(oc, generator=g) * 0.01 + 0.001
    bias = torch.randn(oc, generator=g)
    bias[5] = float("nan")
    packed, w_sum = F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32)
    kwargs = dict(stride=stride, padding=padding)
    y = reference.int8_conv2d(x_q, 0.03, 4, w_q, w_scale, bias.nan_to_num(), **kwargs)
    first = {}
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        for out_dtype in ALL_OUT_DTYPES:
            kw = out_kwargs(out_dtype, y)
            for clamp in ((None, None), (0.0, None), (0.0, 6.0)):
                got = F.int8_conv2d(x_q, 0.03, 4, packed, w_sum, w_scale, bias, out_channels=oc, kernel_size=kernel,
                                    out_dtype=out_dtype, clamp_min=clamp[0], clamp_max=clamp[1], **kwargs, **kw)
                want = reference.int8_conv2d(x_q, 0.03, 4, w_q, w_scale, bias, out_dtype=out_dtype,
                                             clamp_min=clamp[0], clamp_max=clamp[1], **kwargs, **kw)
                assert_same(got, want)
                bits = first.setdefault((out_dtype, clamp), bit_patterns(got))
                assert torch.equal(bit_patterns(got), bits), (isa, out_dtype, clamp)


# ---------------------------------------------------------------------------------------------------------------
# Fused activation clamp: int8_conv2d
# ---------------------------------------------------------------------------------------------------------------

CONVS = [  # batch, in_ch, h, w, out_ch, kernel, stride, padding, groups
    (2, 8, 9, 9, 16, 3, 1, 1, 1),
    (1, 16, 8, 8, 24, 1, 1, 0, 1),  # pointwise
    (1, 8, 10, 9, 12, 3, 2, 1, 4),  # stride, groups
]


@pytest.mark.parametrize("conv", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int8], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_int8_conv2d_clamp(device, isa, conv, out_dtype, channels_last):
    b, c, h, w_, oc, kernel, stride, padding, groups = conv
    g = torch.Generator().manual_seed(oc)
    x_q = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g)
    if channels_last:
        x_q = x_q.contiguous(memory_format=torch.channels_last)
    w_q = randint8((oc, c // groups, kernel, kernel), generator=g)
    w_scale = torch.rand(oc, generator=g) * 0.01 + 0.001
    bias = torch.randn(oc, generator=g)
    kwargs = dict(stride=stride, padding=padding, groups=groups)
    y = reference.int8_conv2d(x_q, 0.03, 100, w_q, w_scale, bias, **kwargs)
    kw = out_kwargs(out_dtype, y)
    for clamp in [(0.0, None), (0.0, 6.0), (-0.5, 0.5)]:
        got = F.int8_conv2d(x_q.to(device), 0.03, 100, F.pack_conv_weight(w_q.to(device), groups),
                            w_q.sum((1, 2, 3), dtype=torch.int32).to(device), w_scale.to(device), bias.to(device),
                            out_channels=oc, kernel_size=kernel, out_dtype=out_dtype, clamp_min=clamp[0],
                            clamp_max=clamp[1], **kw, **kwargs)
        want = reference.int8_conv2d(x_q, 0.03, 100, w_q, w_scale, bias, out_dtype=out_dtype, clamp_min=clamp[0],
                                     clamp_max=clamp[1], **kw, **kwargs)
        assert got.is_contiguous(memory_format=torch.channels_last)
        if device == "cpu":
            assert_same(got, want)
        else:
            assert (got.cpu().double() - want.double()).abs().max() <= (1 if not out_dtype.is_floating_point else 1e-2)


def test_clamp_bad_inputs(device):
    x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(4, 16, 8, 4, device)

    def linear(**kw):
        return F.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, out_features=8, **kw)

    with pytest.raises(ValueError, match="int8_linear: clamp_min must be finite"):
        linear(clamp_min=float("nan"))
    with pytest.raises(ValueError, match="int8_linear: clamp_max must be finite"):
        linear(clamp_max=float("inf"))
    with pytest.raises(TypeError, match="int8_linear: clamp_min must be a number or None"):
        linear(clamp_min="0")
    with pytest.raises(RuntimeError, match=r"int8_linear: clamp_min \(1\) must not exceed clamp_max \(0.5\)"):
        linear(clamp_min=1.0, clamp_max=0.5)
    # the op itself checks, with the same messages (float32: 1e39 is infinite)
    with pytest.raises(RuntimeError, match=r"int8_linear: clamp_max must be finite \(as float32\), got 1e\+39"):
        ops.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, None, 8, torch.float32, None, 0, None, 1e39)
    with pytest.raises(RuntimeError, match=r"int8_linear: clamp_min must be finite \(as float32\), got nan"):
        ops.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, None, 8, torch.float32, None, 0, math.nan, None)
    w_q = randint8((8, 4, 3, 3), device=device)
    conv_args = (randint8((1, 4, 6, 6), device=device), torch.ones(1, device=device), 0, F.pack_conv_weight(w_q),
                 w_q.sum((1, 2, 3), dtype=torch.int32), torch.ones(8, device=device), None, 8, [3, 3], [1, 1], [0, 0],
                 [1, 1], 1, torch.float32, None, 0)
    with pytest.raises(RuntimeError, match=r"int8_conv2d: clamp_min \(6\) must not exceed clamp_max \(0\)"):
        ops.int8_conv2d(*conv_args, 6.0, 0.0)
    with pytest.raises(RuntimeError, match="int8_conv2d: clamp_min must be finite"):
        ops.int8_conv2d(*conv_args, -math.inf, None)


# ---------------------------------------------------------------------------------------------------------------
# quantized_add
# ---------------------------------------------------------------------------------------------------------------

def add_case(shape, a_dtype, b_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = randint8(shape, generator=g, dtype=a_dtype), randint8(shape, generator=g, dtype=b_dtype)
    a_zp = -5 if a_dtype == torch.int8 else 130
    b_zp = 17 if b_dtype == torch.int8 else 3
    return a, b, a_zp, b_zp


def add_out_kwargs(out_dtype):
    if out_dtype.is_floating_point:
        return {}
    return dict(out_scale=0.07, out_zero_point=-10 if out_dtype == torch.int8 else 128)


def assert_near_float64(got, y64, out_dtype, kw):
    """got against y64, the unfused ops in float64: float outputs close, requantized ones (kw: add_out_kwargs')
    within one step of y64 requantized."""
    if out_dtype.is_floating_point:
        torch.testing.assert_close(got.cpu().double(), y64, atol=0.05, rtol=1e-2)
    else:
        info = torch.iinfo(out_dtype)
        q64 = (torch.round(y64 / kw["out_scale"]) + kw["out_zero_point"]).clamp(info.min, info.max)
        assert (got.cpu().double() - q64).abs().max() <= 1


@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.int8, torch.int8), (torch.uint8, torch.uint8),
                                             (torch.int8, torch.uint8), (torch.uint8, torch.int8)], ids=str)
@pytest.mark.parametrize("out_dtype", ALL_OUT_DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_quantized_add(device, isa, a_dtype, b_dtype, out_dtype, relu):
    # odd sizes: vector bodies and scalar tails; 70001 elements: more than one parallel task
    for shape in [(1,), (15,), (3, 17), (2, 8, 5, 7), (70001,)]:
        a, b, a_zp, b_zp = add_case(shape, a_dtype, b_dtype, len(shape))
        kw = add_out_kwargs(out_dtype)
        got = F.quantized_add(a.to(device), 0.05, a_zp, b.to(device), torch.tensor([0.031], device=device), b_zp,
                              out_dtype, relu=relu, **kw)
        want = reference.quantized_add(a, 0.05, a_zp, b, 0.031, b_zp, out_dtype=out_dtype, relu=relu, **kw)
        assert_same(got, want)
        # float64 of the unfused ops: dequantize, add, relu, quantize
        y64 = (a.double() - a_zp) * 0.05 + (b.double() - b_zp) * torch.tensor(0.031).double()
        if relu:
            y64 = y64.clamp(min=0)
        assert_near_float64(got, y64, out_dtype, kw)


def test_quantized_add_ties_and_extremes(device, isa):
    """Scales 0.5 and 0.25 with out_scale 1: y is a multiple of 0.25, so .5 ties occur (round half to even);
    the ends of both ranges and zero points, and scales so large that y overflows to +-inf (or NaN: inf - inf)."""
    vals = torch.tensor([-128, -127, -1, 0, 1, 126, 127], dtype=torch.int8)
    a = vals.repeat_interleave(7)
    b = vals.repeat(7)
    for out_dtype in ALL_OUT_DTYPES:
        kw = {} if out_dtype.is_floating_point else dict(out_scale=1.0, out_zero_point=0)
        for a_scale, b_scale, zps in [(0.5, 0.25, (0, 0)), (0.5, 0.25, (-128, 127)), (3e38, 3e38, (0, 0)),
                                      (3e38, 1.0, (-128, -128))]:
            for relu in (False, True):
                got = F.quantized_add(a.to(device), a_scale, zps[0], b.to(device), b_scale, zps[1], out_dtype,
                                      relu=relu, **kw)
                want = reference.quantized_add(a, a_scale, zps[0], b, b_scale, zps[1], out_dtype=out_dtype,
                                               relu=relu, **kw)
                assert_same(got, want)
    y = (a.float() * 0.5 + b.float() * 0.25)
    assert ((y - y.floor()) == 0.5).any()


def test_quantized_add_paths_bit_identical(monkeypatch):
    a, b, a_zp, b_zp = add_case((5, 1031), torch.uint8, torch.int8, 9)
    for out_dtype in ALL_OUT_DTYPES:
        kw = add_out_kwargs(out_dtype)
        outs = []
        for isa in SUPPORTED_ISAS:
            monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
            for a_scale in (0.013, 3e38):
                outs.append(F.quantized_add(a, a_scale, a_zp, b, 0.02, b_zp, out_dtype, relu=True, **kw))
        per_isa = len(outs) // len(SUPPORTED_ISAS)
        for i, out in enumerate(outs):
            assert torch.equal(bit_patterns(out), bit_patterns(outs[i % per_isa])), out_dtype


def test_quantized_add_layouts(device):
    """Output in a's memory format (channels-last in, channels-last out); any strides in; b in another layout."""
    a, b, a_zp, b_zp = add_case((2, 6, 5, 4), torch.uint8, torch.uint8, 11)
    a_cl = a.contiguous(memory_format=torch.channels_last).to(device)
    for b_in in (b, b.contiguous(memory_format=torch.channels_last), b.transpose(2, 3).contiguous().transpose(2, 3)):
        got = F.quantized_add(a_cl, 0.1, a_zp, b_in.to(device), 0.2, b_zp, torch.uint8, 0.3, 5, True)
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        assert_same(got, reference.quantized_add(a, 0.1, a_zp, b, 0.2, b_zp, out_dtype=torch.uint8, out_scale=0.3,
                                                 out_zero_point=5, relu=True))
    # non-contiguous, non-dense inputs: a slice with steps
    big_a, big_b, _, _ = add_case((4, 9, 10), torch.int8, torch.int8, 12)
    sa, sb = big_a[::2, 1::2, ::3].to(device), big_b[1::2, :8:2, ::3].to(device)
    got = F.quantized_add(sa, 0.1, 3, sb, 0.2, -3, torch.float32)
    assert_same(got, reference.quantized_add(sa, 0.1, 3, sb, 0.2, -3))
    # a 0-d pair and empty tensors
    assert_same(F.quantized_add(a[0, 0, 0, 0].to(device), 0.1, 0, b[0, 0, 0, 0].to(device), 0.1, 0),
                reference.quantized_add(a[0, 0, 0, 0], 0.1, 0, b[0, 0, 0, 0], 0.1, 0))
    empty = F.quantized_add(a[:0].to(device), 0.1, 0, b[:0].to(device), 0.1, 0, torch.int8, 0.5)
    assert empty.shape == (0, 6, 5, 4) and empty.dtype == torch.int8


# The bad-input rules of quantized_add and quantized_mul, each op's name in its messages: the functional wrapper's
# and the op's own (C++); then their shape rules, where they differ (add: one shape; mul: torch's broadcasting)
@pytest.mark.parametrize("name", ["quantized_add", "quantized_mul"])
def test_quantized_binary_bad_inputs(device, name):
    a, b = randint8((3, 4), device=device), randint8((3, 4), device=device)
    functional, op = getattr(F, name), getattr(ops, name)

    def call(a=a, a_scale=0.1, a_zp=0, b=b, b_scale=0.1, b_zp=0, out_dtype=torch.float32, **kw):
        return functional(a, a_scale, a_zp, b, b_scale, b_zp, out_dtype, **kw)

    with pytest.raises(TypeError, match="a must be int8 or uint8, got float32"):
        call(a=a.float())
    with pytest.raises(TypeError, match="b must be int8 or uint8, got int32"):
        call(b=b.int())
    with pytest.raises(ValueError, match=f"{name}: a_scale must be positive and finite"):
        call(a_scale=0.0)
    with pytest.raises(ValueError, match=f"{name}: b_scale must be positive and finite"):
        call(b_scale=float("nan"))
    # Python numbers are checked as the float32 the kernels read (CUDA's kernels check no scale values)
    with pytest.raises(ValueError, match=rf"{name}: a_scale must be positive and finite \(as a float32\), got 1e-46"):
        call(a_scale=1e-46)
    with pytest.raises(ValueError, match=rf"{name}: b_scale must be positive and finite \(as a float32\), got 1e\+39"):
        call(b_scale=1e39)
    with pytest.raises(TypeError, match=f"{name}: out_dtype must be float32, float16, bfloat16, int8 or uint8"):
        call(out_dtype=torch.int32)
    s = torch.tensor([0.1], device=device)
    with pytest.raises(RuntimeError, match=rf"{name}: a_zero_point must lie in \[-128, 127\] for Char a"):
        op(a, s, 128, b, s, 0, torch.float32)
    with pytest.raises(RuntimeError, match=rf"{name}: b_zero_point must lie in \[0, 255\] for Byte b, got -1"):
        op(a, s, 0, b.to(torch.uint8), s, -1, torch.float32)
    with pytest.raises(RuntimeError, match=rf"{name}: b_zero_point must lie in \[-128, 127\] for Char b"):
        op(a, s, 0, b, s, 200, torch.float32)
    with pytest.raises(RuntimeError, match=f"{name}: b_scale must be a float32 tensor of 1 element"):
        op(a, s, 0, b, s.repeat(2), 0, torch.float32)
    with pytest.raises(RuntimeError, match=f"{name}: a_scale must be a float32 tensor of 1 element"):
        op(a, s.double(), 0, b, s, 0, torch.float32)
    for out_dtype, c10_name in ((torch.int8, "Char"), (torch.uint8, "Byte")):
        with pytest.raises(RuntimeError, match=rf"{name}: out_dtype {c10_name} \(requantized output\) needs out_scale"):
            op(a, s, 0, b, s, 0, out_dtype)
    with pytest.raises(RuntimeError, match=f"{name}: out_scale is only for int8/uint8 out_dtype"):
        op(a, s, 0, b, s, 0, torch.float32, 0.5)
    with pytest.raises(RuntimeError, match=f"{name}: out_zero_point must lie in"):
        op(a, s, 0, b, s, 0, torch.uint8, 0.5, 256)
    with pytest.raises(RuntimeError, match=f"{name}: out_zero_point must lie in"):
        op(a, s, 0, b, s, 0, torch.int8, 0.5, 128)
    with pytest.raises(RuntimeError, match=f"{name}: out_dtype must be float32, float16 or bfloat16"):
        op(a, s, 0, b, s, 0, torch.float64)
    if device == "cpu":  # (scale values are checked by each kernel)
        with pytest.raises(RuntimeError, match=f"{name}: a_scale must be positive and finite, got inf"):
            op(a, torch.tensor([math.inf]), 0, b, s, 0, torch.float32)
        with pytest.raises(RuntimeError, match=f"{name}: b_scale must be positive and finite, got nan"):
            op(a, s, 0, b, torch.tensor([math.nan]), 0, torch.float32)
    if cuda_ready() and device == "cpu":
        with pytest.raises(RuntimeError, match=f"{name}: b must be on a's device"):
            op(a, s, 0, b.cuda(), s, 0, torch.float32)
    if name == "quantized_add":
        with pytest.raises(ValueError, match=r"quantized_add: a and b must have the same shape \(no broadcasting\), "
                                             r"got \(3, 4\) and \(1, 4\)"):
            call(b=b[:1])
        with pytest.raises(RuntimeError, match=r"quantized_add: a and b must have the same shape \(no "
                                               r"broadcasting\), got \[3, 4\] and \[4\]"):
            op(a, s, 0, b[0], s, 0, torch.float32)
    else:
        with pytest.raises(ValueError, match=r"quantized_mul: a and b must broadcast to one shape, got \(3, 4\) "
                                             r"and \(2, 4\)"):
            call(b=b[:2])
        with pytest.raises(RuntimeError, match=r"quantized_mul: a and b must broadcast to one shape, got \[3, 4\] "
                                               r"and \[3\]"):
            op(a, s, 0, b[:, 0], s, 0, torch.float32)


def test_quantized_add_different_devices():
    if not cuda_ready():
        pytest.skip("needs a CUDA device")
    a = randint8((3, 4))
    with pytest.raises(ValueError, match="b is on cuda"):
        F.quantized_add(a, 0.1, 0, a.cuda(), 0.1, 0)
    with pytest.raises(RuntimeError, match="quantized_add: b must be on a's device"):
        ops.quantized_add(a, torch.ones(1), 0, a.cuda(), torch.ones(1), 0, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# quantized_mul
# ---------------------------------------------------------------------------------------------------------------

# (a's shape, b's shape): one shape, a squeeze-excitation gate [N, C, 1, 1] either side, vectors against rows, both
# broadcast, 0-d, and more than one parallel task
MUL_SHAPES = [((1,), (1,)), ((15,), (15,)), ((3, 17), (17,)), ((2, 8, 5, 7), (2, 8, 1, 1)), ((2, 8, 1, 1), (2, 8, 5, 7)),
              ((4, 1, 5), (3, 1)), ((), (6,)), ((70001,), (1,)), ((3, 40, 30, 20), (3, 40, 1, 1))]


def mul_float64(a, a_scale, a_zp, b, b_scale, b_zp):
    return ((a.double() - a_zp) * a_scale) * ((b.double() - b_zp) * b_scale)


@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.int8, torch.int8), (torch.uint8, torch.uint8),
                                             (torch.int8, torch.uint8), (torch.uint8, torch.int8)], ids=str)
@pytest.mark.parametrize("out_dtype", ALL_OUT_DTYPES, ids=str)
def test_quantized_mul(device, isa, a_dtype, b_dtype, out_dtype):
    for i, (a_shape, b_shape) in enumerate(MUL_SHAPES):
        g = torch.Generator().manual_seed(i)
        a, b = randint8(a_shape, generator=g, dtype=a_dtype), randint8(b_shape, generator=g, dtype=b_dtype)
        a_zp, b_zp = (-5 if a_dtype == torch.int8 else 130), (17 if b_dtype == torch.int8 else 3)
        kw = add_out_kwargs(out_dtype)
        got = F.quantized_mul(a.to(device), 0.05, a_zp, b.to(device), torch.tensor([0.031], device=device), b_zp,
                              out_dtype, **kw)
        want = reference.quantized_mul(a, 0.05, a_zp, b, 0.031, b_zp, out_dtype=out_dtype, **kw)
        assert got.shape == torch.broadcast_shapes(a_shape, b_shape) and got.dtype == out_dtype
        assert_same(got, want)
        y64 = mul_float64(a, 0.05, a_zp, b, torch.tensor(0.031).double(), b_zp)  # the unfused ops in float64
        assert_near_float64(got, y64, out_dtype, kw)


def test_quantized_mul_ties_and_extremes(device, isa):
    """Scales 0.5 and 0.25 with out_scale 1: y = a * b / 8, so .5 ties occur (round half to even); the ends of both
    ranges and zero points, and scales so large that y overflows to +-inf (and inf * 0 gives NaN: the zero point)."""
    vals = torch.tensor([-128, -127, -4, -1, 0, 1, 4, 126, 127], dtype=torch.int8)
    a, b = vals.repeat_interleave(9), vals.repeat(9)
    for out_dtype in ALL_OUT_DTYPES:
        kw = {} if out_dtype.is_floating_point else dict(out_scale=1.0, out_zero_point=3)
        for a_scale, b_scale, zps in [(0.5, 0.25, (0, 0)), (0.5, 0.25, (-128, 127)), (3e38, 3e38, (0, 0)),
                                      (3e38, 3e38, (1, -128))]:
            got = F.quantized_mul(a.to(device), a_scale, zps[0], b.to(device), b_scale, zps[1], out_dtype, **kw)
            want = reference.quantized_mul(a, a_scale, zps[0], b, b_scale, zps[1], out_dtype=out_dtype, **kw)
            assert_same(got, want)
    y = a.float() * b.float() / 8
    assert ((y - y.floor()) == 0.5).any()
    nan = F.quantized_mul(a.to(device), 3e38, 0, b.to(device), 3e38, 0, torch.float32)
    assert nan.isnan().any() and nan.isinf().any()


def test_quantized_mul_paths_bit_identical(monkeypatch):
    g = torch.Generator().manual_seed(9)
    a, b = randint8((5, 1031), generator=g, dtype=torch.uint8), randint8((5, 1), generator=g)
    for out_dtype in ALL_OUT_DTYPES:
        kw = add_out_kwargs(out_dtype)
        outs = []
        for isa in SUPPORTED_ISAS:
            monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
            for a_scale in (0.013, 3e38):
                outs.append(F.quantized_mul(a, a_scale, 7, b, 0.02, -3, out_dtype, **kw))
        per_isa = len(outs) // len(SUPPORTED_ISAS)
        for i, out in enumerate(outs):
            assert torch.equal(bit_patterns(out), bit_patterns(outs[i % per_isa])), out_dtype


def test_quantized_mul_layouts(device):
    """A channels-last a times its gate [N, C, 1, 1] writes channels-last, and so does the gate times a (the operand
    of the output's shape gives the layout); any strides in, the gate in other layouts."""
    g = torch.Generator().manual_seed(11)
    a, gate = randint8((2, 6, 5, 4), generator=g, dtype=torch.uint8), randint8((2, 6, 1, 1), generator=g)
    a_cl = a.contiguous(memory_format=torch.channels_last).to(device)
    want = reference.quantized_mul(a, 0.1, 7, gate, 0.2, -1, out_dtype=torch.uint8, out_scale=0.3, out_zero_point=5)
    for b_in in (gate, gate.contiguous(memory_format=torch.channels_last), gate.expand(2, 6, 5, 4)):
        got = F.quantized_mul(a_cl, 0.1, 7, b_in.to(device), 0.2, -1, torch.uint8, 0.3, 5)
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        assert_same(got, want)
    spread = torch.zeros(2, 12, 1, 1, dtype=gate.dtype)
    spread[:, ::2] = gate
    for gate_in in (gate, gate.contiguous(memory_format=torch.channels_last), spread[:, ::2]):
        got = F.quantized_mul(gate_in.to(device), 0.2, -1, a_cl, 0.1, 7, torch.uint8, 0.3, 5)
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        assert_same(got, want)
    # a gate over contiguous x: one value a row of H * W elements; a [C, 1] gate of an unbatched x; rows longer than
    # the kernel's repeat buffer
    for x_shape, g_shape in (((2, 6, 5, 4), (2, 6, 1, 1)), ((6, 5, 4), (6, 1, 1)), ((1, 3, 40, 40), (1, 3, 1, 1)),
                             ((2, 3, 4), (1, 3, 1))):
        x, gg = randint8(x_shape, generator=g, dtype=torch.uint8), randint8(g_shape, generator=g)
        for first in (x, gg):
            second = gg if first is x else x
            got = F.quantized_mul(first.to(device), 0.1, 3, second.to(device), 0.2, 0, torch.int8, 0.07, -4)
            assert got.is_contiguous()
            assert_same(got, reference.quantized_mul(first, 0.1, 3, second, 0.2, 0, out_dtype=torch.int8,
                                                     out_scale=0.07, out_zero_point=-4))
    big_a, big_b = randint8((4, 9, 10), generator=g), randint8((4, 9, 10), generator=g)
    sa, sb = big_a[::2, 1::2, ::3].to(device), big_b[1::2, :8:2, :1].to(device)
    assert_same(F.quantized_mul(sa, 0.1, 3, sb, 0.2, -3, torch.float32), reference.quantized_mul(sa, 0.1, 3, sb, 0.2, -3))
    empty = F.quantized_mul(a[:0].to(device), 0.1, 0, gate[:1].to(device), 0.1, 0, torch.int8, 0.5)
    assert empty.shape == (0, 6, 5, 4) and empty.dtype == torch.int8


def test_quantized_mul_compiles(device):
    """Under torch.compile (fullgraph, dynamic shapes): the same bits as eager."""
    g = torch.Generator().manual_seed(5)
    fn = torch.compile(lambda a, b: F.quantized_mul(a, 0.1, 4, b, 0.02, 0, torch.uint8, 0.05, 2), fullgraph=True,
                       dynamic=True)
    for n, hw in ((2, 5), (3, 7)):
        a = randint8((n, 8, hw, hw), generator=g, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        b = randint8((n, 8, 1, 1), generator=g)
        assert_same(fn(a.to(device), b.to(device)), F.quantized_mul(a, 0.1, 4, b, 0.02, 0, torch.uint8, 0.05, 2))


def laid_out(shape, dtype, layout):
    """Random integers of shape: contiguous, every other image of a batch twice as large ("strided"), or
    channels-last."""
    x = randint8((shape[0] * 2, *shape[1:]), seed=sum(shape), dtype=dtype)
    x = x[::2] if layout == "strided" else x[: shape[0]]
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


# ---------------------------------------------------------------------------------------------------------------
# quantized_max_pool2d
# ---------------------------------------------------------------------------------------------------------------

POOLS = [  # shape, kernel, stride, padding, dilation, ceil_mode
    ((2, 3, 9, 9), 3, 2, 1, 1, False),
    ((2, 3, 9, 10), 3, 2, 1, 1, True),     # ceil mode: a last window that starts inside
    ((1, 5, 12, 11), (3, 2), (2, 1), (1, 0), (2, 1), False),  # dilation, non-square
    ((2, 32, 14, 14), 3, 2, 1, 1, False),  # channels-last: 16 channels per thread
    ((1, 16, 8, 8), 2, None, 0, 1, True),
    ((4, 7, 7), 3, 1, 1, 1, False),        # unbatched
    ((1, 16, 2, 5), 3, 2, 1, 1, True),     # ceil mode: a window past the padded input (as torch allows)
    ((0, 3, 5, 5), 2, 2, 0, 1, False),     # empty batch
    ((2, 16, 1, 2), 3, (3, 2), (1, 0), (2, 1), True),  # a window with no tap inside: the type's lowest value
    ((1, 37, 9, 8), 3, 2, 1, 1, False),    # channels in whole vectors of 16 and a tail
    ((2, 64, 12, 11), 3, 2, 1, 1, False),  # whole 64-byte vectors (a ResNet stem's pool)
    ((1, 101, 5, 6), 2, 1, 0, 1, False),   # 64 + 32 + 5 channels: each vector width and a tail
]


@pytest.mark.parametrize("pool", POOLS, ids=[f"pool{i}" for i in range(len(POOLS))])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_quantized_max_pool2d(device, isa, pool, dtype, layout):
    shape, kernel, stride, padding, dilation, ceil_mode = pool
    if layout != "contiguous" and len(shape) == 3:
        pytest.skip("layouts of 4-d inputs")
    x = laid_out(shape, dtype, layout)
    got = F.quantized_max_pool2d(x.to(device), kernel, stride, padding, dilation, ceil_mode)
    # torch's channels-last CPU kernel fails on integers once H * W > 127: the reference pools a contiguous copy
    want = torch.nn.functional.max_pool2d(x.contiguous(), kernel, stride, padding, dilation, ceil_mode)
    assert_same(got, want)
    if got.numel():
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                 torch.contiguous_format)
    # the maximum commutes with dequantization: the float pool of the float values gives the same numbers (where a
    # window has no tap inside the input, -inf for floats and the lowest value for integers)
    float_pool = torch.nn.functional.max_pool2d(x.float(), kernel, stride, padding, dilation, ceil_mode)
    assert_same(got.float(), float_pool.clamp(min=torch.iinfo(dtype).min))


def test_quantized_max_pool2d_bad_inputs(device):
    x = randint8((1, 2, 6, 6), device=device)
    with pytest.raises(TypeError, match="x must be int8 or uint8, got float32"):
        F.quantized_max_pool2d(x.float(), 2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        F.quantized_max_pool2d(x, (2, 2, 2))
    with pytest.raises(RuntimeError, match="quantized_max_pool2d: padding must be >= 0 and at most half the kernel"):
        F.quantized_max_pool2d(x, 3, 1, 2)
    with pytest.raises(RuntimeError, match="quantized_max_pool2d: stride must be >= 1"):
        F.quantized_max_pool2d(x, 3, 0)
    with pytest.raises(RuntimeError, match="quantized_max_pool2d: the output would be empty: the \\(dilated\\) "
                                           "kernel \\[7, 7\\]"):
        F.quantized_max_pool2d(x, 7)
    with pytest.raises(RuntimeError, match="quantized_max_pool2d: x must have non-empty channel and spatial"):
        F.quantized_max_pool2d(x[:, :0], 2)
    with pytest.raises(RuntimeError, match="quantized_max_pool2d: x must be 3-d"):
        F.quantized_max_pool2d(x[0, 0], 2)


POOLS_1D = [  # shape, kernel, stride, padding, dilation, ceil_mode
    ((2, 3, 20), 3, 2, 1, 1, False),
    ((3, 16, 10), 3, 2, 1, 1, True),       # ceil mode: a last window that starts inside
    ((1, 40, 33), (4,), (3,), (2,), (2,), False),  # 1-tuples, dilation, 40 channels: vectors and a tail
    ((5, 9), 2, None, 0, 1, False),        # unbatched
    ((2, 16, 5), 3, 2, 1, 1, True),        # ceil mode at the end of a short input
    ((0, 3, 5), 2, 2, 0, 1, False),        # empty batch
]


@pytest.mark.parametrize("pool", POOLS_1D, ids=[f"pool{i}" for i in range(len(POOLS_1D))])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "channels_last"])
def test_quantized_max_pool1d(device, isa, pool, dtype, layout):
    shape, kernel, stride, padding, dilation, ceil_mode = pool
    x = randint8((*shape[:-1], shape[-1] * 2), seed=sum(shape), dtype=dtype)
    x = x[..., ::2] if layout == "strided" else x[..., : shape[-1]]
    if layout == "channels_last":  # as an integer pipeline's Conv1d writes it: [B, C, L] with the channels innermost
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = F.quantized_max_pool1d(x.to(device), kernel, stride, padding, dilation, ceil_mode)
    # the float pool of the float values (where a window has no tap inside the input: the type's lowest value)
    want = torch.nn.functional.max_pool1d(x.float(), kernel, stride, padding, dilation, ceil_mode)
    assert_same(got.cpu().float(), want.clamp(min=torch.iinfo(dtype).min))
    assert got.dtype == dtype and got.device.type == device


def test_quantized_max_pool1d_compiles_and_bad_inputs(device):
    x = randint8((2, 3, 12), device=device)
    compiled = torch.compile(F.quantized_max_pool1d, fullgraph=True, dynamic=False)
    assert_same(compiled(x, 3, 2, 1), F.quantized_max_pool1d(x, 3, 2, 1))
    with pytest.raises(TypeError, match="x must be int8 or uint8, got float32"):
        F.quantized_max_pool1d(x.float(), 2)
    with pytest.raises(ValueError, match="quantized_max_pool1d: x must be 2-d \\[C, L\\] or 3-d \\[B, C, L\\], "
                                         "got 4-d"):
        F.quantized_max_pool1d(x[None], 2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a 1-tuple"):
        F.quantized_max_pool1d(x, (2, 2))
    # the rules and messages of torch's max_pool1d, not the 2-d sizes the kernel is called with
    with pytest.raises(RuntimeError, match="max_pool1d\\(\\) padding should be at most half of kernel size, but got "
                                           "padding=2 and kernel_size=3"):
        F.quantized_max_pool1d(x, 3, 1, 2)
    with pytest.raises(RuntimeError, match="max_pool1d\\(\\) stride must be greater than zero"):
        F.quantized_max_pool1d(x, 3, 0)
    with pytest.raises(RuntimeError, match="max_pool1d\\(\\) Invalid computed output size: 0"):
        F.quantized_max_pool1d(x, 13)
    with pytest.raises(RuntimeError, match="max_pool1d: Expected 2D or 3D \\(batch mode\\) tensor with optional 0 dim "
                                           "batch size"):
        F.quantized_max_pool1d(x[:, :0], 2)


# ---------------------------------------------------------------------------------------------------------------
# quantized_lookup
# ---------------------------------------------------------------------------------------------------------------

def lookup_table(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return randint8((256,), generator=g, dtype=dtype)


LOOKUP_SHAPES = [(0,), (1,), (63,), (64,), (65,), (3, 129), (2, 7, 9, 11), (1000003,), ()]


@pytest.mark.parametrize("shape", LOOKUP_SHAPES, ids=str)
@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("table_dtype", [torch.int8, torch.uint8], ids=str)
def test_quantized_lookup(device, isa, shape, x_dtype, table_dtype):
    x = randint8(shape, seed=len(shape) + sum(shape), dtype=x_dtype)
    table = lookup_table(table_dtype, 3)
    got = F.quantized_lookup(x.to(device), table.to(device))
    assert_same(got, reference.quantized_lookup(x, table))
    assert got.dtype == table_dtype and got.shape == x.shape


def test_quantized_lookup_index_order(device):
    """Every byte value, each at a position of every 64-byte vector lane: an int8 x indexes by its two's-complement
    byte (-128 -> 128, -1 -> 255), a uint8 x by its value."""
    table = torch.arange(256, dtype=torch.uint8, device=device)
    codes = torch.arange(256 * 65, dtype=torch.int64) % 256
    got_u8 = F.quantized_lookup(codes.to(torch.uint8).to(device), table)
    assert_same(got_u8, codes.to(torch.uint8))
    signed = codes.to(torch.uint8).view(torch.int8)
    got_s8 = F.quantized_lookup(signed.to(device), table)
    assert_same(got_s8, codes.to(torch.uint8))
    assert F.quantized_lookup(torch.tensor([-128, -1, 0, 127], dtype=torch.int8, device=device), table).tolist() == \
        [128, 255, 0, 127]


@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed", "offset"])
def test_quantized_lookup_layouts(device, isa, layout):
    x = randint8((4, 20, 9, 7), seed=11, dtype=torch.int8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[::2, 1::3, :, ::2]
    elif layout == "transposed":
        x = x.transpose(1, 3)
    else:  # a view whose data does not start on a vector boundary
        x = x.flatten()[5:]
    table = lookup_table(torch.uint8, 4)
    got = F.quantized_lookup(x.to(device), table.to(device))
    assert_same(got, reference.quantized_lookup(x, table))
    if layout in ("channels_last", "transposed"):  # dense inputs keep their memory format
        assert got.stride() == x.stride()
    # a table that is itself a view (a strided slice)
    wide = torch.stack([table, table.flip(0)], 1)
    assert_same(F.quantized_lookup(x.to(device), wide[:, 1].to(device)), reference.quantized_lookup(x, table.flip(0)))


def test_quantized_lookup_paths_bit_identical(monkeypatch):
    x = randint8((3, 1001), seed=21)
    table = lookup_table(torch.int8, 22)
    outs = []
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        outs.append(F.quantized_lookup(x, table))
        outs.append(F.quantized_lookup(x[:, 1:], table))  # an unaligned start and a tail in every vector path
    for i, out in enumerate(outs):
        assert torch.equal(out, outs[i % 2]), SUPPORTED_ISAS[i // 2]


def test_quantized_lookup_bad_inputs(device):
    x = randint8((3, 4), device=device)
    table = lookup_table(torch.uint8, 5).to(device)
    with pytest.raises(TypeError, match="x must be int8 or uint8, got float32"):
        F.quantized_lookup(x.float(), table)
    with pytest.raises(TypeError, match="table must be int8 or uint8, got int32"):
        F.quantized_lookup(x, table.int())
    with pytest.raises(ValueError, match=r"quantized_lookup: table must be 1-d with 256 entries, got shape \(255,\)"):
        F.quantized_lookup(x, table[:255])
    with pytest.raises(ValueError, match=r"quantized_lookup: table must be 1-d with 256 entries, got shape "
                                         r"\(2, 128\)"):
        F.quantized_lookup(x, table.reshape(2, 128))
    with pytest.raises(TypeError, match="table must be a torch.Tensor, got list"):
        F.quantized_lookup(x, list(range(256)))
    # the op's own checks (same messages from C++)
    with pytest.raises(RuntimeError, match="quantized_lookup: x must be int8 or uint8, got Short"):
        ops.quantized_lookup(x.short(), table)
    with pytest.raises(RuntimeError, match="quantized_lookup: table must be int8 or uint8, got Float"):
        ops.quantized_lookup(x, table.float())
    with pytest.raises(RuntimeError, match=r"quantized_lookup: table must be 1-d with 256 entries, got shape \[257\]"):
        ops.quantized_lookup(x, torch.zeros(257, dtype=torch.uint8, device=device))
    with pytest.raises(RuntimeError, match=r"quantized_lookup: table must be 1-d with 256 entries, got shape "
                                           r"\[16, 16\]"):
        ops.quantized_lookup(x, table.reshape(16, 16))


@pytest.mark.cuda
def test_quantized_lookup_different_devices():
    if not cuda_ready():
        pytest.skip("needs a CUDA device")
    x = randint8((3, 4))
    table = lookup_table(torch.uint8, 6)
    with pytest.raises(ValueError, match="table is on cuda"):
        F.quantized_lookup(x, table.cuda())
    with pytest.raises(RuntimeError, match="quantized_lookup: table must be on x's device"):
        ops.quantized_lookup(x.cuda(), table)


# ---------------------------------------------------------------------------------------------------------------
# quantized_sum
# ---------------------------------------------------------------------------------------------------------------

SUMS = [  # shape, dim
    ((2, 64, 7, 7), (2, 3)),      # one whole 64-channel block
    ((3, 130, 5, 3), (-2, -1)),   # two blocks and a masked tail of 2
    ((1, 37, 9, 11), (3, 2)),     # one masked block, dims in the other order
    ((2, 1, 4, 4), (2, 3)),       # one channel
    ((2, 200, 1, 1), (2, 3)),     # one pixel
    ((0, 16, 3, 3), (2, 3)),      # empty batch
    ((2, 16, 0, 3), (2, 3)),      # no pixels: zeros
    ((4, 5, 6), (-1,)),           # other dims and ranks: torch's sum
    ((3, 8, 4, 4), (1,)),
]


@pytest.mark.parametrize("case", SUMS, ids=[f"sum{i}" for i in range(len(SUMS))])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("keepdim", [False, True])
def test_quantized_sum(device, isa, case, dtype, layout, keepdim):
    shape, dim = case
    if layout != "contiguous" and len(shape) != 4:
        pytest.skip("layouts of 4-d inputs")
    x = laid_out(shape, dtype, layout)
    assert_same(F.quantized_sum(x.to(device), dim, keepdim), x.sum(dim, keepdim=keepdim, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
def test_quantized_sum_at_the_ends_of_the_range(device, isa, dtype):
    # every byte at the type's lowest or highest value over many pixels: the int32 sums do not wrap, and int8 bytes
    # widen with their sign
    for value in (torch.iinfo(dtype).min, torch.iinfo(dtype).max):
        x = torch.full((2, 70, 64, 50), value, dtype=dtype).contiguous(memory_format=torch.channels_last)
        got = F.quantized_sum(x.to(device), (2, 3))
        assert_same(got, torch.full((2, 70), value * 64 * 50, dtype=torch.int32))


def test_quantized_sum_bad_inputs(device):
    x = randint8((1, 2, 6, 6), device=device)
    with pytest.raises(TypeError, match="x must be int8 or uint8, got float32"):
        F.quantized_sum(x.float(), (2, 3))
    with pytest.raises(TypeError, match="quantized_sum: dim must be an int or a non-empty sequence of ints, got 2.0"):
        F.quantized_sum(x, 2.0)
    with pytest.raises(TypeError, match="quantized_sum: dim must be an int or a non-empty sequence of ints, got \\(\\)"):
        F.quantized_sum(x, ())
    with pytest.raises(RuntimeError, match="quantized_sum: x must be int8 or uint8, got Float"):
        ops.quantized_sum(x.float(), [2, 3])
    with pytest.raises(IndexError, match="Dimension out of range"):
        F.quantized_sum(x.contiguous(memory_format=torch.channels_last), (2, 4))


# ---------------------------------------------------------------------------------------------------------------
# quantized_avg_pool2d / 1d
# ---------------------------------------------------------------------------------------------------------------

AVG_POOLS = [  # shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
    ((2, 64, 8, 8), 2, None, 0, False, True, None),       # a DenseNet transition: one whole 64-channel block
    ((2, 37, 9, 7), 3, 1, 1, False, True, None),          # an Inception branch: a masked block, padding counted
    ((1, 130, 6, 5), 3, 1, 1, False, False, None),        # two blocks and a tail, padding not counted
    ((2, 16, 9, 9), 2, 2, 0, True, False, None),          # a ResNet-D shortcut: ceil-mode windows overhang
    ((1, 8, 4, 6), 3, 2, 1, True, True, None),            # ceil mode past the padded input, padding counted
    ((1, 8, 5, 5), 2, 2, 1, True, True, None),            # ceil mode: a last window that would start past: dropped
    ((2, 5, 7, 6), (3, 2), (2, 1), (1, 0), True, False, None),  # non-square
    ((1, 20, 6, 6), 2, 1, 1, False, True, 3),             # divisor_override
    ((2, 3, 7, 7), 3, 2, 1, True, False, -5),             # a negative divisor
    ((4, 7, 7), 3, 1, 1, False, True, None),              # unbatched
    ((0, 3, 5, 5), 2, 2, 0, False, True, None),           # empty batch
    ((1, 2, 1, 1), 1, 1, 0, False, True, None),           # one element
]


@pytest.mark.parametrize("pool", AVG_POOLS, ids=[f"pool{i}" for i in range(len(AVG_POOLS))])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_quantized_avg_pool2d(device, isa, pool, dtype, layout):
    # bit for bit the reference's float32 steps on exact sums (the channels-last CPU kernel on integers, the other
    # layouts and devices torch's float32 pools), on every instruction-set path; within one float32 rounding of the
    # float64 pool of the dequantized values
    shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor = pool
    if layout != "contiguous" and len(shape) == 3:
        pytest.skip("layouts of 4-d inputs")
    x = laid_out(shape, dtype, layout)
    zero_point = -3 if dtype == torch.int8 else 131
    args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    got = F.quantized_avg_pool2d(x.to(device), 0.037, zero_point, *args)
    pair = torch.nn.modules.utils._pair
    want = reference.quantized_avg_pool2d(x, 0.037, zero_point, pair(kernel), pair(stride or kernel), pair(padding),
                                          ceil_mode, count_include_pad, divisor)
    assert got.dtype == torch.float32
    assert_same(got.cpu(), want)
    if got.numel():
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                 torch.contiguous_format)
    float64 = torch.nn.functional.avg_pool2d((x.double() - zero_point) * 0.037, *args)
    torch.testing.assert_close(got.cpu().double(), float64, rtol=2 ** -22, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
def test_quantized_avg_pool2d_at_the_ends_of_the_range(device, isa, dtype):
    # every byte at the type's lowest or highest value, the zero point at the other end: int8 bytes widen with their
    # sign, and the sums of the largest windows allowed stay exact
    lo, hi = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    for value, zero_point in ((lo, hi), (hi, lo)):
        x = torch.full((1, 70, 300, 256), value, dtype=dtype).contiguous(memory_format=torch.channels_last)
        got = F.quantized_avg_pool2d(x.to(device), 1.0, zero_point, (257, 256))
        assert_same(got.cpu(), torch.full((1, 70, 1, 1), float(value - zero_point)))
        sums = F.quantized_avg_pool2d(x.to(device), 1.0, zero_point, (257, 256), divisor_override=1)
        assert_same(sums.cpu(), torch.full((1, 70, 1, 1), float((value - zero_point) * 257 * 256)))


POOLS_AVG_1D = [  # shape, kernel, stride, padding, ceil_mode, count_include_pad
    ((2, 3, 20), 3, 2, 1, False, True),
    ((3, 16, 10), 3, 2, 1, True, False),
    ((1, 40, 33), (4,), (3,), (2,), False, False),
    ((5, 9), 2, None, 0, False, True),    # unbatched
    ((0, 3, 5), 2, 2, 0, True, True),     # empty batch
]


@pytest.mark.parametrize("pool", POOLS_AVG_1D, ids=[f"pool{i}" for i in range(len(POOLS_AVG_1D))])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
def test_quantized_avg_pool1d(device, isa, pool, dtype):
    shape, kernel, stride, padding, ceil_mode, count_include_pad = pool
    x = randint8(shape, seed=sum(shape), dtype=dtype)
    got = F.quantized_avg_pool1d(x.to(device), 0.5, 7, kernel, stride, padding, ceil_mode, count_include_pad)
    single = torch.nn.modules.utils._single
    want = reference.quantized_avg_pool2d(x.unsqueeze(-2), 0.5, 7, (1, *single(kernel)),
                                          (1, *single(stride or kernel)), (0, *single(padding)), ceil_mode,
                                          count_include_pad).squeeze(-2)
    assert_same(got.cpu(), want)


def test_quantized_avg_pool_compiles_and_bad_inputs(device):
    x = randint8((2, 3, 12, 12), device=device)
    compiled = torch.compile(F.quantized_avg_pool2d, fullgraph=True, dynamic=False)
    assert_same(compiled(x, 0.1, 2, 3, 2, 1, True, False), F.quantized_avg_pool2d(x, 0.1, 2, 3, 2, 1, True, False))
    with pytest.raises(TypeError, match="x must be int8 or uint8, got float32"):
        F.quantized_avg_pool2d(x.float(), 0.1, 0, 2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        F.quantized_avg_pool2d(x, 0.1, 0, (2, 2, 2))
    with pytest.raises(RuntimeError, match="quantized_avg_pool2d: padding must be >= 0 and at most half the kernel"):
        F.quantized_avg_pool2d(x, 0.1, 0, 3, 1, 2)
    with pytest.raises(RuntimeError, match="quantized_avg_pool2d: scale must be positive and finite \\(as a "
                                           "float32\\), got -0.1"):
        F.quantized_avg_pool2d(x, -0.1, 0, 2)
    with pytest.raises(RuntimeError, match="quantized_avg_pool2d: scale must be positive and finite"):
        F.quantized_avg_pool2d(x, 1e-50, 0, 2)  # 0 as a float32
    with pytest.raises(RuntimeError, match="quantized_avg_pool2d: zero_point must lie in \\[-128, 127\\] for Char x, "
                                           "got 200"):
        F.quantized_avg_pool2d(x, 0.1, 200, 2)
    with pytest.raises(RuntimeError, match="quantized_avg_pool2d: divisor_override must not be 0"):
        F.quantized_avg_pool2d(x, 0.1, 0, 2, divisor_override=0)
    with pytest.raises(RuntimeError, match="quantized_avg_pool2d: the window may have at most 65793 elements"):
        F.quantized_avg_pool2d(randint8((1, 1, 300, 300), device=device), 0.1, 0, 257)
    with pytest.raises(RuntimeError, match="quantized_avg_pool2d: the output would be empty"):
        F.quantized_avg_pool2d(x, 0.1, 0, 13)
    with pytest.raises(TypeError, match="quantized_avg_pool2d: scale must be a number, got 'a'"):
        F.quantized_avg_pool2d(x, "a", 0, 2)
    with pytest.raises(TypeError, match="quantized_avg_pool2d: scale must be a number, got None"):
        F.quantized_avg_pool2d(x, None, 0, 2)
    with pytest.raises(ValueError, match="quantized_avg_pool1d: x must be 2-d \\[C, L\\] or 3-d \\[B, C, L\\], "
                                         "got 4-d"):
        F.quantized_avg_pool1d(x, 0.1, 0, 2)
    # the rules and messages of torch's avg_pool1d, not the 2-d sizes the kernel is called with
    with pytest.raises(RuntimeError, match="pad should be at most half of effective kernel size, but got pad=2, "
                                           "kernel_size=3"):
        F.quantized_avg_pool1d(x[0], 0.1, 0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------
# opcheck: schemas, fake kernels, dispatch
# ---------------------------------------------------------------------------------------------------------------

def test_opcheck_int_pipeline_ops(device):
    x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(4, 64, 64, 6, device)  # unpadded packed weight
    torch.library.opcheck(ops.int8_linear, (x_q, x_scale, 0, packed, w_sum, w_scale, bias, 64, torch.float16, None, 0,
                                            0.0, 6.0))
    torch.library.opcheck(ops.int8_linear, (x_q, x_scale[:1], 0, packed, w_sum, w_scale, None, 64, torch.uint8, 0.5,
                                            10, 0.0, None))
    w_q = randint8((128, 16, 2, 2), device=device)
    torch.library.opcheck(ops.int8_conv2d.default,
                          (randint8((2, 32, 7, 6), device=device), x_scale[:1], 1, F.pack_conv_weight(w_q, 2),
                           w_q.sum((1, 2, 3), dtype=torch.int32), torch.rand(128, device=device), None, 128, [2, 2],
                           [2, 1], [1, 0], [1, 2], 2, torch.int8, 0.25, -3, None, 1.5))
    a, b, a_zp, b_zp = add_case((2, 3, 4, 5), torch.uint8, torch.int8, 7)
    a, b = a.to(device), b.to(device)
    s = torch.tensor([0.1], device=device)
    torch.library.opcheck(ops.quantized_add, (a, s, a_zp, b, s * 2, b_zp, torch.float32))
    torch.library.opcheck(ops.quantized_add, (a.contiguous(memory_format=torch.channels_last), s, a_zp, b, s, b_zp,
                                              torch.uint8, 0.3, 4, True))
    torch.library.opcheck(ops.quantized_add, (a[:, :, ::2], s, a_zp, b[:, :, 1::2], s, b_zp, torch.bfloat16, None, 0,
                                              True))
    a_cl = a.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.quantized_mul, (a_cl, s, a_zp, b[:, :, :1, :1], s * 2, b_zp, torch.uint8, 0.3, 4))
    torch.library.opcheck(ops.quantized_mul, (b[:, :, :1, :1], s, b_zp, a_cl, s, a_zp, torch.float32))
    torch.library.opcheck(ops.quantized_mul, (a[:, :, ::2], s, a_zp, b[0, 0, 0], s, b_zp, torch.float16))
    torch.library.opcheck(ops.quantized_mul, (a[:0], s, a_zp, b[:1], s, b_zp, torch.int8, 0.5, 0))
    table = lookup_table(torch.int8, 8).to(device)
    torch.library.opcheck(ops.quantized_lookup, (a, table))
    torch.library.opcheck(ops.quantized_lookup, (b.contiguous(memory_format=torch.channels_last), table))
    torch.library.opcheck(ops.quantized_lookup, (b[:, :, ::2], table.to(torch.uint8)))
    torch.library.opcheck(ops.quantized_lookup, (b[:0], table))
    torch.library.opcheck(ops.quantized_max_pool2d, (a, [3, 3], [2, 2], [1, 1], [1, 1], True))
    torch.library.opcheck(ops.quantized_max_pool2d, (b.contiguous(memory_format=torch.channels_last), [2, 3], [1, 2],
                                                     [0, 1], [2, 1], False))
    torch.library.opcheck(ops.quantized_sum, (a.contiguous(memory_format=torch.channels_last), [2, 3], True))
    torch.library.opcheck(ops.quantized_sum, (b.contiguous(memory_format=torch.channels_last), [-1, -2], False))
    torch.library.opcheck(ops.quantized_sum, (a, [1], False))
    torch.library.opcheck(ops.quantized_avg_pool2d, (a.contiguous(memory_format=torch.channels_last), 0.1, a_zp,
                                                     [3, 3], [2, 2], [1, 1], True, False, None))
    torch.library.opcheck(ops.quantized_avg_pool2d, (b, 0.25, b_zp, [2, 3], [1, 2], [1, 1], False, True, 5))
    torch.library.opcheck(ops.quantized_avg_pool2d, (b[:, :, ::2].contiguous(memory_format=torch.channels_last), 2.0,
                                                     b_zp, [2, 2], [2, 2], [0, 0]))
    torch.library.opcheck(ops.quantized_adaptive_avg_pool2d, (a.contiguous(memory_format=torch.channels_last), 0.1,
                                                              a_zp, [3, 2]))
    torch.library.opcheck(ops.quantized_adaptive_avg_pool2d, (b, 0.25, b_zp, [4, 5]))
    torch.library.opcheck(ops.quantized_adaptive_avg_pool2d, (b[0], 0.25, b_zp, [2, 3]))
    torch.library.opcheck(ops.quantized_adaptive_avg_pool2d, (a[:0], 0.1, a_zp, [3, 3]))
    torch.library.opcheck(ops.quantized_adaptive_avg_pool2d, (a.contiguous(memory_format=torch.channels_last), 0.1,
                                                              a_zp, [0, 2]))


# ---------------------------------------------------------------------------------------------------------------
# quantized_adaptive_avg_pool2d / 1d
# ---------------------------------------------------------------------------------------------------------------

ADAPTIVE_AVG_POOLS = [  # shape, output_size
    ((2, 64, 12, 12), 6),            # a size that divides the input's: quantized_avg_pool2d's fixed window
    ((2, 37, 7, 7), 7),              # VGG's pool at its usual input: windows of one element
    ((1, 8, 6, 6), 4),               # windows of 2 and 3, overlapping
    ((2, 5, 13, 9), (5, 2)),         # uneven both ways, non-square
    ((2, 5, 9, 8), (None, 3)),       # a kept dim
    ((3, 7, 5), (2, 4)),             # unbatched
    ((0, 3, 6, 6), 4),               # empty batch
    ((1, 2, 5, 5), (0, 2)),          # an empty output
    ((1, 3, 2, 3), 5),               # more outputs than inputs: windows repeat elements
]


@pytest.mark.parametrize("pool", ADAPTIVE_AVG_POOLS, ids=[f"pool{i}" for i in range(len(ADAPTIVE_AVG_POOLS))])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_quantized_adaptive_avg_pool2d(device, isa, pool, dtype, layout):
    # bit for bit the reference's float32 steps on each window's exact sum, on every instruction-set path and
    # layout, keeping the input's memory format; within one float32 rounding of the float64 pool of the dequantized
    # values
    shape, output_size = pool
    if layout != "contiguous" and len(shape) == 3:
        pytest.skip("layouts of 4-d inputs")
    x = laid_out(shape, dtype, layout)
    zero_point = -3 if dtype == torch.int8 else 131
    got = F.quantized_adaptive_avg_pool2d(x.to(device), 0.037, zero_point, output_size)
    want = reference.quantized_adaptive_avg_pool2d(x, 0.037, zero_point, output_size)
    assert got.dtype == torch.float32
    assert_same(got.cpu(), want)
    if got.numel():
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                 torch.contiguous_format)
    float64 = torch.nn.functional.adaptive_avg_pool2d((x.double() - zero_point) * 0.037, output_size)
    torch.testing.assert_close(got.cpu().double(), float64, rtol=2 ** -22, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_quantized_adaptive_avg_pool2d_at_the_ends_of_the_range(device, dtype, memory_format):
    # every byte at the type's lowest or highest value, the zero point at the other end, uneven windows: of 90 x 89
    # elements (the float32 pool's largest) and 257 x 256 (float64), each sum recovered exactly from its mean (a
    # channels-last x on the CPU: the kernel's int32 sums)
    lo, hi = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    for value, zero_point in ((lo, hi), (hi, lo)):
        # (and fixed windows past quantized_avg_pool2d's exact bound: 512 x 512, in float64)
        for shape, output_size in (((1, 3, 179, 89), (2, 1)), ((1, 3, 513, 512), (2, 2)), ((1, 2, 1024, 1024), 2)):
            x = torch.full(shape, value, dtype=dtype).contiguous(memory_format=memory_format)
            got = F.quantized_adaptive_avg_pool2d(x.to(device), 1.0, zero_point, output_size)
            assert_same(got.cpu(), torch.full((*shape[:2], *torch.nn.modules.utils._pair(output_size)),
                                              float(value - zero_point)))
            x = x.contiguous()
            x.view(-1)[::7] = zero_point  # means that are not integers, scaled by 0.37
            x = x.contiguous(memory_format=memory_format)
            got = F.quantized_adaptive_avg_pool2d(x.to(device), 0.37, zero_point, output_size)
            assert_same(got.cpu(), reference.quantized_adaptive_avg_pool2d(x, 0.37, zero_point, output_size))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8], ids=str)
def test_quantized_adaptive_avg_pool1d(device, dtype):
    for shape, output_size in [((2, 3, 20), 5), ((3, 16, 10), 4), ((5, 9), (2,)), ((0, 3, 5), 2), ((1, 2, 3), 7)]:
        x = randint8(shape, seed=sum(shape), dtype=dtype)
        got = F.quantized_adaptive_avg_pool1d(x.to(device), 0.5, 7, output_size)
        size = output_size if isinstance(output_size, int) else output_size[0]
        want = reference.quantized_adaptive_avg_pool2d(x.unsqueeze(-2), 0.5, 7, (1, size)).squeeze(-2)
        assert_same(got.cpu(), want)


class _AdaptivePool(torch.nn.Module):
    def forward(self, x):
        return F.quantized_adaptive_avg_pool2d(x, 0.1, 2, 5)


def test_quantized_adaptive_avg_pool_compiles_and_bad_inputs(device):
    x = randint8((2, 3, 12, 12), device=device)
    for output_size in (4, 5):  # a fixed window, uneven windows
        compiled = torch.compile(F.quantized_adaptive_avg_pool2d, fullgraph=True, dynamic=False)
        got, want = compiled(x, 0.1, 2, output_size), F.quantized_adaptive_avg_pool2d(x, 0.1, 2, output_size)
        if device == "cpu":
            assert_same(got, want)
        else:  # Inductor's generated GPU code may divide to within an ulp, not correctly rounded
            torch.testing.assert_close(got, want, rtol=2 ** -22, atol=0)
    # torch.export traces it under a fake mode (its first call at this size): the calls after it compute real values
    y = randint8((1, 3, 13, 11), device=device)
    program = torch.export.export(_AdaptivePool(), (y,), strict=False)
    want = reference.quantized_adaptive_avg_pool2d(y, 0.1, 2, 5)
    assert_same(F.quantized_adaptive_avg_pool2d(y, 0.1, 2, 5).cpu(), want)
    assert_same(program.module()(y).cpu(), want)
    with pytest.raises(TypeError, match="x must be int8 or uint8"):
        F.quantized_adaptive_avg_pool2d(x.float(), 0.1, 0, 2)
    with pytest.raises(ValueError, match="quantized_adaptive_avg_pool2d: x must be 3-d \\[C, H, W\\] or 4-d"):
        F.quantized_adaptive_avg_pool2d(x[0, 0], 0.1, 0, 2)
    with pytest.raises(ValueError, match="quantized_adaptive_avg_pool2d: scale must be positive and finite"):
        F.quantized_adaptive_avg_pool2d(x, -0.1, 0, 5)
    with pytest.raises(ValueError, match="quantized_adaptive_avg_pool2d: scale must be positive and finite"):
        F.quantized_adaptive_avg_pool2d(x, 1e-50, 0, 4)  # 0 as a float32
    with pytest.raises(ValueError, match="quantized_adaptive_avg_pool2d: zero_point must lie in \\[-128, 127\\] "
                                         "for torch.int8 x, got 200"):
        F.quantized_adaptive_avg_pool2d(x, 0.1, 200, 5)
    with pytest.raises(TypeError, match="quantized_adaptive_avg_pool2d: scale must be a number, got 'a'"):
        F.quantized_adaptive_avg_pool2d(x, "a", 0, 2)
    # torch's rules and messages on the output size
    with pytest.raises(RuntimeError, match="adaptive_avg_pool2d: output_size must be 2"):
        F.quantized_adaptive_avg_pool2d(x, 0.1, 0, (2, 2, 2))
    with pytest.raises(ValueError, match="quantized_adaptive_avg_pool1d: x must be 2-d \\[C, L\\] or 3-d"):
        F.quantized_adaptive_avg_pool1d(x, 0.1, 0, 2)
    with pytest.raises(RuntimeError, match="adaptive_avg_pool1d"):
        F.quantized_adaptive_avg_pool1d(x[0], 0.1, 0, (2, 2))
    # the op's own checks (C++)
    with pytest.raises(RuntimeError, match="quantized_adaptive_avg_pool2d: x must be int8 or uint8, got Float"):
        ops.quantized_adaptive_avg_pool2d(x.float(), 0.1, 0, [2, 3])
    with pytest.raises(RuntimeError, match="quantized_adaptive_avg_pool2d: x must be 3-d \\[C, H, W\\] or 4-d"):
        ops.quantized_adaptive_avg_pool2d(x[0, 0], 0.1, 0, [2, 3])
    with pytest.raises(RuntimeError, match="quantized_adaptive_avg_pool2d: output_size must be 2 sizes >= 0, got "
                                           "\\[2, -1\\]"):
        ops.quantized_adaptive_avg_pool2d(x, 0.1, 0, [2, -1])
    with pytest.raises(RuntimeError, match="quantized_adaptive_avg_pool2d: scale must be positive and finite \\(as a "
                                           "float32\\), got 1e-50"):
        ops.quantized_adaptive_avg_pool2d(x, 1e-50, 0, [2, 3])
    with pytest.raises(RuntimeError, match="quantized_adaptive_avg_pool2d: zero_point must lie in \\[-128, 127\\] for "
                                           "Char x, got 128"):
        ops.quantized_adaptive_avg_pool2d(x, 0.1, 128, [2, 3])


# ---------------------------------------------------------------------------------------------------------------
# Requantized outputs of fewer bits (out_bits): every op that requantizes clamps to the range of that many bits,
# as a fake-quantized activation of those bits is (an integer pipeline's 7-bit activations)
# ---------------------------------------------------------------------------------------------------------------

# (out_dtype, out_bits, out_zero_point): zero points at both ends of the narrower ranges
OUT_BITS = [(torch.uint8, 7, 60), (torch.uint8, 7, 0), (torch.uint8, 4, 15), (torch.uint8, 2, 1),
            (torch.int8, 7, -5), (torch.int8, 3, -4), (torch.int8, 2, 1)]


def _out_bits_calls(device, out_dtype, out_zero_point):
    """name -> (run(out_bits, **out), reference(out_bits, **out)) for each requantizing op, on cases whose 8-bit
    outputs at an output scale of 1 / 150 of their largest y leave every narrower range."""
    calls = {}
    for m, k, n, x_zp in [(37, 150, 130, 0), (7, 64, 128, 9), (13, 1028, 64, 200)]:  # (AVX-512: whole panels)
        x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(m, k, n, m, device, torch.uint8)
        for clamp in ((None, None), (0.0, None)):
            args = (x_q, x_scale, x_zp, packed, w_sum, w_scale, bias)
            calls[f"linear-{m}x{k}x{n}-clamp{clamp}"] = (
                lambda bits, clamp=clamp, args=args, n=n, **out: F.int8_linear(
                    *args, out_features=n, clamp_min=clamp[0], clamp_max=clamp[1], out_bits=bits, **out),
                lambda bits, clamp=clamp, x_q=x_q, x_scale=x_scale, x_zp=x_zp, w=w, w_scale=w_scale, bias=bias,
                **out: reference.int8_linear(x_q, x_scale, x_zp, w, w_scale, bias, clamp_min=clamp[0],
                                             clamp_max=clamp[1], out_bits=bits, **out))
    for b, c, h, w_, oc, kernel, stride, padding, groups in [(1, 32, 5, 6, 128, (1, 1), 1, 0, 1),
                                                             (2, 8, 9, 9, 64, (3, 3), 1, 1, 1),
                                                             (2, 70, 6, 9, 70, (3, 3), 1, 1, 70)]:
        g = torch.Generator().manual_seed(c)
        x_q = randint8((b, c, h, w_), generator=g, dtype=torch.uint8).to(device)
        w_q = randint8((oc, c // groups, *kernel), generator=g).to(device)
        w_scale = (torch.rand(oc, generator=g) * 0.01 + 0.001).to(device)
        bias = torch.randn(oc, generator=g).to(device)
        packed, w_sum = F.pack_conv_weight(w_q, groups), w_q.sum((1, 2, 3), dtype=torch.int32)
        geometry = dict(stride=stride, padding=padding, groups=groups)
        residual = randint8((b, oc, (h + 2 * padding - kernel[0]) // stride + 1,
                             (w_ + 2 * padding - kernel[1]) // stride + 1), generator=g, dtype=torch.uint8).to(device)
        conv_args = (x_q, 0.03, 4, packed, w_sum, w_scale, bias)
        for residual_args in ({}, dict(residual=residual, residual_scale=0.5, residual_zero_point=100, relu=True)):
            name = f"conv-{kernel}-groups{groups}" + ("-residual" if residual_args else "")
            calls[name] = (
                lambda bits, conv_args=conv_args, oc=oc, kernel=kernel, geometry=geometry, r=residual_args, **out:
                F.int8_conv2d(*conv_args, out_channels=oc, kernel_size=kernel, out_bits=bits, **geometry, **r, **out),
                lambda bits, x_q=x_q, w_q=w_q, w_scale=w_scale, bias=bias, geometry=geometry, r=residual_args, **out:
                (reference.int8_conv2d_residual if r else reference.int8_conv2d)(
                    x_q, 0.03, 4, w_q, w_scale, bias, out_bits=bits, **geometry, **r, **out))
    a, b_, a_zp, b_zp = add_case((3, 70001 // 3), torch.uint8, torch.int8, 4)  # vector bodies, tails, tasks
    a, b_ = a.to(device), b_.to(device)
    for relu in (False, True):
        calls[f"add-relu{relu}"] = (
            lambda bits, relu=relu, **out: F.quantized_add(a, 0.05, a_zp, b_, 0.031, b_zp, out_bits=bits, relu=relu,
                                                           **out),
            lambda bits, relu=relu, **out: reference.quantized_add(a, 0.05, a_zp, b_, 0.031, b_zp, out_bits=bits,
                                                                   relu=relu, **out))
    gate = randint8((3, 1), seed=5, dtype=torch.uint8).to(device)
    for name, other in (("mul", b_), ("mul-broadcast", gate)):
        calls[name] = (
            lambda bits, other=other, **out: F.quantized_mul(a, 0.05, a_zp, other, 0.02, 7, out_bits=bits, **out),
            lambda bits, other=other, **out: reference.quantized_mul(a, 0.05, a_zp, other, 0.02, 7, out_bits=bits,
                                                                     **out))
    return calls


@pytest.mark.parametrize("out_dtype,out_bits,out_zero_point", OUT_BITS, ids=str)
def test_requantized_outputs_of_fewer_bits(device, isa, out_dtype, out_bits, out_zero_point):
    """Each op's output of out_bits bits is its 8-bit output clamped to that range (the narrower clamp of the same
    rounded values), the reference's, and reaches both ends of the range."""
    qmin, qmax = reference.qrange(out_bits, out_dtype == torch.int8)
    for name, (run, ref) in _out_bits_calls(device, out_dtype, out_zero_point).items():
        y = run(8, out_dtype=torch.float32)
        out = dict(out_dtype=out_dtype, out_scale=float(y.max()) / 150, out_zero_point=out_zero_point)
        wide, got = run(8, **out), run(out_bits, **out)
        assert int(wide.min()) < qmin or int(wide.max()) > qmax, name  # the narrower range clamps
        assert_same(got, wide.clamp(qmin, qmax))
        assert_same(got, ref(out_bits, **out))
        assert int(got.max()) == qmax, name


def test_out_bits_bad_inputs(device):
    x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(4, 16, 8, 1, device, torch.uint8)
    linear = dict(out_features=8, out_dtype=torch.uint8, out_scale=0.1)
    for bits in (1, 9, -7):
        with pytest.raises(RuntimeError, match=rf"int8_linear: out_bits must be in \[2, 8\], got {bits}"):
            F.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, out_bits=bits, **linear)
    with pytest.raises(RuntimeError, match=r"int8_linear: out_zero_point must lie in \[0, 127\] for Byte output of "
                                           r"7 bits, got 128"):
        F.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, out_bits=7, out_zero_point=128, **linear)
    with pytest.raises(RuntimeError, match=r"int8_linear: out_zero_point must lie in \[-64, 63\] for Char output of "
                                           r"7 bits, got -65"):
        F.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, out_features=8, out_dtype=torch.int8, out_scale=0.1,
                      out_bits=7, out_zero_point=-65)
    with pytest.raises(RuntimeError, match="int8_linear: out_bits is only for int8/uint8 out_dtype \\(8 otherwise\\), "
                                           "got 7 with out_dtype Float"):
        F.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, out_features=8, out_bits=7)
    with pytest.raises(TypeError, match="int8_linear: out_bits must be an integer, got '7'"):
        F.int8_linear(x_q, x_scale, 0, packed, w_sum, w_scale, out_bits="7", **linear)
    a = randint8((5,), seed=1, device=device)
    for name in ("quantized_add", "quantized_mul"):
        op = getattr(F, name)
        with pytest.raises(RuntimeError, match=rf"{name}: out_bits must be in \[2, 8\], got 1"):
            op(a, 0.1, 0, a, 0.1, 0, torch.int8, out_scale=0.1, out_bits=1)
        with pytest.raises(RuntimeError, match=rf"{name}: out_bits is only for int8/uint8 out_dtype"):
            op(a, 0.1, 0, a, 0.1, 0, torch.bfloat16, out_bits=4)
    w_q = randint8((8, 4, 3, 3), seed=2, device=device)
    x = randint8((1, 4, 6, 6), seed=3, dtype=torch.uint8, device=device)
    conv = dict(out_channels=8, kernel_size=3, out_dtype=torch.uint8, out_scale=0.1)
    with pytest.raises(RuntimeError, match=r"int8_conv2d: out_zero_point must lie in \[0, 3\] for Byte output of 2 "
                                           r"bits, got 4"):
        F.int8_conv2d(x, 0.1, 0, F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32),
                      torch.ones(8, device=device), out_zero_point=4, out_bits=2, **conv)
    with pytest.raises(RuntimeError, match=r"int8_conv2d: out_bits must be in \[2, 8\], got 0"):
        F.int8_conv2d(x, 0.1, 0, F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32),
                      torch.ones(8, device=device), residual=randint8((1, 8, 4, 4), seed=4, device=device),
                      residual_scale=0.1, out_bits=0, **conv)


def test_out_bits_opcheck(device):
    """opcheck of each op with an output of fewer bits (schema, fake kernel, dispatch)."""
    x_q, x_scale, w, packed, w_sum, w_scale, bias = linear_case(6, 64, 64, 1, device, torch.uint8)
    torch.library.opcheck(ops.int8_linear, (x_q, x_scale, 3, packed, w_sum, w_scale, bias, 64, torch.uint8, 0.05, 9,
                                            0.0, None, 7))
    a = randint8((4, 9), seed=2, device=device)
    scale = torch.tensor([0.1], device=device)
    torch.library.opcheck(ops.quantized_add, (a, scale, 0, a, scale, 3, torch.int8, 0.2, -1, True, 5))
    torch.library.opcheck(ops.quantized_mul, (a, scale, 0, a[:, :1], scale, 3, torch.uint8, 0.01, 2, 3))
    w_q = randint8((64, 16, 2, 2), seed=18, device=device)
    conv_args = (randint8((2, 16, 5, 6), seed=19, dtype=torch.uint8, device=device), scale, 2,
                 F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32), torch.rand(64, device=device), None,
                 64, [2, 2], [1, 1], [0, 0], [1, 1], 1, torch.uint8, 0.5, 3)
    torch.library.opcheck(ops.int8_conv2d.default, (*conv_args, None, None, 6))
    residual = randint8((2, 64, 4, 5), seed=20, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.int8_conv2d.residual, (*conv_args, None, None, residual, scale, -5, True, 7))


# ---------------------------------------------------------------------------------------------------------------
# Layers: the fused activation of a converted QuantLinear / QuantConv2d
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic"])
def test_layers_activation_clamp(preset):
    from torchquant.nn import QuantConv2d, QuantLinear
    torch.manual_seed(0)
    cases = [(QuantLinear(32, 24, config=preset), torch.randn(5, 32)),
             (QuantConv2d(8, 12, 3, padding=1, config=preset), torch.randn(2, 8, 6, 6))]
    for layer, x in cases:
        if preset == "int8-static":
            layer(x)  # training mode: the input observer records the range
        layer.eval()
        plain_fake = layer(x)
        layer.set_activation_clamp(0.0, 0.5)
        torch.testing.assert_close(layer(x), plain_fake.clamp(0.0, 0.5), rtol=0, atol=0)
        layer.convert()
        clamped = layer(x)
        layer.set_activation_clamp()
        plain = layer(x)
        assert (plain < 0).any() and (plain > 0.5).any()
        assert_same(clamped, plain.clamp(0.0, 0.5))
    with pytest.raises(ValueError, match="clamp_min .* must not exceed clamp_max"):
        cases[0][0].set_activation_clamp(1.0, 0.0)
    with pytest.raises(ValueError, match="clamp_max must be None or a number finite as float32"):
        cases[0][0].set_activation_clamp(None, math.inf)
    with pytest.raises(ValueError, match="clamp_max must be None or a number finite as float32"):
        cases[0][0].set_activation_clamp(0, 10 ** 400)  # (beyond float64: math.isfinite raised OverflowError)
