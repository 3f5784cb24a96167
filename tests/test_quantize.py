"""The quantize family (quantize, dequantize, fake_quantize and its gradient, quantize_per_token, choose_qparams,
quantization_error) against torch's own fake-quantize ops and torchquant.reference."""
import copy
import math
import re

import pytest
import torch

import torchquant
import torchquant.functional as F
from torchquant import reference as R
from torchquant._ops import FLOAT_DTYPES as FLOATS, ROUNDINGS, device_values_hold, ops

from conftest import SUPPORTED_ISAS, assert_same


def gen(*shape, device="cpu", dtype=torch.float32, spread=60.0, seed=0, specials=True):
    """Random values over and beyond the quantization range (scales used below are ~0.05 - 1), with NaN, +-inf,
    +-0 and huge values planted at random positions when `specials`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * spread
    flat = x.view(-1)
    if specials and flat.numel() >= 16:
        idx = torch.randperm(flat.numel(), generator=g)[:8]
        flat[idx] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 3e-39])
    return x.to(device=device, dtype=dtype)


def qparams(channels, *, bits, signed, device, seed=1):
    """Per-channel scale (float32) and zero point (int32) inside the format's range."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(channels, generator=g) * 0.9 + 0.05
    qmin, qmax = R.qrange(bits, signed)
    if signed and bits == 1:
        zp = torch.zeros(channels, dtype=torch.int32)
    else:
        zp = torch.randint(qmin, qmax + 1, (channels,), generator=g, dtype=torch.int32)
    return scale.to(device), zp.to(device)


def check_all_ops(x, scale, zp, *, bits, signed, rounding, axis):
    """quantize, fake_quantize, its gradient and dequantize of x against the reference."""
    kw = dict(bits=bits, signed=signed, rounding=rounding, axis=axis)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1)
    zp = torch.as_tensor(zp, dtype=torch.int32, device=x.device).reshape(-1)
    q = F.quantize(x, scale, zp, **kw)
    assert_same(q, R.quantize(x, scale, zp, **kw))
    assert_same(F.fake_quantize(x, scale, zp, **kw), R.fake_quantize(x, scale, zp, **kw))
    grad = gen(*x.shape, device=x.device, dtype=x.dtype, seed=7, specials=False)
    assert_same(ops.fake_quantize_backward(grad, x, scale, zp, axis if axis is None else axis % x.dim(), bits,
                                           signed, rounding),
                R.fake_quantize_backward(grad, x, scale, zp, **kw))
    for dtype in FLOATS:
        assert_same(F.dequantize(q, scale, zp, axis=axis, dtype=dtype), R.dequantize(q, scale, zp, axis=axis,
                                                                                     dtype=dtype))


# ---------------------------------------------------------------------------------------------------------------
# Bit identity with torch's fake-quantize ops (nearest, float32): values and gradient mask
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (3, False), (2, True)])
def test_fake_quantize_per_tensor_is_torch_bit_for_bit(device, bits, signed):
    qmin, qmax = R.qrange(bits, signed)
    for seed, (scale, zp) in enumerate([(0.37, 0), (0.05, qmin), (1.0, qmax), (0.011, (qmin + qmax) // 2)]):
        x = gen(1 << 18, device=device, spread=0.6 * scale * (qmax - qmin), seed=seed, specials=False)
        x.requires_grad_(True)
        x_torch = x.detach().clone().requires_grad_(True)
        ours = F.fake_quantize(x, scale, zp, bits=bits, signed=signed)
        theirs = torch.fake_quantize_per_tensor_affine(x_torch, scale, zp, qmin, qmax)
        assert_same(ours, theirs)
        grad = torch.randn_like(ours)
        ours.backward(grad)
        theirs.backward(grad)
        assert_same(x.grad, x_torch.grad)


@pytest.mark.parametrize("shape,axis", [((64, 33, 7), 0), ((64, 33, 7), 1), ((64, 33, 7), 2), ((5, 3, 17, 19), 3),
                                        ((4096, 24), 1), ((24, 4096), 0)])
def test_fake_quantize_per_channel_is_torch_bit_for_bit(device, shape, axis):
    scale, zp = qparams(shape[axis], bits=8, signed=False, device=device)
    x = gen(*shape, device=device, spread=100.0, specials=False).requires_grad_(True)
    x_torch = x.detach().clone().requires_grad_(True)
    ours = F.fake_quantize(x, scale, zp, signed=False, axis=axis - len(shape))  # negative axis
    theirs = torch.fake_quantize_per_channel_affine(x_torch, scale, zp, axis, 0, 255)
    assert_same(ours, theirs)
    ours.sum().backward()  # an expanded (stride 0) incoming gradient
    theirs.sum().backward()
    assert_same(x.grad, x_torch.grad)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # the deprecated op is the baseline
def test_quantize_is_torch_quantize_per_tensor_qint8():
    # torch's quint8 path rounds some ties up (not to even); its qint8 path and fake-quant ops round half to even.
    x = gen(1 << 18, spread=40.0, specials=False)
    assert_same(F.quantize(x, 0.37, 3), torch.quantize_per_tensor(x, 0.37, 3, torch.qint8).int_repr())


def test_dequantize_matches_torch_dequantize(device):
    q = torch.randint(-128, 128, (1000, 17), dtype=torch.int8, device=device)
    qt = torch._make_per_tensor_quantized_tensor(q.cpu(), 0.173, -5)
    torch.testing.assert_close(F.dequantize(q, 0.173, -5).cpu(), qt.dequantize())


# ---------------------------------------------------------------------------------------------------------------
# Against the reference: every format, rounding, dtype, axis and odd input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_formats_match_reference(device, bits, signed, rounding):
    qmin, qmax = R.qrange(bits, signed)
    x = gen(3001, device=device, spread=0.5 * (qmax - qmin + 1), seed=bits)
    zp = 0 if signed and bits == 1 else (qmin + qmax) // 3
    check_all_ops(x, 0.5, zp, bits=bits, signed=signed, rounding=rounding, axis=None)
    q = F.quantize(x, 0.5, zp, bits=bits, signed=signed, rounding=rounding)
    assert q.dtype == (torch.int8 if signed else torch.uint8)
    assert int(q.min()) == qmin and int(q.max()) == qmax


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_reference(device, dtype):
    x = gen(77, 131, device=device, dtype=dtype, spread=30.0)
    for axis in (None, 1, 0):
        for bits, rounding in ((8, "nearest"), (4, "truncate")):
            s, z = qparams(1 if axis is None else x.shape[axis], bits=bits, signed=True, device=device)
            check_all_ops(x, s, z, bits=bits, signed=True, rounding=rounding, axis=axis)
    assert F.fake_quantize(x, 0.1).dtype == dtype


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 40, 3, 1), (700, 3), (3, 700), (1, 1, 300, 5)])
def test_every_axis_matches_reference(device, shape):
    for axis in range(-len(shape), len(shape)):
        scale, zp = qparams(shape[axis], bits=6, signed=False, device=device, seed=axis + 9)
        x = gen(*shape, device=device, seed=axis + 9)
        check_all_ops(x, scale, zp, bits=6, signed=False, rounding="nearest", axis=axis)


