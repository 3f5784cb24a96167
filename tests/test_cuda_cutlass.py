"""The CUTLASS sm_90a GEMMs (csrc/cuda/sm90), the default kernels for M > 16 on a compute capability 9.0 GPU, and the
CUTLASS implicit-GEMM convolution, the default for int8_conv2d there.

Every bucket of the dispatch: both kernel shapes (128x256 tiles when they fill the GPU, 128x128 stream-K below
that, K split over the multiprocessors), odd M, N and K on every tile tail, M = 1 (CUTLASS forced with
TORCHQUANT_CUDA_GEMM=cutlass; the automatic choice keeps the small-M kernel up to M = 16), empty inputs, and the
shapes CUTLASS cannot take (output rows that are not a multiple of 16 bytes, grouped convolutions), which fall back
to mma.sync. int32 results are compared exactly against int64 products and the CPU kernel; the fused epilogues
(fp32/fp16/bf16 and requantized int8/uint8 outputs, int8 and uint8 activations with zero points, per-token and
per-tensor scales, with and without bias) must give the very bytes of the mma.sync kernel's epilogue, whose float
operations they repeat in the same order, and stay within float32 rounding of the float64 reference. The
convolution (ResNet-50's layers and odd shapes, strides, paddings, dilations, every output type, int8 and uint8
activations with zero points) must give the very bytes of the im2col + mma.sync path and of the CPU kernel; the
convolutions it cannot take (groups, channel counts that are not multiples of 16 bytes, TMA im2col's limits) fall
back to that path, as does TORCHQUANT_CUDA_GEMM=mma.
Skipped visibly without a compute capability 9.0 GPU (the kernels exist nowhere else).
"""
import pytest
import torch
import torch.nn.functional as F

import torchquant
from conftest import bit_patterns, exact_mm, int8_linear_case, randint8
from torchquant._ops import ops
from torchquant._ops.gemm import dynamic_int8_linear, pack_conv_weight

CUDA = torch.cuda.is_available() and torchquant.has_cuda_kernels()
HOPPER = CUDA and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HOPPER, reason="the CUTLASS kernels need a compute capability 9.0 GPU")]

GEMM_VARIABLE = "TORCHQUANT_CUDA_GEMM"
CUTLASS_KERNEL = "GemmUniversal"  # in the name of every CUTLASS 3.x kernel (cutlass::device_kernel<GemmUniversal<..>>)


def kernels_run(monkeypatch, kernel, fn, *args):
    """The names of the CUDA kernels fn(*args) launches under TORCHQUANT_CUDA_GEMM=kernel, and its result."""
    monkeypatch.setenv(GEMM_VARIABLE, kernel)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn(*args)
        torch.cuda.synchronize()
    return " ".join(event.key for event in prof.key_averages()), out


def under(monkeypatch, kernel, fn, *args):
    monkeypatch.setenv(GEMM_VARIABLE, kernel)
    return fn(*args)


def assert_same_bits(expected, actual, what=""):
    """Identical bytes (a float compared by its bit pattern: -0.0 is not 0.0, NaN equals the same NaN)."""
    assert expected.dtype == actual.dtype and expected.shape == actual.shape
    differ = (bit_patterns(expected) != bit_patterns(actual)).sum().item()
    assert differ == 0, f"{what}: {differ} of {expected.numel()} elements differ"


def assert_float32_rounding(actual, exact, magnitude):
    """actual (float32) within a few float32 roundings of the float64 value `exact`, whose terms add up to
    `magnitude` in absolute value (the error bound scales with the terms, not with their possibly cancelling sum)."""
    error = (actual.cpu().double() - exact).abs()
    bound = 4 * 2.0 ** -24 * magnitude
    assert (error <= bound).all(), f"max error / bound: {(error / bound.clamp_min(1e-300)).max().item():.3g}"


# ---------------------------------------------------------------------------------------------------------------
# int8_mm
# ---------------------------------------------------------------------------------------------------------------

