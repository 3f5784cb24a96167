"""BatchNorm folding: finding the layer -> BatchNorm pairs of a model and the folding arithmetic.

A BatchNorm in eval mode is a per-channel affine map, y = (x - mean) * gamma / sqrt(var + eps) + beta, so a
Conv2d/Conv1d/Linear whose output feeds only a BatchNorm computes, with the BatchNorm, the same function as one
layer of weight w * s and bias beta + (b - mean) * s, s = gamma / sqrt(var + eps) per output channel. Quantizing that
folded weight instead of w leaves one integer layer where there were two float ops.

Pairs are found on the model's torch.fx graph (a layer called once whose only user is a BatchNorm called once),
so models that call self.conv then self.bn in forward fold; a model that cannot be traced falls back to
consecutive children of nn.Sequential containers, with a warning that says why.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
import torch.nn as nn

# the BatchNorm type that can fold into each layer type (exact types, like the layer swap)
FOLDABLE = {nn.Conv2d: nn.BatchNorm2d, nn.Conv1d: nn.BatchNorm1d, nn.Linear: nn.BatchNorm1d}


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether module has forward hooks or forward pre-hooks (which see its input and output as they are)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether bn, applied to layer's output, folds into layer: the matching BatchNorm type over its output
    channels, with running statistics (a BatchNorm without them normalizes with batch statistics even in eval
    mode, which no fixed weight computes), and neither has forward hooks (folded, a hook on the layer would see the
    BatchNorm's output, one on the BatchNorm its input)."""
    return (FOLDABLE.get(type(layer)) is type(bn) and bn.track_running_stats and bn.running_var is not None
            and bn.num_features == layer.weight.shape[0] and not has_forward_hooks(layer)
            and not has_forward_hooks(bn))


def bn_scale(bn: nn.BatchNorm2d | nn.BatchNorm1d, var: torch.Tensor) -> torch.Tensor:
    """gamma / sqrt(var + eps) per channel, float32 at least (gamma is 1 without affine parameters)."""
    dtype = torch.promote_types(var.dtype, torch.float32)
    scale = torch.rsqrt(var.to(dtype) + bn.eps)
    return scale if bn.weight is None else scale * bn.weight.to(dtype)


