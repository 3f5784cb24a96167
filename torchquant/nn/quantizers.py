"""Fake quantizers for a layer's weight and its input activations, with LSQ learned scales.

The fake-quant forward uses functional.fake_quantize with exactly the qparams the converted layer stores, so the
converted layer computes the same function (up to float summation order).
"""
from __future__ import annotations

import math

import torch

from torchquant import functional as F_q
from torchquant._ops.quantize import qrange
from torchquant.config import QuantSpec
from torchquant.observers import Float32StateModule, Observer, batch_range, qparams_from_range

_TINY = torch.finfo(torch.float32).tiny


def _channel_view(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """t [C] shaped to broadcast against x along axis."""
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def floor_learned_scale(scale: torch.nn.Parameter) -> torch.Tensor:
    """scale, floored in place at the smallest scale the kernels take: an optimizer step may take a learned scale
    to 0 or below, and training goes on (torch.ao's learnable fake-quant clamps its own alike; convert, save and
    export floor it too: floor_learned_scales). Through .data, outside autograd's version
    counting, so that a graph built before (gradient accumulation) still runs its backward; a scale above the
    floor keeps its value."""
    scale.data.clamp_(min=_TINY)
    return scale


class _LSQFakeQuantize(torch.autograd.Function):
    """fake_quantize with a learned scale: straight-through gradient to x and the LSQ gradient to scale
    (Esser et al. 2020: d x_hat / d s = round(x/s) - x/s inside the range, q_min - z or q_max - z outside,
    scaled by 1 / sqrt(elements per scale * q_max))."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec: QuantSpec, axis):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.spec, ctx.axis = spec, axis
        return fake_quantize_spec(x, scale.detach(), zero_point, spec, axis)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        spec, axis = ctx.spec, ctx.axis
        qmin, qmax = qrange(spec.bits, spec.signed)
        s = _channel_view(scale.float(), x, axis)
        z = _channel_view(zero_point.float(), x, axis)
        v = x.float() * (1.0 / s)
        if spec.bits == 1 and spec.signed:
            q = torch.where(v >= 0, 1.0, -1.0)
            inside = v.abs() <= 1
        else:
            r = torch.round(v) if spec.rounding == "nearest" else torch.trunc(v)
            inside = (r + z >= qmin) & (r + z <= qmax)
            q = torch.clamp(r + z, qmin, qmax) - z
        g = grad.float()
        grad_x = torch.where(inside, g, 0.0).to(x.dtype)
        per_scale = x.numel() // scale.numel()
        grad_scale_factor = 1.0 / math.sqrt(max(per_scale, 1) * max(qmax, 1))
        term = g * (q - torch.where(inside, v, 0.0))
        dims = [d for d in range(x.dim()) if d != axis]
        grad_scale = (term.sum(dim=dims) if dims else term).reshape(scale.shape) * grad_scale_factor
        return grad_x, grad_scale.to(scale.dtype), None, None, None


def fake_quantize_spec(x, scale, zero_point, spec: QuantSpec, axis):
    return F_q.fake_quantize(x, scale, zero_point, bits=spec.bits, signed=spec.signed, rounding=spec.rounding,
                             axis=axis)


class WeightQuantizer(Float32StateModule):
    """Weight fake quantizer: qparams from the current weight (per channel along dim 0, or per tensor), or a
    learned scale (learn_scale) initialised from that range on first use."""

    def __init__(self, spec: QuantSpec, out_channels: int):
        super().__init__()
        self.spec = spec
        self.axis = 0 if spec.granularity == "per_channel" else None
        channels = out_channels if self.axis == 0 else 1
        if spec.learn_scale:
            self.scale = torch.nn.Parameter(torch.ones(channels))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def observed_qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = batch_range(weight, self.spec, self.axis)
        return qparams_from_range(lo, hi, self.spec)

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32 [C], zero_point int32 [C]) the weight is quantized with now."""
        if not self.spec.learn_scale:
            return self.observed_qparams(weight)
        # compiled, the scale is selected by the flag rather than branched on its value (which would break the graph),
        # and written through .data as _observe writes an input's learned scale
        if torch.compiler.is_compiling() or not self.initialized.item():
            with torch.no_grad():
                self.scale.data.copy_(torch.where(self.initialized, self.scale, self.observed_qparams(weight)[0]))
                self.initialized.fill_(True)
        zero_point = torch.zeros(self.scale.shape, dtype=torch.int32, device=self.scale.device)
        return self.scale, zero_point

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams(weight)
        if self.spec.learn_scale:
            return _LSQFakeQuantize.apply(weight, floor_learned_scale(scale), zero_point, self.spec, self.axis)
        return fake_quantize_spec(weight, scale, zero_point, self.spec, self.axis)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weight, float32 scale [out_channels]) as the converted layer stores them."""
        scale, zero_point = self.qparams(weight)
        scale = scale.detach().float()
        q = F_q.quantize(weight, scale, zero_point, bits=self.spec.bits, signed=True,
                         rounding=self.spec.rounding, axis=self.axis)
        return q, scale.expand(weight.shape[0]).contiguous()

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, {self.spec.granularity}, observer={self.spec.observer}"


class InputQuantizer(Float32StateModule):
    """Activation fake quantizer.

    dynamic: qparams from each input (per token over the last dim when the layer allows it, else per tensor).
    static: an Observer records ranges while `observing` (training or calibrating); `scale`/`zero_point`
    (per tensor) follow it, or `scale` is learned (LSQ) after being initialised from the first observation.
    Before anything was observed a static quantizer passes its input through unchanged.
    """

    def __init__(self, spec: QuantSpec, per_token_ok: bool):
        super().__init__()
        self.spec = spec
        self.per_token = spec.dynamic and spec.granularity == "per_token" and per_token_ok
        self.calibrating = False
        if not spec.dynamic:
            self.observer = Observer(spec, axis=None, num_channels=1, sync=True)
            if spec.learn_scale:
                self.scale = torch.nn.Parameter(torch.ones(1))
            else:
                self.register_buffer("scale", torch.ones(1))
            self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))

    @property
    def ready(self) -> bool:
        """A static quantizer is ready once it has observed data (dynamic ones always are)."""
        return self.spec.dynamic or self.observer.has_data

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Observes x (not empty) and sets the qparams from the range: a learned scale only from the first one, then it
        is trained (selected by the count as a tensor: a branch on its value would break a compiled step's graph)."""
        first = self.observer.batches == 0
        self.observer(x)
        scale, zero_point = qparams_from_range(self.observer.lo, self.observer.hi, self.spec)
        if self.spec.learn_scale:
            scale, zero_point = torch.where(first, scale, self.scale), torch.where(first, zero_point, self.zero_point)
        # (through .data: a learned scale and its zero point rewritten with their own values keep their autograd
        # versions, so that a graph built before, as in gradient accumulation, still runs its backward)
        self.scale.data.copy_(scale)
        self.zero_point.data.copy_(zero_point)

    def dynamic_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run-time scale: per token ([rows]) of x viewed as [rows, K], or per tensor ([1]); zero point 0. (A converted
        layer's C++ entry, quantized_layer_forward in csrc/python_calls.cpp, computes the per-tensor CPU case the
        same way: keep the two alike.)"""
        x = x.detach()
        if self.per_token:
            if x.dim() == 0:
                raise ValueError("per-token activation quantization needs an input with a feature dimension [..., K], "
                                 "got a 0-d tensor")
            return F_q.quantize_per_token(x.reshape(-1, x.shape[-1]), bits=self.spec.bits)[1], None
        if x.numel() == 0:  # an empty batch has no range; any scale quantizes it to nothing
            return torch.ones(1, device=x.device), None
        if self.spec.bits == 1 or x.device.type != "cpu":
            # (a GPU reduces one long row in a single block: choose_qparams' parallel reductions win there)
            return F_q.choose_qparams(x, bits=self.spec.bits, signed=True, symmetric=True)[0], None
        # choose_qparams' symmetric signed scale (finite absmax / qmax, 1.0 for no range, at least the smallest
        # normal float32) in one pass and two calls, instead of a dozen elementwise ops: the per-token scale of x
        # as a single row, in memory order (a channels-last conv input's row is a view: reshaped as it is, a copy,
        # which under torch.compile made a converted int8-dynamic CNN slower than eager)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            x = x.permute(0, 2, 3, 1)
        scale = F_q.quantize_per_token(x.reshape(1, -1), bits=self.spec.bits)[1]
        return scale.clamp_(min=_TINY), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.dynamic:
            scale, _ = self.dynamic_qparams(x)
            if self.per_token:
                rows = x.reshape(-1, x.shape[-1])
                return fake_quantize_spec(rows, scale, 0, spec, 0).reshape(x.shape)
            return fake_quantize_spec(x, scale, 0, spec, None)
        if (self.training or self.calibrating) and x.numel() > 0:  # (an empty batch carries no range)
            self._observe(x)
            return self._fake_quantize_static(x, observing=True)
        # torch.export traces the observer's count as an unknown symbol: an exported quantizer is taken as calibrated
        # (export_onnx checks that it is)
        if hasattr(torch.compiler, "is_exporting") and torch.compiler.is_exporting():
            return self._fake_quantize_static(x)
        if torch.compiler.is_compiling():  # (a branch on the count's value would break the graph)
            return torch.where(self.observer.batches > 0, self._fake_quantize_static(x), x)
        return self._fake_quantize_static(x) if self.observer.has_data else x

    def _fake_quantize_static(self, x: torch.Tensor, observing: bool = False) -> torch.Tensor:
        spec = self.spec
        if spec.learn_scale:
            return _LSQFakeQuantize.apply(x, floor_learned_scale(self.scale), self.zero_point, spec, None)
        if observing:  # autograd keeps this call's qparams, which the next observed call (a layer or quantizer used
            # twice before backward) updates in place
            return fake_quantize_spec(x, self.scale.clone(), self.zero_point.clone(), spec, None)
        return fake_quantize_spec(x, self.scale, self.zero_point, spec, None)

    def quantize(self, x: torch.Tensor, zero_point: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_q int8/uint8 shaped like x, x_scale) for the converted layer: x_scale is per token ([rows] of x
        viewed as [rows, K]) or [1]."""
        spec = self.spec
        if spec.dynamic:
            scale, _ = self.dynamic_qparams(x)
            if self.per_token:
                rows = x.reshape(-1, x.shape[-1])
                q = F_q.quantize(rows, scale, 0, bits=spec.bits, signed=True, rounding=spec.rounding, axis=0)
                return q.reshape(x.shape), scale
        else:
            scale = self.scale.detach()
        q = F_q.quantize(x, scale, zero_point, bits=spec.bits, signed=spec.signed, rounding=spec.rounding)
        return q, scale

    def extra_repr(self) -> str:
        kind = "dynamic " + ("per_token" if self.per_token else "per_tensor") if self.spec.dynamic else "static"
        return f"bits={self.spec.bits}, {kind}"


def floor_learned_scales(model: torch.nn.Module) -> None:
    """floor_learned_scale on every learned scale of model's quantizers, as their next forward would do: convert,
    save and export read the scales an optimizer step may have left at 0 or below."""
    for module in model.modules():
        if isinstance(module, (WeightQuantizer, InputQuantizer)) and module.spec.learn_scale:
            floor_learned_scale(module.scale)
