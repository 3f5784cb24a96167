"""The state machine shared by QuantLinear and QuantConv2d.

fake-quant (from construction): `weight`/`bias` are the nn.Linear/nn.Conv2d parameters; forward fake-quantizes
the weight (WeightQuantizer) and the input (InputQuantizer) and runs the float op, with straight-through (or LSQ)
gradients, so the layer trains like its float counterpart.

folded BatchNorm (`attach_bn`, done by prepare): the layer also applies the BatchNorm that followed it (a
torchquant.fold.FoldedBatchNorm2d/1d left at the BatchNorm's place, which owns its tensors) and quantizes
the folded weight w * gamma / sqrt(var + eps) with bias beta + (b - mean) * gamma / sqrt(var + eps): in training
with the statistics of the batch (computed by an extra float pass, the running statistics updated as the
BatchNorm would) until the statistics are frozen (`freeze_bn_stats`, or after QuantConfig.freeze_bn_after training
steps), otherwise with the running statistics, which is what convert() stores.

converted (`convert()`): the float weight is replaced by integer buffers, `qweight` (int8 [out, ...], or for
bits <= 4 two signed nibbles per byte, uint8 [out, ceil(n / 2)]) and `weight_scale` (float32 [out]); forward
runs the integer kernels. The kernels' packed weight layout depends on the device, so it lives in non-persistent
buffers rebuilt from `qweight` whenever the layer moves (`_apply`) or loads a state dict.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn as nn

from torch.compiler import is_dynamo_compiling

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # (older torch)
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing

from torchquant import _C
from torchquant import functional as F_q
from torchquant._ops import FLOAT_DTYPES, ops
from torchquant.config import QuantConfig, resolve_config
from torchquant.fold import fold_running, folded_weight_bias
from torchquant.nn.quantizers import InputQuantizer, WeightQuantizer, floor_learned_scales
from torchquant.observers import moved_state


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] -> uint8 [N, ceil(K / 2)]: element 2j in the low nibble, 2j+1 high."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, ceil(K / 2)] -> int8 [N, K] (nibbles sign-extended)."""
    p = packed.to(torch.int16)
    low = ((p & 0xF) ^ 8) - 8
    high = ((p >> 4) ^ 8) - 8
    return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :k].to(torch.int8)


def is_clamp_bound(value) -> bool:
    """Whether value can bound a fused activation clamp: a number the kernels' float32 epilogue holds finite."""
    # (the magnitude first: math.isfinite of an int beyond float64 raises OverflowError)
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and abs(value) <= torch.finfo(torch.float32).max and math.isfinite(value))


def set_weight_spec(layer: "QuantLayerBase", spec) -> None:
    """Gives a fake-quant layer another weight spec (a new weight quantizer; its input quantizer stays)."""
    layer.config = dataclasses.replace(layer.config, weight=spec)
    layer.weight_quantizer = WeightQuantizer(spec, layer.weight_shape[0]).to(layer.weight.device)


def _computed_weight(module: nn.Module) -> str | None:
    """Why module's weight cannot be quantized in place (it is computed on every call), or None."""
    if isinstance(module.weight, nn.Parameter):
        return None
    # torch.nn.utils.weight_norm / spectral_norm: a forward pre-hook computes it from other parameters
    return (f"its weight is not a parameter but a {type(module.weight).__name__} computed from others (as "
            f"torch.nn.utils.weight_norm / spectral_norm do; remove_weight_norm / remove_spectral_norm first to "
            f"quantize it)")


# the hooks a float layer hands to the quantized layer taking its place (with the flags that say how they are called)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def take_hooks(new: nn.Module, module: nn.Module) -> None:
    """new takes over module's forward and backward hooks: the same dicts, not copies, so that a handle registering a
    hook on module returned removes it from new too (hooks registered on either later run around both)."""
    for hooks in _HOOK_DICTS:
        new.__dict__[hooks] = getattr(module, hooks)
    if module._is_full_backward_hook is not None:
        new._is_full_backward_hook = module._is_full_backward_hook


