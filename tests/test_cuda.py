"""CUDA-only checks beyond the shared device-parametrized suites: CPU and CUDA give the same integers on large random
tensors, the GEMM kernels are exact on many shapes (tails, the small-M path, strides), linear/conv agree with the
CPU kernels and an independent float64 reference, and the kernels respect streams and device guards.

Skipped visibly without a GPU; TORCHQUANT_REQUIRE_CUDA=1 turns a missing GPU into a failure (tests/conftest.py)."""
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import torchquant
from torchquant._ops import FLOAT_DTYPES as FLOATS, ROUNDINGS
from torchquant.functional import pack_conv_weight

from conftest import assert_same, exact_mm, randint8

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and torchquant.has_cuda_kernels()),
                       reason="no CUDA device or CUDA kernels not built"),
]

ops = torch.ops.torchquant


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_cuda_matches_cpu(cpu: torch.Tensor, cuda: torch.Tensor) -> None:
    assert cuda.device.type == "cuda"
    assert_same(cuda, cpu)


# ---------------------------------------------------------------------------------------------------------------
# Quantize family: CPU vs CUDA integer identity
# ---------------------------------------------------------------------------------------------------------------

# (bits, signed)
FORMATS = [(8, True), (8, False), (4, True), (3, False), (1, True), (1, False)]
SHAPE = (37, 129, 65)  # odd sizes: vector tails everywhere, ~310k elements


