"""Whole-model conversion: prepare (swap float layers for fake-quant ones), calibrate, convert, quantize_model.

Every step is all-or-nothing: replacements and integer states are built first and installed only when all of
them were built, and quantize_model puts the original layers back if calibration or conversion fails, so a
failed call leaves the user's model as it was.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
import inspect
import warnings
from collections import Counter
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from torchquant._ops.gemm import GELU_APPROXIMATE
from torchquant.config import QuantConfig, resolve_config
from torchquant.fold import _Tracer, find_bn_pairs, folded_bn, parent_and_key
from torchquant.graph import (META_KEY as PIPELINE_META, SWAP_READ_TENSORS, aliases_copied_by_a_layout,
                              convert_pipeline, is_pipeline, keeping_read_layers_float, planning_rule,
                              prepare_pipeline, reaches_a_layout_reader)
from torchquant.nn import QUANT_TYPES, QuantConv2d, QuantLinear, QuantMultiheadAttention, quant_type, quant_type_of
from torchquant.nn.attention import PROJECTIONS
from torchquant.nn.base import QuantLayerBase, quant_layers
from torchquant.nn.quantizers import InputQuantizer


def _check_model(model, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")


def _refuse_a_bare_layer(model: nn.Module) -> None:
    """A model that is itself a layer prepare would swap cannot be replaced in place."""
    swap_type = quant_type(model) or (QuantMultiheadAttention if type(model) is nn.MultiheadAttention else None)
    if swap_type is not None:
        raise TypeError(f"prepare: model is itself a {type(model).__name__}; wrap it in a container "
                        f"(e.g. nn.Sequential) or use {swap_type.__name__}.from_float")


def _rule_matches(rule, name: str, module: nn.Module) -> bool:
    if isinstance(rule, str):
        return fnmatch.fnmatchcase(name, rule)
    if isinstance(rule, type):
        return isinstance(module, rule)
    return bool(rule(name, module))


def _same_module_message(name: str, first: str, first_skipped: bool) -> str:
    """The warning for a module reached as name whose skip rules say otherwise than those for its first name."""
    return (f"prepare: {name} is the same module as {first}, which skip rules "
            f"{'keep float' if first_skipped else 'do not match'}; it is "
            f"{'kept float' if first_skipped else 'quantized'} under both names")


def _plan_swaps(model: nn.Module, config: QuantConfig, warn_untraceable: bool = True,
                stacklevel: int = 3) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """(parent, child key, float module, replacement) for every layer to swap and every BatchNorm folded into one
    (replaced by a FoldedBatchNorm sharing its tensors); builds the quant layers but changes nothing. A module
    reachable under several names is swapped once (one replacement shared by all parents) or kept float, as the skip
    rules for its first name say (with a warning where those for another name say otherwise); a skipped module keeps
    its whole subtree float. Warns about skip rules that matched no module (and, with warn_untraceable, where
    BatchNorm folding cannot trace the model: a failed integer pipeline has said so); stacklevel: the warnings'
    (that of the model's owner: 3 for the caller's caller)."""
    layer_config = dataclasses.replace(config, skip=())
    replacements: dict[int, nn.Module] = {}
    visited: set[int] = set()
    matched: set[int] = set()
    skipped_names: list[str] = []
    swapped: dict[str, nn.Module] = {}
    other_config: list[str] = []  # quantized layers whose config is not this one
    # id of an attention -> the name its projections were planned under, and its planned form (float projections)
    first_visits: dict[int, tuple[str, QuantMultiheadAttention]] = {}
    first_names: dict[int, tuple[str, bool]] = {}  # id of a module -> its first name, and whether that was skipped
    deferred: list[str] = []  # warnings found while visiting, given once the visit is done (at the owner's line)
    plan = []

    def skipped(name: str, module: nn.Module) -> bool:
        hit = False
        for i, rule in enumerate(config.skip):
            if _rule_matches(rule, name, module):
                matched.add(i)
                hit = True
        return hit

    def decided(child: nn.Module, name: str, is_skipped: bool) -> bool:
        """Whether child, reached as name, is quantized: as the skip rules decided for its first name (one module
        cannot be float under one name and quantized under another), with a warning where name's differ."""
        first, first_skipped = first_names.setdefault(id(child), (name, is_skipped))
        if is_skipped != first_skipped:
            deferred.append(_same_module_message(name, first, first_skipped))
        return not first_skipped

    def visit_skipped(parent: nn.Module, prefix: str) -> None:
        """The subtree of a skipped module: float, but for modules quantized under another name before (the same
        replacement here; a container's layers were swapped inside it)."""
        for key, child in parent._modules.items():
            if child is None:
                continue
            skipped(f"{prefix}{key}", child)  # (a rule for a module inside is met: it is float with its container)
            if not decided(child, f"{prefix}{key}", True):
                visit_skipped(child, f"{prefix}{key}.")
            elif replacements.get(id(child)) is not None:
                plan.append((parent, key, child, replacements[id(child)]))

    def revisit(parent: nn.Module, prefix: str) -> None:
        """The subtree of a container reached again under another name: its modules follow their first names'
        rules, with a warning where this name's rules say otherwise."""
        for key, child in parent._modules.items():
            if child is not None:
                name = f"{prefix}{key}"
                if decided(child, name, skipped(name, child)) and quant_type(child) is None:
                    revisit(child, name + ".")

    def visit(parent: nn.Module, prefix: str) -> None:
        for key, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}{key}"
            if not decided(child, name, skipped(name, child)):
                skipped_names.append(name)
                visit_skipped(child, name + ".")
                continue
            swap_type = quant_type(child)
            reason = None if swap_type is None else swap_type.unsupported(child)
            if (reason is None and getattr(child, "padding_mode", "zeros") != "zeros"
                    and not planning_rule("padding_mode_convs")):
                reason = f"padding_mode={child.padding_mode!r} (a pipeline planned when such convs stayed float)"
            if swap_type is None and quant_type_of(parametrize.type_before_parametrizations(child)) is not None:
                reason = ("it is parametrized (torch.nn.utils.parametrize, e.g. parametrizations.weight_norm); "
                          "parametrize.remove_parametrizations first to quantize it")
            elif swap_type is None and isinstance(child, tuple(QUANT_TYPES)) \
                    and type(child) is not nn.modules.linear.NonDynamicallyQuantizableLinear:  # (attention's own)
                reason = _float_subclass_reason(child)
            if reason is not None:
                if id(child) not in visited:
                    visited.add(id(child))
                    deferred.append(f"prepare: {name} ({type(child).__name__}) stays float: {reason}")
            elif isinstance(child, QuantLayerBase):
                if (child.config.weight, child.config.activation) != (config.weight, config.activation):
                    other_config.append(name)
            elif swap_type is not None:
                if id(child) not in replacements:
                    replacements[id(child)] = swap_type.from_float(child, layer_config)
                plan.append((parent, key, child, replacements[id(child)]))
                swapped[name] = replacements[id(child)]
            elif type(child) is nn.MultiheadAttention:
                # its projections become layers of their own, swapped as any Linear; an attention none of whose
                # projections is swapped stays as it is
                if id(child) not in replacements:
                    attention, planned = QuantMultiheadAttention.from_float(child), len(plan)
                    visit(attention, name + ".")
                    replacements[id(child)] = attention if len(plan) > planned else None
                    first_visits[id(child)] = (name, attention)
                else:  # reached again under another name: quantized as under the first
                    first, attention = first_visits[id(child)]
                    hits = [f"{name}.{p}" for p in PROJECTIONS if skipped(f"{name}.{p}", getattr(attention, p))]
                    if hits:
                        deferred.append(f"prepare: skip rules match {', '.join(hits)}, but {name} is the same "
                                        f"attention as {first}, whose projections are quantized as that name's "
                                        f"rules say")
                if replacements[id(child)] is not None:
                    plan.append((parent, key, child, replacements[id(child)]))
            elif id(child) not in visited:
                visited.add(id(child))
                visit(child, name + ".")
            else:
                revisit(child, name + ".")

    if not skipped("", model):
        _refuse_a_bare_layer(model)
        visit(model, "")
    for message in deferred:
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
    if config.fold_bn and swapped:
        for layer_name, bn_name in find_bn_pairs(model, "prepare", warn_untraceable, stacklevel + 1):
            if layer_name in swapped and not any(bn_name == s or bn_name.startswith(s + ".") for s in skipped_names):
                bn_parent, bn_key = parent_and_key(model, bn_name)
                bn = bn_parent._modules[bn_key]
                folded = folded_bn(bn)
                swapped[layer_name].attach_bn(folded, bn_name)
                plan.append((bn_parent, bn_key, bn, folded))
    for i, rule in enumerate(config.skip):
        if i not in matched:
            warnings.warn(f"prepare: skip rule {rule!r} matched no module", UserWarning, stacklevel=stacklevel)
    if other_config:
        warnings.warn(f"prepare: {', '.join(other_config)} quantized already with another config keep theirs "
                      f"(prepare the float model to change it)", UserWarning, stacklevel=stacklevel)
    return plan


