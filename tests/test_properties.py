"""Property-based tests (hypothesis): the CPU kernels against torchquant.reference and PyTorch's own ops on generated
inputs (shapes from empty to odd sizes, any float32 value including subnormals and huge ones, exact ties at .5,
every bit width and rounding, every qparam in range), on every instruction-set path this CPU has. The examples are
derandomized, so a run is reproducible; hypothesis prints the failing example."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import torchquant.functional as F
from conftest import SUPPORTED_ISAS, assert_same, forced_isa, randint8
from torchquant import reference

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)


def _on_every_isa(compute, expected) -> None:
    for isa in SUPPORTED_ISAS:
        with forced_isa(isa):
            assert_same(compute(), expected)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=19)


@st.composite
def quantize_cases(draw, per_channel: bool):
    """(x, scale, zero_point, axis, bits, signed, rounding): x either any float32 values or exact multiples of half
    the scale (ties), the scale a power of two for the ties so that they stay exact."""
    bits = draw(st.integers(1, 8))
    signed = draw(st.booleans())
    rounding = draw(st.sampled_from(["nearest", "truncate"]))
    shape = draw(shapes)
    axis = draw(st.integers(0, len(shape) - 1)) if per_channel else None
    channels = shape[axis] if per_channel else 1
    qmin, qmax = reference.qrange(bits, signed)
    ties = draw(st.booleans())
    if ties:
        exponent = draw(st.integers(-12, 6))
        scale = torch.full((channels,), 2.0 ** exponent)
        halves = draw(hnp.arrays(np.int32, shape, elements=st.integers(-2 * 300, 2 * 300)))
        x = torch.from_numpy(halves).float() * 0.5 * 2.0 ** exponent
    else:
        scale = torch.tensor(draw(st.lists(st.floats(2.0 ** -20, 1e4, width=32), min_size=channels, max_size=channels)),
                             dtype=torch.float32)
        x = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=finite32)))
    if bits == 1 and signed:  # sign binarization: no zero point
        qmin = qmax = 0
    zero_point = torch.tensor(draw(st.lists(st.integers(qmin, qmax), min_size=channels, max_size=channels)),
                              dtype=torch.int32)
    if not per_channel:
        scale, zero_point = scale.reshape(1), zero_point.reshape(1)
    return x, scale, zero_point, axis, bits, signed, rounding


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@PROPERTY
@given(data=st.data())
def test_quantize_family_equals_the_reference(per_channel, data):
    x, scale, zero_point, axis, bits, signed, rounding = data.draw(quantize_cases(per_channel))
    qargs = dict(bits=bits, signed=signed, rounding=rounding, axis=axis)
    scale_arg, zp_arg = (scale, zero_point) if per_channel else (float(scale), int(zero_point))
    q = reference.quantize(x, scale, zero_point, **qargs)
    _on_every_isa(lambda: F.quantize(x, scale_arg, zp_arg, **qargs), q)
    _on_every_isa(lambda: F.fake_quantize(x, scale_arg, zp_arg, **qargs),
                  reference.fake_quantize(x, scale, zero_point, **qargs))
    _on_every_isa(lambda: F.dequantize(q, scale_arg, zp_arg, axis=axis),
                  reference.dequantize(q, scale, zero_point, axis=axis))
    if bits >= 2 and rounding == "nearest" and x.numel():  # PyTorch's op (which takes no empty per-channel input)
        qmin, qmax = reference.qrange(bits, signed)
        ours = F.fake_quantize(x, scale_arg, zp_arg, **qargs)
        if per_channel:
            torch_fq = torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
            # PyTorch's per-channel kernel converts x / scale to int64 before clamping: from 2^63 on it overflows
            # and gives the zero point's value, where torchquant (and the per-tensor op) saturate
            shape = [-1 if d == axis else 1 for d in range(x.dim())]
            in_int64 = (x.double() / scale.double().reshape(shape)).abs() < 2.0 ** 62
            ours, torch_fq = ours[in_int64], torch_fq[in_int64]
        else:
            torch_fq = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), qmin, qmax)
        assert_same(ours, torch_fq)


@PROPERTY
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40),
                    elements=finite32.filter(lambda v: abs(v) < 1e30)),
       bits=st.integers(2, 8))
def test_quantize_per_token_equals_the_reference(x, bits):
    x = torch.from_numpy(x)
    q_ref, scale_ref = reference.quantize_per_token(x, bits=bits)
    for isa in SUPPORTED_ISAS:
        with forced_isa(isa):
            q, scale = F.quantize_per_token(x, bits=bits)
        assert_same(q, q_ref)
        assert_same(scale, scale_ref)


@st.composite
def linear_cases(draw):
    m, k, n = draw(st.integers(0, 9)), draw(st.integers(1, 70)), draw(st.integers(1, 70))
    x_dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    x_q = randint8((m, k), generator=g, dtype=x_dtype)
    w = randint8((n, k), generator=g)
    x_zero_point = draw(st.integers(-128, 127) if x_dtype == torch.int8 else st.integers(0, 255))
    x_scale = torch.rand(m if draw(st.booleans()) and m > 0 else 1, generator=g) * 0.1 + 1e-3
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g) if draw(st.booleans()) else None
    clamp_min = draw(st.one_of(st.none(), st.floats(-2, 1)))
    clamp_max = draw(st.one_of(st.none(), st.floats(1, 3)))
    output = draw(st.sampled_from([(torch.float32, None, 0), (torch.uint8, 0.05, 17), (torch.int8, 0.03, -5)]))
    return x_q, x_scale, x_zero_point, w, w_scale, bias, clamp_min, clamp_max, output


@PROPERTY
@given(case=linear_cases())
def test_int8_linear_equals_the_reference(case):
    x_q, x_scale, x_zero_point, w, w_scale, bias, clamp_min, clamp_max, (out_dtype, out_scale, out_zp) = case
    expected = reference.int8_linear(x_q, x_scale, x_zero_point, w, w_scale, bias, out_dtype=out_dtype,
                                     out_scale=out_scale, out_zero_point=out_zp, clamp_min=clamp_min,
                                     clamp_max=clamp_max)
    w_sum = w.int().sum(1, dtype=torch.int32)

    def compute():
        return F.int8_linear(x_q, x_scale, x_zero_point, F.pack_int8_weight(w), w_sum, w_scale, bias,
                             out_features=w.shape[0], out_dtype=out_dtype, out_scale=out_scale,
                             out_zero_point=out_zp, clamp_min=clamp_min, clamp_max=clamp_max)
    _on_every_isa(compute, expected)
    a = x_q.to(torch.int16).clamp(-128, 127).to(torch.int8)  # int8_mm takes int8 only
    _on_every_isa(lambda: F.int8_mm(a, w.t()), reference.int8_mm(a, w.t()))


@PROPERTY
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=70), signed=st.booleans(),
       transpose=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_quantized_lookup_equals_the_reference(shape, signed, transpose, seed):
    g = torch.Generator().manual_seed(seed)
    x = randint8(shape, generator=g, dtype=torch.int8 if signed else torch.uint8)
    if transpose and x.dim() >= 2:
        x = x.transpose(0, -1)
    table = randint8((256,), generator=g, dtype=torch.uint8)
    _on_every_isa(lambda: F.quantized_lookup(x, table), reference.quantized_lookup(x, table))
