"""ONNX export of prepared (fake-quant) and converted models as a standard QuantizeLinear/DequantizeLinear graph.

How: a copy of the model has each QuantLinear/QuantConv2d/QuantConv1d replaced by a placeholder op; torch.onnx's
exporter (torch.export underneath) turns everything else into ONNX and each placeholder into one node of a private
domain; those nodes are then replaced by the layer's quantized subgraph, written here with the `onnx` helpers from
the layer's own integer weights and qparams.

The subgraphs give the integers torchquant gives, ties included. torchquant quantizes with q = clamp(rne(x *
(1 / scale)) + zero_point) where 1 / scale is a float32; ONNX QuantizeLinear divides by its scale, and x / scale
and x * (1 / scale) round differently now and then. So the graph multiplies by the float32 reciprocal torchquant
uses and hands the product to QuantizeLinear with scale 1 (an exact division), which rounds half to even, adds the
zero point and saturates; DequantizeLinear then carries the real scale.

- static activations (per tensor): Mul(1 / scale) [-> truncation] [-> Clip to a < 8-bit range] ->
  QuantizeLinear(1, zero_point) -> DequantizeLinear(scale, zero_point) in front of the MatMul / Conv, whose weight
  initializer (in the activations' type: the int8 values plus 128 as uint8 beside uint8 activations, see
  _weight_in_activation_type) has its own DequantizeLinear (per channel: axis set);
- dynamic activations: the scale absmax / qmax of each row (Linear, per token) or of the tensor (Conv) is computed
  in the graph (Abs, ReduceMax, Div, Max with the smallest normal float32); a Linear then runs MatMulInteger on
  uint8 activations (the int8 values plus 128, zero point 128) and uint8 weights (likewise: see
  _weight_in_activation_type), and scales the exact int32 sums as torchquant's kernel does: acc * x_scale *
  w_scale + bias (layers reading the same tensor in the same format, as a transformer's query, key and value do,
  share the quantization and one MatMulInteger over their weights side by side, split into their outputs after the
  scaling); a Conv dequantizes and runs a float Conv;
- rounding="truncate": Sign(v) * Floor(Abs(v)) (exact) before QuantizeLinear;
- signed 1-bit (sign binarization): Where(x >= 0, 1, -1);
- weights of 4 bits or fewer: INT4 initializers (opset 21 and later; DequantizeLinear reads them, or Casts (and an
  Add) make the int8 (uint8) weight of MatMulInteger / ConvInteger), int8 / uint8 initializers at lower opsets.
- integer pipelines (torchquant.graph; a prepared one is converted first, on a copy): every integer op of the
  converted graph becomes a placeholder too, replaced by exact integer ONNX (see "Integer pipelines" below).
- an Add that feeds a LayerNormalization (a transformer's residual sum) is written as Sum, the same float sum:
  onnxruntime fuses Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel is several times slower
  than the two nodes (see _sums_before_layer_norms).

NaN and infinite inputs are not carried over: torchquant maps NaN to the zero point and leaves infinities out of
dynamic ranges; the exported graph does neither.

export_aoti, the other way out of eager PyTorch, keeps torchquant's ops: torch.export's program of the model,
compiled by AOTInductor into a package that calls the same kernels (the same numbers, up to inductor's fusion of the
float ops between layers).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from torchquant import graph as pipeline
from torchquant import functional as F_q
from torchquant._ops.quantize import qrange
from torchquant.io import atomic_write
from torchquant.nn.base import QuantLayerBase, quant_layers
from torchquant.nn.conv import QuantConv1d, QuantConv2d
from torchquant.nn.linear import QuantLinear
from torchquant.nn.quantizers import floor_learned_scales

__all__ = ["export_onnx", "export_aoti", "ExportError", "has_quantized_layers"]

DEFAULT_OPSET = 21
MIN_OPSET = 18  # torch.onnx's exporter writes opset 18 and converts up from there
_INT4_OPSET = 21
_DOMAIN = "torchquant.export"
_TINY = torch.finfo(torch.float32).tiny


class ExportError(RuntimeError):
    """The model cannot be exported: the message names the module and the reason."""


# ---------------------------------------------------------------------------------------------------------------
# What one quantized layer computes, read from the layer (prepared or converted)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Activation:
    bits: int
    signed: bool
    rounding: str
    dynamic: bool
    per_token: bool
    scale: Optional[float] = None  # static only: float32 values
    inv_scale: Optional[float] = None
    zero_point: int = 0


@dataclass
class _Layer:
    name: str
    module: QuantLayerBase
    weight: torch.Tensor  # int8, the float weight's shape
    weight_scale: torch.Tensor  # float32 [out]
    per_channel: bool
    weight_bits: int
    bias: Optional[torch.Tensor]
    activation: Optional[_Activation]
    clamp: Tuple[Optional[float], Optional[float]] = (None, None)  # the fused output activation
    gelu: Optional[str] = None  # a fused GELU ("gelu" / "gelu_tanh"), before the clamp


def _static_activation(quantizer, what: str) -> _Activation:
    """The format and qparams of a calibrated static quantizer (a layer's input or a pipeline's tensor)."""
    a = quantizer.spec
    s = quantizer.scale.detach().cpu().float().reshape(1)
    if not bool(torch.isfinite(s).all() and (s >= _TINY).all()):
        raise ExportError(f"export_onnx: {what} has an input scale that is not positive and finite: {s.tolist()}")
    return _Activation(a.bits, a.signed, a.rounding, False, False, scale=float(s[0]),
                       inv_scale=float((1.0 / s)[0]),  # in float32, as the kernels compute it
                       zero_point=int(quantizer.zero_point.reshape(-1)[0]))


def _layer_state(name: str, layer: QuantLayerBase) -> _Layer:
    """The integer weight, scales and input quantization of `layer` as its converted forward uses them."""
    what = f"module {name!r} ({type(layer).__name__})"
    if type(layer) not in (QuantLinear, QuantConv2d, QuantConv1d):
        raise ExportError(f"export_onnx: {what} is a torchquant layer type with no ONNX mapping "
                          f"(QuantLinear, QuantConv2d and QuantConv1d are exported)")
    spec = layer.config.weight
    with torch.no_grad():
        if layer.converted:
            weight, scale, bias = layer._weight_int8(), layer.weight_scale, layer.bias
        else:  # the weight and bias a folded BatchNorm makes, quantized as convert would
            if spec.learn_scale:  # convert's check: an optimizer step may have left the learned scale <= 0
                try:
                    layer._check_learned_weight_scale()
                except ValueError as exc:
                    raise ExportError(f"export_onnx: layer {name!r}: {exc}") from exc
            float_weight, bias = layer.float_weight_bias()
            weight, scale = layer.weight_quantizer.quantize(float_weight)
    weight, scale = weight.detach().cpu(), scale.detach().cpu().float()
    bias = None if bias is None else bias.detach().cpu().float()
    quantizer = layer.input_quantizer
    activation = None
    if quantizer is not None:
        a = quantizer.spec
        if a.dynamic:
            activation = _Activation(a.bits, a.signed, a.rounding, True, quantizer.per_token)
        elif not layer.converted and not quantizer.ready:
            raise ExportError(f"export_onnx: {what} quantizes its input statically but was never "
                              f"calibrated (no input range observed): run torchquant.calibrate first")
        else:
            activation = _static_activation(quantizer, what)
    return _Layer(name, layer, weight, scale, spec.granularity == "per_channel", spec.bits, bias, activation,
                  (layer.clamp_min, layer.clamp_max), getattr(layer, "fused_activation", None))


# ---------------------------------------------------------------------------------------------------------------
# Placeholders: what the exporter sees in place of each quantized layer
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("torchquant_export::linear", mutates_args=())
def _linear_placeholder(x: torch.Tensor, out_features: int, index: int) -> torch.Tensor:
    """Stands for quantized layer `index` during export only (its value is never used): shape and dtype only."""
    return x.new_zeros((*x.shape[:-1], out_features))


@_linear_placeholder.register_fake
def _(x, out_features, index):
    return x.new_empty((*x.shape[:-1], out_features))


def _conv_output_shape(x, out_channels, kernel_size, stride, padding, dilation):
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], kernel_size, stride, padding, dilation)]
    return (x.shape[0], out_channels, *spatial)


@torch.library.custom_op("torchquant_export::conv2d", mutates_args=())
def _conv2d_placeholder(x: torch.Tensor, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], index: int) -> torch.Tensor:
    """Stands for quantized layer `index` during export only (its value is never used): shape and dtype only."""
    return x.new_zeros(_conv_output_shape(x, out_channels, kernel_size, stride, padding, dilation))


@_conv2d_placeholder.register_fake
def _(x, out_channels, kernel_size, stride, padding, dilation, index):
    return x.new_empty(_conv_output_shape(x, out_channels, kernel_size, stride, padding, dilation))


class _Placeholder(nn.Module):
    def __init__(self, layer: QuantLayerBase, index: int):
        super().__init__()
        self.layer_type = type(layer)
        self.index = index
        # the placeholder would take any input width and dtype (an integer input exported as a graph that cannot load)
        self.check_input = layer._check_float_input
        if isinstance(layer, QuantLinear):
            self.args = (layer.out_features,)
        else:
            self.args = (layer.out_channels, list(layer.kernel_size), list(layer.stride), list(layer.padding),
                         list(layer.dilation))

    def forward(self, x):
        self.check_input(x)
        if self.layer_type is QuantLinear:
            if x.dim() == 1:  # one sample, as nn.Linear takes it: a batch of one (the graph's bias is [1, N])
                return self.forward(x.unsqueeze(0)).squeeze(0)
            return torch.ops.torchquant_export.linear(x, *self.args, self.index)
        if x.dim() == len(self.args[1]) + 1:  # unbatched, as nn.Conv2d / nn.Conv1d take it: a batch of one
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return torch.ops.torchquant_export.conv2d(x, *self.args, self.index)


def _translations():
    import onnx
    import onnxscript
    if not onnx.defs.has("QuantLayer", _DOMAIN):  # onnxscript builds nodes only for ops with a schema
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "QuantLayer", _DOMAIN, 1, inputs=[onnx.defs.OpSchema.FormalParameter("x", "T")],
            outputs=[onnx.defs.OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)"], "float32")],
            attributes=[onnx.defs.OpSchema.Attribute("index", onnx.defs.OpSchema.AttrType.INT, "layer number")]))
    if not onnx.defs.has("PipelineStep", _DOMAIN):
        types = ["tensor(float)", "tensor(uint8)", "tensor(int8)"]
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "PipelineStep", _DOMAIN, 1,
            inputs=[onnx.defs.OpSchema.FormalParameter(
                "xs", "T1", param_option=onnx.defs.OpSchema.FormalParameterOption.Variadic, is_homogeneous=False)],
            outputs=[onnx.defs.OpSchema.FormalParameter("y", "T2")],
            type_constraints=[("T1", types, "float32 or 8-bit integers"), ("T2", types, "float32 or 8-bit integers")],
            attributes=[onnx.defs.OpSchema.Attribute("index", onnx.defs.OpSchema.AttrType.INT, "step number")]))
    domain = onnxscript.values.Opset(_DOMAIN, 1)

    def linear(x, out_features: int, index: int):
        return domain.QuantLayer(x, index=index)

    def conv2d(x, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], index: int):
        return domain.QuantLayer(x, index=index)

    def elementwise(x, other, dtype, index: int):
        return domain.PipelineStep(*([x] if other is None else [x, other]), index=index)

    def pipeline_linear(x, out_features: int, dtype, index: int):
        return domain.PipelineStep(x, index=index)

    def pipeline_conv2d(x, residual, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], dtype, index: int):
        return domain.PipelineStep(*([x] if residual is None else [x, residual]), index=index)

    def pipeline_max_pool(x, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], ceil_mode: bool, index: int):
        return domain.PipelineStep(x, index=index)

    def pipeline_mean(x, dims: Sequence[int], keepdim: bool, dtype, index: int):
        return domain.PipelineStep(x, index=index)

    def pipeline_avg_pool(x, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                          ceil_mode: bool, count_include_pad: bool, divisor_override: int, dtype, index: int):
        return domain.PipelineStep(x, index=index)

    def pipeline_adaptive_avg_pool(x, output_size: Sequence[int], dtype, index: int):
        return domain.PipelineStep(x, index=index)

    ops = torch.ops.torchquant_export
    return {ops.linear.default: linear, ops.conv2d.default: conv2d,
            ops.pipeline_elementwise.default: elementwise, ops.pipeline_linear.default: pipeline_linear,
            ops.pipeline_conv2d.default: pipeline_conv2d, ops.pipeline_max_pool.default: pipeline_max_pool,
            ops.pipeline_mean.default: pipeline_mean, ops.pipeline_avg_pool.default: pipeline_avg_pool,
            ops.pipeline_adaptive_avg_pool.default: pipeline_adaptive_avg_pool}


# ---------------------------------------------------------------------------------------------------------------
# The ONNX subgraph of one layer
# ---------------------------------------------------------------------------------------------------------------


class _GraphBuilder:
    """Appends nodes and initializers for one layer; names are prefixed with the layer's name."""

    def __init__(self, prefix: str, opset: int):
        import onnx
        self.onnx = onnx
        self.prefix = prefix
        self.opset = opset
        self.nodes = []
        self.initializers = []
        self._count = 0

    def name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}/{what}_{self._count}"

    def const(self, what: str, array) -> str:
        import numpy as np
        name = self.name(what)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def const_int4(self, what: str, values: torch.Tensor) -> str:
        name = self.name(what)
        self.initializers.append(self.onnx.helper.make_tensor(
            name, self.onnx.TensorProto.INT4, list(values.shape), values.flatten().tolist()))
        return name

    def op(self, op_type: str, *inputs: str, output: Optional[str] = None, **attrs) -> str:
        output = output or self.name(op_type)
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [output], name=self.name(op_type + "_node"),
                                                     **attrs))
        return output