def test_cutlass_is_the_default_above_16_rows(monkeypatch):
    a, b = randint8((300, 256), 1, device="cuda"), randint8((256, 320), 2, device="cuda")
    names, out = kernels_run(monkeypatch, "", ops.int8_mm, a, b)
    assert CUTLASS_KERNEL in names, f"the automatic choice did not run CUTLASS: {names}"
    assert torch.equal(out.long(), exact_mm(a, b))
    names, _ = kernels_run(monkeypatch, "mma", ops.int8_mm, a, b)
    assert CUTLASS_KERNEL not in names
    names, _ = kernels_run(monkeypatch, "", ops.int8_mm, a[:16], b)
    assert CUTLASS_KERNEL not in names and "gemm_small_m_kernel" in names
    names, _ = kernels_run(monkeypatch, "cutlass", ops.int8_mm, a[:16], b)
    assert CUTLASS_KERNEL in names


# M, N around the 128 x 128 / 128 x 256 tiles (and the small-M limit 16) and K around the 128-byte k-tile (16: a
# single 16-byte unit; 4112 = 32 * 128 + 16, a last k-tile of one unit, spread over several multiprocessors by
# stream-K, or split-K for wgmma). CUTLASS takes N multiple of 4 (16-byte int32 rows); other N fall back to mma.sync.
TAIL_M = [1, 17, 127, 128, 129, 300]
TAIL_N = [1, 4, 8, 124, 255, 256, 257, 260, 600]


@pytest.mark.parametrize("kernel", ["cutlass", "wgmma"])  # wgmma: the hand-written kernel of gemm_sm90.cu
@pytest.mark.parametrize("k", [16, 48, 144, 4112])
def test_int8_mm_exact_on_every_tail(monkeypatch, kernel, k):
    monkeypatch.setenv(GEMM_VARIABLE, kernel)
    for m in TAIL_M:
        for n in TAIL_N:
            a, b = randint8((m, k), m * 31 + k, device="cuda"), randint8((k, n), n * 17 + k, device="cuda")
            a[0], b[:, -1] = -128, -128  # the largest sums
            out = ops.int8_mm(a, b)
            assert out.dtype == torch.int32 and out.shape == (m, n)
            assert torch.equal(out.long(), exact_mm(a, b)), f"M={m} N={n} K={k}"


@pytest.mark.parametrize("m,k,n", [(4096, 4096, 4096), (2048, 1040, 8192), (8192, 256, 1040)])
def test_int8_mm_large_tiles_match_cpu_and_int_mm(monkeypatch, m, k, n):
    """Grids that fill the GPU (the 128 x 256 cluster kernel), against the CPU kernel and cuBLASLt."""
    a, b = randint8((m, k), m + k, device="cuda"), randint8((k, n), k + n, device="cuda")
    names, out = kernels_run(monkeypatch, "", ops.int8_mm, a, b)
    assert CUTLASS_KERNEL in names
    assert torch.equal(out.cpu(), ops.int8_mm(a.cpu(), b.cpu()))
    assert torch.equal(out, torch._int_mm(a, b))


def test_int8_mm_odd_k_and_unaligned_n_fall_back(monkeypatch):
    """K = 7 is zero-padded to 16 (CUTLASS runs); N = 3 leaves int32 rows of 12 bytes: mma.sync runs."""
    a, b = randint8((40, 7), 3, device="cuda"), randint8((7, 32), 4, device="cuda")
    names, out = kernels_run(monkeypatch, "", ops.int8_mm, a, b)
    assert CUTLASS_KERNEL in names and torch.equal(out.long(), exact_mm(a, b))
    names, out = kernels_run(monkeypatch, "", ops.int8_mm, a, b[:, :3])
    assert CUTLASS_KERNEL not in names and torch.equal(out.long(), exact_mm(a, b[:, :3]))