def special_input(shape, dtype, scale: float, seed: int) -> torch.Tensor:
    """Random values over and beyond the quantization range, exact ties (k + 0.5) * scale, zeros, +-inf and NaN."""
    x = torch.randn(shape, generator=gen(seed)) * 40 * scale
    flat = x.view(-1)
    n = flat.numel()
    ties = (torch.randint(-300, 300, (n // 8,), generator=gen(seed + 1)).float() + 0.5) * scale
    flat[: n // 8] = ties
    flat[n // 8: n // 8 + 5] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    perm = torch.randperm(n, generator=gen(seed + 2))
    return flat[perm].view(shape).to(dtype)


def qparams(x: torch.Tensor, axis, bits: int, signed: bool, seed: int):
    channels = 1 if axis is None else x.shape[axis]
    scale = torch.rand(channels, generator=gen(seed)) * 0.5 + 0.05
    if signed or bits == 1:
        zero_point = torch.zeros(channels, dtype=torch.int32)
    else:
        zero_point = torch.randint(0, 2 ** bits, (channels,), generator=gen(seed + 1), dtype=torch.int32)
    return scale, zero_point


def run_quantize_ops(device, x, grad, scale, zero_point, axis, bits, signed, rounding):
    x, grad, scale, zero_point = (t.to(device) for t in (x, grad, scale, zero_point))
    q = ops.quantize(x, scale, zero_point, axis, bits, signed, rounding)
    return {
        "quantize": q,
        "dequantize": ops.dequantize(q, scale, zero_point, axis, x.dtype),
        "fake_quantize": ops.fake_quantize(x, scale, zero_point, axis, bits, signed, rounding),
        "fake_quantize_backward": ops.fake_quantize_backward(grad, x, scale, zero_point, axis, bits, signed, rounding),
    }


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [None, 0, 1, 2])
@pytest.mark.parametrize("bits,signed", FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_quantize_family_matches_cpu(dtype, axis, bits, signed, rounding):
    seed = zlib.crc32(repr((dtype, axis, bits, signed, rounding)).encode()) % 10_000
    scale, zero_point = qparams(torch.empty(SHAPE), axis, bits, signed, seed)
    x = special_input(SHAPE, dtype, scale.mean().item(), seed)
    grad = torch.randn(SHAPE, generator=gen(seed + 3)).to(dtype)
    cpu = run_quantize_ops("cpu", x, grad, scale, zero_point, axis, bits, signed, rounding)
    cuda = run_quantize_ops("cuda", x, grad, scale, zero_point, axis, bits, signed, rounding)
    for name in cpu:
        assert_cuda_matches_cpu(cpu[name], cuda[name])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["offset", "transposed"])
def test_quantize_family_unaligned_and_strided(dtype, layout):
    """An offset view takes the scalar (unaligned) kernel, a transposed one the contiguous copy."""
    base = special_input((4097, 33), dtype, 0.1, 7)
    x = base.view(-1)[3:3 + 4096 * 33].view(4096, 33) if layout == "offset" else base.t()
    grad = torch.randn(x.shape, generator=gen(8)).to(dtype)
    for axis in (None, 1):
        scale, zero_point = qparams(x, axis, 8, False, 9)
        cpu = run_quantize_ops("cpu", x, grad, scale, zero_point, axis, 8, False, "nearest")
        xc = base.cuda().view(-1)[3:3 + 4096 * 33].view(4096, 33) if layout == "offset" else base.cuda().t()
        cuda = run_quantize_ops("cuda", xc, grad, scale, zero_point, axis, 8, False, "nearest")
        for name in cpu:
            assert_cuda_matches_cpu(cpu[name], cuda[name])


def test_quantize_matches_torch_fake_quantize():
    """The independent oracle: torch's own fake-quantize on CUDA, per tensor and per channel."""
    x = torch.randn(513, 1031, generator=gen(11)).cuda() * 3
    y = ops.fake_quantize(x, torch.tensor([0.02], device="cuda"), torch.tensor([3], device="cuda", dtype=torch.int32),
                          None, 8, False, "nearest")
    torch.testing.assert_close(y, torch.fake_quantize_per_tensor_affine(x, 0.02, 3, 0, 255), rtol=0, atol=0)
    scale = torch.rand(1031, generator=gen(12)).cuda() * 0.1 + 0.01
    zp = torch.zeros(1031, dtype=torch.int32, device="cuda")
    y = ops.fake_quantize(x, scale, zp, 1, 8, True, "nearest")
    torch.testing.assert_close(y, torch.fake_quantize_per_channel_affine(x, scale, zp, 1, -128, 127), rtol=0, atol=0)


def test_quantize_empty_and_large_per_channel():
    for shape in [(0,), (0, 5), (3, 0)]:
        x = torch.empty(shape, device="cuda")
        q = ops.quantize(x, torch.ones(1, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda"), None, 8,
                         True, "nearest")
        assert q.shape == x.shape and q.dtype == torch.int8
    # more channels than one block's worth, channel boundaries inside vectors (inner = 3)
    x = torch.randn(2, 70_001, 3, generator=gen(13))
    scale, zp = qparams(x, 1, 8, False, 14)
    assert_cuda_matches_cpu(ops.quantize(x, scale, zp, 1, 8, False, "nearest"),
                ops.quantize(x.cuda(), scale.cuda(), zp.cuda(), 1, 8, False, "nearest"))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("row_len", [1, 7, 64, 4096, 4097, 11008])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_per_token_matches_cpu(dtype, row_len, bits):
    rows = max(1, 300_000 // row_len)
    x = torch.randn(rows, row_len, generator=gen(row_len + bits)) * 5
    x[0] = 0.0                                       # all-zero row: scale 1
    if rows > 2:
        x[1, 0] = float("inf")                       # non-finite values do not set the scale
        x[2, -1] = float("nan")
    x = x.to(dtype)
    q_cpu, s_cpu = ops.quantize_per_token(x, bits)
    q_cuda, s_cuda = ops.quantize_per_token(x.cuda(), bits)
    assert_cuda_matches_cpu(q_cpu, q_cuda)
    assert_cuda_matches_cpu(s_cpu, s_cuda)
    # 3-d input and an unaligned row start take other kernel paths
    x3 = x.reshape(1, rows, row_len)
    assert_cuda_matches_cpu(ops.quantize_per_token(x3, bits)[0], ops.quantize_per_token(x3.cuda(), bits)[0])
    if rows > 1:
        def offset_rows(t):
            return t.view(-1)[1:][: (rows - 1) * row_len].view(rows - 1, row_len)
        assert_cuda_matches_cpu(ops.quantize_per_token(offset_rows(x), bits)[0],
                    ops.quantize_per_token(offset_rows(x.cuda()), bits)[0])


# ---------------------------------------------------------------------------------------------------------------
# int8_mm: exact on every shape
# ---------------------------------------------------------------------------------------------------------------

SIZES = [1, 7, 17, 33, 100, 257, 1000]


@pytest.mark.parametrize("m,n", list(itertools.product(SIZES, SIZES)))
def test_int8_mm_exact_all_tails(m, n):
    for k in SIZES:
        a = randint8((m, k), m * 7 + k).cuda()
        b = randint8((k, n), n * 13 + k).cuda()
        out = ops.int8_mm(a, b)
        assert out.dtype == torch.int32 and out.shape == (m, n)
        assert torch.equal(out.long(), exact_mm(a, b)), f"M={m} N={n} K={k}"


@pytest.mark.parametrize("m", list(range(1, 17)) + [31, 128])
def test_int8_mm_small_m_extremes(m):
    """The small-M (GEMV) path and the first tiled sizes, with the largest magnitudes (-128 * -128 sums)."""
    for n, k in [(8, 16), (100, 4096), (4096, 4096), (300, 11008), (129, 4100)]:
        a = randint8((m, k), m + k).cuda()
        b = randint8((k, n), n + k).cuda()
        a[0] = -128
        b[:, 0] = -128
        assert torch.equal(ops.int8_mm(a, b).long(), exact_mm(a, b)), f"M={m} N={n} K={k}"


def test_int8_mm_matches_torch_int_mm_large():
    a = randint8((4096, 4096), 1).cuda()
    b = randint8((4096, 4096), 2).cuda()
    torch.testing.assert_close(ops.int8_mm(a, b), torch._int_mm(a, b), rtol=0, atol=0)
    assert torch.equal(ops.int8_mm(a, b.t()).long(), exact_mm(a, b.t()))


@pytest.mark.parametrize("layout", ["a_transposed", "b_col_major", "sliced", "offset", "expanded"])
def test_int8_mm_any_strides(layout):
    m, k, n = 70, 96, 50
    a = randint8((m, k), 3).cuda()
    b = randint8((k, n), 4).cuda()
    if layout == "a_transposed":
        a = a.t().contiguous().t()
    elif layout == "b_col_major":
        b = b.t().contiguous().t()
    elif layout == "sliced":
        a = randint8((m, 2 * k), 5).cuda()[:, ::2]
        b = randint8((2 * k, n + 3), 6).cuda()[1::2, 3:]
    elif layout == "offset":
        a = randint8((m * k + 1,), 7).cuda()[1:].view(m, k)
    elif layout == "expanded":
        a = randint8((1, k), 8).cuda().expand(m, k)
    assert torch.equal(ops.int8_mm(a, b).long(), exact_mm(a, b))


def test_int8_mm_empty_and_k0():
    assert ops.int8_mm(torch.empty(0, 5, dtype=torch.int8, device="cuda"),
                       torch.empty(5, 3, dtype=torch.int8, device="cuda")).shape == (0, 3)
    out = ops.int8_mm(torch.empty(4, 0, dtype=torch.int8, device="cuda"),
                      torch.empty(0, 3, dtype=torch.int8, device="cuda"))
    assert out.shape == (4, 3) and not out.any()


def test_int8_mm_rejects_bad_input():
    a = torch.zeros(4, 8, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="int8_mm: a and b must be int8"):
        ops.int8_mm(a.float(), a.t())
    with pytest.raises(RuntimeError, match="inner sizes differ"):
        ops.int8_mm(a, a)
    with pytest.raises(RuntimeError, match="same CUDA device"):
        ops.int8_mm(a, a.t().cpu())


# ---------------------------------------------------------------------------------------------------------------
# int8_linear and int8_conv2d: CUDA vs CPU kernel vs float64 reference
# ---------------------------------------------------------------------------------------------------------------

def linear_reference(x_q, x_scale, x_zp, w, w_scale, bias):
    acc = (x_q.double() - x_zp) @ w.double().t()
    y = acc * x_scale.double().reshape(-1, 1) * w_scale.double()
    return y if bias is None else y + bias.double()


def linear_inputs(m, k, n, x_dtype, per_token, with_bias, seed):
    x_q = randint8((m, k), seed, dtype=x_dtype)
    x_zp = 0 if x_dtype == torch.int8 else 128
    w = randint8((n, k), seed + 1)
    x_scale = torch.rand(m if per_token else 1, generator=gen(seed + 2)) * 0.1 + 0.01
    w_scale = torch.rand(n, generator=gen(seed + 3)) * 0.01 + 0.001
    bias = torch.randn(n, generator=gen(seed + 4)) if with_bias else None
    return x_q, x_scale, x_zp, w, w_scale, bias


def run_linear(device, x_q, x_scale, x_zp, w, w_scale, bias, out_dtype, out_scale=None, out_zp=0):
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    w_packed = ops.pack_int8_weight(dev(w))
    w_sum = dev(w.int().sum(1, dtype=torch.int32))
    return ops.int8_linear(dev(x_q), dev(x_scale), x_zp, w_packed, w_sum, dev(w_scale), dev(bias), w.shape[0],
                           out_dtype, out_scale, out_zp)


@pytest.mark.parametrize("m", [1, 5, 16, 17, 300])
@pytest.mark.parametrize("k,n", [(7, 3), (64, 64), (200, 130), (1024, 257)])
@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("per_token,with_bias", [(True, True), (False, False)])
def test_int8_linear_float_out(m, k, n, x_dtype, per_token, with_bias):
    args = linear_inputs(m, k, n, x_dtype, per_token, with_bias, m + k + n)
    ref = linear_reference(*args)
    cpu = run_linear("cpu", *args, torch.float32)
    for out_dtype, tol in [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]:
        y = run_linear("cuda", *args, out_dtype)
        assert y.dtype == out_dtype and y.shape == (m, n)
        torch.testing.assert_close(y.double().cpu(), ref, rtol=tol, atol=tol)
        if out_dtype == torch.float32:  # the CPU epilogue may fuse a multiply-add: an ulp of the product apart
            torch.testing.assert_close(y.cpu(), cpu, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("out_dtype,out_zp", [(torch.int8, -5), (torch.uint8, 128)])
def test_int8_linear_requantized_matches_cpu(m, out_dtype, out_zp):
    args = linear_inputs(m, 96, 72, torch.uint8, True, True, 21)
    cpu = run_linear("cpu", *args, out_dtype, 0.5, out_zp)
    cuda = run_linear("cuda", *args, out_dtype, 0.5, out_zp).cpu()
    assert cuda.dtype == out_dtype
    assert (cpu.int() - cuda.int()).abs().max().item() <= 1  # same float math; allow one rounding step
    assert (cpu != cuda).float().mean().item() < 1e-3


def test_int8_linear_batched_input_and_bf16_bias():
    x_q, x_scale, x_zp, w, w_scale, bias = linear_inputs(24, 80, 48, torch.int8, True, True, 31)
    y = run_linear("cuda", x_q.view(2, 3, 4, 80), x_scale, x_zp, w, w_scale, bias.bfloat16(), torch.float32)
    ref = linear_reference(x_q, x_scale, x_zp, w, w_scale, bias.bfloat16().float())
    assert y.shape == (2, 3, 4, 48)
    torch.testing.assert_close(y.reshape(24, 48).double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 16, 1024])
def test_dynamic_int8_linear_close_to_float(m):
    k, n = 4096, 1024
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    w_scale = w.abs().amax(1) / 127
    w_q = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    x_q, x_scale = ops.quantize_per_token(x, 8)
    y = ops.int8_linear(x_q, x_scale, 0, ops.pack_int8_weight(w_q), w_q.int().sum(1, dtype=torch.int32), w_scale,
                        None, n, torch.bfloat16, None, 0)
    ref = F.linear(x.float(), w)
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def conv_reference(x_q, x_scale, x_zp, w, w_scale, bias, stride, padding, dilation, groups):
    y = F.conv2d(x_q.double() - x_zp, w.double(), None, stride, padding, dilation, groups)
    y = y * x_scale.double().item() * w_scale.double().view(1, -1, 1, 1)
    return y if bias is None else y + bias.double().view(1, -1, 1, 1)


def run_conv(device, x_q, x_scale, x_zp, w, w_scale, bias, stride, padding, dilation, groups, out_dtype):
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    oc, _, kh, kw = w.shape
    w_packed = pack_conv_weight(dev(w), groups)
    w_sum = dev(w.int().sum((1, 2, 3), dtype=torch.int32))
    return ops.int8_conv2d(dev(x_q), dev(x_scale), x_zp, w_packed, w_sum, dev(w_scale), dev(bias), oc, [kh, kw],
                           list(stride), list(padding), list(dilation), groups, out_dtype)


CONV_CASES = [
    # (B, C, H, W, OC, k, stride, padding, dilation, groups)
    (2, 3, 13, 11, 8, 3, 1, 1, 1, 1),
    (2, 16, 9, 9, 32, 1, 1, 0, 1, 1),    # pointwise: the input read in place
    (1, 32, 10, 7, 64, 1, 2, 0, 1, 1),   # strided 1x1
    (2, 32, 8, 8, 32, 3, 2, 1, 1, 2),    # grouped, 16-byte im2col
    (1, 24, 9, 9, 24, 3, 1, 1, 1, 24),   # depthwise
    (1, 20, 12, 12, 10, 3, 1, 2, 2, 1),  # dilated, byte im2col
    (32, 64, 14, 14, 64, 3, 1, 1, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
def test_int8_conv2d_matches_cpu_and_reference(case, x_dtype):
    b, c, h, w_, oc, k, stride, padding, dilation, groups = case
    seed = sum(case)
    x_q = randint8((b, c, h, w_), seed, dtype=x_dtype)
    x_zp = 3 if x_dtype == torch.int8 else 120
    w = randint8((oc, c // groups, k, k), seed + 1)
    x_scale = torch.tensor([0.03])
    w_scale = torch.rand(oc, generator=gen(seed + 2)) * 0.01 + 0.001
    bias = torch.randn(oc, generator=gen(seed + 3))
    geo = ((stride,) * 2, (padding,) * 2, (dilation,) * 2, groups)
    ref = conv_reference(x_q, x_scale, x_zp, w, w_scale, bias, *geo)
    cpu = run_conv("cpu", x_q, x_scale, x_zp, w, w_scale, bias, *geo, torch.float32)
    y = run_conv("cuda", x_q, x_scale, x_zp, w, w_scale, bias, *geo, torch.float32)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.cpu(), cpu, rtol=1e-5, atol=1e-4)
    y16 = run_conv("cuda", x_q.contiguous(memory_format=torch.channels_last), x_scale, x_zp, w, w_scale, None, *geo,
                   torch.bfloat16)
    ref16 = conv_reference(x_q, x_scale, x_zp, w, w_scale, None, *geo)
    torch.testing.assert_close(y16.double().cpu(), ref16, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# Streams and devices
# ---------------------------------------------------------------------------------------------------------------

def test_kernels_run_on_the_current_stream():
    side = torch.cuda.Stream()
    a = randint8((300, 512), 41).cuda()
    b = randint8((512, 200), 42).cuda()
    x = torch.randn(1 << 20, device="cuda")
    scale = torch.tensor([0.1], device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        # a long kernel first, so a kernel wrongly queued on the default stream would read unfinished inputs
        a2 = (a.float() * 1).to(torch.int8)
        out = ops.int8_mm(a2, b)
        q = ops.quantize(x * 2, scale, torch.zeros(1, dtype=torch.int32, device="cuda"), None, 8, True, "nearest")
        q_tok, _ = ops.quantize_per_token(x.view(256, -1) * 2, 8)
    side.synchronize()
    assert torch.equal(out.long(), exact_mm(a, b))
    assert torch.equal(q, torch.clamp(torch.round((x * 2) * (1 / scale)), -128, 127).to(torch.int8))
    assert q_tok.shape == (256, 4096)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_device_guard_second_gpu():
    a = randint8((64, 128), 51).to("cuda:1")
    b = randint8((128, 48), 52).to("cuda:1")
    with torch.cuda.device(0):
        out = ops.int8_mm(a, b)
        q = ops.quantize(a.float(), torch.tensor([0.5], device="cuda:1"),
                         torch.zeros(1, dtype=torch.int32, device="cuda:1"), None, 8, True, "nearest")
    assert out.device == a.device and q.device == a.device
    assert torch.equal(out.long(), exact_mm(a, b))