def _swap(plan, undo: bool = False) -> None:
    for parent, key, float_layer, quant_layer in plan:
        parent._modules[key] = float_layer if undo else quant_layer


@contextlib.contextmanager
def attention_as_layers(model: nn.Module) -> Iterator[nn.Module]:
    """model with each nn.MultiheadAttention replaced by QuantMultiheadAttention.from_float of it inside (the same
    function, its projections nn.Linear layers named as a quantized model's are: a report pairs them), restored
    after."""
    built: dict[int, nn.Module] = {}
    plan = []
    for parent in list(model.modules()):
        for key, child in parent._modules.items():
            if type(child) is nn.MultiheadAttention:
                if id(child) not in built:
                    built[id(child)] = QuantMultiheadAttention.from_float(child)
                plan.append((parent, key, child, built[id(child)]))
    _swap(plan)
    unfuse = unfuse_transformers(model)
    try:
        yield model
    finally:
        for undo in unfuse:
            undo()
        _swap(plan, undo=True)


def _unfold_plan(model: nn.Module, layers: Iterable[QuantLayerBase]) -> list:
    """(parent, key, folded BatchNorm, nn.Identity) for the places of the folded BatchNorms of layers, which are
    about to be converted: their weight and bias then hold the BatchNorm, whose tensors leave the model."""
    folded = {id(layer.bn) for layer in layers if layer.bn is not None}
    return [(parent, key, child, nn.Identity()) for parent in model.modules()
            for key, child in parent._modules.items() if id(child) in folded]


