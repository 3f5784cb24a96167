"""QuantConv2d / QuantConv1d: drop-in nn.Conv2d / nn.Conv1d that train with fake quantization and run on int8
kernels once converted.

Activations are quantized per tensor (a per_token dynamic spec means per tensor here: the conv kernel takes one
input scale). A converted QuantConv1d runs the 2-D integer conv on its input viewed as [batch, channels, 1, length].
Like nn.Conv2d / nn.Conv1d, the layers also take an unbatched input ([channels, height, width] / [channels, length])
and then return an unbatched output; converted, they run it as a batch of one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from torch.compiler import is_dynamo_compiling

from torchquant import _C
from torchquant import functional as F_q
from torchquant._ops import ops
from torchquant.nn.base import QuantLayerBase, warn_if_gradient_cut


def _explicit_padding(conv: nn.Conv1d | nn.Conv2d, layer_type: str) -> tuple[int, ...]:
    """The float conv's padding (ints or 'valid'/'same') as explicit symmetric padding per spatial dimension."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(f"{layer_type}: padding='same' needs an even dilation * (kernel_size - 1) in each "
                             f"dimension (symmetric padding), got kernel_size={conv.kernel_size}, "
                             f"dilation={conv.dilation}")
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


def contiguous_output(y: torch.Tensor) -> torch.Tensor:
    """y.contiguous() of a conv's channels-last output: on the CPU by the kernels' tile transposes (torch's copy of a
    channels-last float tensor to the contiguous layout runs at a fraction of the memory bandwidth), torch's own
    copy under torch.compile and wherever the transposes decline (other devices, layouts, autograd, modes)."""
    if not is_dynamo_compiling():
        out = _C.contiguous_from_channels_last(y)
        if out is not NotImplemented:
            return out
    return y.contiguous()