@pytest.mark.parametrize("kernel", ["cutlass", "wgmma"])  # wgmma: the hand-written kernel of gemm_sm90.cu
@pytest.mark.parametrize("layout", ["a_transposed", "b_row_major", "sliced", "offset"])
def test_int8_mm_any_strides(monkeypatch, kernel, layout):
    m, k, n = 260, 200, 300
    a, b = randint8((m, k), 3, device="cuda"), randint8((k, n), 4, device="cuda")
    if layout == "a_transposed":
        a = a.t().contiguous().t()
    elif layout == "b_row_major":
        b = b.contiguous()
    elif layout == "sliced":
        a = randint8((m, 2 * k), 5, device="cuda")[:, ::2]
        b = randint8((2 * k, n + 3), 6, device="cuda")[1::2, 3:]
    elif layout == "offset":
        a = randint8((m * k + 1,), 7, device="cuda")[1:].view(m, k)
    assert torch.equal(under(monkeypatch, kernel, ops.int8_mm, a, b).long(), exact_mm(a, b))


def test_empty_inputs(monkeypatch):
    monkeypatch.setenv(GEMM_VARIABLE, "cutlass")
    assert ops.int8_mm(randint8((0, 32), 1, device="cuda"), randint8((32, 8), 2, device="cuda")).shape == (0, 8)
    k0 = ops.int8_mm(randint8((5, 0), 1, device="cuda"), randint8((0, 8), 2, device="cuda"))
    assert torch.equal(k0.cpu(), torch.zeros(5, 8, dtype=torch.int32))
    w = ops.pack_int8_weight(randint8((8, 32), 3, device="cuda"))
    out = ops.int8_linear(randint8((0, 32), 4, device="cuda"), torch.ones(1, device="cuda"), 0, w,
                          torch.zeros(8, dtype=torch.int32, device="cuda"), torch.ones(8, device="cuda"), None, 8,
                          torch.bfloat16, None, 0)
    assert out.shape == (0, 8) and out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# int8_linear: the fused epilogues
# ---------------------------------------------------------------------------------------------------------------

OUTPUTS = [(torch.float32, None, 0), (torch.float16, None, 0), (torch.bfloat16, None, 0), (torch.int8, 0.5, -5),
           (torch.uint8, 0.25, 128)]


def linear_reference(args, w):
    """The float64 value of the float epilogue and the magnitude of its terms."""
    x_q, x_scale, x_zp, _, _, w_scale, bias, _ = args
    y = (x_q.cpu().double() - x_zp) @ w.double().t() * x_scale.cpu().double().reshape(-1, 1) * w_scale.cpu().double()
    if bias is None:
        return y, y.abs()
    return y + bias.cpu().double(), y.abs() + bias.cpu().double().abs()


# (M, K, N), N a multiple of 16 so that every output type's rows are multiples of 16 bytes: stream-K with K spread
# over the GPU (40 x 4112 x 608), odd M and K, N = 16 (int8 rows of exactly 16 bytes), N tails of the 128 x 128 and
# 128 x 256 tiles, the 128 x 256 kernel (2048 x 1024 x 2560 fills 132 multiprocessors), batch 1 (CUTLASS forced)
LINEAR_SHAPES = [(1, 64, 64), (17, 72, 16), (300, 200, 144), (40, 4112, 608), (1024, 1024, 528), (2048, 1024, 2560)]


@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("per_token,with_bias", [(True, True), (False, False), (True, False)])
def test_int8_linear_identical_to_mma(monkeypatch, m, k, n, x_dtype, per_token, with_bias):
    args, w = int8_linear_case(m, k, n, x_dtype, per_token, with_bias, m + k + n)
    exact, magnitude = linear_reference(args, w)

    def every_output():
        return [ops.int8_linear(*args, out_dtype, out_scale, out_zp) for out_dtype, out_scale, out_zp in OUTPUTS]

    monkeypatch.setenv(GEMM_VARIABLE, "cutlass")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        outputs = every_output()
        torch.cuda.synchronize()
    kernels = {event.key for event in prof.key_averages() if CUTLASS_KERNEL in event.key}
    assert len(kernels) == len(OUTPUTS), f"M={m} K={k} N={n}: {len(kernels)} CUTLASS kernels ran"  # one per dtype
    for (out_dtype, _, _), cutlass, mma in zip(OUTPUTS, outputs, under(monkeypatch, "mma", every_output)):
        assert_same_bits(mma, cutlass, f"{out_dtype} M={m} K={k} N={n}")
        if out_dtype == torch.float32:
            assert_float32_rounding(cutlass, exact, magnitude)