def test_large_per_channel_spans_threads(device):
    # > 2 parallel grains, short rows (per-element parameter buffers) and long rows.
    for shape, axis in [((2048, 257), 1), ((257, 2048), 0), ((64, 1000, 3), 1)]:
        scale, zp = qparams(shape[axis], bits=8, signed=True, device=device)
        x = gen(*shape, device=device)
        check_all_ops(x, scale, zp, bits=8, signed=True, rounding="nearest", axis=axis)


def test_ties_round_half_to_even(device):
    k = torch.arange(-300, 300, dtype=torch.float32, device=device)
    x = (k + 0.5) * 0.25  # exactly representable ties of x / 0.25
    expected = torch.clamp(torch.round(k + 0.5), -128, 127)  # torch.round: half to even
    assert_same(F.quantize(x, 0.25).float(), expected)
    assert_same(F.quantize(x, 0.25, rounding="truncate").float(), torch.clamp(torch.trunc(k + 0.5), -128, 127))
    assert F.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], device=device), 1.0).tolist() == \
        [0, 2, 2, 0, -2, -2]


def test_range_extremes(device):
    x = torch.tensor([-129.0, -128.0, -127.6, 126.5, 127.0, 127.5, 300.0], device=device)
    assert F.quantize(x, 1.0).tolist() == [-128, -128, -128, 126, 127, 127, 127]
    u = torch.tensor([-1.0, -0.5, 0.0, 254.5, 255.0, 255.4, 256.0], device=device)
    assert F.quantize(u, 1.0, signed=False).tolist() == [0, 0, 0, 254, 255, 255, 255]
    assert F.quantize(u, 1.0, 255, signed=False).tolist() == [254, 255, 255, 255, 255, 255, 255]
    q = torch.tensor([-128, 127], dtype=torch.int8, device=device)
    assert F.dequantize(q, 2.0, -128).tolist() == [0.0, 510.0]


def test_special_values(device):
    x = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e38, -1e38], device=device, requires_grad=True)
    assert F.quantize(x.detach(), 0.1, 5).tolist() == [5, 127, -128, 5, 127, -128]
    assert F.quantize(x.detach(), 0.1, 5, signed=False).tolist() == [5, 255, 0, 5, 255, 0]
    y = F.fake_quantize(x, 0.1, 5)
    assert math.isnan(y.detach()[0].item()) and y[1:].detach().tolist() == pytest.approx([12.2, -13.3, 0.0, 12.2, -13.3])
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert F.quantize(x.detach(), 0.1, bits=1).tolist() == [0, 1, -1, 1, 1, -1]