def _swap_layers(model: nn.Module, config: QuantConfig, warn_untraceable: bool = True, stacklevel: int = 3) -> None:
    _swap(_plan_swaps(model, config, warn_untraceable, stacklevel + 1))
    unfuse_transformers(model)


def _keep_layers_called(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: a hook turns off nn.TransformerEncoderLayer's fused inference path."""


def unfuse_transformers(model: nn.Module) -> list:
    """Turns off the fused inference paths of torch's transformer modules that hold quantized layers, and returns
    what undoes that (callables). In eval mode nn.TransformerEncoderLayer (and nn.TransformerEncoder, given a
    padding mask) compute with linear1's and linear2's float weights themselves instead of calling the layers:
    a prepared model would run unquantized and calibrate nothing, a converted one (no float weight) would raise
    AttributeError. A forward pre-hook on the layer and use_nested_tensor=False on the encoder turn them off, as
    torch documents (the layer then calls its submodules). A QuantMultiheadAttention, which has no packed
    in-projection for them to read, turns them off too."""
    undo = []
    for m in model.modules():
        if (not isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder))
                or not any(isinstance(c, (QuantLayerBase, QuantMultiheadAttention)) for c in m.modules())):
            continue
        if isinstance(m, nn.TransformerEncoderLayer):
            if _keep_layers_called not in m._forward_pre_hooks.values():
                undo.append(m.register_forward_pre_hook(_keep_layers_called).remove)
        elif getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False
            undo.append(lambda m=m: setattr(m, "use_nested_tensor", True))
    return undo