def test_int8_linear_negative_zero_and_nan_pass_through(monkeypatch):
    """Without bias the bias node adds -0.0: -0.0 outputs keep their sign, NaN scales give NaN."""
    x_q = randint8((32, 64), 1, device="cuda")
    x_q[0] = 0
    w = ops.pack_int8_weight(randint8((64, 64), 2, device="cuda"))
    w_sum = torch.zeros(64, dtype=torch.int32, device="cuda")
    x_scale = torch.full((32,), -0.5, device="cuda")
    x_scale[1] = float("nan")
    w_scale = torch.full((64,), 0.01, device="cuda")
    out = under(monkeypatch, "cutlass", ops.int8_linear, x_q, x_scale, 0, w, w_sum, w_scale, None, 64,
                torch.float32, None, 0)
    assert torch.signbit(out[0]).all() and (out[0] == 0).all()  # 0 * -0.5 * 0.01 = -0.0
    assert out[1].isnan().all()
    assert_same_bits(under(monkeypatch, "mma", ops.int8_linear, x_q, x_scale, 0, w, w_sum, w_scale, None, 64,
                           torch.float32, None, 0), out)


def test_int8_linear_unaligned_output_falls_back(monkeypatch):
    """bf16 rows of 130 elements (260 bytes) cannot be stored by TMA: mma.sync runs, with the same results."""
    args, _ = int8_linear_case(64, 96, 130, torch.uint8, True, True, 5)
    names, out = kernels_run(monkeypatch, "cutlass", ops.int8_linear, *args, torch.bfloat16, None, 0)
    assert CUTLASS_KERNEL not in names
    assert_same_bits(under(monkeypatch, "mma", ops.int8_linear, *args, torch.bfloat16, None, 0), out)
    names, out = kernels_run(monkeypatch, "cutlass", ops.int8_linear, *args, torch.float32, None, 0)
    assert CUTLASS_KERNEL not in names  # fp32 rows of 520 bytes: not a multiple of 16 either


def test_int8_linear_requantized_matches_cpu(monkeypatch):
    args, w = int8_linear_case(200, 96, 80, torch.uint8, True, True, 21)
    cpu_args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args]
    cpu_args[3] = ops.pack_int8_weight(w)
    for out_dtype, out_scale, out_zp in OUTPUTS[3:]:
        cuda = under(monkeypatch, "cutlass", ops.int8_linear, *args, out_dtype, out_scale, out_zp).cpu()
        cpu = ops.int8_linear(*cpu_args, out_dtype, out_scale, out_zp)
        # the CPU epilogue may fuse a multiply-add: a rounding step apart, rarely
        assert (cpu.int() - cuda.int()).abs().max().item() <= 1
        assert (cpu != cuda).float().mean().item() < 1e-3


def test_dynamic_int8_linear_batched(monkeypatch):
    monkeypatch.setenv(GEMM_VARIABLE, "")
    x = torch.randn(4, 75, 384, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, 384, device="cuda") * 0.05
    w_scale = w.abs().amax(1) / 127
    w_q = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    bias = torch.randn(1536, device="cuda")
    y = dynamic_int8_linear(x, ops.pack_int8_weight(w_q), w_q.sum(1, dtype=torch.int32), w_scale, bias,
                            out_features=1536)
    assert y.shape == (4, 75, 1536) and y.dtype == torch.bfloat16
    ref = F.linear(x.float(), w_q.float() * w_scale[:, None], bias)
    cos = F.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0)
    assert cos.item() > 0.999