def test_sign_binarization(device):
    x = torch.tensor([-2.0, -0.3, -0.0, 0.0, 0.3, 2.0], device=device, requires_grad=True)
    assert F.quantize(x.detach(), 0.5, bits=1).tolist() == [-1, -1, 1, 1, 1, 1]
    y = F.fake_quantize(x, 0.5, bits=1)
    assert y.tolist() == [-0.5, -0.5, 0.5, 0.5, 0.5, 0.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # clipped straight-through: |x| <= scale
    assert F.quantize(x.detach(), 0.5, bits=1, signed=False).tolist() == [0, 0, 0, 0, 1, 1]


def test_non_contiguous_inputs(device):
    base = gen(40, 66, device=device)
    scale, zp = qparams(33, bits=8, signed=True, device=device)
    for x in (base.t(), base[:, ::2], base.t()[3:, 1::3]):
        assert not x.is_contiguous()
        axis = 1 if x.shape[1] == 33 else None
        s, z = (scale, zp) if axis is not None else (scale[:1], zp[:1])
        check_all_ops(x, s, z, bits=8, signed=True, rounding="nearest", axis=axis)
        assert_same(F.quantize(x, s, z, axis=axis), F.quantize(x.contiguous(), s, z, axis=axis))
    q = F.quantize(base, 0.3)
    assert_same(F.dequantize(q.t(), 0.3), F.dequantize(q.t().contiguous(), 0.3))


def _layouts(device):
    """(name, x, per-channel axis) in layouts other than the contiguous one: dense ones (read where they lie) and
    ones with gaps or overlaps (copied to empty_like's dense layout first)."""
    nchw = gen(2, 5, 4, 3, device=device)
    return [
        ("channels-last", nchw.to(memory_format=torch.channels_last), 1),
        ("channels-last, axis 3", nchw.to(memory_format=torch.channels_last), 3),
        ("channels-last, axis 0", nchw.to(memory_format=torch.channels_last), 0),
        ("transposed", gen(7, 9, device=device).t(), 1),
        ("permuted 3-d", gen(3, 4, 6, device=device).permute(2, 0, 1), 2),
        ("size-1 dims with odd strides", gen(6, 1, 5, device=device).as_strided((6, 1, 5), (5, 77, 1)), 1),
        ("sliced", nchw.to(memory_format=torch.channels_last)[:, :, ::2], 1),
        ("expanded", gen(1, 6, device=device).expand(4, 6), 1),
    ]


@pytest.mark.parametrize("case", range(8))
def test_outputs_keep_the_input_layout(device, case):
    # elementwise over memory: a channels-last or transposed input gives an output laid out alike (torch.empty_like's
    # strides, as torch's fake-quantize gives), the values of the contiguous input's
    _, x, axis = _layouts(device)[case]
    scale, zp = qparams(x.shape[axis], bits=8, signed=False, device=device)
    q = F.quantize(x, scale, zp, signed=False, axis=axis)
    assert q.stride() == torch.empty_like(x, dtype=torch.uint8).stride()
    assert_same(q, R.quantize(x.contiguous(), scale, zp, signed=False, axis=axis))
    y = F.dequantize(q, scale, zp, axis=axis, dtype=torch.bfloat16)
    assert y.stride() == torch.empty_like(q, dtype=torch.bfloat16).stride()
    assert_same(y, R.dequantize(q.contiguous(), scale, zp, axis=axis, dtype=torch.bfloat16))
    fq = F.fake_quantize(x, scale, zp, signed=False, axis=axis)
    torch_fq = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, 0, 255)
    assert fq.stride() == torch.empty_like(x).stride() == torch_fq.stride()
    assert_same(fq, R.fake_quantize(x.contiguous(), scale, zp, signed=False, axis=axis))
    args = (scale, zp, axis, 8, False, "nearest")
    for grad in (gen(*x.shape, device=device, seed=3, specials=False),  # contiguous, whatever x's layout
                 torch.empty_like(x).copy_(gen(*x.shape, device=device, seed=3, specials=False))):
        grad_x = ops.fake_quantize_backward(grad, x, *args)
        assert grad_x.stride() == torch.empty_like(x).stride()
        assert_same(grad_x, R.fake_quantize_backward(grad.contiguous(), x.contiguous(), scale, zp, signed=False,
                                                      axis=axis))
    finite = torch.empty_like(x).copy_(torch.randn(x.shape, device=device) * 30)
    for op, op_args in [(ops.quantize, (finite, *args)), (ops.fake_quantize, (finite.requires_grad_(True), *args)),
                        (ops.dequantize, (q, scale, zp, axis, torch.float32)),
                        (ops.fake_quantize_backward, (torch.ones_like(finite), finite.detach(), *args))]:
        torch.library.opcheck(op, op_args)


def test_empty_tensors(device):
    for shape, axis in [((0,), None), ((3, 0, 2), 1), ((3, 0, 2), 0), ((0, 4), -1)]:
        x = torch.empty(shape, device=device)
        scale, zp = qparams(1 if axis is None else shape[axis], bits=8, signed=True, device=device)
        q = F.quantize(x, scale, zp, axis=axis)
        assert q.shape == x.shape and q.dtype == torch.int8
        assert F.fake_quantize(x, scale, zp, axis=axis).shape == x.shape
        assert F.dequantize(q, scale, zp, axis=axis).shape == x.shape
    q, s = F.quantize_per_token(torch.empty(0, 8, device=device))
    assert q.shape == (0, 8) and s.shape == (0,)
    q, s = F.quantize_per_token(torch.empty(3, 0, device=device))
    assert q.shape == (3, 0) and s.tolist() == [1.0, 1.0, 1.0]