def warn_if_gradient_cut(what: str, x: torch.Tensor) -> None:
    """Warns where integer kernels receive an x that autograd records (they have no gradient: their output
    leaves x's graph, and a backward through it would silently leave out what went through them)."""
    if x.requires_grad and torch.is_grad_enabled() and not is_dynamo_compiling():
        warnings.warn(f"{what}: a converted model's integer kernels have no gradient, so their output is cut from "
                      f"the autograd graph of an input that requires grad: train the prepared (fake-quant) model, "
                      f"and run the converted one under torch.no_grad() or torch.inference_mode()", UserWarning,
                      stacklevel=2)


class QuantLayerBase(nn.Module):
    """Subclasses set FLOAT_TYPE and implement the constructor (calling _init_quant), _like, _float_op,
    _int_op, _input_features, _pack, _check_input and _shape_repr."""

    FLOAT_TYPE: type = nn.Module
    PER_TOKEN_INPUT = False  # whether per-token activation scales apply (Linear) or become per tensor (Conv)
    # the weight parameter of a layer made from a Hugging Face Conv1D keeps that layer's [in, out] layout (its state
    # dict and optimizers stay as they were); the layer computes with its transpose (_float_weight)
    weight_transposed = False

    def _init_quant(self, config) -> None:
        """Called by subclass constructors once `weight` exists."""
        if self.weight.dtype not in FLOAT_DTYPES:
            # the quantize kernels take these only: refused here, before prepare changes the model
            raise TypeError(f"{type(self).__name__}: the weight must be float32, float16 or bfloat16, got "
                            f"{self.weight.dtype} (convert the model with .float() first)")
        if self.weight.numel() == 0:
            # nothing to quantize, and no scale to choose (prepare fails here, before it changes the model)
            raise ValueError(f"{type(self).__name__}: cannot quantize an empty weight (shape "
                             f"{list(self.weight.shape)}): every feature and channel count must be >= 1 (leave such "
                             f"a layer float with QuantConfig.skip)")
        self.config: QuantConfig = resolve_config(config)
        self.converted = False
        self.bn = None  # the folded BatchNorm (attach_bn)
        self.folded_bn = None  # its name in the model, for reports and checkpoints
        self.bn_frozen = False
        # in an integer pipeline (torchquant.graph) the input arrives quantized by the pipeline's quantizer of that
        # tensor, which input_quantizer then references without owning
        self.graph_input = False
        self.weight_shape = tuple(self.weight.shape)
        self.clamp_min = None  # the fused output activation (set_activation_clamp)
        self.clamp_max = None
        self._build_quantizers()
        self.fused = self._has_fused_forward()
        self.register_load_state_dict_pre_hook(QuantLayerBase._before_load)
        self.register_load_state_dict_post_hook(QuantLayerBase._after_load)

    def _build_quantizers(self) -> None:
        # quantization state is float32 whatever the layer's dtype, on the weight's device
        device = self.weight.device
        self.weight_quantizer = WeightQuantizer(self.config.weight, self.weight_shape[0]).to(device)
        act = self.config.activation
        self.input_quantizer = None if act is None else InputQuantizer(act, self.PER_TOKEN_INPUT).to(device)

    # ---- construction from a float layer ----
    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why module (of FLOAT_TYPE) has no quantized form, so that model conversion leaves it float, or None."""
        return _computed_weight(module)

    @classmethod
    def replaces(cls, module: nn.Module) -> bool:
        """Whether module is a float layer this type quantizes (exact types: a subclass may be used through its
        weight directly, which a swapped layer would not see)."""
        return type(module) is cls.FLOAT_TYPE

    @classmethod
    def _float_type_names(cls) -> str:
        return cls.FLOAT_TYPE.__name__

    @classmethod
    def from_float(cls, module: nn.Module, config=None):
        """A fake-quant layer sharing `module`'s weight and bias parameters (optimizers keep working) and its forward
        and backward hooks (they run around the quantized layer where they ran around the float one, and the handles
        register_forward_hook & co. returned remove them from both)."""
        if not cls.replaces(module):
            raise TypeError(f"{cls.__name__}.from_float: module must be a {cls._float_type_names()}, "
                            f"got {type(module).__name__}")
        reason = _computed_weight(module)
        if reason is not None:
            raise ValueError(f"{cls.__name__}.from_float: {reason}")
        layer = cls._like(module, config, device="meta")  # no throwaway weight allocation
        layer.weight = module.weight
        layer.bias = module.bias
        layer._build_quantizers()
        layer.train(module.training)
        take_hooks(layer, module)
        return layer

    # ---- BatchNorm folding ----
    def attach_bn(self, bn: nn.Module, name: str | None = None) -> None:
        """Folds bn (which the caller removes from the model's forward) into this fake-quant layer; name: where
        it was in the model."""
        if self.converted:
            raise RuntimeError(f"{type(self).__name__}.attach_bn: the layer is already converted")
        # referenced, not registered: the module at the BatchNorm's place owns (saves, moves) its tensors
        self.__dict__["bn"] = bn
        self.folded_bn = name
        # training steps with batch statistics since: a tensor counted in the graph (a Python int is a value
        # torch.compile guards on, and compiled the training step again at every step); checkpoints record it
        self.register_buffer("bn_step_count", torch.zeros((), dtype=torch.int64, device=self.weight.device),
                             persistent=False)

    # The folded BatchNorm's training state is in the layer's state_dict (bn_step_count, bn_frozen: a training run
    # resumed from a state_dict goes on where it stopped) and optional when one loads: a float model's checkpoint,
    # or one written before, leaves the layer's state as it is.
    BN_STATE_KEYS = ("bn_step_count", "bn_frozen")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bn is not None:
            count = self.bn_step_count
            destination[prefix + "bn_step_count"] = count if keep_vars else count.detach()
            destination[prefix + "bn_frozen"] = torch.tensor(self.bn_frozen, device=count.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.bn is None:  # (a layer without a folded BatchNorm: the keys stay unexpected)
            return
        for key in self.BN_STATE_KEYS:
            if prefix + key in unexpected_keys:
                unexpected_keys.remove(prefix + key)
        steps, frozen = (state_dict.get(prefix + key) for key in self.BN_STATE_KEYS)
        if steps is not None:
            if (not isinstance(steps, torch.Tensor) or steps.numel() != 1 or steps.is_floating_point()
                    or steps.is_complex() or steps.dtype == torch.bool or int(steps) < 0):
                error_msgs.append(f"{prefix}bn_step_count must be a non-negative integer tensor of one element, got "
                                  f"{steps!r}")
            else:
                self.bn_steps = int(steps)
        if frozen is not None:
            if not isinstance(frozen, torch.Tensor) or frozen.numel() != 1 or frozen.dtype != torch.bool:
                error_msgs.append(f"{prefix}bn_frozen must be a bool tensor of one element, got {frozen!r}")
            else:
                self.bn_frozen = bool(frozen)

    @property
    def bn_steps(self) -> int:
        """Training steps with batch statistics since the BatchNorm was attached (0 without one)."""
        count = self._buffers.get("bn_step_count")
        return 0 if count is None else int(count)

    @bn_steps.setter
    def bn_steps(self, steps: int) -> None:
        self.bn_step_count.fill_(steps)

    def freeze_bn_stats(self) -> None:
        """From now on the folded BatchNorm's running statistics are fixed and used in training too."""
        self.bn_frozen = True

    def _bn_uses_batch_stats(self) -> bool:
        after = self.config.freeze_bn_after
        # the BatchNorm's own mode, as in the float model (a BatchNorm set to eval() alone fine-tunes on its
        # running statistics); the step count is read only with a limit (compiled, a graph break)
        return self.bn.training and not self.bn_frozen and (after is None or self.bn_steps < after)

    def _batch_folded_weight_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias folded with the statistics of this batch's float output; updates the running
        statistics like the BatchNorm's own training forward. The layer's bias cancels in the normalization; it stays
        in the graph so that it gets its (zero) gradient, as before a BatchNorm (DistributedDataParallel expects a
        gradient for every parameter)."""
        bn = self.bn
        y = self._float_op(x, self._float_weight(), self.bias)
        dims = [0, *range(2, y.dim())]
        count = y.numel() // max(y.shape[1], 1)
        if count <= 1:
            raise ValueError(f"{type(self).__name__}: the folded BatchNorm needs more than one value per channel "
                             f"in training, got an output of shape {list(y.shape)}")
        # the mean, then the mean square of the deviations, as the CPU BatchNorm computes them (torch.var_mean over
        # these dims took 3-5x as long on the CPU: a tenth of a CNN's QAT step)
        y = y.float()
        mean = y.mean(dim=dims)
        var = (y - mean.reshape(-1, *[1] * (y.dim() - 2))).square().mean(dim=dims)
        self.bn_step_count.add_(1)
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            bn.running_var.lerp_((var * (count / (count - 1))).to(bn.running_var.dtype), momentum)
        return folded_weight_bias(self._float_weight(), self.bias, bn, mean, var)

    def _other_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """weight in the other of the layer's [out, ...] layout (weight_shape) and the float layer's: its transpose
        for a Conv1D's, itself for the others."""
        return weight.t() if self.weight_transposed else weight

    def _float_weight(self) -> torch.Tensor:
        """The float weight parameter in the layer's [out, ...] layout (weight_shape)."""
        return self._other_layout(self.weight)

    def float_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight and bias this layer quantizes (fake-quant layers): with the folded BatchNorm's running
        statistics folded in when there is one."""
        if self.bn is None:
            return self._float_weight(), self.bias
        return fold_running(self._float_weight(), self.bias, self.bn)

    # ---- fused output activation ----
    def set_activation_clamp(self, clamp_min: float | None = None, clamp_max: float | None = None) -> None:
        """Makes the layer's output y = clamp(y, clamp_min, clamp_max) (each bound when given; ReLU: clamp_min=0,
        ReLU6 / hardtanh: both), computed by the integer kernels' epilogue once converted and by torch.clamp before;
        no bounds removes it."""
        for name, value in (("clamp_min", clamp_min), ("clamp_max", clamp_max)):
            if value is not None and not is_clamp_bound(value):
                raise ValueError(f"{type(self).__name__}.set_activation_clamp: {name} must be None or a number "
                                 f"finite as float32, got {value!r}")
        if clamp_min is not None and clamp_max is not None and clamp_min > clamp_max:
            raise ValueError(f"{type(self).__name__}.set_activation_clamp: clamp_min ({clamp_min}) must not exceed "
                             f"clamp_max ({clamp_max})")
        self.clamp_min = None if clamp_min is None else float(clamp_min)
        self.clamp_max = None if clamp_max is None else float(clamp_max)

    def _clamped(self, y: torch.Tensor) -> torch.Tensor:
        """The fused activation applied outside a kernel (fake-quant, weight-only and per-token forwards)."""
        if self.clamp_min is None and self.clamp_max is None:
            return y
        return torch.clamp(y, self.clamp_min, self.clamp_max)

    def __prepare_scriptable__(self):
        # (torch.jit.script calls it on every module before compiling: without it the error names TorchScript's
        # failure to type a QuantSpec)
        raise RuntimeError(f"{type(self).__name__}: torchquant's layers are not TorchScript-scriptable; trace the "
                           f"model instead (torch.jit.trace), or export it (torch.export, torchquant.export_aoti, "
                           f"torchquant.export_onnx) or compile it (torch.compile)")

    # ---- forward ----
    def _check_folded_input(self, x) -> None:
        """The BatchNorm folded into the layer normalizes dim 1 of a batch: the features of a Linear's output only
        when it is 2-D, the channels of a conv's only when it is batched (not an unbatched [channels, ...] output).
        Checked converted too: a dynamic model folds without seeing an input."""
        if self.folded_bn is not None and isinstance(x, torch.Tensor) and x.dim() != len(self.weight_shape):
            batch = {2: "[batch, features]", 3: "[batch, channels, length]",
                     4: "[batch, channels, height, width]"}[len(self.weight_shape)]
            bn = f"BatchNorm{len(self.weight_shape) - 2 or 1}d"
            raise ValueError(f"{type(self).__name__}: a folded {bn} needs {len(self.weight_shape)}-D input {batch}, "
                             f"got {list(x.shape)} (where inputs of that shape are meant, prepare with "
                             f"QuantConfig(fold_bn=False) to keep {self.folded_bn!r} a BatchNorm)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_folded_input(x)
        if self.converted:
            if getattr(x, "requires_grad", False) and not self._weight_only:
                warn_if_gradient_cut(type(self).__name__, x)
            self._repack_if_written()
            if self._quantized_call_args is not None and not is_dynamo_compiling():
                # _converted_forward's calls made in C++ (it checks x there and declines what it does not take)
                y = _C.quantized_layer_forward(x, self._quantized_call_args, self.clamp_min, self.clamp_max)
                if y is not NotImplemented:
                    return y
            return self._converted_forward(x)
        if self.input_quantizer is not None and not self.graph_input:
            x = self.input_quantizer(x)
        if self.bn is not None and self._bn_uses_batch_stats():
            weight, bias = self._batch_folded_weight_bias(x)
        else:
            weight, bias = self.float_weight_bias()
        return self._clamped(self._float_op(x, self.weight_quantizer(weight), bias))

    @property
    def weight(self) -> torch.Tensor:
        """The float weight (a parameter) before conversion; once converted, the weight the layer computes with,
        dequantized (dequantized_weight) in the float weight's dtype and layout: read-only, made on the first read
        and kept until the integer weight changes, so that a forward that reads a layer's weight itself keeps working
        (Hugging Face's T5 casts its input to `self.wo.weight.dtype`; a model torch.fx can trace keeps such a layer
        float)."""
        parameters = self._parameters
        if "weight" in parameters:
            # (torch.fx records a read of a parameter in nn.Module.__getattr__, which it patches while tracing)
            return nn.Module.__getattr__(self, "weight") if is_fx_symbolic_tracing() else parameters["weight"]
        if not self.__dict__.get("converted", False):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'weight'")
        dtype = self.__dict__["_weight_dtype"]
        if torch.compiler.is_compiling():
            return self._other_layout(self.dequantized_weight(dtype))
        key = (self.qweight.data_ptr(), self.qweight._version, self.weight_scale.data_ptr(),
               self.weight_scale._version, dtype)
        cached = self.__dict__.get("_dequantized_weight")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                weight = self._other_layout(self.dequantized_weight(dtype))
                cached = self.__dict__["_dequantized_weight"] = (key, weight)
        return cached[1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_dequantized_weight", None)  # (a cache: pickles and copies leave it out)
        return state

    def _weight_int8(self) -> torch.Tensor:
        """The integer weight as int8 in the float weight's shape."""
        if self.config.weight.bits <= 4:
            return unpack_int4(self.qweight, self._weight_numel_per_channel()).reshape(self.weight_shape)
        return self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, as a float tensor of shape weight_shape ([out, ...]): the integer
        weight times its scales once converted, the fake-quantized weight before."""
        if not self.converted:
            with torch.no_grad():
                return self.weight_quantizer(self.float_weight_bias()[0]).to(dtype)
        return F_q.dequantize(self._weight_int8(), self.weight_scale, 0, axis=0, dtype=dtype)

    def _weight_numel_per_channel(self) -> int:
        return math.prod(self.weight_shape[1:])

    def _check_float_input(self, x: torch.Tensor) -> None:
        """The shape rule of _check_input, and a float dtype (the input a converted layer quantizes)."""
        self._check_input(x)
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: input must be float32, float16 or bfloat16, got {x.dtype}")

    def _converted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Input checks only read Python attributes (no tensor is made, nothing syncs); the kernels' TORCH_CHECKs
        # guard the rest. Everything that does not depend on x was prepared by _prepare_forward.
        self._check_float_input(x)
        if x.device != self._device:
            raise ValueError(f"{type(self).__name__}: input is on {x.device} but the layer is on {self._device}")
        if self._weight_only:  # float compute with the dequantized weight
            return self._clamped(self._float_op(x, self.dequantized_weight(x.dtype), self.bias))
        if self.fused:
            return self._clamped(self._fused_forward(x))
        x_q, x_scale = self._quantize_input(x)
        return self._int_op(x_q, x_scale, self.input_zero_point, x.dtype)

    def pipeline_op(self, x_q: torch.Tensor, out_dtype: torch.dtype, out_scale: float | None = None,
                    out_zero_point: int = 0, out_bits: int = 8) -> torch.Tensor:
        """A converted layer in an integer pipeline (torchquant.graph): the integer op on x_q, which holds the input
        quantized with input_quantizer's qparams; the output (with the layer's activation clamp) float of out_dtype,
        or requantized to out_dtype int8/uint8 with out_scale, out_zero_point and out_bits."""
        self._check_folded_input(x_q)
        self._repack_if_written()
        if self._quantized_call_args is not None and not is_dynamo_compiling():
            y = _C.quantized_layer_forward(x_q, self._quantized_call_args, self.clamp_min, self.clamp_max, out_dtype,
                                           out_scale, out_zero_point, out_bits)
            if y is not NotImplemented:
                return y
        self._check_input(x_q)  # (the C++ entry declines what it does not take)
        return self._int_op(x_q, self._static_scale, self.input_zero_point, out_dtype, out_scale, out_zero_point,
                            out_bits)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantizer = self.input_quantizer
        if quantizer.per_token:  # dynamic per token with a format that has no fused kernel
            return quantizer.quantize(x, self.input_zero_point)
        scale = self._static_scale
        if scale is None:
            scale = quantizer.dynamic_qparams(x)[0]
        return ops.quantize(x, scale, self._input_zero_point_tensor, None, *self._input_format), scale

    def _has_fused_forward(self) -> bool:
        """Whether _fused_forward (one kernel for quantize + integer op) computes this layer's converted forward."""
        return False

    # ---- conversion ----
    @torch.no_grad()
    def converted_state(self) -> dict:
        """The integer state convert() installs, computed without changing the layer's function (may raise)."""
        floor_learned_scales(self)  # as the next forward would: an optimizer step may have left them <= 0
        if self.input_quantizer is not None and not self.input_quantizer.ready:
            raise RuntimeError(f"{type(self).__name__}: static activation quantization needs calibration "
                               f"before convert (no input range observed: if the model never calls this layer on "
                               f"its calibration inputs, leave it float with QuantConfig.skip)")
        if self.input_quantizer is not None and not self.input_quantizer.spec.dynamic:
            self._checked_static_input_scale()  # so that installing the converted state cannot fail
        if self.weight_quantizer.spec.learn_scale:
            self._check_learned_weight_scale()
        weight, bias = self.float_weight_bias()
        q, scale = self.weight_quantizer.quantize(weight)
        if self.config.weight.bits <= 4:
            q = pack_int4(q.reshape(q.shape[0], -1))
        return {"qweight": q, "weight_scale": scale, "bias": bias}

    def _install_converted(self, state: dict) -> None:
        """Drops the float weight (and the folded BatchNorm), stores the integer weight and the bias, and packs the
        weight for the kernels (cannot fail)."""
        bias = None if state["bias"] is None else nn.Parameter(state["bias"].detach(), requires_grad=False)
        self._weight_dtype = self.weight.dtype  # (the dtype the converted layer's `weight` reads as)
        del self.weight
        self.bias = bias
        self.bn = None  # folded into the stored weight and bias
        self._buffers.pop("bn_step_count", None)
        self.register_buffer("qweight", state["qweight"])
        self.register_buffer("weight_scale", state["weight_scale"])
        self.converted = True
        self._set_input_zero_point()
        self._repack()

    def convert(self):
        """Converts this layer in place (idempotent)."""
        if not self.converted:
            self._install_converted(self.converted_state())
        return self

    def _converted_skeleton(self) -> None:
        """Converted layout with placeholder integer buffers, for loading a converted state dict."""
        if self.converted:
            return
        n = self.weight_shape[0]
        k = self._weight_numel_per_channel()
        device = self.weight.device
        if self.config.weight.bits <= 4:
            q = torch.zeros(n, (k + 1) // 2, dtype=torch.uint8, device=device)
        else:
            q = torch.zeros(self.weight_shape, dtype=torch.int8, device=device)
        bias = self.bias
        if self.bn is not None:  # a folded layer always has a bias
            bias = torch.zeros(n, dtype=self.weight.dtype, device=device)
        self._install_converted({"qweight": q, "weight_scale": torch.ones(n, device=device), "bias": bias})

    def _set_input_zero_point(self) -> None:
        # a Python int, so converted forward has no device sync and compiles to one graph
        quantizer = self.input_quantizer
        if quantizer is not None and not quantizer.spec.dynamic:
            self.input_zero_point = int(quantizer.zero_point.item())
        else:
            self.input_zero_point = 0

    def _repack(self) -> None:
        qweight = self.qweight
        try:  # the integer weight packed, and its version: _repack_if_written packs it again after a write to it
            self._packed_from = (qweight, qweight._version)
        except RuntimeError:  # an inference tensor has no version (and takes no write outside inference mode)
            self._packed_from = None
        w = self._weight_int8()
        self.register_buffer("w_sum", w.reshape(w.shape[0], -1).sum(dim=1, dtype=torch.int32), persistent=False)
        packed = self._pack(w)
        # The buffer is the packed weight's whole storage (its zero padding, and a device's extras past the view's
        # last element, included); the kernels take the view. A buffer that is a view would lose those bytes where a
        # program copies only the bytes its view spans (AOTInductor's copies of the buffers it compiles in).
        self.register_buffer("w_packed", torch.empty(0, dtype=packed.dtype, device=packed.device).set_(
            packed.untyped_storage()), persistent=False)
        self._packed_view = (tuple(packed.shape), packed.stride(), packed.storage_offset())
        self._prepare_forward()

    def _repack_if_written(self) -> None:
        """Packs the integer weight again if it was written in place since it was packed (a pruning mask applied to
        a converted layer's qweight, say), so that the forward computes with the weight the layer holds and saves.
        One version read a call, eager only (a layer unpickled from a version before the check has none: not
        checked); a write seen while torch.export traces the layer is left to the next eager call."""
        if is_dynamo_compiling():
            return
        packed_from = self.__dict__.get("_packed_from")
        if packed_from is not None and packed_from[0]._version != packed_from[1] \
                and not torch.compiler.is_compiling():
            self._repack()

    def _prepare_forward(self) -> None:
        """Precomputes what the converted forward needs and that does not depend on its input (called whenever the
        buffers change: convert, load, move), so a call reads plain attributes instead of module state."""
        self._device = self.qweight.device
        quantizer = self.input_quantizer
        self._weight_only = quantizer is None
        self._static_scale = None
        if quantizer is not None:
            spec = quantizer.spec
            self._input_format = (spec.bits, spec.signed, spec.rounding)
            self._input_zero_point_tensor = torch.tensor([self.input_zero_point], dtype=torch.int32,
                                                         device=self._device)
            if not spec.dynamic:  # checked here once, not by a wrapper on every call
                # (to the layer's device: a pipeline's quantizer may move after the layer)
                self._static_scale = moved_state(self._checked_static_input_scale(), self._device)
        self._kernel_args = self._weight_args()
        self._quantized_call_args = self._quantized_layer_args()

    def _quantized_layer_args(self) -> tuple | None:
        """The layer's arguments of torchquant._C.quantized_layer_forward, which makes _converted_forward's calls for
        an input quantized per tensor (static, or dynamic but for sign binarization), or None for the other
        forwards."""
        quantizer = self.input_quantizer
        if (self._weight_only or self.fused or quantizer.per_token
                or (quantizer.spec.dynamic and quantizer.spec.bits == 1)):
            return None
        return (self._input_features(), self._static_scale, self._input_zero_point_tensor, self.input_zero_point,
                *self._input_format, *self._kernel_args)

    def _checked_static_input_scale(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The static input scale (input_quantizer's, or `scale`) as the kernels take it (float32 [1]); raises unless
        it is positive and finite."""
        scale = (self.input_quantizer.scale if scale is None else scale).detach().reshape(1).float()
        tiny = torch.finfo(torch.float32).tiny
        if not scale.is_meta and not bool((torch.isfinite(scale) & (scale >= tiny)).all()):  # meta: no values
            raise ValueError(f"{type(self).__name__}: the input scale must be positive and finite (at least "
                             f"{tiny:g}), got {scale.tolist()}")
        return scale

    def _check_learned_weight_scale(self) -> None:
        """Raises unless the learned weight scale is positive and finite (an optimizer step after the last forward
        may have taken it to 0 or below, NaN or inf: callers floor it first, as the forward does)."""
        scale = self.weight_quantizer.scale.detach().flatten()
        tiny = torch.finfo(torch.float32).tiny
        bad = (~(torch.isfinite(scale) & (scale >= tiny))).nonzero().flatten().tolist() if not scale.is_meta else []
        if bad:
            raise ValueError(f"{type(self).__name__}: the learned weight scale must be positive and finite (at least "
                             f"{tiny:g}), got {scale[bad[0]].item():g} in channel {bad[0]}")

    def _int_op_args(self) -> tuple:
        """The weight-side arguments of the integer op after the packed weight, in its schema's order."""
        raise NotImplementedError

    def _kernel_bias(self) -> torch.Tensor | None:
        """The bias as the kernels read it, float32. A half model's bias is converted when the layer is prepared
        (convert, load, move) rather than by every call (one conversion kernel per layer per forward on a GPU): as
        with the integer weight, change a converted layer's bias through load_state_dict, not in place."""
        bias = self.bias
        return bias if bias is None or bias.dtype == torch.float32 else bias.detach().float()

    def _weight_args(self) -> tuple:
        """The integer op's weight-side arguments: the packed weight's view of the w_packed buffer, then
        _int_op_args()."""
        return (self.w_packed.as_strided(*self._packed_view), *self._int_op_args())

    def _op_args(self) -> tuple:
        """The integer op's weight-side arguments (_kernel_args) for a call: while torch.compile or torch.export
        traces the layer, they are made in the traced graph from the module's buffers (the packed weight's view, a
        half bias's float32 copy), so the program holds the buffers themselves."""
        if torch.compiler.is_compiling():
            return self._weight_args()
        return self._kernel_args

    def _input_features(self) -> int:
        """The size of the input's feature dimension (Linear: the last, Conv2d: dim 1)."""
        raise NotImplementedError

    @staticmethod
    def _before_load(module, state_dict, prefix, *args) -> None:
        """A converted layer prepares its forward from what it loads (_after_load), which refuses an input scale the
        kernels cannot take: refused here, before anything is copied, a bad scale leaves the layer as it was instead
        of half loaded (new weights and zero point beside the old packed weight, no static scale)."""
        quantizer = module.input_quantizer
        scale = state_dict.get(prefix + "input_quantizer.scale")
        if (module.converted and quantizer is not None and not quantizer.spec.dynamic and not module.graph_input
                and isinstance(scale, torch.Tensor) and scale.numel() == 1):  # other sizes: load_state_dict says
            module._checked_static_input_scale(scale)

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        if module.converted:
            module._set_input_zero_point()
            module._repack()

    def _apply(self, fn, recurse=True):
        if not self.converted:
            return super()._apply(fn, recurse)
        # the float32 weight scale keeps its dtype under model.half(); the packed weight is rebuilt on the new
        # device rather than moved (its layout is device-specific)
        scale = self._buffers.pop("weight_scale")
        del self._buffers["w_packed"], self._buffers["w_sum"]
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight_scale"] = moved_state(scale, self.qweight.device)
        # `weight` reads as the dtype model.half() / .to(dtype) gives a float weight
        self._weight_dtype = fn(torch.empty((), dtype=self._weight_dtype, device=self.qweight.device)).dtype
        self.__dict__.pop("_dequantized_weight", None)
        self._repack()
        return self

    def extra_repr(self) -> str:
        state = "converted" if self.converted else "fake-quant"
        folded = "" if self.folded_bn is None else f", folded {self.folded_bn}"
        return f"{self._shape_repr()}, {state}{folded}"


def quant_layers(model: nn.Module) -> list[QuantLayerBase]:
    """The distinct quantized layers (prepared or converted) of model, in module order."""
    return [m for m in model.modules() if isinstance(m, QuantLayerBase)]