def _rules_for_first_names(model: nn.Module, config: QuantConfig) -> QuantConfig:
    """config for the traced graph of model, which names each module once (its first name): with a warning where
    the skip rules for another name of a module say otherwise than those for its first (the first name's decide, as
    in the module swap), and without the rules that match such other names only (they match nothing there)."""
    firsts: dict[int, tuple[str, bool]] = {}
    matched_first, matched_other = set(), set()
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        hits = {i for i, rule in enumerate(config.skip) if _rule_matches(rule, name, module)}
        first, first_skipped = firsts.setdefault(id(module), (name, bool(hits)))
        if first == name:
            matched_first |= hits
            continue
        matched_other |= hits
        if bool(hits) != first_skipped and (quant_type(module) is not None or type(module) is nn.MultiheadAttention):
            warnings.warn(_same_module_message(name, first, first_skipped), UserWarning, stacklevel=4)
    other_only = matched_other - matched_first
    if not other_only:
        return config
    return dataclasses.replace(config, skip=tuple(r for i, r in enumerate(config.skip) if i not in other_only))


def _prepared_pipeline(model: nn.Module, config: QuantConfig):
    """The prepared integer pipeline of model (torchquant.graph), or None when torch.fx cannot trace it (warned)."""
    _refuse_a_bare_layer(model)
    if is_pipeline(model):  # as layers quantized already keep their configs
        state = "converted" if model.meta[PIPELINE_META]["converted"] else "prepared"
        warnings.warn(f"prepare: model is a {state} integer pipeline already and is kept as it is (prepare the "
                      f"float model to change it)", UserWarning, stacklevel=3)
        return model
    pipeline = prepare_pipeline(model, _rules_for_first_names(model, config), _swap_layers)
    if pipeline is not None:
        # what save() writes: skip rules that are not name globs become the names they matched
        skipped = [r for r in config.skip if isinstance(r, str)] + [
            name for name, module in model.named_modules() if name and any(
                _rule_matches(rule, name, module) for rule in config.skip if not isinstance(rule, str))]
        pipeline.meta[PIPELINE_META]["config"] = dataclasses.replace(config, skip=tuple(skipped)).to_dict()
    return pipeline


def prepare(model: nn.Module, config=None, *, inplace: bool = True) -> nn.Module:
    """Replaces every nn.Linear, nn.Conv2d and nn.Conv1d (except those `config.skip` selects) with
    QuantLinear/QuantConv2d/QuantConv1d in fake-quant mode, sharing the float parameters (tied weights stay tied);
    a Hugging Face transformers Conv1D (GPT-2's projections) becomes a QuantLinear that keeps its [in, out] weight.
    An nn.MultiheadAttention becomes a QuantMultiheadAttention whose projection layers are swapped likewise (its
    query, key and value projections are copies of the packed in_proj_weight: new parameters).
    config: a QuantConfig, a preset name or None (int8-dynamic).
    With config.fold_bn (the default) a BatchNorm that only reads such a layer's output folds into the layer (see
    torchquant.fold): a FoldedBatchNorm with the same parameters and buffers, under the same names, takes its place
    and passes its input through, the layer applying the BatchNorm; convert() replaces it with nn.Identity.

    With config.integer_pipeline (preset 'int8-pipeline') the model is traced with torch.fx and the result is a new
    model, a torch.fx.GraphModule (use the returned model): see torchquant.graph. Its modules are its own (the
    float model's modules, nn.TransformerEncoderLayer and the like included, are left as they are: swaps, hooks,
    train()/eval() and later edits of one model do not reach the other), but with inplace=True its parameters and
    buffers are the float model's tensors, as the module swap's layers share theirs: training the prepared model
    trains them, and a converted pipeline computes from its own integer copies. inplace=False shares nothing. A model
    torch.fx cannot trace is prepared by the module swap above instead, with a warning that says why."""
    _check_model(model, "prepare")
    config = resolve_config(config)
    if not inplace:
        model = copy.deepcopy(model)
    if config.integer_pipeline:
        pipeline = _prepared_pipeline(model, config)
        if pipeline is not None:
            return pipeline
    # (an integer pipeline that could not trace the model has said so)
    _swap_layers(model, keeping_read_layers_float(model, None, config, stacklevel=2, tensors=SWAP_READ_TENSORS),
                 warn_untraceable=not config.integer_pipeline, stacklevel=3)
    return model