def test_gradients_match_reference(device):
    for dtype in FLOATS:
        x = gen(33, 70, device=device, dtype=dtype, spread=20.0).requires_grad_(True)
        scale, zp = qparams(70, bits=4, signed=True, device=device)
        for kw in (dict(bits=4, rounding="truncate", axis=-1), dict(bits=1, axis=None), dict(bits=8, axis=None)):
            s, z = (scale, zp) if kw.get("axis") is not None else (scale[:1], zp[:1] * 0)
            x.grad = None
            grad = gen(33, 70, device=device, dtype=dtype, seed=3, specials=False)
            F.fake_quantize(x, s, z, **kw).backward(grad)
            assert_same(x.grad, R.fake_quantize_backward(grad, x.detach(), s, z, **kw))


# ---------------------------------------------------------------------------------------------------------------
# Every CPU code path, forced
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_paths_match_reference(isa):
    for dtype in FLOATS:
        for shape, axis in [((1000 + 13,), None), ((37, 19, 5), 1), ((6, 131), -1), ((131, 6), 0), ((9, 40), 1)]:
            x = gen(*shape, dtype=dtype, seed=len(shape))
            channels = 1 if axis is None else shape[axis]
            for bits, signed, rounding in [(8, True, "nearest"), (8, False, "truncate"), (1, True, "nearest"),
                                           (3, False, "nearest"), (5, True, "truncate")]:
                scale, zp = qparams(channels, bits=bits, signed=signed, device="cpu", seed=bits)
                check_all_ops(x, scale, zp, bits=bits, signed=signed, rounding=rounding, axis=axis)
        x = gen(45, 300, dtype=dtype)
        for bits in (8, 4, 2):
            q, s = F.quantize_per_token(x, bits=bits)
            q_ref, s_ref = R.quantize_per_token(x, bits=bits)
            assert_same(q, q_ref)
            assert_same(s, s_ref)


def test_cpu_paths_round_at_the_ends_of_the_range(isa):
    """Values whose scaled form lies at, half a step and a fraction beyond each end of [qmin, qmax] (the vector
    paths clamp before they round), with the zero point at either end and inside, both roundings, NaN and +-inf."""
    for bits, signed in [(8, True), (8, False), (4, True), (2, False)]:
        qmin, qmax = R.qrange(bits, signed)
        for zp in (qmin, qmax, (qmin + qmax) // 2):
            scale = 0.25
            steps = torch.tensor([-1.5, -0.7, -0.5, -0.3, 0.0, 0.3, 0.5, 0.7, 1.5])
            ends = torch.tensor([qmin - zp, qmax - zp], dtype=torch.float32)
            around_ends = ((ends[:, None] + steps) * scale).reshape(-1)
            specials = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30])
            x = torch.cat([around_ends, specials]).repeat(9)  # > 4 vectors
            # without specials (whole vector groups that the conversion rounds), scaled values past the ends of
            # int16 (saturated by the packs before the zero point is added) and at the ends of int32 (-2^31 and
            # beyond: the conversion's INT_MIN, whose groups take the scalar loop), each in groups of their own
            ends_only = around_ends.repeat(8)
            int16_ends = torch.tensor([32766.5, 32767.0, 32767.5, 32768.0, 40000.0, 2147483520.0, -32768.0,
                                       -32768.5, -32769.0, -40000.0, 1e9, -1e9, 3.5, -3.5, 254.5, -127.5])
            int32_ends = torch.tensor([-2147483648.0, -2147483904.0, 2147483648.0, 3.5])
            for rounding in ROUNDINGS:
                for values in (x, ends_only, (int16_ends * scale).repeat(8), (int32_ends * scale).repeat(16)):
                    for dtype in FLOATS:
                        check_all_ops(values.to(dtype), scale, zp, bits=bits, signed=signed, rounding=rounding,
                                      axis=None)


def test_cpu_paths_agree_on_a_million_elements(monkeypatch):
    x = gen(1 << 20, spread=50.0)
    results = []
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        results.append((F.quantize(x, 0.3, 7), F.fake_quantize(x, 0.3, 7), F.quantize_per_token(x.view(1024, 1024))))
    for other in results[1:]:
        for a, b in zip(results[0][:2] + results[0][2], other[:2] + other[2]):
            assert_same(a, b)