def _f32(value: float):
    import numpy as np
    return np.array(float(value), dtype=np.float32)


def _int4_weight(b: _GraphBuilder, layer: _Layer) -> bool:
    """Whether the layer's weight is written as INT4 (<= 4 bits, where the opset has it)."""
    return layer.weight_bits <= 4 and b.opset >= _INT4_OPSET


def _weight_in_activation_type(b: _GraphBuilder, weight: torch.Tensor, signed: bool) -> Tuple[str, int]:
    """The weight initializer of a layer whose integer activations are int8 (signed) or uint8, and its zero point:
    int8 (0) beside int8 activations, the int8 values plus 128 as uint8 (128) beside uint8 ones. onnxruntime's x86
    kernels without AVX-512 VNNI multiply uint8 x int8 (either way round) with vpmaddubsw, whose int16 pair sums
    saturate (255 * 127 * 2 > 32767): other integers than torchquant's, in MatMulInteger / ConvInteger and in the
    integer kernels it fuses a QuantizeLinear / DequantizeLinear pair around a MatMul or Conv into. Operands of one
    type they multiply exactly."""
    if signed:
        return b.const("weight_int8", weight.numpy()), 0
    return b.const("weight_uint8", (weight.to(torch.int16) + 128).to(torch.uint8).numpy()), 128


def _integer_weight(b: _GraphBuilder, layer: _Layer, weight: torch.Tensor, x_q: str, x_zero_point: str,
                    signed: bool) -> Tuple[str, ...]:
    """The inputs of a MatMulInteger / ConvInteger of x_q (int8 when signed, else uint8; zero point x_zero_point)
    by `weight`, in x_q's type (see _weight_in_activation_type)."""
    import numpy as np
    if _int4_weight(b, layer):  # INT4 in the file, made int8 (and uint8) in the graph
        name = b.op("Cast", b.const_int4("weight_int4", weight), to=b.onnx.TensorProto.INT8)
        if signed:
            return x_q, name, x_zero_point
        wide = b.op("Cast", name, to=b.onnx.TensorProto.INT16)
        name = b.op("Cast", b.op("Add", wide, b.const("offset", np.array(128, np.int16))),
                    to=b.onnx.TensorProto.UINT8)
        return x_q, name, x_zero_point, b.const("weight_zero_point", np.array(128, np.uint8))
    name, zero_point = _weight_in_activation_type(b, weight, signed)
    if zero_point == 0:
        return x_q, name, x_zero_point
    return x_q, name, x_zero_point, b.const("weight_zero_point", np.array(zero_point, np.uint8))


def _dequantized_weight(b: _GraphBuilder, layer: _Layer, weight: torch.Tensor, axis: int) -> str:
    """The weight's DequantizeLinear: INT4, or in the type of the layer's activations (see
    _weight_in_activation_type; int8 for float inputs)."""
    import numpy as np
    scale = layer.weight_scale.numpy() if layer.per_channel else _f32(layer.weight_scale[0])
    per_channel = {"axis": axis} if layer.per_channel else {}
    if _int4_weight(b, layer):
        return b.op("DequantizeLinear", b.const_int4("weight_int4", weight), b.const("weight_scale", scale),
                    **per_channel)
    act = layer.activation
    name, zero_point = _weight_in_activation_type(b, weight, act is None or act.signed)
    if zero_point == 0:
        return b.op("DequantizeLinear", name, b.const("weight_scale", scale), **per_channel)
    return b.op("DequantizeLinear", name, b.const("weight_scale", scale),
                b.const("weight_zero_point", np.full(scale.shape, zero_point, np.uint8)), **per_channel)


def _truncated(b: _GraphBuilder, v: str) -> str:
    return b.op("Mul", b.op("Sign", v), b.op("Floor", b.op("Abs", v)))


def _quantized(b: _GraphBuilder, x: str, inv_scale: str, act: _Activation, zero_point: str, q_name: str) -> str:
    """The integers clamp(round(x * inv_scale) + zero_point, qmin, qmax) in zero_point's type."""
    import numpy as np
    if act.bits == 1 and act.signed:  # sign binarization
        return b.op("Where", b.op("GreaterOrEqual", x, b.const("zero", _f32(0.0))),
                    b.const("plus_one", np.array(1, np.int8)), b.const("minus_one", np.array(-1, np.int8)),
                    output=q_name)
    v = b.op("Mul", x, inv_scale)
    if act.rounding == "truncate":
        v = _truncated(b, v)
    qmin, qmax = qrange(act.bits, act.signed)
    if act.bits < 8 and not act.dynamic:  # a dynamic symmetric range never leaves [-qmax, qmax]
        v = b.op("Clip", v, b.const("qmin", _f32(qmin - act.zero_point)), b.const("qmax", _f32(qmax - act.zero_point)))
    return b.op("QuantizeLinear", v, b.const("one", _f32(1.0)), zero_point, output=q_name)