# ---------------------------------------------------------------------------------------------------------------
# int8_conv2d: the CUTLASS implicit-GEMM convolution
# ---------------------------------------------------------------------------------------------------------------

CONV_KERNEL = "ConvUniversal"  # in the name of the CUTLASS conv kernel (cutlass::device_kernel<ConvUniversal<..>>)
IM2COL_KERNEL = "im2col_nhwc"  # im2col_nhwc_kernel, im2col_nhwc_rows_kernel


def conv_case(b, c, hw, oc, kernel, x_dtype, x_zp, with_bias, seed):
    """int8_conv2d's tensor arguments on the GPU (a channels-last input) and the int8 weight [OC, C, KH, KW]."""
    gen = torch.Generator().manual_seed(seed)
    x_q = randint8((b, c, *hw), generator=gen, dtype=x_dtype, device="cuda")
    x_q = x_q.contiguous(memory_format=torch.channels_last)
    w = randint8((oc, c, *kernel), generator=gen, device="cuda")
    x_scale = torch.tensor([0.02], device="cuda")
    w_scale = (torch.rand(oc, generator=gen) * 0.01 + 0.001).cuda()
    bias = torch.randn(oc, generator=gen).cuda() if with_bias else None
    args = (x_q, x_scale, x_zp, pack_conv_weight(w), w.int().sum((1, 2, 3), dtype=torch.int32), w_scale, bias, oc)
    return args, w


def on_cpu(args, w, groups=1):
    """int8_conv2d's tensor arguments moved to the CPU, the weight w packed there."""
    return tuple(pack_conv_weight(w.cpu(), groups) if i == 3 else (t.cpu() if isinstance(t, torch.Tensor) else t)
                 for i, t in enumerate(args))


def cutlass_takes(c, oc, out_dtype, stride=(1, 1)):
    """Whether the CUTLASS conv takes a 1-group conv: 16-byte input pixels, 16-byte output pixels, strides <= 8."""
    return c % 16 == 0 and oc * torch.empty(0, dtype=out_dtype).element_size() % 16 == 0 and max(stride) <= 8


# (B, C, (H, W), OC, (KH, KW), stride, padding, dilation). ResNet-50's layers at batch 1-2 (the bottleneck 1x1s, the
# 3x3s of every stage, the strided 3x3 and 1x1 downsamples), then odd ones: C = 16, 48 (a part of the 64-channel
# k-tile) and 80 (a full and a partial k-tile per tap), odd and non-square images and kernels, unequal strides,
# paddings and dilations, a kernel as large as the padded image (one output pixel), OC = 8 (16-byte bf16 pixels,
# fp32/int8 fall back), OC not a multiple of the 64-channel tile.
RESNET50_CONVS = [
    (1, 64, (56, 56), 64, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 64, (56, 56), 256, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 256, (56, 56), 64, (1, 1), (1, 1), (0, 0), (1, 1)),
    (1, 128, (56, 56), 128, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 512, (28, 28), 1024, (1, 1), (2, 2), (0, 0), (1, 1)),
    (2, 128, (28, 28), 128, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 256, (14, 14), 256, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 512, (7, 7), 512, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 512, (7, 7), 2048, (1, 1), (1, 1), (0, 0), (1, 1)),
]
ODD_CONVS = [
    (3, 16, (9, 11), 48, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 48, (13, 17), 32, (3, 1), (2, 1), (1, 0), (1, 1)),
    (2, 80, (10, 10), 40, (1, 5), (1, 1), (0, 2), (1, 2)),
    (1, 32, (15, 15), 64, (3, 3), (3, 3), (2, 2), (2, 2)),
    (2, 64, (7, 5), 16, (7, 5), (1, 1), (3, 2), (1, 1)),
    (1, 64, (5, 5), 200, (5, 5), (1, 1), (0, 0), (1, 1)),
    (4, 32, (12, 12), 8, (3, 3), (1, 2), (2, 1), (3, 1)),
]
# (activation dtype, zero point): a nonzero zero point with padding pads the input with it before the CUTLASS conv
ACTIVATIONS = [(torch.int8, 0), (torch.uint8, 131)]


