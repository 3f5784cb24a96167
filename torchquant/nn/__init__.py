"""Quantized layers: drop-in QuantLinear, QuantConv2d and QuantConv1d (fake-quant for training, integer kernels once
converted), and QuantMultiheadAttention, whose projections are QuantLinear layers."""
from torchquant.nn.attention import QuantMultiheadAttention  # noqa: F401
from torchquant.nn.conv import QuantConv1d, QuantConv2d  # noqa: F401
from torchquant.nn.linear import QuantLinear  # noqa: F401

__all__ = ["QuantLinear", "QuantConv2d", "QuantConv1d", "QuantMultiheadAttention"]