def _dynamic_qparams(b: _GraphBuilder, x: str, act: _Activation, per_row: bool) -> Tuple[str, str]:
    """(2 * scale, 1 / scale) of each row (keeping the reduced dim) or of the whole tensor (scalars), where scale
    is absmax / qmax, at least the smallest normal float32.

    The doubled scale is absmax / (qmax / 2), the same float times 2 (a power of two), and 1 / scale is taken as
    2 / (2 * scale), the same float again: onnxruntime rewrites Mul(x, Div(1, s)) into Div(x, s), which rounds
    differently, and leaves this alone; the 2 is folded into the weight scale (or a Mul by 0.5) afterwards."""
    import numpy as np
    qmax = qrange(act.bits, act.signed)[1]
    axes = [b.const("last_axis", np.array([-1], np.int64))] if per_row else []
    absmax = b.op("ReduceMax", b.op("Abs", x), *axes, keepdims=1 if per_row else 0)
    double_scale = b.op("Max", b.op("Div", absmax, b.const("half_qmax", _f32(qmax / 2))),
                        b.const("double_tiny", _f32(2 * _TINY)))
    return double_scale, b.op("Div", b.const("two", _f32(2.0)), double_scale)


def _biased(b: _GraphBuilder, out: str, layer: _Layer, y: str) -> None:
    """y = out + bias (a copy when the layer has none)."""
    if layer.bias is None:
        b.op("Identity", out, output=y)
    else:
        b.op("Add", out, b.const("bias", layer.bias.numpy()), output=y)


def _quantized_input(b: _GraphBuilder, x: str, act: _Activation, q_name: str) -> str:
    """x dequantized from the integers torchquant computes (QDQ), for the float MatMul / Conv."""
    import numpy as np
    zp_type = np.int8 if act.signed else np.uint8
    if act.dynamic:
        double_scale, inv = _dynamic_qparams(b, x, act, per_row=False)
        scale = b.op("Mul", double_scale, b.const("half", _f32(0.5)))
        zero_point = b.const("zero_point", np.array(0, zp_type))
    else:
        scale = b.const("scale", _f32(act.scale))
        inv = b.const("inv_scale", _f32(act.inv_scale))
        zero_point = b.const("zero_point", np.array(act.zero_point, zp_type))
    q = _quantized(b, x, inv, act, zero_point, q_name)
    return b.op("DequantizeLinear", q, scale, zero_point)