def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """Quantization-aware training: every folded BatchNorm of model keeps its running statistics fixed from now on
    and normalizes with them (instead of the batch's) in training too."""
    _check_model(model, "freeze_bn_stats")
    for layer in quant_layers(model):
        layer.freeze_bn_stats()
    return model


def _run_batch(model: nn.Module, batch, index: int):
    """model's output on one batch: a tensor is the one positional input, a tuple/list the positional inputs, a
    dict the keyword inputs (as calibrate reads them; the report and the budget measure the same batches)."""
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    elif isinstance(batch, dict):
        args, kwargs = (), batch
    else:
        raise TypeError(f"calibrate: each batch must be a tensor, a tuple/list of positional inputs or a dict of "
                        f"keyword inputs, got {type(batch).__name__}")
    try:
        return model(*args, **kwargs)
    except TypeError as exc:
        try:
            signature = inspect.signature(model.forward)
            signature.bind(*args, **kwargs)
        except TypeError as mismatch:  # the batch's form, not the model, is at fault: say how batches are read
            form = (f"a {type(batch).__name__} of {len(batch)}, passed as {len(batch)} positional inputs"
                    if isinstance(batch, (tuple, list)) else "a dict, passed as keyword inputs"
                    if isinstance(batch, dict) else "a tensor, passed as the one positional input")
            raise TypeError(f"calibrate: batch {index} is {form}, which {type(model).__name__}.forward{signature} "
                            f"does not take ({mismatch}); for a DataLoader of (input, target) pairs pass the inputs "
                            f"alone, e.g. calibration=(x for x, _ in loader)") from exc
        except ValueError:  # (no signature to compare with)
            pass
        raise


def calibrate(model: nn.Module, batches: Iterable, *, progress: bool = True) -> nn.Module:
    """Runs the batches through a prepared model in eval mode without gradients so the static activation
    observers record ranges. The training flags of every module are restored afterwards, and the observers
    are restored too if a batch fails."""
    return _calibrate(model, batches, progress, stacklevel=3)


def _calibrate(model: nn.Module, batches: Iterable, progress: bool, stacklevel: int) -> nn.Module:
    """calibrate, warning at stacklevel (3: the line that called the caller)."""
    _check_model(model, "calibrate")
    layers = quant_layers(model)
    if not layers:
        raise ValueError(no_quantized_layers_message(model, "calibrate"))
    if all(layer.converted for layer in layers):  # (it ran every batch and changed nothing)
        raise ValueError("calibrate: the model is converted: its layers keep the scales they were converted with; "
                         "calibrate the prepared model, then convert it")
    if isinstance(batches, (torch.Tensor, dict)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"calibrate: batches must be an iterable of batches (e.g. a list or a DataLoader), "
                        f"got {type(batches).__name__}")
    quantizers = [m for m in model.modules() if isinstance(m, InputQuantizer) and not m.spec.dynamic]
    saved = [{k: v.clone() for k, v in q.state_dict().items()} for q in quantizers]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for q in quantizers:
        q.calibrating = True
    seen = 0
    try:
        with torch.no_grad():
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, total=total, desc="calibrate", unit="batch", disable=not progress or None,
                              leave=False):
                _run_batch(model, batch, seen)
                seen += 1
        if seen == 0:
            raise ValueError("calibrate: batches is empty")
        # (NaN and inf count as 0: inputs of nothing else leave an empty range, where the scale stays at 1)
        observers = [(name, m.observer) for name, m in model.named_modules() if isinstance(m, InputQuantizer)
                     and getattr(m, "observer", None) is not None]  # (a converted pipeline's keep none)
        empty = [name for name, o in observers if o.has_data and not bool((o.lo != 0).any() | (o.hi != 0).any())]
        if empty:
            warnings.warn(f"calibrate: {', '.join(empty[:3])}{f' (+{len(empty) - 3} more)' if len(empty) > 3 else ''}"
                          f" observed only zeros, NaN or inf: their scale stays 1 (are the calibration inputs all "
                          f"zero or non-finite?)", UserWarning, stacklevel=stacklevel)
    except BaseException:
        for q, state in zip(quantizers, saved):
            q.load_state_dict(state)
        raise
    finally:
        for q in quantizers:
            q.calibrating = False
        for m, training in modes:
            m.training = training
    return model


