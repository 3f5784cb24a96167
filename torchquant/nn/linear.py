"""QuantLinear: a drop-in nn.Linear that trains with fake quantization and runs on int8 kernels once converted."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.compiler import is_dynamo_compiling

from torchquant import _C
from torchquant import functional as F_q
from torchquant._ops import FLOAT_DTYPES, ops
from torchquant._ops.gemm import GELU_APPROXIMATE
from torchquant.nn.base import QuantLayerBase, warn_if_gradient_cut


def is_conv1d_type(cls: type) -> bool:
    """Whether cls is Hugging Face transformers' Conv1D (the projections of GPT-2 and OpenAI GPT): a linear layer
    x @ weight + bias whose weight is stored [in_features, out_features]. Known by its name, so that torchquant need
    not import transformers."""
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


def is_conv1d_linear(module) -> bool:
    """Whether module is a transformers Conv1D (is_conv1d_type)."""
    return is_conv1d_type(type(module))


class QuantLinear(QuantLayerBase):
    """nn.Linear(in_features, out_features, bias) quantized per `config` (a QuantConfig or a preset name;
    default int8-dynamic). Same parameters and initialisation as nn.Linear. Made from a transformers Conv1D
    (from_float), it keeps that layer's weight parameter, [in_features, out_features] (weight_transposed)."""

    FLOAT_TYPE = nn.Linear
    PER_TOKEN_INPUT = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config=None, *, device=None,
                 dtype=None):
        super().__init__()
        float_layer = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = float_layer.weight
        self.bias = float_layer.bias
        self._init_quant(config)
        # "gelu" / "gelu_tanh": torch.nn.functional.gelu (approximate "none" / "tanh") of the output, computed by the
        # kernel's epilogue (fuse_activation: convert() fuses the GELU module that followed the layer), and that
        # module's name in the model, where an nn.Identity now stands
        self.fused_activation = None
        self.fused_activation_module = None

    @classmethod
    def replaces(cls, module: nn.Module) -> bool:
        return type(module) is nn.Linear or is_conv1d_linear(module)

    @classmethod
    def _float_type_names(cls) -> str:
        return "Linear or transformers Conv1D"

    @classmethod
    def _like(cls, linear: nn.Module, config, device):
        transposed = is_conv1d_linear(linear)
        in_features, out_features = linear.weight.shape if transposed else (linear.in_features, linear.out_features)
        layer = cls(in_features, out_features, linear.bias is not None, config, device=device,
                    dtype=linear.weight.dtype)
        if transposed:
            layer.weight_transposed = True
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A converted int8-dynamic layer is one kernel call. Its input checks are inlined here (in C++ when eager)
        # because the method calls of the general path cost as much as the kernel for a few tokens (a transformer at
        # batch 1). Any input that fails them takes the general path, which raises the precise error.
        if self.converted and self.fused and self.clamp_min is None and self.clamp_max is None:
            if self.folded_bn is not None:
                self._check_folded_input(x)
            if not is_dynamo_compiling():
                self._repack_if_written()
                y = _C.int8_linear_dynamic(x, self.in_features, *self._kernel_args, self.fused_activation)
                if y is not NotImplemented:
                    if x.requires_grad:
                        warn_if_gradient_cut(type(self).__name__, x)
                    return y
            elif (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == self.in_features
                  and x.dtype in FLOAT_DTYPES and x.device == self._device):
                return self._fused_forward(x)
        return super().forward(x)

    def fuse_activation(self, form: str, module_name: str | None = None) -> None:
        """Makes the layer's output gelu(y) (form "gelu", or "gelu_tanh" for approximate="tanh"), computed by the
        int8-dynamic kernel: a converted layer whose input is quantized per token to 8 bits only. module_name: the
        GELU module this replaces in the model (recorded for save and load)."""
        if form not in GELU_APPROXIMATE:
            raise ValueError(f"QuantLinear.fuse_activation: form must be 'gelu' or 'gelu_tanh', got {form!r}")
        if not (self.converted and self.fused and self.clamp_min is None and self.clamp_max is None):
            raise ValueError("QuantLinear.fuse_activation: the layer must be converted, quantize its input per token "
                             "to 8 bits (int8-dynamic) and have no activation clamp")
        self.fused_activation = form
        self.fused_activation_module = module_name

    def _float_op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuantLinear: input must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input must have shape [..., {self.in_features}], got {list(x.shape)}")

    def _pack(self, w_int8: torch.Tensor) -> torch.Tensor:
        return F_q.pack_int8_weight(w_int8)

    @staticmethod
    def fuses_input_quantize(activation) -> bool:
        """Whether a QuantLinear with this activation spec quantizes its input inside the int8-dynamic kernel
        (8-bit per token, rounded to nearest), the kernel that also computes a fused GELU."""
        return (activation is not None and activation.dynamic and activation.granularity == "per_token"
                and activation.bits == 8 and activation.rounding == "nearest")

    def _has_fused_forward(self) -> bool:
        return self.fuses_input_quantize(self.config.activation)

    def _input_features(self) -> int:
        return self.in_features

    def _int_op_args(self) -> tuple:
        return (self.w_sum, self.weight_scale, self._kernel_bias(), self.out_features)

    def _fused_forward(self, x):
        if self.fused_activation is None:
            return ops.int8_linear_dynamic(x, *self._op_args())
        return ops.int8_linear_dynamic.activation(x, *self._op_args(), self.fused_activation)

    def _int_op(self, x_q, x_scale, x_zero_point, out_dtype, out_scale=None, out_zero_point=0, out_bits=8):
        # the kernel takes any leading dims of x_q, with x_scale [1] or one per row
        return ops.int8_linear(x_q, x_scale, x_zero_point, *self._op_args(), out_dtype, out_scale, out_zero_point,
                               self.clamp_min, self.clamp_max, out_bits)

    def _shape_repr(self) -> str:
        transposed = ", weight_transposed=True" if self.weight_transposed else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f"{transposed}")

    def extra_repr(self) -> str:
        if self.fused_activation is None:
            return super().extra_repr()
        replaced = "" if self.fused_activation_module is None else f" (was {self.fused_activation_module})"
        return f"{super().extra_repr()}, fused {self.fused_activation}{replaced}"
