"""Quantized layers: drop-in QuantLinear, QuantConv2d and QuantConv1d (fake-quant for training, integer kernels once
converted), and QuantMultiheadAttention, whose projections are QuantLinear layers."""
import torch.nn as nn

from torchquant.nn.attention import QuantMultiheadAttention  # noqa: F401
from torchquant.nn.conv import QuantConv1d, QuantConv2d  # noqa: F401
from torchquant.nn.linear import QuantLinear, is_conv1d_linear, is_conv1d_type  # noqa: F401

__all__ = ["QuantLinear", "QuantConv2d", "QuantConv1d", "QuantMultiheadAttention"]

# the float layers prepare swaps, by exact type: subclasses (e.g. the out_proj of nn.MultiheadAttention) may be used
# through their weight directly, which a swapped layer would not see
QUANT_TYPES = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, nn.Conv1d: QuantConv1d}


def quant_type_of(cls: type):
    """The quantized layer type that replaces layers of type cls (a QUANT_TYPES key, or transformers' Conv1D), or
    None."""
    swap_type = QUANT_TYPES.get(cls)
    return QuantLinear if swap_type is None and is_conv1d_type(cls) else swap_type


def quant_type(module: nn.Module):
    """quant_type_of(type(module))."""
    return quant_type_of(type(module))
