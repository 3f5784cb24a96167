"""The Hopper wgmma GEMM kernel (csrc/cuda/gemm_sm90.cu), chosen with TORCHQUANT_CUDA_GEMM=wgmma.

The tile tails and strided operands are checked in test_cuda_cutlass.py, for this kernel and CUTLASS; the fused
epilogues (float and requantized outputs, int8 and uint8 activations, grouped convolutions) must give the very bytes
of the mma.sync kernel. These tests need a compute capability 9.0 GPU (the kernel exists nowhere else);
benchmarks/gpu_check.sh also runs the GEMM, linear and conv cases of test_cuda.py and test_gemm.py under
TORCHQUANT_CUDA_GEMM=wgmma.
"""
import pytest
import torch
import torch.nn.functional as F

import torchquant
from torchquant._ops import FLOAT_DTYPES, ops
from torchquant._ops.gemm import pack_conv_weight

from conftest import exact_mm, int8_linear_case, randint8

CUDA = torch.cuda.is_available() and torchquant.has_cuda_kernels()
HOPPER = CUDA and torch.cuda.get_device_capability() == (9, 0)
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device or CUDA kernels not built")
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the wgmma kernel needs a compute capability 9.0 GPU")
pytestmark = pytest.mark.cuda

GEMM_VARIABLE = "TORCHQUANT_CUDA_GEMM"


def with_kernel(monkeypatch, kernel, fn, *args):
    monkeypatch.setenv(GEMM_VARIABLE, kernel)
    return fn(*args)


def both_kernels(monkeypatch, fn, *args):
    """fn(*args) under the mma.sync kernel and under the wgmma kernel."""
    return with_kernel(monkeypatch, "mma", fn, *args), with_kernel(monkeypatch, "wgmma", fn, *args)


@needs_hopper
def test_wgmma_kernel_is_the_one_running(monkeypatch):
    a, b = randint8((300, 256), 1, device="cuda"), randint8((256, 300), 2, device="cuda")

    def kernels_run(kernel):
        monkeypatch.setenv(GEMM_VARIABLE, kernel)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ops.int8_mm(a, b)
            torch.cuda.synchronize()
        return " ".join(event.key for event in prof.key_averages())

    assert "gemm_wgmma_kernel" in kernels_run("wgmma"), (
        "TORCHQUANT_CUDA_GEMM=wgmma did not run the wgmma kernel: was the extension built with 9.0 in "
        "TORCH_CUDA_ARCH_LIST (setup.py then builds sm_90a)?")
    assert "gemm_wgmma_kernel" not in kernels_run("mma")


@needs_hopper
def test_int8_mm_large_matches_torch_int_mm(monkeypatch):
    a, b = randint8((2048, 4096), 8, device="cuda"), randint8((4096, 1536), 9, device="cuda")
    out = with_kernel(monkeypatch, "wgmma", ops.int8_mm, a, b.t().contiguous().t())
    torch.testing.assert_close(out, torch._int_mm(a, b), rtol=0, atol=0)


@needs_hopper
@pytest.mark.parametrize("m,k,n", [(17, 64, 72), (300, 200, 130), (1024, 1024, 520), (40, 4112, 600)])
@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("per_token,with_bias", [(True, True), (False, False)])
def test_int8_linear_identical_to_mma(monkeypatch, m, k, n, x_dtype, per_token, with_bias):
    args, _ = int8_linear_case(m, k, n, x_dtype, per_token, with_bias, m + k + n)
    outputs = [(out_dtype, None, 0) for out_dtype in FLOAT_DTYPES]
    outputs += [(torch.int8, 0.5, -5), (torch.uint8, 0.25, 128)]
    for out_dtype, out_scale, out_zp in outputs:
        mma, wgmma = both_kernels(monkeypatch, ops.int8_linear, *args, out_dtype, out_scale, out_zp)
        assert wgmma.dtype == out_dtype and wgmma.shape == (m, n)
        assert torch.equal(mma, wgmma), f"{out_dtype} M={m} K={k} N={n}"


@needs_hopper
@pytest.mark.parametrize("groups,channels,out_channels", [(1, 64, 300), (2, 64, 64), (32, 32, 32)])
@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
def test_int8_conv2d_identical_to_mma(monkeypatch, groups, channels, out_channels, x_dtype):
    """Grouped GEMMs (group offsets into A and B, output columns g * N + n) and uint8 activations."""
    x_q = randint8((4, channels, 12, 12), groups + channels, dtype=x_dtype, device="cuda")
    x_q = x_q.contiguous(memory_format=torch.channels_last)
    w = randint8((out_channels, channels // groups, 3, 3), out_channels, device="cuda")
    packed = pack_conv_weight(w, groups)
    w_sum = w.int().sum((1, 2, 3), dtype=torch.int32)
    x_scale = torch.tensor([0.02], device="cuda")
    w_scale = torch.rand(out_channels, device="cuda") * 0.01 + 0.001
    bias = torch.randn(out_channels, device="cuda")
    x_zp = 3 if x_dtype == torch.int8 else 120
    mma, wgmma = both_kernels(monkeypatch, ops.int8_conv2d, x_q, x_scale, x_zp, packed, w_sum, w_scale, bias,
                              out_channels, [3, 3], [1, 1], [1, 1], [1, 1], groups, torch.float32)
    assert torch.equal(mma, wgmma)
    ref = F.conv2d(x_q.cpu().double() - x_zp, w.cpu().double(), None, 1, 1, 1, groups)
    ref = ref * 0.02 * w_scale.cpu().double().view(1, -1, 1, 1) + bias.cpu().double().view(1, -1, 1, 1)
    torch.testing.assert_close(wgmma.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_gemm_variable_rejects_unknown_kernels(monkeypatch):
    """Checked on every GEMM call, on any GPU and shape (not only where wgmma or CUTLASS could run)."""
    a = randint8((4, 32), 10, device="cuda")
    for value in ["wmma", "WGMMA", "auto"]:
        monkeypatch.setenv(GEMM_VARIABLE, value)
        with pytest.raises(RuntimeError, match=rf"TORCHQUANT_CUDA_GEMM must be cutlass, mma or wgmma \(or unset: the "
                                               rf"automatic choice\), got '{value}'"):
            ops.int8_mm(a, a.t())
    for value in ["", "cutlass", "mma", "wgmma"]:
        monkeypatch.setenv(GEMM_VARIABLE, value)
        assert torch.equal(ops.int8_mm(a, a.t()).long(), exact_mm(a, a.t()))