def _distinct_half(b: _GraphBuilder, scale: str, index: int, rank: int) -> str:
    """scale * 0.5 written differently for each index (operand order, then the rank of the 0.5, up to `rank`, the
    rank of scale): onnxruntime merges identical nodes, and a Mul shared by several layers does not fuse."""
    half = b.const("half", _f32(0.5).reshape([1] * min(index // 2, rank)))
    return b.op("Mul", *((scale, half) if index % 2 == 0 else (half, scale)))


def _linear_integer(b: _GraphBuilder, layers: Sequence[_Layer], x: str, outputs: Sequence[str], q_name: str,
                    rank: int) -> None:
    """Dynamic Linear layers that read the same x with the same activation format (a transformer's query, key and
    value): x (of the given rank) quantized once, then one MatMulInteger on the exact integers for the layers with a
    bias and one for those without, each over the layers' weights side by side, acc * x_scale * w_scale + bias
    on all their columns at once and a Split into the layers' outputs. The nodes a GEMM per layer adds cost more at
    small batches than the Split's copy at large ones (all-MiniLM-L6-v2 in onnxruntime 1.32, one thread: 1.50 ->
    1.38 ms at batch 1 x 12 tokens, 34.7 -> 36.1 ms at batch 32 x 20)."""
    import numpy as np
    first = layers[0]
    act = first.activation
    double_scale, inv = _dynamic_qparams(b, x, act, per_row=first.module.input_quantizer.per_token)
    offset = b.const("zero_point_128", np.array(128, np.uint8))  # int8 + 128 as uint8
    if act.bits == 1:  # sign binarization, as int8, moved to uint8
        q = _quantized(b, x, inv, act, None, b.name("sign"))
        q = b.op("Cast", b.op("Add", b.op("Cast", q, to=b.onnx.TensorProto.INT16),
                              b.const("offset", np.array(128, np.int16))), to=b.onnx.TensorProto.UINT8,
                 output=q_name)
    else:
        act_u8 = _Activation(act.bits, False, act.rounding, True, act.per_token, zero_point=128)
        q = _quantized(b, x, inv, act_u8, offset, q_name)
    # a layer without a bias is not given zeros: y + 0.0 turns -0.0 into +0.0
    biased = [i for i, layer in enumerate(layers) if layer.bias is not None]
    unbiased = [i for i, layer in enumerate(layers) if layer.bias is None]
    for index, members in enumerate(m for m in (biased, unbiased) if m):
        group = [layers[i] for i in members]
        weight = torch.cat([layer.weight.t() for layer in group], dim=1).contiguous()
        acc = b.op("MatMulInteger", *_integer_weight(b, first, weight, q, offset, signed=False))
        # (acc * x_scale) * w_scale + bias, float for float as torchquant's kernel. The first product is written
        # Mul(Cast(acc), Mul(2 * x_scale, 0.5)), which onnxruntime fuses into MatMulIntegerToFloat(a_scale = 2 *
        # x_scale per row, b_scale = 0.5): its GEMM writes acc * 0.5 (exact) and scales each row by 2 * x_scale
        # afterwards, one rounding of acc * x_scale; unfused, the graph computes acc * x_scale directly. (A scale
        # of 1 would be removed before the fusion; w_scale cannot go in: the kernel would apply it before x_scale,
        # and the bias it takes before the row scale.)
        x_scale = _distinct_half(b, double_scale, index, rank)
        scaled = b.op("Mul", b.op("Cast", acc, to=b.onnx.TensorProto.FLOAT), x_scale)
        if len(group) == 1 and not group[0].per_channel:
            weight_scale = _f32(group[0].weight_scale[0])
        else:  # one scale per column, a per-tensor layer's repeated (the same products)
            weight_scale = torch.cat([layer.weight_scale if layer.per_channel
                                      else layer.weight_scale[:1].expand(layer.weight.shape[0])
                                      for layer in group]).numpy()
        ys = [outputs[i] for i in members]
        y = ys[0] if len(ys) == 1 else None
        scaled = b.op("Mul", scaled, b.const("weight_scale", weight_scale),
                      output=y if group[0].bias is None else None)
        if group[0].bias is not None:
            # a [1, N] bias, not [N]: onnxruntime fuses Add of a 1-D bias with a following Gelu into BiasGelu,
            # which runs at a third of the speed of its Gelu (all-MiniLM-L6-v2's feed-forward layers)
            bias = torch.cat([layer.bias for layer in group]).reshape(1, -1)
            scaled = b.op("Add", scaled, b.const("bias", bias.numpy()), output=y)
        if len(ys) > 1:
            sizes = b.const("split_sizes", np.array([layer.weight.shape[0] for layer in group], np.int64))
            b.nodes.append(b.onnx.helper.make_node("Split", [scaled, sizes], ys, name=b.name("Split_node"), axis=-1))


# ONNX Pad's mode for each padding_mode of a conv other than 'zeros' ('wrap' from opset 19 on)
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
_WRAP_PAD_OPSET = 19


def _conv_input(b: _GraphBuilder, layer: _Layer, x: str) -> tuple[str, list]:
    """The input of the Conv / ConvInteger node of a conv layer (x batched, its float values or integers) and the
    node's pads: under a padding_mode other than 'zeros', a Pad node of x and a conv that pads nothing."""
    conv = layer.module
    if not conv.pads_input:
        return x, list(conv.padding) * 2
    import numpy as np
    if conv.padding_mode == "circular" and b.opset < _WRAP_PAD_OPSET:
        raise ExportError(f"export_onnx: layer {layer.name!r}: padding_mode='circular' needs opset "
                          f"{_WRAP_PAD_OPSET} or later (ONNX Pad's 'wrap' mode), got opset {b.opset}")
    pads = b.const("pads", np.array([0, 0, *conv.padding] * 2, np.int64))
    return b.op("Pad", x, pads, mode=_PAD_MODES[conv.padding_mode]), [0] * (2 * len(conv.padding))


def _layer_nodes(b: _GraphBuilder, layer: _Layer, x: str, y: str, q_name: str) -> None:
    act = layer.activation
    if isinstance(layer.module, QuantLinear):
        x_in = x if act is None else _quantized_input(b, x, act, q_name)
        w = _dequantized_weight(b, layer, layer.weight.t().contiguous(), axis=1)
        _biased(b, b.op("MatMul", x_in, w), layer, y)
        return
    conv = layer.module
    x_in, pads = _conv_input(b, layer, x if act is None else _quantized_input(b, x, act, q_name))
    w = _dequantized_weight(b, layer, layer.weight, axis=0)
    inputs = [x_in, w] + ([b.const("bias", layer.bias.numpy())] if layer.bias is not None else [])
    b.op("Conv", *inputs, output=y, kernel_shape=list(conv.kernel_size), strides=list(conv.stride), pads=pads,
         dilations=list(conv.dilation), group=conv.groups)


def _gelu(b: _GraphBuilder, x: str, form: str, output: str) -> None:
    """output = torch.nn.functional.gelu(x) (form "gelu": the erf form, "gelu_tanh": approximate="tanh"): one Gelu
    node from opset 20 on, its definition in Erf / Tanh and arithmetic before."""
    if b.opset >= 20:
        b.op("Gelu", x, output=output, approximate="tanh" if form == "gelu_tanh" else "none")
        return
    if form == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = b.op("Mul", b.op("Mul", x, x), x)
        inner = b.op("Mul", b.op("Add", x, b.op("Mul", cube, b.const("kappa", _f32(0.044715)))),
                     b.const("beta", _f32(math.sqrt(2 / math.pi))))
        phi2 = b.op("Add", b.op("Tanh", inner), b.const("one", _f32(1.0)))
    else:  # x 0.5 (1 + erf(x / sqrt(2)))
        phi2 = b.op("Add", b.op("Erf", b.op("Mul", x, b.const("sqrt_half", _f32(math.sqrt(0.5))))),
                    b.const("one", _f32(1.0)))
    b.op("Mul", b.op("Mul", x, b.const("half", _f32(0.5))), phi2, output=output)


def _clamped_outputs(b: _GraphBuilder, layers: Sequence[_Layer], outputs: Sequence[str], emit) -> None:
    """emit(names) writes the layers' outputs to names; a layer with a fused activation (a GELU, then a clamp)
    writes a tensor that a Gelu and a Clip turn into its output (as the kernels' epilogue computes it, on the float
    y)."""
    raw = [y if layer.clamp == (None, None) and layer.gelu is None else b.name("unactivated")
           for layer, y in zip(layers, outputs)]
    emit(raw)
    for layer, r, y in zip(layers, raw, outputs):
        if r == y:
            continue
        lo, hi = layer.clamp
        if layer.gelu is not None:
            _gelu(b, r, layer.gelu, output=y if layer.clamp == (None, None) else b.name("gelu"))
            if layer.clamp == (None, None):
                continue
            r = b.nodes[-1].output[0]
        b.op("Clip", r, "" if lo is None else b.const("clamp_min", _f32(lo)),
             "" if hi is None else b.const("clamp_max", _f32(hi)), output=y)


def _group_key(node, layer: _Layer, position: int) -> tuple:
    """Dynamic Linear layers with the same key share one quantized input."""
    act = layer.activation
    if isinstance(layer.module, QuantLinear) and act is not None and act.dynamic:
        return ("integer", node.input[0], act.bits, act.rounding, layer.module.input_quantizer.per_token,
                layer.weight_bits <= 4)
    return ("alone", position)


def input_q_name(layer_name: str) -> str:
    """The graph tensor holding the integer input of a quantized layer: int8/uint8 as torchquant quantizes it, or
    (dynamic Linear layers) uint8 holding the int8 values plus 128."""
    return f"{layer_name}::input_q"


# ---------------------------------------------------------------------------------------------------------------
# Integer pipelines (torchquant.graph): every integer op of the converted graph becomes one placeholder, then
# exact integer ONNX (below)
# ---------------------------------------------------------------------------------------------------------------
#
# A pipeline's integers are exported exactly, end to end: ConvInteger / MatMulInteger give the int32 sums, which
# are scaled in float32 in the order of torchquant's epilogue, (acc * x_scale) * w_scale + bias, then clamped (the
# fused activation: Clip, or Relu for a plain ReLU, on the float y, where the kernels clamp it) and requantized as
# everywhere here: Mul(1 / out_scale) -> QuantizeLinear(scale 1, out_zero_point). An integer add is
# DequantizeLinear (float(q - zero_point) * scale, as torchquant's) of both inputs -> Add -> [Relu] -> the same
# requantization, an integer product (a squeeze-excitation gate) DequantizeLinear of both -> Mul (broadcast) -> the
# requantization, and a conv with the add in its epilogue adds the DequantizeLinear of its residual to its float y
# (after the clamp), then [Relu] and the requantization; max-pool (1-d or 2-d) runs MaxPool on the integers, a ReLU
# between layers is Max(q, zero point), flatten / reshape / concatenation act on the integer tensors, padding is Pad
# of the integers (constant padding with the zero point), a mean or global average pool (integer_mean) is ReduceSum
# of the integers less their zero point in int32, then Cast, Mul(scale), Div(count) and the requantization, as
# torchquant computes it, an average pool of a fixed window (integer_avg_pool) is a Conv with a window of ones of each
# channel's integers and of a tensor of ones (the exact sums, and how many of each window's elements are inside the
# input), Sub(that count times the zero point), Mul(scale), Div(the divisor), cut to the pool's size in ceil mode,
# then the requantization, and an activation lookup (quantized_lookup) is a Gather from its 256-entry table: Cast of
# the integers to an int32 index, for int8 ones plus 128 into the table rotated by 128 entries (the same entry for
# each value as torchquant's byte index, with no negative index). A QDQ Conv (DequantizeLinear -> Conv ->
# QuantizeLinear) would not give torchquant's integers: run unfused it sums dequantized floats, and onnxruntime's
# fused QLinearConv quantizes the bias to int32 and requantizes with one combined multiplier.

_PIPELINE_KINDS = {pipeline.quantize_input: "quantize", pipeline.dequantize_output: "dequantize",
                   pipeline.integer_relu: "relu", F_q.quantized_max_pool1d: "max_pool",
                   F_q.quantized_max_pool2d: "max_pool",
                   pipeline.integer_add: "add", pipeline.integer_mul: "mul", pipeline.integer_layer: "layer",
                   pipeline.integer_conv_add: "conv_add", F_q.quantized_lookup: "lookup",
                   pipeline.integer_mean: "mean", pipeline.integer_avg_pool: "avg_pool",
                   pipeline.integer_adaptive_avg_pool: "adaptive_avg_pool"}


@dataclass
class _Step:
    """One integer op of a converted pipeline, with the qparams of its integer inputs and of its output (None: the
    output is float32)."""
    kind: str
    node: str
    dtype: torch.dtype  # of the output
    inputs: Tuple[_Activation, ...]
    out: Optional[_Activation]
    layer: Optional[_Layer] = None
    pool: Optional[dict] = None  # a max-pool's or average pool's arguments, a mean's dims and keepdim
    relu: bool = False
    table: Optional[torch.Tensor] = None  # a lookup's
    input_dtype: Optional[torch.dtype] = None  # a lookup's integer input


@torch.library.custom_op("torchquant_export::pipeline_elementwise", mutates_args=())
def _elementwise_placeholder(x: torch.Tensor, other: Optional[torch.Tensor], dtype: torch.dtype,
                             index: int) -> torch.Tensor:
    """Stands for pipeline step `index` (x's shape, broadcast with other's for an add or a product; of dtype) during
    export only."""
    return x.new_zeros(_elementwise_shape(x, other), dtype=dtype)


@_elementwise_placeholder.register_fake
def _(x, other, dtype, index):
    return x.new_empty(_elementwise_shape(x, other), dtype=dtype)


def _elementwise_shape(x: torch.Tensor, other: Optional[torch.Tensor]) -> torch.Size:
    return x.shape if other is None else torch.broadcast_shapes(x.shape, other.shape)


@torch.library.custom_op("torchquant_export::pipeline_linear", mutates_args=())
def _pipeline_linear_placeholder(x: torch.Tensor, out_features: int, dtype: torch.dtype, index: int) -> torch.Tensor:
    return x.new_zeros((*x.shape[:-1], out_features), dtype=dtype)


@_pipeline_linear_placeholder.register_fake
def _(x, out_features, dtype, index):
    return x.new_empty((*x.shape[:-1], out_features), dtype=dtype)


@torch.library.custom_op("torchquant_export::pipeline_conv2d", mutates_args=())
def _pipeline_conv2d_placeholder(x: torch.Tensor, residual: Optional[torch.Tensor], out_channels: int,
                                 kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int], dtype: torch.dtype, index: int) -> torch.Tensor:
    """A pipeline conv (with the residual its epilogue adds, or None) during export only."""
    return x.new_zeros(_conv_output_shape(x, out_channels, kernel_size, stride, padding, dilation), dtype=dtype)


@_pipeline_conv2d_placeholder.register_fake
def _(x, residual, out_channels, kernel_size, stride, padding, dilation, dtype, index):
    return x.new_empty(_conv_output_shape(x, out_channels, kernel_size, stride, padding, dilation), dtype=dtype)


def _max_pool(x, kernel_size, *args):
    """torch's max_pool1d or max_pool2d of float x, as kernel_size has 1 or 2 entries."""
    pool = torch.nn.functional.max_pool1d if len(kernel_size) == 1 else torch.nn.functional.max_pool2d
    return pool(x, kernel_size, *args)


@torch.library.custom_op("torchquant_export::pipeline_max_pool", mutates_args=())
def _pipeline_max_pool_placeholder(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                                   padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool,
                                   index: int) -> torch.Tensor:
    return _max_pool(x.float(), kernel_size, stride, padding, dilation, ceil_mode).to(x.dtype)


@_pipeline_max_pool_placeholder.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, index):
    return _max_pool(x.new_empty(x.shape, dtype=torch.float32), kernel_size, stride, padding, dilation,
                     ceil_mode).to(x.dtype)


@torch.library.custom_op("torchquant_export::pipeline_mean", mutates_args=())
def _pipeline_mean_placeholder(x: torch.Tensor, dims: Sequence[int], keepdim: bool, dtype: torch.dtype,
                               index: int) -> torch.Tensor:
    """A pipeline's mean over dims during export only."""
    return x.new_zeros(_mean_shape(x, dims, keepdim), dtype=dtype)


@_pipeline_mean_placeholder.register_fake
def _(x, dims, keepdim, dtype, index):
    return x.new_empty(_mean_shape(x, dims, keepdim), dtype=dtype)


def _mean_shape(x: torch.Tensor, dims: Sequence[int], keepdim: bool) -> list:
    reduced = {d % x.dim() for d in dims}
    return [1 if i in reduced else size for i, size in enumerate(x.shape) if keepdim or i not in reduced]


def _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """torch's avg_pool1d or avg_pool2d of float x, as kernel_size has 1 or 2 entries (divisor_override 0: none)."""
    if len(kernel_size) == 1:
        return torch.nn.functional.avg_pool1d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    return torch.nn.functional.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                          divisor_override or None)