@pytest.mark.parametrize("case", RESNET50_CONVS + ODD_CONVS)
@pytest.mark.parametrize("x_dtype,x_zp", ACTIVATIONS)
def test_int8_conv2d_cutlass_identical_to_mma_and_cpu(monkeypatch, case, x_dtype, x_zp):
    b, c, hw, oc, kernel, stride, padding, dilation = case
    seed = b * c + oc + sum(kernel) + sum(stride) + sum(padding) + sum(dilation) + x_zp
    args, w = conv_case(b, c, hw, oc, kernel, x_dtype, x_zp, seed % 2 == 0, seed)
    geometry = (list(kernel), list(stride), list(padding), list(dilation), 1)

    def every_output(conv_args):
        return [ops.int8_conv2d(*conv_args, *geometry, out_dtype, out_scale, out_zp)
                for out_dtype, out_scale, out_zp in OUTPUTS]

    monkeypatch.setenv(GEMM_VARIABLE, "")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        outputs = every_output(args)
        torch.cuda.synchronize()
    kernels = {event.key for event in prof.key_averages() if CONV_KERNEL in event.key}  # one per (input, output) type
    takes = [cutlass_takes(c, oc, out_dtype, stride) for out_dtype, _, _ in OUTPUTS]
    assert len(kernels) == sum(takes), f"{case}: CUTLASS conv expected for {takes}, ran {len(kernels)} kernels"
    for (out_dtype, _, _), cutlass, mma, cpu in zip(OUTPUTS, outputs, under(monkeypatch, "mma", every_output, args),
                                                    every_output(on_cpu(args, w))):
        assert cutlass.is_contiguous(memory_format=torch.channels_last)
        assert_same_bits(mma, cutlass, f"{case} {out_dtype} vs mma.sync")
        assert_same_bits(cpu, cutlass.cpu(), f"{case} {out_dtype} vs CPU")


@pytest.mark.parametrize("x_dtype,x_zp", [(torch.int8, -7), (torch.uint8, 0), (torch.uint8, 255)])
@pytest.mark.parametrize("padding", [(1, 1), (0, 2), (0, 0)])
def test_int8_conv2d_cutlass_zero_points(monkeypatch, x_dtype, x_zp, padding):
    """Taps outside the image count as the zero point (x - zero point = 0 there), on every path: with a nonzero
    zero point and padding the input is padded explicitly, without either TMA's zero fill is right."""
    args, w = conv_case(2, 32, (9, 9), 64, (3, 3), x_dtype, x_zp, True, 7 + x_zp)
    geometry = ([3, 3], [1, 1], list(padding), [1, 1], 1)
    names, out = kernels_run(monkeypatch, "", ops.int8_conv2d, *args, *geometry, torch.float32)
    assert CONV_KERNEL in names
    assert_same_bits(under(monkeypatch, "mma", ops.int8_conv2d, *args, *geometry, torch.float32), out)
    assert_same_bits(ops.int8_conv2d(*on_cpu(args, w), *geometry, torch.float32), out.cpu())
    x_q, _, _, _, _, w_scale, bias, _ = args
    core = F.conv2d(x_q.cpu().double() - x_zp, w.cpu().double(), None, 1, padding) * 0.02
    core = core * w_scale.cpu().double().view(1, -1, 1, 1)
    b = bias.cpu().double().view(1, -1, 1, 1)
    assert_float32_rounding(out, core + b, core.abs() + b.abs())


