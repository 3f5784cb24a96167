"""Tensor-level quantization API: thin, validated wrappers around the compiled torchquant ops."""
from torchquant._ops.gemm import *  # noqa: F401,F403
from torchquant._ops.gemm import __all__ as _gemm_all
from torchquant._ops.quantize import *  # noqa: F401,F403
from torchquant._ops.quantize import __all__ as _quantize_all

__all__ = list(_quantize_all) + list(_gemm_all)