@torch.library.custom_op("torchquant_export::pipeline_avg_pool", mutates_args=())
def _pipeline_avg_pool_placeholder(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                                   padding: Sequence[int], ceil_mode: bool, count_include_pad: bool,
                                   divisor_override: int, dtype: torch.dtype, index: int) -> torch.Tensor:
    """A pipeline's average pool during export only."""
    return _avg_pool(x.float(), kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override).to(dtype)


@_pipeline_avg_pool_placeholder.register_fake
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, dtype, index):
    return _avg_pool(x.new_empty(x.shape, dtype=torch.float32), kernel_size, stride, padding, ceil_mode,
                     count_include_pad, divisor_override).to(dtype)


def _pipeline_linear(x, in_features, *args):
    """The pipeline Linear's placeholder call, on an input of the layer's width (the placeholder takes any: a free
    first dimension of an unbatched input would be exported as a batch)."""
    torch._check(x.shape[-1] == in_features, lambda: f"a pipeline Linear needs {in_features} input features")
    return torch.ops.torchquant_export.pipeline_linear(x, *args)


def _pipeline_conv2d(x, in_channels, residual, out_channels, kernel_size, *args):
    """The pipeline conv's placeholder call, on an input of the layer's channels; an unbatched x (as nn.Conv2d /
    nn.Conv1d take it) as the batch of one it is (ConvInteger takes batches only)."""
    if x.dim() == len(kernel_size) + 1:
        residual = None if residual is None else residual.unsqueeze(0)
        return _pipeline_conv2d(x.unsqueeze(0), in_channels, residual, out_channels, kernel_size, *args).squeeze(0)
    torch._check(x.shape[1] == in_channels, lambda: f"a pipeline conv needs {in_channels} input channels")
    return torch.ops.torchquant_export.pipeline_conv2d(x, residual, out_channels, kernel_size, *args)


def _pipeline_max_pool(x, kernel_size, *args):
    """The pipeline max-pool's placeholder call; an unbatched x as a batch of one (ONNX MaxPool takes batches)."""
    if x.dim() == len(kernel_size) + 1:
        return _pipeline_max_pool(x.unsqueeze(0), kernel_size, *args).squeeze(0)
    return torch.ops.torchquant_export.pipeline_max_pool(x, kernel_size, *args)


def _adaptive_avg_pool(x, output_size):
    """torch's adaptive_avg_pool1d or adaptive_avg_pool2d of float x, as output_size has 1 or 2 entries (-1: the
    input's size)."""
    sizes = [None if s < 0 else s for s in output_size]
    if len(sizes) == 1:
        return torch.nn.functional.adaptive_avg_pool1d(x, x.shape[-1] if sizes[0] is None else sizes[0])
    return torch.nn.functional.adaptive_avg_pool2d(x, sizes)


@torch.library.custom_op("torchquant_export::pipeline_adaptive_avg_pool", mutates_args=())
def _pipeline_adaptive_avg_pool_placeholder(x: torch.Tensor, output_size: Sequence[int], dtype: torch.dtype,
                                            index: int) -> torch.Tensor:
    """A pipeline's adaptive average pool during export only."""
    return _adaptive_avg_pool(x.float(), output_size).to(dtype)


@_pipeline_adaptive_avg_pool_placeholder.register_fake
def _(x, output_size, dtype, index):
    return _adaptive_avg_pool(x.new_empty(x.shape, dtype=torch.float32), output_size).to(dtype)


def _pipeline_adaptive_avg_pool(x, output_size, *args):
    """The pipeline adaptive average pool's placeholder call; an unbatched x as a batch of one."""
    if x.dim() == len(output_size) + 1:
        return _pipeline_adaptive_avg_pool(x.unsqueeze(0), output_size, *args).squeeze(0)
    return torch.ops.torchquant_export.pipeline_adaptive_avg_pool(x, output_size, *args)


def _pipeline_avg_pool(x, kernel_size, *args):
    """The pipeline average pool's placeholder call; an unbatched x as a batch of one."""
    if x.dim() == len(kernel_size) + 1:
        return _pipeline_avg_pool(x.unsqueeze(0), kernel_size, *args).squeeze(0)
    return torch.ops.torchquant_export.pipeline_avg_pool(x, kernel_size, *args)


def _sizes(value, n: int) -> list:
    """A pooling argument as n ints (an int stands for all n)."""
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * n


def _pipeline_steps(gm) -> list:
    """Rewrites gm, a copy of a converted pipeline, so that each of its integer ops calls a placeholder numbered
    into the returned list of _Steps; a torchquant function the export does not know is an ExportError that names
    the graph node."""
    graph = gm.graph
    steps = []

    def quantizer(arg, what) -> Optional[_Activation]:
        return None if arg is None else _static_activation(gm.get_submodule(arg.target), what)

    def dtype_of(act: Optional[_Activation]) -> torch.dtype:
        return torch.float32 if act is None else torch.int8 if act.signed else torch.uint8

    step_dtypes = {}

    def integer_dtype(value) -> torch.dtype:
        """The dtype of an integer tensor: its step's output, through flatten / reshape / concatenation."""
        while value not in step_dtypes:
            value = value.args[0][0] if isinstance(value.args[0], (list, tuple)) else value.args[0]
        return step_dtypes[value]

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is pipeline.integer_pad:  # ONNX Pad of the integers, constants with the zero point
            x, pad, mode, q = node.args
            value = {"value": quantizer(q, f"integer pipeline node {node.name!r}").zero_point} \
                if mode == "constant" else {}
            with graph.inserting_before(node):
                new = graph.call_function(torch.nn.functional.pad, (x, pad), {"mode": mode, **value})
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            continue
        kind = _PIPELINE_KINDS.get(node.target)
        if kind is None:
            module = getattr(node.target, "__module__", None) or ""
            if module.split(".")[0] == "torchquant" or getattr(node.target, "namespace", None) == "torchquant":
                raise ExportError(f"export_onnx: integer pipeline node {node.name!r} calls "
                                  f"{getattr(node.target, '__name__', node.target)}, which has no ONNX mapping")
            continue
        what = f"integer pipeline node {node.name!r}"
        index = len(steps)
        elementwise = torch.ops.torchquant_export.pipeline_elementwise
        if kind == "quantize":
            x, q = node.args
            out = quantizer(q, what)
            step = _Step(kind, node.name, dtype_of(out), (), out)
            call = (elementwise, (x, None, step.dtype, index))
        elif kind == "dequantize":
            x, q, _ = node.args
            step = _Step(kind, node.name, torch.float32, (quantizer(q, what),), None)
            call = (elementwise, (x, None, step.dtype, index))
        elif kind == "relu":
            x, q = node.args
            step = _Step(kind, node.name, dtype_of(quantizer(q, what)), (quantizer(q, what),), None)
            call = (elementwise, (x, None, step.dtype, index))
        elif kind == "max_pool":
            pool = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), node.args[1:]),
                        **node.kwargs)
            n = 1 if node.target is F_q.quantized_max_pool1d else 2
            kernel = _sizes(pool["kernel_size"], n)
            stride = kernel if pool.get("stride") is None else _sizes(pool["stride"], n)
            pool = {"kernel_size": kernel, "stride": stride, "padding": _sizes(pool.get("padding", 0), n),
                    "dilation": _sizes(pool.get("dilation", 1), n), "ceil_mode": bool(pool.get("ceil_mode", False))}
            step = _Step(kind, node.name, integer_dtype(node.args[0]), (), None, pool=pool)
            call = (_pipeline_max_pool, (node.args[0], *pool.values(), index))
        elif kind == "mean":
            x, dims, keepdim, q, out = node.args
            out = quantizer(out, what)
            step = _Step(kind, node.name, dtype_of(out), (quantizer(q, what),), out,
                         pool={"dims": list(dims), "keepdim": bool(keepdim)})
            call = (torch.ops.torchquant_export.pipeline_mean, (x, list(dims), bool(keepdim), step.dtype, index))
        elif kind == "avg_pool":
            x, kernel, stride, padding, ceil_mode, count_include_pad, divisor, q, out = node.args
            out = quantizer(out, what)
            pool = {"kernel_size": list(kernel), "stride": list(stride), "padding": list(padding),
                    "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad),
                    "divisor_override": int(divisor or 0)}
            step = _Step(kind, node.name, dtype_of(out), (quantizer(q, what),), out, pool=pool)
            call = (_pipeline_avg_pool, (x, *pool.values(), step.dtype, index))
        elif kind == "adaptive_avg_pool":
            x, output_size, q, out = node.args
            out = quantizer(out, what)
            pool = {"output_size": [-1 if s is None else int(s) for s in output_size]}
            step = _Step(kind, node.name, dtype_of(out), (quantizer(q, what),), out, pool=pool)
            call = (_pipeline_adaptive_avg_pool, (x, pool["output_size"], step.dtype, index))
        elif kind == "lookup":
            x, table = node.args
            table = gm.get_buffer(table.target)
            step = _Step(kind, node.name, table.dtype, (), None, table=table.cpu(), input_dtype=integer_dtype(x))
            call = (elementwise, (x, None, step.dtype, index))
        elif kind == "add":
            a, b, qa, qb, out, relu, _ = node.args
            out = quantizer(out, what)
            step = _Step(kind, node.name, dtype_of(out), (quantizer(qa, what), quantizer(qb, what)), out,
                         relu=bool(relu))
            call = (elementwise, (a, b, step.dtype, index))
        elif kind == "mul":
            a, b, qa, qb, out, _ = node.args
            out = quantizer(out, what)
            step = _Step(kind, node.name, dtype_of(out), (quantizer(qa, what), quantizer(qb, what)), out)
            call = (elementwise, (a, b, step.dtype, index))
        else:
            if kind == "conv_add":
                layer_attr, x, residual, q_residual, out, relu, _ = node.args
                inputs = (quantizer(q_residual, what),)
            else:
                (layer_attr, x, out, _), residual, inputs, relu = node.args, None, (), False
            layer = gm.get_submodule(layer_attr.target)
            out = quantizer(out, what)
            step = _Step(kind, node.name, dtype_of(out), inputs, out, layer=_layer_state(layer_attr.target, layer),
                         relu=bool(relu))
            if isinstance(layer, QuantLinear):
                call = (_pipeline_linear, (x, layer.in_features, layer.out_features, step.dtype, index))
            else:
                call = (_pipeline_conv2d,
                        (x, layer.in_channels, residual, layer.out_channels, list(layer.kernel_size),
                         list(layer.stride), list(layer.padding), list(layer.dilation), step.dtype, index))
        steps.append(step)
        with graph.inserting_before(node):
            new = graph.call_function(*call)
        step_dtypes[new] = step.dtype
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()  # the quantizers' and layers' get_attr nodes
    gm.delete_all_unused_submodules()
    gm.recompile()
    return steps