@pytest.mark.parametrize("clamp", [(0.0, None), (-0.5, 0.5)])  # a fused ReLU, a two-sided clamp
def test_int8_conv2d_cutlass_fused_clamp(monkeypatch, clamp):
    args, w = conv_case(2, 64, (14, 14), 64, (3, 3), torch.uint8, 131, True, 5)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
    for out_dtype, out_scale, out_zp in OUTPUTS:
        call = (*geometry, out_dtype, out_scale, out_zp, *clamp)
        names, out = kernels_run(monkeypatch, "", ops.int8_conv2d, *args, *call)
        assert CONV_KERNEL in names
        assert_same_bits(under(monkeypatch, "mma", ops.int8_conv2d, *args, *call), out, f"{out_dtype} {clamp}")
        assert_same_bits(ops.int8_conv2d(*on_cpu(args, w), *call), out.cpu(), f"{out_dtype} {clamp} vs CPU")


def test_int8_conv2d_cutlass_negative_zero_and_nan_pass_through(monkeypatch):
    """Without bias the bias node adds -0.0: -0.0 outputs keep their sign; a NaN scale gives NaN, as on mma.sync."""
    args, _ = conv_case(1, 16, (6, 6), 16, (1, 1), torch.int8, 0, False, 3)
    x_q, _, _, packed, w_sum, _, _, oc = args
    x_q[0, :, 0, 0] = 0
    w_scale = torch.full((16,), 0.01, device="cuda")
    w_scale[5] = float("nan")
    geometry = ([1, 1], [1, 1], [0, 0], [1, 1], 1)
    conv_args = (x_q, torch.tensor([-0.5], device="cuda"), 0, packed, w_sum, w_scale, None, oc, *geometry,
                 torch.float32)
    names, out = kernels_run(monkeypatch, "", ops.int8_conv2d, *conv_args)
    assert CONV_KERNEL in names
    zero_pixel = torch.cat([out[0, :5, 0, 0], out[0, 6:, 0, 0]])
    assert torch.signbit(zero_pixel).all() and (zero_pixel == 0).all()  # 0 * -0.5 * 0.01 = -0.0
    assert out[:, 5].isnan().all()
    assert_same_bits(under(monkeypatch, "mma", ops.int8_conv2d, *conv_args), out)


