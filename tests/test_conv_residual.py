"""int8_conv2d's residual form (the overload int8_conv2d.residual): the conv's float32 y plus a dequantized residual
[+ ReLU], then the output conversion, as an integer pipeline's residual add in the conv's epilogue.

The CPU kernel (every conv path: the GEMM on im2col rows or the input itself, the direct conv, windows read in place,
depthwise; every instruction-set path), the CUDA kernel (the conv, then one element-wise pass) and
torchquant.reference agree bit for bit.
"""
import pytest
import torch

import torchquant.functional as F
from torchquant import reference
from torchquant._ops import ops

from conftest import assert_same, randint8

# batch, in_ch, h, w, out_ch, kernel, stride, padding, dilation, groups: each reaches one conv path of the CPU kernel
# for a uint8 input (an int8 input takes the GEMM on im2col rows, except depthwise and grouped ones of 2 to 8 channels
# a group: the depthwise kernel's passes, on AVX2 the pair kernel for 4 to 16)
CONVS = {
    "pointwise": (2, 16, 7, 9, 24, (1, 1), 1, 0, 1, 1),           # the GEMM on the input itself, a partial panel
    "pointwise-full-panels": (1, 32, 5, 6, 128, (1, 1), 1, 0, 1, 1),  # the fused AVX-512 kernel, two panels
    "pointwise-groups-odd": (1, 6, 5, 5, 10, (1, 1), 1, 0, 1, 2),  # grouped, channels not a multiple of 4
    "direct": (2, 8, 9, 9, 64, (3, 3), 1, 1, 1, 1),               # uint8: the direct conv (AVX-512)
    "in-place-strided": (2, 8, 11, 10, 16, (3, 3), 2, 1, 1, 1),   # uint8: windows read in place
    "odd-channels": (1, 5, 9, 8, 7, (3, 3), 1, 1, 1, 1),           # im2col rows, odd sizes
    "dilated": (1, 8, 10, 10, 12, (3, 3), 1, 2, 2, 1),
    "groups": (1, 8, 10, 9, 12, (3, 1), (2, 1), (1, 0), 1, 4),
    "depthwise": (2, 70, 6, 9, 70, (3, 3), 1, 1, 1, 70),         # a full and a partial 64-channel block
    "grouped": (1, 72, 6, 7, 72, (3, 3), 1, 1, 1, 18),           # 4 channels a group: the depthwise kernel's passes
                                                                  # (AVX2: the pair kernel)
    "grouped-4": (1, 80, 5, 7, 80, (3, 3), 1, 1, 1, 20),          # 4 a group, groups a multiple of 4: uint8 on
                                                                  # AVX-512 the dword kernel's transposed lanes (rows
                                                                  # of 6 + 1 pixels)
    "grouped-8": (1, 104, 5, 6, 104, (3, 3), 1, 1, 1, 13),        # 8 a group: AVX2 the pair kernel, AVX-512 the
                                                                  # dword kernel's pairs of lanes, 13 vectors
    "grouped-16": (1, 64, 6, 7, 64, (3, 3), 1, 1, 1, 4),          # 16 a group: uint8 on AVX-512 the dword kernel
    "stem": (1, 3, 15, 14, 16, (7, 7), 2, 3, 1, 1),
    "one-pixel": (1, 4, 3, 3, 70, (3, 3), 1, 0, 1, 1),
    # C and OC multiples of 16: the CUTLASS conv on Hopper, padded (explicitly, for a nonzero zero point) and strided
    "padded-16": (2, 32, 9, 10, 64, (3, 3), 1, 1, 1, 1),
    "strided-16": (2, 16, 11, 9, 32, (3, 3), 2, 1, 1, 1),
}


