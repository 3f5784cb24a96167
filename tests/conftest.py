import contextlib
import os

import pytest
import torch

import torchquant
from torchquant.timing import num_threads

REQUIRE_CUDA = os.environ.get("TORCHQUANT_REQUIRE_CUDA") == "1"


def cuda_ready() -> bool:
    return torch.cuda.is_available() and torchquant.has_cuda_kernels()


def pytest_sessionstart(session):
    if REQUIRE_CUDA and not cuda_ready():
        pytest.exit(
            f"TORCHQUANT_REQUIRE_CUDA=1 but CUDA is not usable: torch.cuda.is_available()={torch.cuda.is_available()}, "
            f"CUDA kernels registered={torchquant.has_cuda_kernels()}",
            returncode=1,
        )


# Use `device` in any test that should run on both: CUDA cases skip (visibly) without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not cuda_ready(), reason="no CUDA device or CUDA kernels not built")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For modules of tiny models: one CPU thread is as fast alone and far faster on a busy shared machine
    (use with pytestmark = pytest.mark.usefixtures("one_cpu_thread"))."""
    with num_threads(1):
        yield


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the kernel tests (import them: `from conftest import assert_same, randint8`)

# AOTInductor packages of torchquant's ops run on torch 2.13 and newer (torchquant.export.aoti_supported)
requires_aoti = pytest.mark.skipif(not torchquant.export.aoti_supported(),
                                   reason=f"export_aoti needs torch 2.13 or newer, this is {torch.__version__}")


# The CPU instruction-set paths (TORCHQUANT_CPU_ISA), best first
ISAS = ["avx512_amx", "avx512_vnni", "avx2", "scalar"]


@contextlib.contextmanager
def forced_isa(isa: str):
    """The CPU kernels take the `isa` path inside the block."""
    previous = os.environ.get("TORCHQUANT_CPU_ISA")
    os.environ["TORCHQUANT_CPU_ISA"] = isa
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCHQUANT_CPU_ISA"]
        else:
            os.environ["TORCHQUANT_CPU_ISA"] = previous


def cpu_supports(isa: str) -> bool:
    """Whether this CPU can run the `isa` path."""
    with forced_isa(isa):
        try:
            return torchquant.cpu_kernel_path() == isa
        except RuntimeError:
            return False


SUPPORTED_ISAS = [isa for isa in ISAS if cpu_supports(isa)]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Forces one CPU code path for the test (skipped where the CPU lacks it). In a test that also takes the
    `device` fixture, the CUDA cases run once (the first param) with no path forced: the paths are a CPU matter."""
    if "device" in request.fixturenames and request.getfixturevalue("device") != "cpu":
        if request.param != ISAS[0]:
            pytest.skip("instruction-set paths are a CPU matter")
        return None
    if request.param not in SUPPORTED_ISAS:
        pytest.skip(f"this CPU cannot run the {request.param} path")
    monkeypatch.setenv("TORCHQUANT_CPU_ISA", request.param)
    return request.param


def randint8(shape, seed=None, *, dtype=torch.int8, generator=None, device="cpu") -> torch.Tensor:
    """Random int8 (or uint8) values over the whole range, drawn on the CPU (the same values for every device) from
    `generator`, else a generator seeded with `seed`, else torch's global one; then moved to `device`."""
    low, high = (-128, 128) if dtype == torch.int8 else (0, 256)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, tuple(shape), generator=generator, dtype=torch.int16).to(dtype).to(device)


def int8_linear_case(m, k, n, x_dtype, per_token, with_bias, seed, device="cuda"):
    """Random int8_linear arguments up to out_features on `device` (an int8 or uint8 activation, per-token or
    per-tensor scale, optional bias), and the unpacked weight [n, k] on the CPU."""
    from torchquant._ops import ops
    g = torch.Generator().manual_seed(seed)
    x_q = randint8((m, k), seed, dtype=x_dtype, device=device)
    x_zp = 0 if x_dtype == torch.int8 else 113
    w = randint8((n, k), seed + 1, device=device)
    x_scale = (torch.rand(m if per_token else 1, generator=g) * 0.1 + 0.01).to(device)
    w_scale = (torch.rand(n, generator=g) * 0.01 + 0.001).to(device)
    bias = torch.randn(n, generator=g).to(device) if with_bias else None
    args = (x_q, x_scale, x_zp, ops.pack_int8_weight(w), w.int().sum(1, dtype=torch.int32), w_scale, bias, n)
    return args, w.cpu()


def exact_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The int64-exact product of two integer matrices, through float64 on their device: exact while every
    |sum| < 2^53, true for every size the tests use (K <= 2^20 at |products| <= 2^14)."""
    return (a.double() @ b.double()).long()


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise-equal values (NaN equal to NaN), same dtype and shape; tensors on two devices are compared on the
    CPU."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{actual.dtype} {list(actual.shape)} vs {expected.dtype} {list(expected.shape)}"
    if actual.is_floating_point():
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    else:
        assert torch.equal(actual, expected), f"{(actual != expected).sum().item()} of {actual.numel()} elements differ"


def bit_patterns(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers of its element size: equal exactly when the values are bit for bit the same (0.0 and
    -0.0 differ, as do NaNs of another sign or payload)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run_python_child(code: str, timeout: float = 300, args=()) -> str:
    """Runs code in a fresh Python process (with sys.argv[1:] = args) and returns its output. A crash (segfault,
    abort) or any non-zero exit fails the calling test with the output, instead of taking the test process down."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"child process exited with {proc.returncode}:\n{output}"
    return output


@pytest.fixture
def run_in_child():
    """run_python_child, for tests of calls that could crash the process."""
    return run_python_child


def integer_tensors(model, x) -> list:
    """(node name, tensor) of every int8/uint8 tensor a converted integer pipeline (an fx.GraphModule) computes for
    x, in the order it computes them."""
    seen = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if isinstance(out, torch.Tensor) and out.dtype in (torch.int8, torch.uint8):
                seen.append((node.name, out))
            return out

    with torch.no_grad():
        Recorder(model).run(x)
    return seen
