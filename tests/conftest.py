import os

import pytest
import torch

import torchquant

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
