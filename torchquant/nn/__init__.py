"""Quantized layers: drop-in QuantLinear and QuantConv2d (fake-quant for training, integer kernels once converted)."""
from torchquant.nn.conv import QuantConv2d  # noqa: F401
from torchquant.nn.linear import QuantLinear  # noqa: F401

__all__ = ["QuantLinear", "QuantConv2d"]