def _zero_point(b: _GraphBuilder, act: _Activation) -> str:
    import numpy as np
    return b.const("zero_point", np.array(act.zero_point, np.int8 if act.signed else np.uint8))


def _requantized(b: _GraphBuilder, y: str, out: Optional[_Activation], output: str) -> None:
    """The float32 y to `output`: as it is (out None) or quantized to out's integers as torchquant's epilogue
    requantizes (clamp(rne(y * (1 / scale)) + zero_point), in out's 8-bit storage)."""
    if out is None:
        b.op("Identity", y, output=output)
    else:
        _quantized(b, y, b.const("inv_scale", _f32(out.inv_scale)), out, _zero_point(b, out), output)


def _dequantized(b: _GraphBuilder, q: str, act: _Activation, output: Optional[str] = None) -> str:
    return b.op("DequantizeLinear", q, b.const("scale", _f32(act.scale)), _zero_point(b, act), output=output)


def _integer_layer_nodes(b: _GraphBuilder, layer: _Layer, x_q: str, out: Optional[_Activation], y: str,
                         residual: Optional[tuple] = None, relu: bool = False) -> None:
    """The exact int32 sums of a pipeline layer (ConvInteger / MatMulInteger on its integer input), then its
    epilogue in float32 (with residual, (its tensor, its _Activation): + its DequantizeLinear, then Relu when relu)
    and requantization."""
    act = layer.activation
    if isinstance(layer.module, QuantLinear):
        acc = b.op("MatMulInteger", *_integer_weight(b, layer, layer.weight.t().contiguous(), x_q,
                                                     _zero_point(b, act), act.signed))
        channel_shape = (-1,)
    else:
        conv = layer.module
        x_q, pads = _conv_input(b, layer, x_q)
        acc = b.op("ConvInteger", *_integer_weight(b, layer, layer.weight, x_q, _zero_point(b, act),
                                                   act.signed),
                   kernel_shape=list(conv.kernel_size), strides=list(conv.stride), pads=pads,
                   dilations=list(conv.dilation), group=conv.groups)
        channel_shape = (-1, *[1] * len(conv.kernel_size))
    v = b.op("Mul", b.op("Cast", acc, to=b.onnx.TensorProto.FLOAT), b.const("input_scale", _f32(act.scale)))
    weight_scale = layer.weight_scale.reshape(channel_shape).numpy() if layer.per_channel \
        else _f32(layer.weight_scale[0])
    v = b.op("Mul", v, b.const("weight_scale", weight_scale))
    if layer.bias is not None:
        v = b.op("Add", v, b.const("bias", layer.bias.reshape(channel_shape).numpy()))
    lo, hi = layer.clamp
    if (lo, hi) == (0.0, None):
        v = b.op("Relu", v)
    elif (lo, hi) != (None, None):
        v = b.op("Clip", v, "" if lo is None else b.const("clamp_min", _f32(lo)),
                 "" if hi is None else b.const("clamp_max", _f32(hi)))
    if residual is not None:
        v = b.op("Add", v, _dequantized(b, *residual))
        v = b.op("Relu", v) if relu else v
    _requantized(b, v, out, y)


def _avg_pool_nodes(b: _GraphBuilder, step: _Step, x: str, y: str) -> None:
    """integer_avg_pool's steps on a batch x: the windows' exact sums as a Conv of each channel (as a batch of
    one-channel images) with a window of ones, in ceil mode padded at the end by stride - 1 (every window torch's
    pool has, and perhaps one more, cut off at the end), then its float32 steps in torchquant's order."""
    import numpy as np
    pool, act = step.pool, step.inputs[0]
    n, kernel, stride, padding = len(pool["kernel_size"]), pool["kernel_size"], pool["stride"], pool["padding"]
    float32, int64 = b.onnx.TensorProto.FLOAT, np.int64
    extra = [s - 1 if pool["ceil_mode"] else 0 for s in stride]
    window = b.const("window", np.ones((1, 1, *kernel), np.float32))

    def window_sums(t: str, begin: list) -> str:
        return b.op("Conv", t, window, kernel_shape=kernel, strides=stride,
                    pads=[*begin, *(p + e for p, e in zip(begin, extra))])

    def ones(spatial: str) -> str:  # float32 ones of shape [1, 1, *spatial]
        return b.op("ConstantOfShape", b.op("Concat", b.const("one_one", np.array([1, 1], int64)), spatial, axis=0),
                    value=b.onnx.helper.make_tensor("one", float32, [1], [1.0]))

    shape = b.op("Shape", x)
    batch_channels = b.op("Slice", shape, b.const("start", np.array([0], int64)), b.const("end", np.array([2], int64)))
    spatial = b.op("Slice", shape, b.const("start", np.array([2], int64)), b.const("end", np.array([2 + n], int64)))
    images = b.op("Reshape", b.op("Cast", x, to=float32),
                  b.op("Concat", b.const("minus_one_one", np.array([-1, 1], int64)), spatial, axis=0))
    inside = window_sums(ones(spatial), padding)
    total = b.op("Sub", window_sums(images, padding),
                 b.op("Mul", inside, b.const("zero_point", _f32(act.zero_point))))
    if pool["divisor_override"]:
        divisor = b.const("divisor", _f32(pool["divisor_override"]))
    elif not pool["count_include_pad"]:
        divisor = inside
    elif pool["ceil_mode"]:  # the elements of the padded input each window covers
        padded = b.op("Add", spatial, b.const("padding", np.array([2 * p for p in padding], int64)))
        divisor = window_sums(ones(padded), [0] * n)
    else:
        divisor = b.const("divisor", _f32(np.prod(kernel)))
    v = b.op("Div", b.op("Mul", total, b.const("scale", _f32(act.scale))), divisor)
    sizes = b.op("Slice", b.op("Shape", v), b.const("start", np.array([2], int64)),
                 b.const("end", np.array([2 + n], int64)))
    v = b.op("Reshape", v, b.op("Concat", batch_channels, sizes, axis=0))
    if pool["ceil_mode"]:  # torch drops a last window that would start past the input and its left padding
        steps = b.op("Mul", b.op("Sub", sizes, b.const("one", np.array([1], int64))),
                     b.const("stride", np.array(stride, int64)))
        past = b.op("GreaterOrEqual", steps, b.op("Add", spatial, b.const("padding", np.array(padding, int64))))
        ends = b.op("Sub", sizes, b.op("Cast", past, to=b.onnx.TensorProto.INT64))
        v = b.op("Slice", v, b.const("starts", np.zeros(n, int64)), ends, b.const("axes", np.arange(2, 2 + n)))
    _requantized(b, v, step.out, y)


def _adaptive_avg_pool_nodes(b: _GraphBuilder, step: _Step, x: str, y: str) -> None:
    """integer_adaptive_avg_pool's steps on a batch x: along each pooled axis of n elements, window i spans
    [i * n // out, ((i + 1) * n + out - 1) // out) (torch's adaptive windows, from the input's shape at run time);
    its exact sum of the integers less the zero point is the difference of two int64 running sums (CumSum, with a
    0 before the first), then float32 times the scale over the window's element count, as torchquant computes it."""
    import numpy as np
    int64 = np.int64
    act, sizes = step.inputs[0], step.pool["output_size"]
    rank = 2 + len(sizes)
    v = b.op("Sub", b.op("Cast", x, to=b.onnx.TensorProto.INT64),
             b.const("zero_point", np.array(act.zero_point, int64)))
    shape = b.op("Shape", x)
    counts = None
    for k, size in enumerate(sizes):
        axis = rank - len(sizes) + k
        n = b.op("Gather", shape, b.const("axis", np.array([axis], int64)))
        out = n if size < 0 else b.const("size", np.array([size], int64))
        i = b.op("Range", b.const("zero", np.array(0, int64)), b.op("Squeeze", out), b.const("one", np.array(1, int64)))
        starts = b.op("Div", b.op("Mul", i, n), out)
        ends = b.op("Div", b.op("Add", b.op("Mul", b.op("Add", i, b.const("one", np.array([1], int64))), n),
                                b.op("Sub", out, b.const("one", np.array([1], int64)))), out)
        pads = np.zeros(2 * rank, int64)
        pads[axis] = 1  # one 0 before the running sums along the axis
        running = b.op("Pad", b.op("CumSum", v, b.const("axis", np.array(axis, int64))), b.const("pads", pads))
        v = b.op("Sub", b.op("Gather", running, ends, axis=axis), b.op("Gather", running, starts, axis=axis))
        count = b.op("Reshape", b.op("Sub", ends, starts),
                     b.const("count_shape", np.array([-1] + [1] * (len(sizes) - 1 - k), int64)))
        counts = count if counts is None else b.op("Mul", counts, count)
    float32 = b.onnx.TensorProto.FLOAT
    v = b.op("Div", b.op("Mul", b.op("Cast", v, to=float32), b.const("scale", _f32(act.scale))),
             b.op("Cast", counts, to=float32))
    _requantized(b, v, step.out, y)