def gelu_form(module: nn.Module) -> Optional[str]:
    """"gelu" or "gelu_tanh" for a module whose forward is torch.nn.functional.gelu of its input (approximate "none"
    or "tanh"): nn.GELU, and Hugging Face's GELUActivation and GELUTanh when they call it; None for any other."""
    if type(module) is nn.GELU:
        return next((form for form, approximate in GELU_APPROXIMATE.items() if approximate == module.approximate),
                    None)
    cls = type(module)
    if cls.__module__ != "transformers.activations":
        return None
    act = getattr(module, "act", None)
    if cls.__name__ == "GELUActivation" and act is F.gelu:
        return "gelu"
    if (cls.__name__ == "GELUTanh" and isinstance(act, functools.partial) and act.func is F.gelu and not act.args
            and act.keywords == {"approximate": "tanh"}):
        return "gelu_tanh"
    return None


def activation_gelu_form(activation) -> Optional[str]:
    """gelu_form of a module, and "gelu" for torch.nn.functional.gelu itself (what a torch transformer layer made
    with activation="gelu" calls)."""
    if activation is F.gelu:
        return "gelu"
    return gelu_form(activation) if isinstance(activation, nn.Module) else None


def transformer_activation(parent: nn.Module, key: str):
    """The activation (a function or a module) of a torch transformer layer when key names it, else None."""
    if type(parent) in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer) and key == "activation":
        return parent.activation
    return None


class _GeluTracer(_Tracer):
    """torchquant's tracer with GELU modules as leaves too."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return gelu_form(m) is not None or super().is_leaf_module(m, qualname)


def _layer_gelu_pairs(parent: nn.Module, layer_types: tuple = (QuantLinear,)) -> list[tuple[str, str]]:
    """(layer key, GELU key) for the children of parent where the forward of parent passes the output of a
    QuantLinear child (or of another of layer_types), and nothing else reads it, to a GELU child (Hugging Face's
    BertIntermediate: dense, then intermediate_act_fn). Traced with torch.fx; a parent it cannot trace has none."""
    activation = transformer_activation(parent, "activation")
    if activation is not None:
        # (torch.fx cannot trace them: their forward branches on the input) the feed-forward block is
        # linear2(dropout(activation(linear1(x)))), the only reader of linear1's output; activation is a module or
        # a function
        fused = isinstance(parent.linear1, layer_types) and activation_gelu_form(activation) is not None
        return [("linear1", "activation")] if fused else []
    children = parent._modules
    if not (any(isinstance(c, layer_types) for c in children.values())
            and any(gelu_form(c) is not None for c in children.values() if c is not None)):
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _GeluTracer().trace(parent)
    except Exception:  # noqa: BLE001 -- a parent torch.fx cannot trace: nothing is fused in it
        return []
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or "." in node.target or calls[node.target] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        if (user.op == "call_module" and "." not in user.target and calls[user.target] == 1
                and user.args == (node,) and not user.kwargs and isinstance(children.get(node.target), layer_types)
                and gelu_form(children.get(user.target)) is not None):
            pairs.append((node.target, user.target))
    return pairs


def fuse_activations(model: nn.Module) -> nn.Module:
    """Fuses each GELU module that only follows a converted int8-dynamic QuantLinear (see _layer_gelu_pairs), or a
    torch transformer layer's GELU activation function, into the layer (QuantLinear.fuse_activation): the kernel
    computes it in its epilogue, and an nn.Identity takes the GELU's place. Modules reachable under several names
    are left alone. Returns model."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for parent_name, parent in list(model.named_modules()):
        for layer_key, gelu_key in _layer_gelu_pairs(parent):
            layer, gelu = parent._modules[layer_key], getattr(parent, gelu_key)
            gelu_module = isinstance(gelu, nn.Module)
            # hooks would be lost or moved
            hooked = layer._forward_hooks or (gelu_module and (gelu._forward_hooks or gelu._forward_pre_hooks))
            if (names[id(layer)] != 1 or (gelu_module and names[id(gelu)] != 1) or layer.fused_activation is not None
                    or hooked or not (layer.converted and layer.fused and layer.clamp_min is None
                                      and layer.clamp_max is None)):
                continue
            layer.fuse_activation(activation_gelu_form(gelu), f"{parent_name}.{gelu_key}" if parent_name else gelu_key)
            setattr(parent, gelu_key, nn.Identity())  # (a module in place of a module or of a function attribute)
    return model