def folded_weight_bias(weight: torch.Tensor, bias: torch.Tensor | None, bn, mean: torch.Tensor,
                       var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the layer that computes bn(layer(x)) when bn normalizes with mean and var; in the
    weight's dtype, computed in float32 (or wider)."""
    scale = bn_scale(bn, var)
    shift = -mean.to(scale.dtype) if bias is None else bias.to(scale.dtype) - mean.to(scale.dtype)
    folded_bias = shift * scale
    if bn.bias is not None:
        folded_bias = folded_bias + bn.bias.to(scale.dtype)
    folded_weight = weight.to(scale.dtype) * scale.reshape(-1, *[1] * (weight.dim() - 1))
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def fold_running(weight: torch.Tensor, bias: torch.Tensor | None, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """folded_weight_bias with bn's running statistics: the eval-mode function of layer + bn."""
    return folded_weight_bias(weight, bias, bn, bn.running_mean, bn.running_var)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with torchquant's layers as leaves (their forward reads tensor values), which leaves the
    traced model as it was.

    A trace runs the forward on proxies: what it writes into the modules' state (`self.prev = y`, a counter, a
    submodule's cache) and what their forward hooks record would keep proxies or counts of a call that never
    happened. The modules' attributes (their parameter, buffer and submodule tables too) are put back after the
    trace, and their forward hooks are off during it. torch.fx also stores a tensor the forward makes
    (torch.tensor(0.5)) as a new attribute of the traced module (`_tensor_constantN`), which a GraphModule built
    from the graph reads: those are kept in `constants`, for the caller that builds a module from the graph."""

    constants: dict = {}

    def trace(self, root, concrete_args=None):
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        before = set(root.__dict__)
        saved = [(m, dict(m.__dict__), {k: dict(v) for k, v in m.__dict__.items() if isinstance(v, dict)})
                 for m in root.modules()]
        for m, _, tables in saved:
            for key in tables:
                if key.startswith("_forward"):  # the forward (pre-)hooks and their flags
                    m.__dict__[key] = type(m.__dict__[key])()
        try:
            return super().trace(root, concrete_args)
        finally:
            self.constants = {name: root.__dict__[name] for name in set(root.__dict__) - before}
            for m, attributes, tables in saved:
                m.__dict__.clear()
                m.__dict__.update(attributes)
                for key, content in tables.items():
                    attributes[key].clear()
                    attributes[key].update(content)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # (a transformers Conv1D too: the layer swap replaces it like the torch.nn layers)
        from torchquant.nn.base import QuantLayerBase
        from torchquant.nn.linear import is_conv1d_linear
        return isinstance(m, QuantLayerBase) or is_conv1d_linear(m) or super().is_leaf_module(m, qualname)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings; a failure is reported once by the caller
        graph = _Tracer().trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op == "call_module" and calls[user.target] == 1 and user.args == (node,) and not user.kwargs:
            pairs.append((node.target, user.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            keys = [key for key, child in module._modules.items() if child is not None]
            prefix = f"{name}." if name else ""
            pairs += [(prefix + a, prefix + b) for a, b in zip(keys, keys[1:])]
    return pairs


def find_bn_pairs(model: nn.Module, where: str = "prepare", warn_untraceable: bool = True,
                  stacklevel: int = 4) -> list[tuple[str, str]]:
    """(layer name, BatchNorm name) for every foldable layer -> BatchNorm edge of model, each module registered
    under one name only (folding a shared module would change its other uses); where torch.fx cannot trace model,
    of consecutive children of nn.Sequential containers, with a warning (unless the caller has warned already)."""
    if not has_foldable_bn(model):
        return []  # nothing to fold: no need to trace
    try:
        candidates = _traced_pairs(model)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure means: use the containers' order instead
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if warn_untraceable:
            warnings.warn(f"{where}: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {reason});"
                          f" {SEQUENTIAL_FOLDING}", UserWarning, stacklevel=stacklevel)
        candidates = _sequential_pairs(model)
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    modules = dict(model.named_modules())
    pairs = []
    for layer_name, bn_name in candidates:
        layer, bn = modules.get(layer_name), modules.get(bn_name)
        if (layer is not None and bn is not None and names[id(layer)] == 1 and names[id(bn)] == 1
                and foldable(layer, bn)):
            pairs.append((layer_name, bn_name))
    return pairs


SEQUENTIAL_FOLDING = "BatchNorm folding falls back to consecutive layers of nn.Sequential containers"


def has_foldable_bn(model: nn.Module) -> bool:
    return any(type(m) in FOLDABLE.values() for m in model.modules())


def parent_and_key(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, key = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), key


class _FoldedMixin:
    """A BatchNorm folded into the quantized layer before it: it stays at the BatchNorm's place in the model, so
    its parameters and buffers keep their names (a float checkpoint loads into the prepared model, optimizers see
    the same parameters, .to() moves them once), while the layer, which references this module without owning it,
    applies its statistics and affine map. Its own forward is therefore the identity."""

    @classmethod
    def of(cls, bn: nn.Module) -> nn.Module:
        """A folded BatchNorm sharing bn's parameter and buffer tensors (bn itself is left unchanged)."""
        folded = cls.__new__(cls)
        nn.Module.__init__(folded)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(folded, attr, getattr(bn, attr))
        for key, param in bn._parameters.items():
            folded.register_parameter(key, param)
        for key, buf in bn._buffers.items():
            folded.register_buffer(key, buf, persistent=key not in bn._non_persistent_buffers_set)
        folded.train(bn.training)
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedBatchNorm2d(_FoldedMixin, nn.BatchNorm2d):
    pass


class FoldedBatchNorm1d(_FoldedMixin, nn.BatchNorm1d):
    pass


_FOLDED_TYPES = {nn.BatchNorm2d: FoldedBatchNorm2d, nn.BatchNorm1d: FoldedBatchNorm1d}


def folded_bn(bn: nn.Module) -> nn.Module:
    """The FoldedBatchNorm1d/2d that takes the place of bn (a foldable BatchNorm) in a prepared model."""
    return _FOLDED_TYPES[type(bn)].of(bn)


def attach_folded_bn(model: nn.Module, float_layer: nn.Module, layer, bn_name: str, layer_name: str) -> tuple:
    """For load(): folds a copy of the BatchNorm at bn_name of a float skeleton into layer (the replacement of
    float_layer, at layer_name); returns the (parent, key, BatchNorm, folded copy) swap that removes it from the
    forward. Changes nothing in model (the copy shares no tensor with it)."""
    try:
        parent, key = parent_and_key(model, bn_name)
        bn = parent._modules[key]
    except (AttributeError, KeyError):
        parent = bn = None
    if bn is None or not foldable(float_layer, bn):
        found = "nothing" if bn is None else f"a {type(bn).__name__}"
        raise ValueError(f"load: the checkpoint has {bn_name!r} folded into {layer_name!r}, but the model has "
                         f"{found} there, not a {FOLDABLE[type(float_layer)].__name__} that folds into it")
    folded = folded_bn(copy.deepcopy(bn))
    layer.attach_bn(folded, bn_name)
    return parent, key, bn, folded