def _pipeline_step_nodes(b: _GraphBuilder, step: _Step, inputs: Sequence[str], y: str) -> None:
    if step.kind == "quantize":
        _requantized(b, inputs[0], step.out, y)
    elif step.kind == "dequantize":
        _dequantized(b, inputs[0], step.inputs[0], output=y)
    elif step.kind == "relu":  # max(q, zero_point): the zero point is the quantized 0
        b.op("Max", inputs[0], _zero_point(b, step.inputs[0]), output=y)
    elif step.kind == "max_pool":
        pool = step.pool  # ONNX pads: the start of each spatial axis, then their ends
        b.op("MaxPool", inputs[0], output=y, kernel_shape=pool["kernel_size"], strides=pool["stride"],
             pads=pool["padding"] * 2, dilations=pool["dilation"], ceil_mode=int(pool["ceil_mode"]))
    elif step.kind == "mean":  # integer_mean's steps: the int32 sum is exact, the float32 ones round alike
        import numpy as np
        axes = b.const("axes", np.array(step.pool["dims"], np.int64))
        codes = b.op("Sub", b.op("Cast", inputs[0], to=b.onnx.TensorProto.INT32),
                     b.const("zero_point", np.array(step.inputs[0].zero_point, np.int32)))
        total = b.op("Cast", b.op("ReduceSum", codes, axes, keepdims=int(step.pool["keepdim"])),
                     to=b.onnx.TensorProto.FLOAT)
        count = b.op("Cast", b.op("ReduceProd", b.op("Gather", b.op("Shape", inputs[0]), axes), keepdims=0),
                     to=b.onnx.TensorProto.FLOAT)
        v = b.op("Div", b.op("Mul", total, b.const("scale", _f32(step.inputs[0].scale))), count)
        _requantized(b, v, step.out, y)
    elif step.kind == "avg_pool":
        _avg_pool_nodes(b, step, inputs[0], y)
    elif step.kind == "adaptive_avg_pool":
        _adaptive_avg_pool_nodes(b, step, inputs[0], y)
    elif step.kind == "lookup":
        import numpy as np
        index = b.op("Cast", inputs[0], to=b.onnx.TensorProto.INT32)
        table = step.table
        if step.input_dtype == torch.int8:  # value v at entry v + 128: the entry of v's byte, rotated by 128
            index = b.op("Add", index, b.const("offset", np.array(128, np.int32)))
            table = torch.roll(table, 128)
        b.op("Gather", b.const("table", table.numpy()), index, output=y)
    elif step.kind == "add":
        v = b.op("Add", *(_dequantized(b, q, act) for q, act in zip(inputs, step.inputs)))
        _requantized(b, b.op("Relu", v) if step.relu else v, step.out, y)
    elif step.kind == "mul":  # each operand's DequantizeLinear rounds its product, then Mul (broadcast) the third
        _requantized(b, b.op("Mul", *(_dequantized(b, q, act) for q, act in zip(inputs, step.inputs))), step.out, y)
    elif step.kind == "conv_add":
        _integer_layer_nodes(b, step.layer, inputs[0], step.out, y, (inputs[1], step.inputs[0]), step.relu)
    else:
        _integer_layer_nodes(b, step.layer, inputs[0], step.out, y)


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether model holds torchquant layers (prepared or converted), i.e. whether export_onnx takes it."""
    return bool(quant_layers(model))


def _check_opset(opset) -> int:
    import onnx
    highest = onnx.defs.onnx_opset_version()
    if opset is None:
        return min(DEFAULT_OPSET, highest)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"export_onnx: opset must be an int or None, got {type(opset).__name__}")
    if not MIN_OPSET <= opset <= highest:
        raise ValueError(f"export_onnx: opset must be in [{MIN_OPSET}, {highest}], got {opset}")
    return opset


def _check_inputs(example_inputs, function: str = "export_onnx") -> Tuple[torch.Tensor, ...]:
    """example_inputs as a tuple of detached tensors (TypeError unless a tensor or a non-empty tuple of them)."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, tuple) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"{function}: example_inputs must be a tensor or a non-empty tuple of tensors, got "
                        f"{type(example_inputs).__name__}")
    return tuple(t.detach() for t in inputs)


def _check_path(path, function: str = "export_onnx") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{function}: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{function}: path: directory {directory} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{function}: path: {path} is a directory, expected a file name")
    return path


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the model's forward"
    path, module_type = list(stack.values())[-1]
    type_name = getattr(module_type, "__name__", str(module_type).rsplit(".", 1)[-1].strip("'>"))
    return f"module {path or '(root)'!r} ({type_name})"


@contextlib.contextmanager
def _quiet_exporters():
    """Keeps torch.export's and torch.onnx's own reports off stderr (the graph it prints on a failed trace, notes on
    missing optional libraries): export_onnx reports what went wrong itself, in one line."""
    loggers = [logging.getLogger(name) for name in ("torch.fx.experimental.symbolic_shapes", "torch.export",
                                                    "torch.onnx._internal.exporter._registration")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _traced(model: nn.Module, inputs: Tuple[torch.Tensor, ...], dynamic_batch: bool, function: str,
            dynamic_shapes=None):
    """torch.export of model (the first dimension of every input free with dynamic_batch, or the free dims
    dynamic_shapes gives, torch.export's argument); an untraceable forward, or one that fixes the batch dimension,
    becomes an ExportError that `function` raises."""
    example = inputs
    batch_only = dynamic_batch and dynamic_shapes is None  # else the caller's dims, or none free
    if batch_only:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else None for t in inputs)
        # torch.export specializes a dimension of size 1: trace a batch of 2 (the batch is only a shape here)
        inputs = tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in inputs)
    try:
        with _quiet_exporters():
            program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        constant = re.search(r"specialized it to be a constant \((\d+)\)", str(exc)) if batch_only else None
        if constant is not None:  # the model computes with a fixed first dimension (an unbatched input's features)
            fixed = [f"input {i} of shape {list(t.shape)}" for i, (t, traced) in enumerate(zip(example, inputs))
                     if traced.dim() > 0 and traced.shape[0] == int(constant[1])]
            raise ExportError(f"{function}: dynamic_batch=True leaves the first dimension of every input free as "
                              f"the batch, but the model fixes it to {constant[1]} ({', '.join(fixed) or 'an input'}):"
                              f" it is not a batch dimension (an unbatched input?); export a batched example input "
                              f"(x.unsqueeze(0) for one sample) or pass dynamic_batch=False") from exc
        lines = [line.strip() for line in str(exc).splitlines()]
        # torch.export names the user's line that failed after this header
        where = next((lines[i + 1] for i, line in enumerate(lines[:-1])
                      if line.startswith("The following call raised this error")), "")
        raise ExportError(f"{function}: the model's forward cannot be traced by torch.export"
                          f"{' (' + where + ')' if where else ''}: {type(exc).__name__}: {_first_line(exc)}; "
                          f"data-dependent control flow and Python side effects are not exportable") from exc
    return program