class QuantConv2d(QuantLayerBase):
    """nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
    quantized per `config` (a QuantConfig or a preset name; default int8-dynamic). Same parameters and
    initialisation as nn.Conv2d (padding_mode is keyword-only here: `config` comes first). A padding_mode other than
    'zeros' pads the input first (F.pad; converted, the integers, whose reflect / replicate / circular copies are
    the quantized copies) and runs the integer conv without padding."""

    FLOAT_TYPE = nn.Conv2d
    PER_TOKEN_INPUT = False
    padding_mode = "zeros"  # (a class default: a layer pickled before the attribute existed pads with zeros)
    # set_output_memory_format's choice as the C++ entry reads it: None, True (channels-last) or False (contiguous);
    # a torch.memory_format attribute would make torch.save of the model fail (it cannot pickle one)
    _output_channels_last = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, config=None, *, padding_mode: str = "zeros", device=None,
                 dtype=None):
        super().__init__()
        # (nn.Conv2d checks the arguments, padding_mode included, and initialises the weight)
        float_layer = self.FLOAT_TYPE(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                      bias, padding_mode, device=device, dtype=dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = float_layer.kernel_size
        self.stride = float_layer.stride
        self.dilation = float_layer.dilation
        self.padding = _explicit_padding(float_layer, type(self).__name__)
        self.padding_mode = padding_mode
        self.groups = groups
        self.weight = float_layer.weight
        self.bias = float_layer.bias
        self._init_quant(config)

    @classmethod
    def unsupported(cls, conv: nn.Conv1d | nn.Conv2d) -> str | None:
        """Why conv has no quantized form (it then stays float), or None."""
        reason = super().unsupported(conv)
        if reason is not None:
            return reason
        if conv.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
            return "padding='same' with an odd total padding (only symmetric padding is supported)"
        return None

    @classmethod
    def _like(cls, conv: nn.Conv2d, config, device):
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, config, padding_mode=conv.padding_mode, device=device,
                   dtype=conv.weight.dtype)

    @property
    def pads_input(self) -> bool:
        """Whether the input is padded before the conv: a padding_mode other than 'zeros', and some padding."""
        return self.padding_mode != "zeros" and any(self.padding)

    @property
    def kernel_padding(self) -> tuple[int, ...]:
        """The padding the conv kernel itself adds (zeros): none where the input is padded before (_padded)."""
        return (0,) * len(self.padding) if self.pads_input else self.padding

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """x as the kernel reads it: padded by `padding` under padding_mode 'reflect', 'replicate' or 'circular'
        (on float values or on their integers alike: these modes copy values), else x itself."""
        if not self.pads_input:
            return x
        return F.pad(x, [p for p in reversed(self.padding) for _ in range(2)], mode=self.padding_mode)

    def _float_op(self, x, weight, bias):
        return F.conv2d(self._padded(x), weight, bias, self.stride, self.kernel_padding, self.dilation, self.groups)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuantConv2d: input must be a tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"QuantConv2d: input must have shape [batch, {self.in_channels}, height, width] or "
                             f"[{self.in_channels}, height, width], got {list(x.shape)}")

    def _pack(self, w_int8: torch.Tensor) -> torch.Tensor:
        return F_q.pack_conv_weight(w_int8, self.groups)

    def set_output_memory_format(self, memory_format: torch.memory_format | None) -> None:
        """The memory format of the converted conv's output. None (the default): the one nn.Conv2d's output would
        have, channels-last for a channels-last input and contiguous otherwise (one copy of the kernels'
        channels-last output), so that code such as y.view(n, -1) works as with nn.Conv2d. torch.channels_last: the
        kernels' output as it is, for any input (no copy). torch.contiguous_format: always contiguous. convert()
        sets one of the last two on every conv of a model it can trace (torchquant.convert.set_conv_layouts)."""
        if memory_format not in (None, torch.channels_last, torch.contiguous_format):
            raise ValueError(f"{type(self).__name__}.set_output_memory_format: expected None, torch.channels_last "
                             f"or torch.contiguous_format, got {memory_format!r}")
        self._output_channels_last = None if memory_format is None else memory_format == torch.channels_last
        if self.converted:
            self._prepare_forward()

    @property
    def output_memory_format(self) -> torch.memory_format | None:
        """The memory format set_output_memory_format set (None: nn.Conv2d's)."""
        if self._output_channels_last is None:
            return None
        return torch.channels_last if self._output_channels_last else torch.contiguous_format

    def _converted_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super()._converted_forward(x)  # channels-last, as the kernels write it
        # (an unbatched or 1-D conv's output is contiguous: 3-D tensors have no channels-last form)
        keep = self.output_memory_format if x.dim() == 4 else torch.contiguous_format
        if keep is None:  # nn.Conv2d's: its padded input's (circular padding makes a contiguous tensor)
            keep = torch.contiguous_format if self.pads_input and self.padding_mode == "circular" else \
                suggest_memory_format(x)
        return y if keep == torch.channels_last else contiguous_output(y)

    def _quantized_layer_args(self) -> tuple | None:
        args = super()._quantized_layer_args()
        # (the C++ entry pads with zeros only: a padded input runs the Python forward, which pads first)
        return None if args is None or self.pads_input else (*args, self._output_channels_last)

    def _input_features(self) -> int:
        return self.in_channels

    def _int_op_args(self) -> tuple:
        return (self.w_sum, self.weight_scale, self._kernel_bias(), self.out_channels, list(self.kernel_size),
                list(self.stride), list(self.kernel_padding), list(self.dilation), self.groups)

    def _int_op(self, x_q, x_scale, x_zero_point, out_dtype, out_scale=None, out_zero_point=0, out_bits=8):
        return self._padded_int_op(self._padded(x_q), x_scale, x_zero_point, out_dtype, out_scale, out_zero_point,
                                   out_bits)

    def _padded_int_op(self, x_q, x_scale, x_zero_point, out_dtype, out_scale=None, out_zero_point=0, out_bits=8):
        """int8_conv2d on x_q as _padded made it ([batch, channels, height, width] or unbatched)."""
        unbatched = x_q.dim() == 3  # a batch of one
        y = ops.int8_conv2d(x_q.unsqueeze(0) if unbatched else x_q, x_scale, x_zero_point, *self._op_args(),
                            out_dtype, out_scale, out_zero_point, self.clamp_min, self.clamp_max, out_bits)
        return y.squeeze(0) if unbatched else y

    def pipeline_residual_op(self, x_q: torch.Tensor, residual: torch.Tensor, residual_scale: torch.Tensor,
                             residual_zero_point: int, relu: bool, out_dtype: torch.dtype,
                             out_scale: float | None = None, out_zero_point: int = 0,
                             out_bits: int = 8) -> torch.Tensor:
        """pipeline_op with a residual add [+ ReLU] after the activation clamp, in the conv's epilogue
        (int8_conv2d.residual): residual int8/uint8 of the output's shape, residual_scale a float32 tensor [1]."""
        self._repack_if_written()
        return self._padded_residual_op(self._padded(x_q), residual, residual_scale, residual_zero_point, relu,
                                        out_dtype, out_scale, out_zero_point, out_bits)

    def _padded_residual_op(self, x_q, residual, residual_scale, residual_zero_point, relu, out_dtype, out_scale=None,
                            out_zero_point=0, out_bits=8):
        """pipeline_residual_op on x_q as _padded made it."""
        if x_q.dim() == 3:  # unbatched: a batch of one, as _int_op runs it
            return self._padded_residual_op(x_q.unsqueeze(0), residual.unsqueeze(0), residual_scale,
                                            residual_zero_point, relu, out_dtype, out_scale, out_zero_point,
                                            out_bits).squeeze(0)
        return ops.int8_conv2d.residual(x_q, self._static_scale, self.input_zero_point, *self._op_args(), out_dtype,
                                        out_scale, out_zero_point, self.clamp_min, self.clamp_max, residual,
                                        residual_scale, residual_zero_point, relu, out_bits)

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}"
                + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"))


