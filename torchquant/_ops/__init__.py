"""The compiled ops (torch.ops.torchquant.*) and their typed Python wrappers.

Importing this package loads torchquant._C, which registers every op schema (csrc/ops.cpp) and the CPU
(and, when built, CUDA) kernels with the dispatcher.
"""
import torch

from torchquant import _C  # noqa: F401  (loading the library registers the ops)

ops = torch.ops.torchquant


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("torchquant::quantize", "CUDA")