def _onnx_model(model: nn.Module, example_inputs, opset: Optional[int], dynamic_batch: bool):
    """(ModelProto, {layer name: (its input tensor's name, its integer input tensor's name or None)}); layers the
    forward never calls are not in the graph."""
    import onnx
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"export_onnx: dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    opset = _check_opset(opset)
    inputs = tuple(t.cpu().float() if t.is_floating_point() else t.cpu() for t in _check_inputs(example_inputs))
    names = [name for name, m in model.named_modules() if isinstance(m, QuantLayerBase)]
    if not names:
        raise ExportError(f"export_onnx: {type(model).__name__} has no quantized layers: quantize it first "
                          f"(torchquant.prepare + calibrate, or torchquant.quantize_model)")

    if "" in names:
        raise ExportError("export_onnx: the model is itself a single quantized layer; wrap it in a module")
    copied = copy.deepcopy(model).cpu().float().eval()
    floor_learned_scales(copied)  # as the next forward would: an optimizer step may have left them <= 0
    steps = []
    if pipeline.is_pipeline(copied):
        try:  # a prepared pipeline is exported as convert makes it
            pipeline.convert_pipeline(copied)
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"export_onnx: the integer pipeline cannot be converted: {exc}") from exc
        steps = _pipeline_steps(copied)
        # the layers the pipeline still calls as modules (one called more than once runs on its own)
        names = [name for name, m in copied.named_modules() if isinstance(m, QuantLayerBase)]
    quant_layers = [copied.get_submodule(name) for name in names]  # read from the copy: nothing touches the model
    placeholders = {id(layer): _Placeholder(layer, index) for index, layer in enumerate(quant_layers)}
    # every name of a layer the model holds under several (a module called from two places) gets its placeholder
    for parent in list(copied.modules()):
        for child, module in parent._modules.items():
            if id(module) in placeholders:
                parent._modules[child] = placeholders[id(module)]
    with torch.no_grad():
        program = _traced(copied, inputs, dynamic_batch, "export_onnx")
        for node in program.graph.nodes:
            target = node.target
            if node.op == "call_function" and getattr(target, "namespace", None) == "torchquant":
                raise ExportError(f"export_onnx: {_module_of(node)} calls {target.name()}, which has no ONNX mapping "
                                  f"(only QuantLinear, QuantConv2d and QuantConv1d layers are exported)")
        try:
            with _quiet_exporters():
                onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset,
                                                 custom_translation_table=_translations(), verbose=False)
        except Exception as exc:
            raise ExportError(f"export_onnx: torch.onnx could not convert the model ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from exc
    _type_pipeline_steps(onnx_program.model, steps)
    proto = onnx_program.model_proto
    tensors = _replace_placeholders(proto, quant_layers, names, steps, opset)
    _sums_before_layer_norms(proto.graph)
    onnx.checker.check_model(proto)
    return proto, tensors


def _sums_before_layer_norms(graph) -> None:
    """Rewrites each Add whose output a LayerNormalization normalizes as Sum of the same two inputs (the same float
    sum, broadcast alike). onnxruntime fuses Add + LayerNormalization (and a bias Add before it) into its
    SkipLayerNormalization, whose CPU kernel takes 3x (1 x 12 x 384) to 8x (32 x 20 x 384) the time of Add and
    LayerNormalization run apart in onnxruntime 1.32: 12 of them were a quarter of all-MiniLM-L6-v2's time. The
    fusion matches Add only."""
    normalized = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx")}
    for node in graph.node:
        if node.op_type == "Add" and node.domain in ("", "ai.onnx") and node.output[0] in normalized:
            node.op_type = "Sum"


def _type_pipeline_steps(model, steps: Sequence[_Step]) -> None:
    """Sets the type of each pipeline step's output in the exported IR model, which the exporter does not always
    keep (the placeholder's schema allows several)."""
    import onnx_ir as ir
    types = {torch.float32: ir.DataType.FLOAT, torch.uint8: ir.DataType.UINT8, torch.int8: ir.DataType.INT8}
    for node in model.graph:
        if node.domain == _DOMAIN and node.op_type == "PipelineStep":
            node.outputs[0].dtype = types[steps[node.attributes["index"].value].dtype]


def _replace_placeholders(proto, quant_layers: Sequence[QuantLayerBase], names: Sequence[str],
                          steps: Sequence[_Step], opset: int) -> dict:
    """Replaces each placeholder node of proto by its layer's (or pipeline step's) subgraph (layers sharing an
    input and a dynamic format: one subgraph) and drops the placeholder domain. Returns _onnx_model's layer ->
    tensor names map."""
    graph = proto.graph
    original = list(graph.node)
    indices = {i: next(a.i for a in node.attribute if a.name == "index")
               for i, node in enumerate(original) if node.domain == _DOMAIN}
    called = {i: index for i, index in indices.items() if original[i].op_type == "QuantLayer"}
    pipeline_steps = {i: steps[index] for i, index in indices.items() if original[i].op_type == "PipelineStep"}
    # the integer state of the layers the forward calls (a layer it never calls may be uncalibrated)
    states = {index: _layer_state(names[index], quant_layers[index]) for index in set(called.values())}
    placeholders = {i: states[index] for i, index in called.items()}
    groups = {}
    for i, layer in placeholders.items():
        groups.setdefault(_group_key(original[i], layer, i), []).append(i)
    nodes, tensors, group_q_names = [], {}, {}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.input, *graph.value_info)
             if v.type.tensor_type.HasField("shape")}
    for i, node in enumerate(original):
        step = pipeline_steps.get(i)
        if step is not None:
            builder = _GraphBuilder(re.sub(r"[^A-Za-z0-9_.]", "_", step.node), opset)
            _pipeline_step_nodes(builder, step, node.input, node.output[0])
            nodes.extend(builder.nodes)
            graph.initializer.extend(builder.initializers)
            if step.layer is not None:
                tensors[step.layer.name] = (node.input[0], node.input[0])
            continue
        layer = placeholders.get(i)
        if layer is None:
            nodes.append(node)
            continue
        key = _group_key(node, layer, i)
        members = groups[key]
        if members[0] == i:
            calls = sum(1 for p in placeholders if p < i and placeholders[p] is layer)  # a module called again
            suffix = f"/call{calls + 1}" if calls else ""
            builder = _GraphBuilder(re.sub(r"[^A-Za-z0-9_.]", "_", layer.name) + suffix, opset)
            q_name = group_q_names[key] = input_q_name(layer.name) + suffix
            if key[0] == "alone":
                _clamped_outputs(builder, [layer], [node.output[0]],
                                 lambda ys: _layer_nodes(builder, layer, node.input[0], ys[0], q_name))
            else:
                layers = [placeholders[m] for m in members]
                _clamped_outputs(builder, layers, [original[m].output[0] for m in members],
                                 lambda ys: _linear_integer(builder, layers, node.input[0], ys, q_name,
                                                            ranks.get(node.input[0], 1)))
            nodes.extend(builder.nodes)
            graph.initializer.extend(builder.initializers)
        q_name = group_q_names[key] if layer.activation is not None else None
        tensors.setdefault(layer.name, (node.input[0], q_name))  # a module called again: its first call
    del graph.node[:]
    graph.node.extend(nodes)
    imports = [o for o in proto.opset_import if o.domain != _DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    return tensors


def export_onnx(model: nn.Module, example_inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
                path: Union[str, os.PathLike], *, opset: Optional[int] = None, dynamic_batch: bool = True,
                force: bool = False) -> str:
    """Writes a prepared (fake-quant) or converted `model` to `path` as standard ONNX (QuantizeLinear /
    DequantizeLinear around its quantized MatMul / Conv; MatMulInteger for dynamically quantized Linear layers)
    and returns the path.

    `example_inputs`: a tensor or a tuple of tensors, the forward's arguments (floating ones are exported as
    float32). `opset`: ONNX opset, 18 or later (default 21: 4-bit weights stored as INT4). `dynamic_batch`: the
    first dimension of every input is left free. The model is not modified. The file is written whole or not at
    all (a temporary file renamed into place); an existing read-only file raises PermissionError unless force=True
    (like cp -f). An integer pipeline (preset 'int8-pipeline') is written with its
    integers end to end (ConvInteger / MatMulInteger, integer adds, max-pool on integers), as convert makes it.
    Raises ExportError (naming the module or graph node and the reason) for a float model, an uncalibrated static
    layer or pipeline, a torchquant op outside a QuantLinear/QuantConv2d or a pipeline's known ops, or a forward
    that torch.export cannot trace; ModuleNotFoundError when onnx or onnxscript is missing (pip install
    'torchquant[onnx]')."""
    path = _check_path(path)
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(f"export_onnx needs {package}: pip install 'torchquant[onnx]'") from exc
    proto, _ = _onnx_model(model, example_inputs, opset, dynamic_batch)
    import onnx
    with atomic_write(path, "export_onnx: path", force=force) as temp:
        onnx.save(proto, temp)
    return path


# The oldest torch whose AOTInductor runs torchquant's ops correctly from a package: torch 2.11's passes them wrong
# arguments (a float32 out_dtype arrived as float64 on CUDA) or crashes loading the package (CPU).
AOTI_MIN_TORCH = (2, 13)


def aoti_supported() -> bool:
    """Whether this torch's AOTInductor can package torchquant's ops (export_aoti): its release, major.minor, at
    least AOTI_MIN_TORCH (a 2.13 pre-release or source build counts as 2.13)."""
    release = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return release is not None and (int(release[1]), int(release[2])) >= AOTI_MIN_TORCH


def export_aoti(model: nn.Module, example_inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
                path: Union[str, os.PathLike], *, dynamic_batch: bool = True, dynamic_shapes=None,
                force: bool = False) -> str:
    """Compiles `model` (converted, or prepared) ahead of time with AOTInductor into a package at `path` (a .pt2
    file) and returns the path. torch.export traces the model with torchquant's ops kept as ops; AOTInductor
    compiles the rest. Run it where torchquant is imported (it registers the ops the package calls):
    `torch._inductor.aoti_load_package(path)(*inputs)`. A package checks no guards and runs no Python per op, which
    makes it the fastest way to run a converted model at small batches (a transformer at batch 1).

    The package runs on the device and in the dtypes of the model and of `example_inputs` (a tensor or a tuple of
    tensors, the forward's arguments). `dynamic_batch`: the first dimension of every input is left free.
    `dynamic_shapes`: torch.export.export's argument instead, for other free dims (a transformer's sequence length:
    `tuple({0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")} for _ in inputs)`); the examples' free
    dims must then be at least 2 (torch.export fixes a dim of size 1). The model is not modified (an eval-mode copy
    is compiled). The file is written whole or not at all; an existing read-only file raises PermissionError unless
    force=True. Raises ExportError for a forward that torch.export cannot trace
    (naming the line), or one that fixes the first dimension with dynamic_batch=True; ValueError unless path ends in
    .pt2 (AOTInductor's suffix). Compiling takes a C++ compiler and seconds to minutes (inductor compiles every
    fused kernel). Needs torch 2.13 or newer (aoti_supported; ExportError on older ones)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_aoti: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"export_aoti: dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    inputs = _check_inputs(example_inputs, "export_aoti")
    path = _check_path(path, "export_aoti")
    if not path.endswith(".pt2"):
        raise ValueError(f"export_aoti: path must end in .pt2 (an AOTInductor package), got {path}")
    if not aoti_supported():
        raise ExportError(f"export_aoti: AOTInductor packages of torchquant's ops need torch "
                          f"{'.'.join(map(str, AOTI_MIN_TORCH))} or newer, this is torch {torch.__version__} (whose "
                          f"AOTInductor runs the ops with wrong arguments or crashes loading the package)")
    copied = copy.deepcopy(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # a note about torch's own internals that packaging raises
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        program = _traced(copied, inputs, dynamic_batch, "export_aoti", dynamic_shapes)
        with atomic_write(path, "export_aoti: path", force=force) as temp:  # its name ends in .pt2 too
            torch._inductor.aoti_compile_and_package(program, package_path=temp)
    return path