def test_unknown_cpu_path_is_rejected(monkeypatch):
    monkeypatch.setenv("TORCHQUANT_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="TORCHQUANT_CPU_ISA must be"):
        F.quantize(torch.ones(4), 1.0)
    with pytest.raises(RuntimeError, match="TORCHQUANT_CPU_ISA must be"):
        torchquant.cpu_kernel_path()


def test_cpu_kernel_path_names_the_path_that_runs(monkeypatch):
    monkeypatch.delenv("TORCHQUANT_CPU_ISA", raising=False)
    assert torchquant.cpu_kernel_path() == SUPPORTED_ISAS[0]  # the best this CPU has
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        assert torchquant.cpu_kernel_path() == isa
    monkeypatch.setenv("TORCHQUANT_CPU_ISA", "")
    assert torchquant.cpu_kernel_path() == SUPPORTED_ISAS[0]


def test_cpu_multiply_add_peak_measures_the_path_that_runs(monkeypatch):
    """The benchmarks' limit: a rate for each vector path (no time is asserted), none for the scalar one."""
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        peak = torch.ops.torchquant.cpu_multiply_add_peak(1000)
        assert (peak == 0.0) if isa == "scalar" else (math.isfinite(peak) and peak > 0), (isa, peak)
    with pytest.raises(RuntimeError, match="cpu_multiply_add_peak: iterations must be >= 1, got 0"):
        torch.ops.torchquant.cpu_multiply_add_peak(0)


# ---------------------------------------------------------------------------------------------------------------
# quantize_per_token, choose_qparams, quantization_error
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_token_matches_reference(device, dtype):
    for shape in [(64, 384), (3, 5, 7), (10, 1), (2, 4096)]:
        x = gen(*shape, device=device, dtype=dtype, seed=shape[-1])
        x[0] = 0  # an all-zero row -> scale 1
        for bits in (8, 4, 2):
            q, s = F.quantize_per_token(x, bits=bits)
            q_ref, s_ref = R.quantize_per_token(x, bits=bits)
            assert_same(q, q_ref)
            assert_same(s, s_ref)
    assert s.shape == x.shape[:-1] and float(s[0]) == 1.0


def test_quantize_per_token_specials(device):
    x = torch.tensor([[1.0, -2.0, math.nan, math.inf, -math.inf, 0.5]], device=device)
    q, s = F.quantize_per_token(x)
    assert s.tolist() == (torch.tensor([2.0]) / 127).tolist() and q.tolist() == [[64, -127, 0, 127, -127, 32]]


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_token_tiny_rows(device, isa, dtype):
    # rows whose absmax / qmax is subnormal (or whose values are): the scale stops at the smallest normal float32,
    # so 1 / scale stays finite and zeros stay 0 instead of 0 * inf = NaN
    tiny = torch.finfo(torch.float32).tiny
    rows = [[0.0, 9.18e-41] + [0.0] * 37, [0.0, -tiny] + [tiny / 2] * 37, [0.0, 126 * tiny] + [-3 * tiny] * 37,
            [0.0, 1e-38] + [-5e-39] * 37]
    x = torch.tensor(rows, dtype=torch.float32).to(device=device, dtype=dtype)
    for bits in (8, 4):
        q, s = F.quantize_per_token(x, bits=bits)
        q_ref, s_ref = R.quantize_per_token(x, bits=bits)
        assert_same(q, q_ref)
        assert_same(s, s_ref)
        assert (s >= tiny).all() and (q[:, 0] == 0).all()


def test_choose_qparams(device):
    x = torch.tensor([[-1.0, 0.5, 3.0], [2.0, 0.0, -4.0]], device=device)
    s, z = F.choose_qparams(x)
    assert s.tolist() == [pytest.approx(4.0 / 127)] and z.tolist() == [0] and s.dtype == torch.float32
    s, z = F.choose_qparams(x, axis=-1)
    assert s.tolist() == pytest.approx([2.0 / 127, 0.5 / 127, 4.0 / 127]) and z.dtype == torch.int32
    s, z = F.choose_qparams(x, signed=False, symmetric=True)
    assert s.tolist() == [pytest.approx(4.0 / 127.5)] and z.tolist() == [128]
    s, z = F.choose_qparams(x, bits=1)
    assert s.tolist() == [4.0] and z.tolist() == [0]
    s, z = F.choose_qparams(torch.zeros(5, device=device), symmetric=False)
    assert s.tolist() == [1.0] and z.tolist() == [-128]
    s, z = F.choose_qparams(torch.tensor([1.0, math.nan, math.inf, 2.0], device=device))
    assert s.tolist() == [pytest.approx(2.0 / 127)]


def test_choose_qparams_asymmetric_matches_torch_observers(device):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    x = gen(64, 32, seed=5, specials=False) + 20.0  # a range that does not reach 0 on some channels
    obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    obs(x)
    s_t, z_t = obs.calculate_qparams()
    s, z = F.choose_qparams(x.to(device), signed=False, symmetric=False)
    torch.testing.assert_close(s.cpu(), s_t)
    assert z.cpu().tolist() == z_t.tolist()
    obs = PerChannelMinMaxObserver(ch_axis=1, dtype=torch.quint8, qscheme=torch.per_channel_affine)
    obs(x)
    s_t, z_t = obs.calculate_qparams()
    s, z = F.choose_qparams(x.to(device), signed=False, symmetric=False, axis=1)
    torch.testing.assert_close(s.cpu(), s_t)
    assert z.cpu().tolist() == z_t.tolist()


def test_choose_qparams_round_trip_error(device):
    x = gen(100, 50, device=device, specials=False)
    for symmetric in (True, False):
        s, z = F.choose_qparams(x, symmetric=symmetric, axis=0)
        err = (F.fake_quantize(x, s, z, axis=0) - x).abs()
        assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())