class QuantConv1d(QuantConv2d):
    """nn.Conv1d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
    quantized per `config`, as QuantConv2d. Converted, it runs the 2-D integer conv with a 1 x kernel_size kernel
    on the input viewed as [batch, channels, 1, length]."""

    FLOAT_TYPE = nn.Conv1d

    def _entry_call(self, x, *pipeline_args):
        """torchquant._C.quantized_layer_forward on the 2-D conv's view of x [batch, channels, length] or unbatched
        [channels, length] (a length-1 height before the length: the entry would take x itself as the 2-D conv's
        input), or NotImplemented where the Python path runs."""
        self._repack_if_written()
        if (self._quantized_call_args is None or is_dynamo_compiling() or not isinstance(x, torch.Tensor)
                or x.dim() not in (2, 3)):
            return NotImplemented
        y = _C.quantized_layer_forward(x.unsqueeze(-2), self._quantized_call_args, self.clamp_min, self.clamp_max,
                                       *pipeline_args)
        return y if y is NotImplemented else y.squeeze(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.converted:
            return super().forward(x)
        self._check_folded_input(x)
        if getattr(x, "requires_grad", False) and not self._weight_only:
            warn_if_gradient_cut(type(self).__name__, x)
        y = self._entry_call(x)
        # nn.Conv1d's output is contiguous whatever its input's strides (the 4-D view of a transposed input reads
        # as channels-last to the entry)
        return self._converted_forward(x) if y is NotImplemented else y.contiguous()

    def pipeline_op(self, x_q: torch.Tensor, out_dtype: torch.dtype, out_scale: float | None = None,
                    out_zero_point: int = 0, out_bits: int = 8) -> torch.Tensor:
        y = self._entry_call(x_q, out_dtype, out_scale, out_zero_point, out_bits)
        if y is NotImplemented:
            self._check_input(x_q)
            y = self._int_op(x_q, self._static_scale, self.input_zero_point, out_dtype, out_scale, out_zero_point,
                             out_bits)
        return y

    def _float_op(self, x, weight, bias):
        return F.conv1d(self._padded(x), weight, bias, self.stride, self.kernel_padding, self.dilation, self.groups)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuantConv1d: input must be a tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(f"QuantConv1d: input must have shape [batch, {self.in_channels}, length] or "
                             f"[{self.in_channels}, length], got {list(x.shape)}")

    def _pack(self, w_int8: torch.Tensor) -> torch.Tensor:
        return F_q.pack_conv_weight(w_int8.unsqueeze(2), self.groups)

    def _int_op_args(self) -> tuple:
        # the 2-D conv's arguments for a 1 x kernel_size kernel
        return (self.w_sum, self.weight_scale, self._kernel_bias(), self.out_channels,
                [1, *self.kernel_size], [1, *self.stride], [0, *self.kernel_padding], [1, *self.dilation], self.groups)

    def _int_op(self, x_q, x_scale, x_zero_point, out_dtype, out_scale=None, out_zero_point=0, out_bits=8):
        return self._padded_int_op(self._padded(x_q).unsqueeze(-2), x_scale, x_zero_point, out_dtype, out_scale,
                                   out_zero_point, out_bits).squeeze(-2)

    def pipeline_residual_op(self, x_q, residual, *args):
        return self._padded_residual_op(self._padded(x_q).unsqueeze(-2), residual.unsqueeze(-2), *args).squeeze(-2)