def set_conv_layouts(model: nn.Module) -> nn.Module:
    """Sets the output memory format of every converted QuantConv2d of a module-swapped model
    (QuantConv2d.set_output_memory_format): contiguous where a view (or the caller, or code outside PyTorch) can
    read it (torchquant.graph.reaches_a_layout_reader, up to the next quantized layer) or where an in-place write
    reaches it through a flatten or reshape (torchquant.graph.aliases_copied_by_a_layout), as the float model's conv
    gives it from a contiguous input; elsewhere channels-last, the kernels' own layout, which the float ops after
    it and the next conv take as it is (no copy per conv). Traced with torch.fx; in a model it cannot trace, every
    conv's output has nn.Conv2d's layout. Returns model."""
    convs = [m for m in model.modules() if type(m) is QuantConv2d and m.converted]
    if not convs:
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 -- any tracing failure: nn.Conv2d's layouts
        for conv in convs:
            conv.set_output_memory_format(None)
        return model
    viewed = {id(m): False for m in convs}
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "call_module" and id(module := model.get_submodule(node.target)) in viewed:
            viewed[id(module)] |= (reaches_a_layout_reader(node, model, lambda user: user.op == "call_module" and
                                                           isinstance(modules[user.target], QuantLayerBase))
                                   or aliases_copied_by_a_layout(node, modules))
    for conv in convs:
        conv.set_output_memory_format(torch.contiguous_format if viewed[id(conv)] else torch.channels_last)
    return model


def convert(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Converts every fake-quant layer of a prepared (and, for static activations, calibrated) model to integer
    weights and kernels. Idempotent; already converted layers are left alone. Either every layer converts or
    none does. A GELU module that only reads an int8-dynamic Linear's output is fused into it (fuse_activations).
    A converted conv whose output no view reads keeps its channels-last output (set_conv_layouts). A prepared
    integer pipeline (torchquant.graph) becomes the converted pipeline.

    Tied weights: a layer whose weight is tied to another module's parameter (a language model's head and its
    embedding) gets its own integer weight, and the other module keeps the float parameter; layers sharing one weight
    get one integer copy each (the same values)."""
    _check_model(model, "convert")
    if not inplace:
        model = copy.deepcopy(model)
    from torchquant.io import guard_loads  # (io imports this module)
    if is_pipeline(model):
        return guard_loads(convert_pipeline(model))
    layers = quant_layers(model)
    if not layers:
        warnings.warn(no_quantized_layers_message(model, "convert"), UserWarning, stacklevel=2)
    pending = []
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLayerBase) and not layer.converted:
            try:
                pending.append((layer, layer.converted_state()))
            except (RuntimeError, ValueError) as exc:
                if type(exc) not in (RuntimeError, ValueError):
                    raise
                raise type(exc)(f"convert: layer '{name}': {exc}") from exc  # which one, in a model of many
    unfold = _unfold_plan(model, [layer for layer, _ in pending])
    for layer, state in pending:
        layer._install_converted(state)
    _swap(unfold)
    unfuse_transformers(model)  # also for layers put in place by hand (from_float)
    fuse_activations(model)
    set_conv_layouts(model)
    return guard_loads(model)


def _float_subclass_reason(module: nn.Module) -> str:
    """Why a module of a subclass of nn.Linear, nn.Conv2d or nn.Conv1d stays float."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "a lazy layer whose shape is not known yet: run one forward before prepare"
    base = next(t for t in QUANT_TYPES if isinstance(module, t)).__name__
    return (f"a subclass of nn.{base}, which prepare does not swap (its forward may differ from nn.{base}'s, or read "
            f"its weight itself)")