# then: what runs on the im2col rows, the CUTLASS conv as a 1x1 conv ("conv": one group, 16-byte output pixels) or
# the GEMM
@pytest.mark.parametrize("what,b,c,hw,oc,kernel,stride,padding,dilation,groups,out_dtype,then", [
    ("grouped", 2, 64, (10, 10), 64, (3, 3), (1, 1), (1, 1), (1, 1), 2, torch.float32, "gemm"),
    ("3 input channels", 2, 3, (16, 16), 64, (7, 7), (2, 2), (3, 3), (1, 1), 1, torch.bfloat16, "conv"),
    ("the stem, odd image", 3, 3, (23, 17), 64, (7, 7), (2, 2), (3, 3), (1, 1), 1, torch.uint8, "conv"),
    ("5 channels, a row of 48 bytes", 1, 5, (9, 9), 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, "conv"),
    ("40 input channels", 1, 40, (8, 8), 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, "conv"),
    ("grouped, 3 channels a group", 2, 6, (11, 11), 32, (3, 3), (2, 1), (1, 0), (1, 2), 2, torch.float32, "gemm"),
    ("bf16 pixels of 8 bytes", 1, 32, (8, 8), 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.bfloat16, "gemm"),
    ("3 channels, bf16 pixels of 8 bytes", 1, 3, (8, 8), 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.bfloat16, "gemm"),
    ("stride 9", 1, 16, (20, 20), 16, (3, 3), (9, 9), (0, 0), (1, 1), 1, torch.float32, "conv"),
    ("dilation beyond TMA im2col", 1, 16, (150, 12), 16, (3, 1), (1, 1), (0, 0), (70, 1), 1, torch.float32, "conv"),
    ("padding beyond TMA im2col", 1, 16, (4, 4), 16, (1, 1), (1, 1), (300, 0), (1, 1), 1, torch.float32, "conv"),
])
@pytest.mark.parametrize("x_dtype,x_zp", ACTIVATIONS)
def test_int8_conv2d_im2col_paths(monkeypatch, what, b, c, hw, oc, kernel, stride, padding, dilation, groups,
                                  out_dtype, then, x_dtype, x_zp):
    """Convolutions the CUTLASS conv cannot take directly write im2col rows first (taps outside the image read the
    zero point), then run the CUTLASS conv as a 1x1 conv over them where it takes that, else the GEMM; the same
    results as the im2col + mma.sync path and the CPU."""
    gen = torch.Generator().manual_seed(b + c + oc + x_zp)
    x_q = randint8((b, c, *hw), generator=gen, dtype=x_dtype, device="cuda")
    x_q = x_q.contiguous(memory_format=torch.channels_last)
    w = randint8((oc, c // groups, *kernel), generator=gen, device="cuda")
    out_args = (out_dtype, 0.05, 3) if out_dtype == torch.uint8 else (out_dtype,)
    args = (x_q, torch.tensor([0.02], device="cuda"), x_zp, pack_conv_weight(w, groups),
            w.int().sum((1, 2, 3), dtype=torch.int32), torch.full((oc,), 0.01, device="cuda"), None, oc,
            list(kernel), list(stride), list(padding), list(dilation), groups, *out_args)
    names, out = kernels_run(monkeypatch, "", ops.int8_conv2d, *args)
    # a nonzero zero point with padding pads the input explicitly: then the CUTLASS conv takes it without im2col
    direct = what == "padding beyond TMA im2col" and x_zp != 0
    assert (IM2COL_KERNEL in names) != direct, what
    assert (CONV_KERNEL in names) == (then == "conv"), what
    assert_same_bits(under(monkeypatch, "mma", ops.int8_conv2d, *args), out, what)
    assert_same_bits(ops.int8_conv2d(*on_cpu(args[:8], w, groups), *args[8:]), out.cpu(), what)


def test_mma_variable_keeps_the_im2col_path(monkeypatch):
    args, _ = conv_case(2, 64, (14, 14), 64, (3, 3), torch.uint8, 0, True, 11)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
    names, out = kernels_run(monkeypatch, "mma", ops.int8_conv2d, *args, *geometry, torch.bfloat16)
    assert CONV_KERNEL not in names and IM2COL_KERNEL in names and CUTLASS_KERNEL not in names
    names, cutlass = kernels_run(monkeypatch, "cutlass", ops.int8_conv2d, *args, *geometry, torch.bfloat16)
    assert CONV_KERNEL in names and IM2COL_KERNEL not in names
    assert_same_bits(out, cutlass)


def test_converted_convs_stay_channels_last(monkeypatch):
    """A converted conv stack on the GPU: every conv runs the CUTLASS conv on channels-last activations, the
    activations between the layers stay channels-last (no layout copies), and the model's output has the float
    model's layout for its contiguous input (convert's set_conv_layouts: the caller may view it)."""
    monkeypatch.setenv(GEMM_VARIABLE, "")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 128, 3, stride=2, padding=1)).cuda()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    torchquant.quantize_model(model, "int8-static", calibration=[x])
    seen = []
    for layer in model:
        if isinstance(layer, torchquant.nn.QuantConv2d):
            layer.register_forward_hook(lambda mod, inputs, out: seen.append((inputs[0], out)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = model(x)
        torch.cuda.synchronize()
    assert len(seen) == 3
    for inp, _ in seen:
        assert inp.is_contiguous(memory_format=torch.channels_last)
    for _, out in seen[:-1]:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert seen[-1][1] is y and y.is_contiguous()
    launches = [event for event in prof.key_averages() if CONV_KERNEL in event.key]
    assert sum(event.count for event in launches) == 3
    assert not any(IM2COL_KERNEL in event.key for event in prof.key_averages())