def test_quantization_error(device):
    x = torch.tensor([1.0, -2.0, 3.0, 0.0], device=device)
    x_hat = torch.tensor([1.5, -2.0, 2.0, 0.0], device=device)
    e = F.quantization_error(x, x_hat)
    assert e["mse"] == pytest.approx(0.3125) and e["max_abs"] == 1.0
    assert e["sqnr_db"] == pytest.approx(10 * math.log10(3.5 / 0.3125))
    assert F.quantization_error(x, x)["sqnr_db"] == math.inf
    assert F.quantization_error(x, x.half())["mse"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------------


def test_opcheck_every_op(device):
    x = gen(7, 40, device=device, specials=False)
    scale, zp = qparams(40, bits=8, signed=True, device=device)
    s1, z1 = scale[:1], zp[:1]
    u4_scale, u4_zp = qparams(40, bits=4, signed=False, device=device)
    q = F.quantize(x, scale, zp, axis=1)
    cases = [
        (ops.quantize, (x, s1, z1, None, 8, True, "nearest")),
        (ops.quantize, (x.half(), u4_scale, u4_zp, 1, 4, False, "truncate")),
        (ops.dequantize, (q, scale, zp, 1, torch.bfloat16)),
        (ops.fake_quantize, (x.requires_grad_(True), scale, zp, 1, 8, True, "nearest")),
        (ops.fake_quantize, (x, s1, z1 * 0, None, 1, True, "nearest")),
        (ops.fake_quantize_backward, (torch.randn_like(x), x.detach(), s1, z1, None, 8, True, "nearest")),
        (ops.quantize_per_token, (x.detach(), 8)),
        (ops.fake_quantize_error, (x.detach(), scale[:7].repeat(3, 1), zp[:7].repeat(3, 1), 8, True, "nearest")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def pipeline(x, scale, zp):
        y = F.fake_quantize(x, 0.05, 3) + F.fake_quantize(x, scale, zp, axis=-1, rounding="truncate")
        q, s = F.quantize_per_token(y)
        return F.dequantize(q, 1.0, dtype=x.dtype) * s[..., None], F.quantize(y, scale, zp, axis=1, signed=True)

    x = gen(8, 32, device=device, specials=False).requires_grad_(True)
    scale, zp = qparams(32, bits=8, signed=True, device=device)
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, scale, zp), pipeline(x, scale, zp)
    for a, b in zip(got, want):
        assert_same(a, b)
    (g,) = torch.autograd.grad(compiled(x, scale, zp)[0].sum(), x)
    (g_ref,) = torch.autograd.grad(pipeline(x, scale, zp)[0].sum(), x)
    assert_same(g, g_ref)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one case each, message checked
# ---------------------------------------------------------------------------------------------------------------

X = torch.randn(4, 6)


@pytest.mark.parametrize("fn", [F.quantize, F.fake_quantize])
def test_non_float_input_to_quantize(fn):
    with pytest.raises(TypeError, match="x must be a float32, float16 or bfloat16 tensor, got torch.int32"):
        fn(torch.ones(3, dtype=torch.int32), 1.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        fn([1.0, 2.0], 1.0)


def test_non_integer_input_to_dequantize():
    with pytest.raises(TypeError, match="q must be an int8 or uint8 tensor, got torch.float32"):
        F.dequantize(X, 1.0)


def test_bad_dequantize_dtype():
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16"):
        F.dequantize(torch.zeros(3, dtype=torch.int8), 1.0, dtype=torch.int32)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, 1e-40, 1e39])
def test_bad_scale_number(scale):
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        F.quantize(X, scale)


@pytest.mark.parametrize("scale", [[0.5, 0.0, 1.0, 1.0, 1.0, 1.0], [math.nan] * 6, [-0.1] * 6, [math.inf] * 6])
def test_bad_scale_tensor(device, scale):
    with pytest.raises((ValueError, RuntimeError), match="scale must be positive and finite"):
        F.fake_quantize(X.to(device), torch.tensor(scale, device=device), axis=1)


def test_value_check_once_per_tensor_version(device):
    """Outside the CPU the wrappers read scale values with a device sync, once per tensor version: an unchanged
    scale is not read again, and an in-place write makes the next call check it anew."""
    scale = torch.full((6,), 0.5, device=device)
    reads = []

    def positive(s):
        reads.append(1)
        return s > 0

    assert device_values_hold(scale, "test", positive) and device_values_hold(scale, "test", positive)
    assert len(reads) == 1
    scale[2] = -1.0  # an in-place write advances the version counter
    assert not device_values_hold(scale, "test", positive) and not device_values_hold(scale, "test", positive)
    assert len(reads) == 3  # a failing tensor is never remembered
    scale.fill_(0.25)
    assert device_values_hold(scale, "test", positive) and len(reads) == 4
    assert device_values_hold(scale, "other", positive) and len(reads) == 5  # each check by its own name
    with torch.inference_mode():
        fresh = torch.ones(3, device=device)  # no version counter: read each time
        assert device_values_hold(fresh, "test", positive) and device_values_hold(fresh, "test", positive)
    assert len(reads) == 7
    copied = copy.deepcopy(scale)  # a copy carries no verdict: it is read once itself
    assert device_values_hold(copied, "test", positive) and len(reads) == 8
    scale.data = torch.full((6,), -1.0, device=device)  # new data under the same tensor: read again
    assert not device_values_hold(scale, "test", positive) and len(reads) == 9
    if device != "cpu":  # the wrapper itself, after an in-place write to a scale it took before
        x = X.to(device)
        scale = torch.full((6,), 0.1, device=device)
        F.fake_quantize(x, scale, axis=1)
        scale[0] = 0.0
        with pytest.raises((ValueError, RuntimeError), match="scale must be positive and finite"):
            F.fake_quantize(x, scale, axis=1)


def test_bad_scale_type():
    with pytest.raises(TypeError, match="scale must be a float tensor or a number, got torch.int64"):
        F.quantize(X, torch.tensor([1]))
    with pytest.raises(TypeError, match="scale must be a number or a tensor, got str"):
        F.quantize(X, "1.0")


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\]"):
        F.quantize(X, 1.0, bits=bits)