def nothing_quantized_reason(model: nn.Module, kept_float: str, name: str = "the model") -> str:
    """Why a conversion of `model` quantized no layer: its layers all stayed float (for the reasons `kept_float`
    names), or it has none (`name` names the model)."""
    if any(quant_type(m) is not None or isinstance(m, tuple(QUANT_TYPES)) for m in model.modules()):
        return f"every nn.Linear, nn.Conv2d and nn.Conv1d layer stayed float ({kept_float})"
    return f"{name} has no nn.Linear, nn.Conv2d or nn.Conv1d layer"


# why prepare left a layer float, as calibrate, convert and quantize_model say it
_KEPT_FLOAT_BY_PREPARE = "skipped, or not supported: see prepare's warnings"


def no_quantized_layers_message(model: nn.Module, where: str) -> str:
    """What calibrate and convert say about a model without quantized layers."""
    why = nothing_quantized_reason(model, _KEPT_FLOAT_BY_PREPARE)
    return (f"{where}: model has no quantized layers (call torchquant.prepare first, and go on with the model it "
            f"returns: an integer pipeline is a new module; if it was called on this model, {why})")


def _nothing_quantized(model: nn.Module) -> nn.Module:
    """quantize_model's result when prepare quantized no layer (each stayed float for a reason prepare warned
    about, or a skip rule, or there is none): the float model, with a warning that says so."""
    why = nothing_quantized_reason(model, _KEPT_FLOAT_BY_PREPARE)
    warnings.warn(f"quantize_model: nothing was quantized: {why}; the model is returned as it is", UserWarning,
                  stacklevel=3)
    return model


def quantize_model(model: nn.Module, config=None, calibration: Iterable | None = None, *,
                   inplace: bool = True) -> nn.Module:
    """prepare + calibrate (when calibration batches are given) + convert. Static activation configs need
    calibration. On failure the model is left as it was. When no layer gets quantized (each stays float: skipped or
    not supported, as prepare warns, or there is none) it warns and returns the model as it is."""
    _check_model(model, "quantize_model")
    config = resolve_config(config)
    act = config.activation
    if act is not None and not act.dynamic and calibration is None:
        raise ValueError("quantize_model: this config quantizes activations statically and needs calibration "
                         "batches (calibration=...), or use a dynamic preset such as 'int8-dynamic'")
    if not inplace:
        model = copy.deepcopy(model)
    pipeline = _prepared_pipeline(model, config) if config.integer_pipeline else None
    if pipeline is not None:  # the float model is left as it is whatever happens
        if not quant_layers(pipeline):
            return _nothing_quantized(model)
        if calibration is not None and not all(layer.converted for layer in quant_layers(pipeline)):
            _calibrate(pipeline, calibration, True, stacklevel=3)
        return convert(pipeline)
    plan = _plan_swaps(model, keeping_read_layers_float(model, None, config, stacklevel=2, tensors=SWAP_READ_TENSORS),
                       warn_untraceable=not config.integer_pipeline)
    _swap(plan)
    if not quant_layers(model):
        return _nothing_quantized(model)
    unfuse = unfuse_transformers(model)
    try:
        if calibration is not None and not all(layer.converted for layer in quant_layers(model)):
            _calibrate(model, calibration, True, stacklevel=3)
        convert(model)
    except BaseException:
        for undo in unfuse:
            undo()
        _swap(plan, undo=True)
        raise
    return model