def conv_case(conv, x_dtype, seed, device="cpu"):
    b, c, h, w_, oc, kernel, stride, padding, dilation, groups = conv
    g = torch.Generator().manual_seed(seed)
    x_q = randint8((b, c, h, w_), generator=g, dtype=x_dtype).to(device)
    w_q = randint8((oc, c // groups, *kernel), generator=g)
    w_scale = torch.rand(oc, generator=g) * 0.01 + 0.001
    bias = torch.randn(oc, generator=g)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x_q, w_q.to(device), w_scale.to(device), bias.to(device), geometry


def packed(w_q, groups):
    return F.pack_conv_weight(w_q, groups), w_q.sum((1, 2, 3), dtype=torch.int32)


def residual_like(y, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = randint8(y.shape, generator=g, dtype=dtype).to(y.device)
    return r.contiguous(memory_format=torch.channels_last)


def requantization(y, out_dtype):
    """An output scale that makes the largest sums clamp, and a zero point off the middle."""
    return dict(out_dtype=out_dtype, out_scale=float(y.abs().max()) / 150,
                out_zero_point=-7 if out_dtype == torch.int8 else 100)


def both(conv, x_q, x_zp, w_q, w_scale, bias, geometry, residual, r_scale, r_zp, relu, **out):
    """(the op's output, the reference's)."""
    w_packed, w_sum = packed(w_q, geometry["groups"])
    got = F.int8_conv2d(x_q, 0.02, x_zp, w_packed, w_sum, w_scale, bias, out_channels=w_q.shape[0],
                        kernel_size=w_q.shape[2:], residual=residual, residual_scale=r_scale,
                        residual_zero_point=r_zp, relu=relu, **geometry, **out)
    want = reference.int8_conv2d_residual(x_q, 0.02, x_zp, w_q, w_scale, bias, residual=residual,
                                          residual_scale=r_scale, residual_zero_point=r_zp, relu=relu, **geometry,
                                          **out)
    return got, want


@pytest.mark.parametrize("conv", CONVS.values(), ids=CONVS.keys())
@pytest.mark.parametrize("x_dtype,x_zp", [(torch.uint8, 0), (torch.uint8, 120), (torch.int8, 3)])
def test_int8_conv2d_residual_matches_the_reference(device, isa, conv, x_dtype, x_zp):
    x_q, w_q, w_scale, bias, geometry = conv_case(conv, x_dtype, seed=conv[4] + x_zp)
    x_q, w_q, w_scale, bias = (t.to(device) for t in (x_q, w_q, w_scale, bias))
    y = reference.int8_conv2d(x_q, 0.02, x_zp, w_q, w_scale, bias, **geometry)
    for r_dtype, r_zp in ((torch.uint8, 130), (torch.int8, -4)):
        residual = residual_like(y, r_dtype, seed=r_zp)
        r_scale = float(y.abs().max()) / 100  # the residual as large as y: the sum and the ReLU both matter
        for relu in (False, True):
            for out_dtype in (torch.int8, torch.uint8, torch.float32, torch.bfloat16, torch.float16):
                out = requantization(y, out_dtype) if not out_dtype.is_floating_point else {"out_dtype": out_dtype}
                got, want = both(conv, x_q, x_zp, w_q, w_scale, bias, geometry, residual, r_scale, r_zp, relu,
                                 **out)
                assert_same(got, want)
                assert got.is_contiguous(memory_format=torch.channels_last)
                if out_dtype == torch.uint8 and relu:  # the ReLU and the clamp at both ends were exercised
                    assert (got == 100).any() and (got == 255).any()


@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("conv", [CONVS[name] for name in ("pointwise-full-panels", "direct", "depthwise", "grouped",
                                                            "grouped-4", "grouped-8")],
                         ids=["pointwise", "direct", "depthwise", "grouped", "grouped-4", "grouped-8"])
def test_int8_conv2d_residual_with_clamp_and_streaming(isa, monkeypatch, streamed, conv):
    """The layer's activation clamp applies to y before the add; streaming stores write the same bytes."""
    if streamed:
        monkeypatch.setenv("TORCHQUANT_STREAMING_BYTES", "0")
    x_q, w_q, w_scale, bias, geometry = conv_case(conv, torch.uint8, seed=5)
    y = reference.int8_conv2d(x_q, 0.02, 0, w_q, w_scale, bias, **geometry)
    residual = residual_like(y, torch.uint8, seed=6)
    for clamp in ((0.0, None), (-0.5, 0.5)):
        out = dict(requantization(y, torch.uint8), clamp_min=clamp[0], clamp_max=clamp[1])
        got, want = both(conv, x_q, 0, w_q, w_scale, bias, geometry, residual, 0.01, 128, True, **out)
        assert_same(got, want)


def test_int8_conv2d_residual_equals_the_unfused_ops(device):
    """The fused op is the conv with a float32 output, then dequantize, add, ReLU and quantize: each an op of its
    own, and together the same bits."""
    conv = CONVS["direct"]
    x_q, w_q, w_scale, bias, geometry = conv_case(conv, torch.uint8, seed=9, device=device)
    w_packed, w_sum = packed(w_q, 1)
    kwargs = dict(out_channels=64, kernel_size=(3, 3), **geometry)
    y = F.int8_conv2d(x_q, 0.02, 0, w_packed, w_sum, w_scale, bias, **kwargs)
    residual = residual_like(y, torch.int8, seed=10)
    out_scale = float(y.abs().max()) / 100
    unfused = F.quantize(torch.relu(y + F.dequantize(residual, 0.01, -3)), out_scale, 5)
    fused = F.int8_conv2d(x_q, 0.02, 0, w_packed, w_sum, w_scale, bias, **kwargs, out_dtype=torch.int8,
                          out_scale=out_scale, out_zero_point=5, residual=residual, residual_scale=0.01,
                          residual_zero_point=-3, relu=True)
    assert_same(fused, unfused)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "broadcast-view"])
def test_int8_conv2d_residual_in_other_layouts(device, layout):
    """A residual in another memory format is read as its values (a channels-last copy); a residual that only
    broadcasts to the output's shape is refused, naming both shapes."""
    conv = CONVS["pointwise"]
    x_q, w_q, w_scale, bias, geometry = conv_case(conv, torch.uint8, seed=13, device=device)
    y = reference.int8_conv2d(x_q, 0.02, 0, w_q, w_scale, bias, **geometry)
    base = residual_like(y, torch.uint8, seed=14)
    if layout == "broadcast-view":
        residual = base[:, :, :1, :]
        w_packed, w_sum = packed(w_q, 1)
        with pytest.raises(RuntimeError, match=r"residual must have the output's shape \[2, 24, 7, 9\] \(no "
                                               r"broadcasting\), got \[2, 24, 1, 9\]"):
            F.int8_conv2d(x_q, 0.02, 0, w_packed, w_sum, w_scale, bias, out_channels=24, kernel_size=1,
                          out_dtype=torch.uint8, out_scale=0.1, residual=residual, residual_scale=0.1)
        return
    residual = base.contiguous() if layout == "contiguous" else \
        torch.empty(*y.shape[:3], 2 * y.shape[3], dtype=torch.uint8, device=device)[..., ::2].copy_(base)
    out = requantization(y, torch.uint8)
    got, want = both(conv, x_q, 0, w_q, w_scale, bias, geometry, residual, 0.05, 7, True, **out)
    assert_same(got, want)
    got_cl, _ = both(conv, x_q, 0, w_q, w_scale, bias, geometry, base, 0.05, 7, True, **out)
    assert_same(got, got_cl)


@pytest.mark.parametrize("conv", [CONVS["pointwise"], CONVS["padded-16"]], ids=["pointwise", "padded-16"])
def test_int8_conv2d_residual_read_in_place_off_alignment(device, conv):
    """A channels-last residual one byte past a 16-byte boundary: read where it is, without the 16-byte vectors."""
    x_q, w_q, w_scale, bias, geometry = conv_case(conv, torch.uint8, seed=17, device=device)
    y = reference.int8_conv2d(x_q, 0.02, 0, w_q, w_scale, bias, **geometry)
    base = residual_like(y, torch.int8, seed=18)
    storage = torch.empty(base.numel() + 1, dtype=torch.int8, device=device)
    residual = storage[1:].as_strided(base.shape, base.stride()).copy_(base)
    assert residual.is_contiguous(memory_format=torch.channels_last) and residual.data_ptr() % 16 != 0
    for out in (requantization(y, torch.int8), {"out_dtype": torch.float32}):
        got, want = both(conv, x_q, 0, w_q, w_scale, bias, geometry, residual, 0.03, -5, True, **out)
        assert_same(got, want)


def test_int8_conv2d_residual_batch_one_and_empty(device):
    conv = CONVS["odd-channels"]
    x_q, w_q, w_scale, bias, geometry = conv_case(conv, torch.int8, seed=15, device=device)
    for batch in (1, 0):
        x = x_q[:batch]
        y = reference.int8_conv2d(x, 0.02, 3, w_q, w_scale, bias, **geometry)
        residual = residual_like(y, torch.uint8, seed=16)
        out = dict(out_dtype=torch.uint8, out_scale=0.05, out_zero_point=10)
        got, want = both(conv, x, 3, w_q, w_scale, bias, geometry, residual, 0.05, 7, True, **out)
        assert_same(got, want)
        assert got.shape[0] == batch


def test_int8_conv2d_residual_bad_inputs(device):
    conv = CONVS["pointwise"]
    x_q, w_q, w_scale, bias, geometry = conv_case(conv, torch.uint8, seed=17, device=device)
    w_packed, w_sum = packed(w_q, 1)
    residual = torch.zeros(2, 24, 7, 9, dtype=torch.uint8, device=device)
    call = dict(out_channels=24, kernel_size=1, out_dtype=torch.uint8, out_scale=0.1)
    cases = [
        (dict(residual=residual.float(), residual_scale=0.1), TypeError, "residual must be int8 or uint8, got float32"),
        (dict(residual=residual), ValueError, "a residual needs its residual_scale"),
        (dict(residual=residual, residual_scale=-1.0), ValueError, "residual_scale must be positive and finite"),
        (dict(residual_scale=0.1), ValueError, "residual_scale and relu apply to a residual"),
        (dict(relu=True), ValueError, "residual_scale and relu apply to a residual"),
        (dict(residual=residual, residual_scale=0.1, relu="yes"), TypeError, "relu must be a bool"),
        (dict(residual=residual[:, :23], residual_scale=0.1), RuntimeError, "residual must have the output's shape"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            F.int8_conv2d(x_q, 0.02, 0, w_packed, w_sum, w_scale, bias, **call, **kwargs)
    args = (x_q, torch.tensor([0.02], device=device), 0, w_packed, w_sum, w_scale, bias, 24, [1, 1], [1, 1], [0, 0],
            [1, 1], 1, torch.uint8, 0.1, 0, None, None)
    with pytest.raises(RuntimeError, match=r"residual_zero_point must lie in \[0, 255\] for Byte residual, got 256"):
        ops.int8_conv2d.residual(*args, residual, torch.tensor([0.1], device=device), 256, False, 8)
    with pytest.raises(RuntimeError, match="residual_scale must be a float32 tensor of 1 element"):
        ops.int8_conv2d.residual(*args, residual, torch.tensor([0.1, 0.2], device=device), 0, False, 8)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="residual_scale"):
            ops.int8_conv2d.residual(*args, residual, torch.tensor([float("nan")]), 0, False, 8)


def test_int8_conv2d_residual_opcheck(device):
    """opcheck (schema, fake kernel, dispatch) with a weight that needs no padding (64 outputs, window 64)."""
    w_q = randint8((64, 16, 2, 2), seed=18, device=device)
    w_packed, w_sum = F.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32)
    w_scale = torch.rand(64, device=device)
    x_q = randint8((2, 16, 5, 6), seed=19, dtype=torch.uint8, device=device)
    residual = randint8((2, 64, 4, 5), seed=20, device=device).contiguous(memory_format=torch.channels_last)
    scale = torch.tensor([0.25], device=device)
    for out in ((torch.uint8, 0.5, 3), (torch.float32, None, 0)):
        torch.library.opcheck(ops.int8_conv2d.residual, (x_q, scale, 2, w_packed, w_sum, w_scale, None, 64, [2, 2],
                                                         [1, 1], [0, 0], [1, 1], 1, *out, None, None, residual, scale,
                                                         -5, True, 8))


# Output scales against the largest |y|: some outputs clamp; the requantized values pass the int16 range (the
# saturating packs clamp them); they pass 2^31 (the float clamp must stay: the conversion gives INT_MIN there)
OUT_SCALE_DIVISORS = {"clamps": 150.0, "past-int16": 1e6, "past-int32": 1e11}


@pytest.mark.parametrize("divisor", OUT_SCALE_DIVISORS.values(), ids=OUT_SCALE_DIVISORS.keys())
@pytest.mark.parametrize("conv", [CONVS["pointwise-full-panels"], CONVS["direct"], CONVS["depthwise"],
                                  CONVS["padded-16"]], ids=["pointwise", "direct", "depthwise", "padded"])
def test_requantized_bounds_at_every_zero_point(isa, conv, divisor):
    """The requantization's bounds (the output type's range, a ReLU's or a clamp's) at the extreme zero points, with
    and without a residual: the AVX-512 kernel leaves the output type's own bounds to its saturating packs where no
    value can pass int32, which must give the reference's bytes."""
    x_q, w_q, w_scale, bias, geometry = conv_case(conv, torch.uint8, seed=conv[4])
    y = reference.int8_conv2d(x_q, 0.02, 0, w_q, w_scale, bias, **geometry)
    largest = float(y.abs().max())
    residual = residual_like(y, torch.uint8, seed=1)
    clamps = [{}, dict(clamp_min=0.0), dict(clamp_min=0.0, clamp_max=largest / 3),
              dict(clamp_min=-largest / 4, clamp_max=largest / 2)]
    for out_dtype, zero_points in ((torch.uint8, (0, 37, 255)), (torch.int8, (-128, 0, 127))):
        info = torch.iinfo(out_dtype)
        for out_zp in zero_points:
            out = dict(out_dtype=out_dtype, out_scale=largest / divisor, out_zero_point=out_zp)
            for clamp in clamps:
                for res in (None, residual):
                    if res is None:
                        w_packed, w_sum = packed(w_q, geometry["groups"])
                        got = F.int8_conv2d(x_q, 0.02, 0, w_packed, w_sum, w_scale, bias,
                                            out_channels=w_q.shape[0], kernel_size=w_q.shape[2:], **geometry,
                                            **out, **clamp)
                        want = reference.int8_conv2d(x_q, 0.02, 0, w_q, w_scale, bias, **geometry, **out, **clamp)
                    else:  # the ReLU after the add where the layer has a clamp
                        got, want = both(conv, x_q, 0, w_q, w_scale, bias, geometry, res, largest / 100, 130,
                                         bool(clamp), **out, **clamp)
                    assert_same(got, want)
                    if not clamp and res is None and divisor > 150:  # both ends of the range reached
                        assert (got == info.min).any() and (got == info.max).any()


@pytest.mark.parametrize("conv", [CONVS["pointwise-full-panels"], CONVS["direct"], CONVS["depthwise"]],
                         ids=["pointwise", "direct", "depthwise"])
def test_requantized_outputs_where_float_y_overflows(isa, conv):
    """Scales so large that y overflows float32 (to +-inf: the output type's bound, which the float clamp must keep
    applying, as the conversion gives INT_MIN for inf), and an overflowed y plus an overflowed residual term of the
    other sign (NaN: the zero point), though every scale and bias is finite."""
    b, c, h, w_, oc, kernel, stride, padding, dilation, groups = conv
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x_q = torch.full((b, c, h, w_), 255, dtype=torch.uint8)
    w_q = torch.full((oc, c // groups, *kernel), 127, dtype=torch.int8)
    w_q[1::2] = -128  # y of both signs
    w_scale = torch.ones(oc)
    w_packed, w_sum = packed(w_q, geometry["groups"])
    y = reference.int8_conv2d(x_q, 1e34, 0, w_q, w_scale, **geometry)
    assert torch.isinf(y).all()
    residual = torch.zeros(y.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    for out_dtype, out_zp in ((torch.uint8, 0), (torch.uint8, 200), (torch.int8, 0), (torch.int8, -7)):
        out = dict(out_dtype=out_dtype, out_scale=1e38, out_zero_point=out_zp)
        got = F.int8_conv2d(x_q, 1e34, 0, w_packed, w_sum, w_scale, out_channels=oc, kernel_size=kernel,
                            **geometry, **out)
        assert_same(got, reference.int8_conv2d(x_q, 1e34, 0, w_q, w_scale, **geometry, **out))
        # the residual term: (0 - 255) * 1e37 = -inf; with y = +inf the sum is NaN, with -inf it is -inf
        r = dict(residual=residual, residual_scale=1e37, residual_zero_point=255)
        got = F.int8_conv2d(x_q, 1e34, 0, w_packed, w_sum, w_scale, out_channels=oc, kernel_size=kernel,
                            **geometry, **out, **r)
        want = reference.int8_conv2d_residual(x_q, 1e34, 0, w_q, w_scale, **geometry, **out, **r)
        assert_same(got, want)
        assert (want == out_zp).any()