def test_bits_not_an_int():
    with pytest.raises(TypeError, match="bits must be an int, got float"):
        F.fake_quantize(X, 1.0, bits=8.0)


def test_per_token_bits_out_of_range():
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
        F.quantize_per_token(X, bits=1)


def test_per_token_needs_a_dimension():
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        F.quantize_per_token(torch.tensor(1.0))


def test_unknown_rounding():
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'truncate', got 'floor'"):
        F.quantize(X, 1.0, rounding="floor")


@pytest.mark.parametrize("bits,signed,zp", [(8, True, 128), (8, False, -1), (4, True, -9), (4, False, 16)])
def test_zero_point_out_of_range(bits, signed, zp):
    with pytest.raises(ValueError, match=r"zero_point must be in \["):
        F.quantize(X, 1.0, zp, bits=bits, signed=signed)


def test_zero_point_tensor_out_of_range(device):
    zp = torch.tensor([0, 0, 0, 0, 0, 300], dtype=torch.int32, device=device)
    with pytest.raises((ValueError, RuntimeError), match=r"zero_point must be in \[0, 255\]"):
        F.quantize(X.to(device), 1.0, zp, signed=False, axis=1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64])
def test_wide_zero_point_tensor_out_of_range_names_its_value(device, dtype):
    # past int32, as the value given (not the saturated int32 the kernels would see), on every device
    big = 2**40
    zp = torch.tensor([big], dtype=dtype, device=device)
    with pytest.raises(ValueError, match=rf"quantize: zero_point must be in \[-128, 127\] .*got \[{big}\]"):
        F.quantize(X.to(device), 1.0, zp)
    with pytest.raises(ValueError, match=rf"fake_quantize: zero_point must be in \[0, 255\] .*got \[0, {big}\]"):
        F.fake_quantize(X.to(device)[:, :2], 1.0, torch.tensor([0, big], dtype=dtype, device=device), signed=False,
                        axis=1)
    with pytest.raises(ValueError, match=rf"dequantize: zero_point must be in \[-128, 127\] .*got \[{big}\]"):
        F.dequantize(torch.zeros(3, dtype=torch.int8, device=device), 1.0, zp)
    if dtype == torch.int64:  # (negative values: int64 only)
        with pytest.raises(ValueError, match=rf"got \[-{big}\]"):
            F.quantize(X.to(device), 1.0, -zp)
    # in range, a wide tensor is taken as its int32 value; fake tensors' values are not read
    assert_same(F.quantize(X.to(device), 0.5, torch.tensor([3], dtype=dtype, device=device)),
                F.quantize(X.to(device), 0.5, 3))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = F.quantize(mode.from_tensor(X.to(device)), 0.5,
                          mode.from_tensor(torch.tensor([3], dtype=dtype, device=device)))
    assert fake.shape == X.shape and fake.dtype == torch.int8


def test_float64_scale_tensor_out_of_float32_range_names_its_value(device):
    # past float32's range or below its normal range, as the value given (not the inf or 0 the float32 kernels would
    # see), on every device
    message = r"scale must be positive and finite \(at least 1.17549e-38\), got "
    for value in (1e300, 1e-300, -2.0):
        scale = torch.tensor([value], dtype=torch.float64, device=device)
        with pytest.raises(ValueError, match=rf"^quantize: {message}\[{re.escape(repr(value))}\]$"):
            F.quantize(X.to(device), scale)
        with pytest.raises(ValueError, match=rf"^dequantize: {message}\[{re.escape(repr(value))}\]$"):
            F.dequantize(torch.zeros(3, dtype=torch.int8, device=device), scale)
    with pytest.raises(ValueError, match=rf"^fake_quantize: {message}\[0.5, 1e\+300\]$"):
        F.fake_quantize(X.to(device)[:, :2], torch.tensor([0.5, 1e300], dtype=torch.float64, device=device), axis=1)
    # in range, a float64 scale is taken as its float32 value; fake tensors' values are not read
    assert_same(F.quantize(X.to(device), torch.tensor([0.1], dtype=torch.float64, device=device)),
                F.quantize(X.to(device), torch.tensor([0.1], device=device)))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = F.quantize(mode.from_tensor(X.to(device)),
                          mode.from_tensor(torch.tensor([1e300], dtype=torch.float64, device=device)))
    assert fake.shape == X.shape and fake.dtype == torch.int8


def test_zero_point_of_sign_binarization():
    with pytest.raises(ValueError, match="sign binarization has no zero point"):
        F.quantize(X, 1.0, 1, bits=1)


def test_zero_point_not_an_integer():
    with pytest.raises(TypeError, match="zero_point must be an integer"):
        F.quantize(X, 1.0, 2.5)
    with pytest.raises(TypeError, match="zero_point must be an integer tensor or an int, got torch.float32"):
        F.quantize(X, 1.0, torch.tensor([1.0]))


def test_dequantize_zero_point_out_of_dtype_range():
    with pytest.raises(ValueError, match=r"zero_point must be in \[-128, 127\] \(the range of torch.int8\)"):
        F.dequantize(torch.zeros(3, dtype=torch.int8), 1.0, 200)


def test_per_channel_scale_of_wrong_length():
    with pytest.raises(ValueError, match=r"scale must have 6 element\(s\) for per-channel \(x.shape\[1\] = 6\)"):
        F.quantize(X, torch.ones(4), axis=1)
    with pytest.raises(ValueError, match=r"zero_point must have 4 element\(s\)"):
        F.fake_quantize(X, torch.ones(4), torch.zeros(6, dtype=torch.int32), axis=0)


def test_per_tensor_scale_of_wrong_length():
    with pytest.raises(ValueError, match=r"scale must have 1 element\(s\) for per-tensor quantization"):
        F.quantize(X, torch.ones(6))


@pytest.mark.parametrize("axis", [2, -3, 10])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 1\] for a 2-d tensor"):
        F.quantize(X, 1.0, axis=axis)


def test_axis_not_an_int():
    with pytest.raises(TypeError, match="axis must be an int or None, got float"):
        F.dequantize(torch.zeros(3, dtype=torch.int8), 1.0, axis=0.0)


def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match=r"scale must be on x's device \(cpu\), got meta"):
        F.quantize(X, torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="x_hat must be on x's device"):
        F.quantization_error(X, X.to("meta"))


def test_kernel_checks_devices_and_dtypes():
    # The compiled ops check what the wrappers normally guarantee (they can be called directly).
    with pytest.raises(RuntimeError, match="scale must be float32"):
        ops.quantize(X, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32), None, 8, True,
                     "nearest")
    with pytest.raises(RuntimeError, match="per-channel scale must have x.size"):
        ops.fake_quantize(X, torch.ones(2), torch.zeros(2, dtype=torch.int32), 1, 8, True, "nearest")
    with pytest.raises(RuntimeError, match="bits must be in"):
        ops.quantize(X, torch.ones(1), torch.zeros(1, dtype=torch.int32), None, 9, True, "nearest")
    with pytest.raises(RuntimeError, match="grad must have x's shape"):
        ops.fake_quantize_backward(X[:2], X, torch.ones(1), torch.zeros(1, dtype=torch.int32), None, 8, True,
                                   "nearest")
    with pytest.raises(RuntimeError, match="grad must have x's dtype"):
        ops.fake_quantize_backward(X.half(), X, torch.ones(1), torch.zeros(1, dtype=torch.int32), None, 8, True,
                                   "nearest")


def test_choose_qparams_bad_input():
    with pytest.raises(ValueError, match="x must not be empty"):
        F.choose_qparams(torch.empty(0))
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        F.choose_qparams(X, symmetric="yes")


def test_quantization_error_bad_input():
    with pytest.raises(ValueError, match=r"x_hat must have x's shape \(4, 6\), got \(6, 4\)"):
        F.quantization_error(X, X.t())
    with pytest.raises(ValueError, match="x must not be empty"):
        F.quantization_error(torch.empty(0), torch.empty(0))


def test_public_names():
    assert set(F.__all__) >= {"quantize", "dequantize", "fake_quantize", "choose_qparams", "quantize_per_token",
                              "quantization_error"}
    assert torchquant.functional.fake_quantize is F.fake_quantize


def test_benchmark_runs():
    from torchquant.bench.quantize import COLUMNS, run
    rows = run(sizes=(1 << 12,), threads=(1,), repeats=1, cpu_time=True)
    assert len(rows) == 11 and all(set(COLUMNS) <= set(r) for r in rows)  # no time is asserted
    assert {r["clock"] for r in rows} == {"cpu"}
    rows = run(sizes=(1 << 12,), threads=(1,), repeats=1, channels_last=True)
    assert len(rows) == 10 and {r["granularity"] for r in rows} == {"per-tensor", "per-channel"}
