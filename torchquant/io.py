"""Pickle-free save/load of (partly) quantized models: tensors in safetensors, the layer layout as JSON in the
safetensors metadata. load() rebuilds that layout on a float model skeleton, then loads the tensors.

load is all-or-nothing. It reads and checks the whole file first: its structure, the layout against the model,
and the dtype, shape and value range of every tensor against the layer that is to hold it. Layers that change
state (float to quantized, fake-quant to converted) and converted layers are then built and loaded beside the
model; only when all of them loaded are the remaining tensors copied in place (checked already, so the copies
cannot fail) and the new layers installed.

save writes a temporary file beside the destination and renames it over the destination, so no reader ever sees a
partial file, and a save that fails or is interrupted (SIGINT or SIGTERM) leaves no temporary file behind.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import stat
import tempfile
import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from torchquant._ops.quantize import qrange
from torchquant.config import QuantConfig
from torchquant._ops.gemm import GELU_APPROXIMATE
from torchquant.convert import (_check_model, _layer_gelu_pairs, activation_gelu_form,
                                set_conv_layouts, transformer_activation, unfuse_transformers)
from torchquant.fold import attach_folded_bn
from torchquant.graph import (ACT_QUANT, META_KEY as PIPELINE_META, ActivationQuantizer, converted_skeleton,
                              is_pipeline, pipeline_rules, rules_a_checkpoint_may_have, PIPELINE_RULES)
from torchquant.nn import QUANT_TYPES, QuantLinear, QuantMultiheadAttention
from torchquant.nn.base import (QuantLayerBase, is_clamp_bound, quant_layers, set_weight_spec, take_hooks,
                                 unpack_int4)
from torchquant.nn.quantizers import InputQuantizer, WeightQuantizer, floor_learned_scales
from torchquant.observers import Observer

FORMAT = "torchquant"
FORMAT_VERSION = 1
_LAYER_TYPES = {cls.__name__: cls for cls in QUANT_TYPES.values()}
_ENTRY_KEYS = {"type", "converted", "weight", "activation"}
_OPTIONAL_ENTRY_KEYS = {"folded_bn", "clamp", "fused_activation", "bn_training"}
# a layer's state that is not its function: absent from checkpoints of earlier versions, compared with nothing
_TRAINING_STATE_KEYS = {"config", "bn_training"}
_TINY = torch.finfo(torch.float32).tiny


def _check_path(path, where: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------------------------
# writing

class _Terminated(BaseException):
    """SIGTERM arrived while a file was being written: unwinds the write so its clean-up runs."""


@contextmanager
def _sigterm_unwinds() -> Iterator[Callable[[], None]]:
    """Inside the block SIGTERM raises _Terminated, so `finally` clauses run (SIGINT does that already, as
    KeyboardInterrupt); the block calls the function it is given to stop that once it is cleaning up. On the way
    out the signal goes to the handler that was there before, whose default ends the process as SIGTERM would
    have. Only the main thread can install signal handlers: elsewhere, and where SIGTERM is ignored or handled
    outside Python, the block runs as it is."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if previous is None or previous is signal.SIG_IGN:
        yield lambda: None
        return
    state = {"armed": True, "received": False}

    def handler(signum, frame):
        state["received"] = True
        if state["armed"]:
            state["armed"] = False
            raise _Terminated()

    def disarm() -> None:
        state["armed"] = False

    signal.signal(signal.SIGTERM, handler)
    try:
        yield disarm
    except _Terminated:
        raise InterruptedError("interrupted by SIGTERM; nothing was written") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if state["received"]:
            signal.raise_signal(signal.SIGTERM)  # the previous handler's turn: by default the process ends here


def written_path(path: str) -> str:
    """The file a write to `path` replaces: a symbolic link is written through (the file it names is replaced,
    the link stays), as `open(path, "w")` would."""
    return os.path.realpath(path)


def check_destination(path: str, where: str, *, force: bool = False, force_hint: str = "force=True") -> None:
    """Raises an OSError naming `where` unless `path` can be written as a new file: its directory exists, it is
    not a directory, and it is not an existing read-only file (replaced only with `force`, like cp -f)."""
    if not path or path.endswith(("/", os.sep)):  # (realpath would make "" the current directory, "out/" a file)
        raise IsADirectoryError(f"{where}: {path!r} is not a file name (empty, or ending in a separator)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{where}: {path} is a directory, expected a file name")
    if os.path.exists(path) and not os.path.isfile(path):  # the rename would replace /dev/null itself
        raise FileExistsError(f"{where}: {path} is not a regular file (a device, pipe or socket); it is never "
                              f"replaced")
    target = written_path(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{where}: directory {directory} does not exist")
    # as cp: a file we may not write; and one nobody may write, though root may write anything
    if not force and os.path.isfile(target) and (
            not os.access(target, os.W_OK) or
            not os.stat(target).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(f"{where}: {path} exists and is read-only; pass {force_hint} to replace it")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{where}: cannot create files in {directory} (permission denied)")


@contextmanager
def atomic_write(path: str, where: str, *, force: bool = False, force_hint: str = "force=True") -> Iterator[str]:
    """Yields a temporary file name beside `path` (beside the file it names, if `path` is a symbolic link) to write;
    when the block succeeds the file is renamed to that path (atomically replacing it), otherwise (an exception,
    SIGINT or SIGTERM) it is removed."""
    check_destination(path, where, force=force, force_hint=force_hint)
    path = written_path(path)
    directory = os.path.dirname(path)
    stem, ext = os.path.splitext(os.path.basename(path))
    with _sigterm_unwinds() as disarm:
        temp = None
        try:
            try:
                fd, temp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
            except OSError as exc:  # a directory that refuses new files although access() allows them (/proc)
                raise type(exc)(f"{where}: cannot create files in {directory}: {exc.strerror}") from exc
            os.close(fd)
            yield temp
            # mkstemp (and some writers, e.g. safetensors) make the file private; give it the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, 0o666 & ~umask)
            os.replace(temp, path)
            temp = None
        finally:
            disarm()
            if temp is not None and os.path.lexists(temp):
                os.remove(temp)


def _layer_layout(model: nn.Module) -> dict:
    layout = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantLayerBase):
            config = module.config
            layout[name] = {
                "type": type(module).__name__,
                "converted": module.converted,
                "weight": config.weight.to_dict(),
                "activation": None if config.activation is None else config.activation.to_dict(),
            }
            if module.folded_bn is not None:
                layout[name]["folded_bn"] = module.folded_bn
                if not module.converted:  # where quantization-aware training stands with the BatchNorm
                    layout[name]["bn_training"] = {"frozen": module.bn_frozen, "steps": module.bn_steps,
                                                   "freeze_after": config.freeze_bn_after}
            if module.clamp_min is not None or module.clamp_max is not None:
                layout[name]["clamp"] = [module.clamp_min, module.clamp_max]
            if getattr(module, "fused_activation", None) is not None:
                layout[name]["fused_activation"] = [module.fused_activation, module.fused_activation_module]
    return layout


def _quantizer_names(pipeline: nn.Module) -> list:
    """The sorted names of an integer pipeline's activation quantizers (as its checkpoint records them)."""
    return sorted(pipeline.get_submodule(ACT_QUANT)._modules)


def _pipeline_layout(model: nn.Module) -> dict:
    """What load() needs to rebuild an integer pipeline on the float model: the config it was prepared with,
    whether it is converted, and its activation quantizers' names (checked against the rebuilt ones)."""
    info = model.meta[PIPELINE_META]
    return {"config": info["config"], "converted": info["converted"],
            "quantizers": _quantizer_names(model),
            **{rule: info.get(rule, False) for rule in PIPELINE_RULES}}  # (absent: planned before the rule)


def tensor_identity(t: torch.Tensor) -> tuple:
    """What two tensors share when one is the other's values (tied weights): storage, offset, shape, strides, dtype."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def _file_tensors(model: nn.Module) -> dict:
    """model.state_dict() less what the file's layer layout records instead: the folded BatchNorms' training state
    (bn_training; files of earlier versions have no such tensors)."""
    state = model.state_dict()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantLayerBase) and module.bn is not None:
            for key in QuantLayerBase.BN_STATE_KEYS:
                state.pop(f"{name}.{key}" if name else key, None)
    return state


def write_checkpoint(model: nn.Module, path: str) -> None:
    """Writes the checkpoint straight to path (save() does it atomically)."""
    floor_learned_scales(model)  # as the next forward would: load refuses a scale <= 0
    tensors, aliases, storages = {}, {}, {}
    for key, t in _file_tensors(model).items():
        if t.is_meta:  # (every meta tensor's storage is at 0: they would all look tied)
            raise ValueError(f"save: {key} is on the meta device, which holds no values: load or initialise the "
                             f"model's weights before saving it")
        ptr = tensor_identity(t)
        if t.numel() and ptr in storages:  # a tied tensor: stored once
            aliases[key] = storages[ptr]
            continue
        storages[ptr] = key
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "layers": _layer_layout(model), "aliases": aliases}
    attention = sorted({name for name, module in model.named_modules(remove_duplicate=False)
                        if isinstance(module, QuantMultiheadAttention)})
    if attention:  # (written only where there is one: files without stay readable by earlier versions)
        meta["attention"] = attention
    if is_pipeline(model):
        meta["pipeline"] = _pipeline_layout(model)
    save_file(tensors, path, metadata={FORMAT: json.dumps(meta)})


def save(model: nn.Module, path, *, force: bool = False) -> None:
    """Writes model's state dict (float, fake-quant or converted layers) and its layer layout to path, atomically
    (a temporary file beside path, renamed over it). An existing file is replaced, except a read-only one: that
    raises PermissionError unless force=True (like cp -f)."""
    _check_model(model, "save")
    path = _check_path(path, "save")
    with atomic_write(path, "save", force=force) as temp:
        write_checkpoint(model, temp)


# ---------------------------------------------------------------------------------------------------------------
# reading and checking a file

def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _parse_meta(path: str, text: str, tensor_names) -> dict:
    """The torchquant metadata of a file, checked for structure and types (a ValueError naming what is wrong)."""
    def malformed(what: str) -> ValueError:
        return ValueError(f"load: {path} has malformed torchquant metadata: {what}")

    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise malformed(f"not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise malformed(f"expected a JSON object, got {_json_type(meta)}")
    unknown = sorted(set(meta) - {"format", "version", "layers", "aliases", "pipeline", "attention"})
    if unknown or meta.get("format") != FORMAT:
        raise malformed(f"expected keys format ('{FORMAT}'), version, layers and aliases; got {sorted(meta)}")
    attention = meta.setdefault("attention", [])
    if not isinstance(attention, list) or not all(isinstance(name, str) for name in attention):
        raise malformed(f"'attention' must be a list of module names, got {attention!r}")
    version = meta.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"load: {path} has format version {version!r}, this torchquant reads {FORMAT_VERSION}")
    layers, aliases = meta.get("layers"), meta.get("aliases", {})
    if not isinstance(layers, dict):
        raise malformed(f"'layers' must be an object, got {_json_type(layers)}")
    for name, entry in layers.items():
        if not isinstance(entry, dict) or set(entry) - _OPTIONAL_ENTRY_KEYS != _ENTRY_KEYS:
            raise malformed(f"layer {name!r} must be an object with keys {sorted(_ENTRY_KEYS)}, got "
                            f"{sorted(entry) if isinstance(entry, dict) else _json_type(entry)}")
        if not isinstance(entry["type"], str) or entry["type"] not in _LAYER_TYPES:
            raise malformed(f"layer {name!r} has unknown type {entry['type']!r} (expected one of "
                            f"{sorted(_LAYER_TYPES)})")
        if not isinstance(entry.get("folded_bn", ""), str):
            raise malformed(f"layer {name!r}: 'folded_bn' must be a module name, got {entry['folded_bn']!r}")
        if not isinstance(entry["converted"], bool):
            raise malformed(f"layer {name!r}: 'converted' must be true or false, got {entry['converted']!r}")
        clamp = entry.get("clamp", [None, None])
        if not (isinstance(clamp, list) and len(clamp) == 2 and all(
                v is None or (type(v) in (int, float) and is_clamp_bound(v)) for v in clamp)
                and (None in clamp or clamp[0] <= clamp[1])):
            raise malformed(f"layer {name!r}: 'clamp' must be [clamp_min, clamp_max], each null or a number finite "
                            f"as float32, and clamp_min <= clamp_max, got {clamp!r}")
        fused = entry.get("fused_activation")
        if fused is not None and not (isinstance(fused, list) and len(fused) == 2
                                      and fused[0] in GELU_APPROXIMATE and isinstance(fused[1], str)
                                      and entry["converted"] and entry["type"] == "QuantLinear"):
            raise malformed(f"layer {name!r}: 'fused_activation' must be [form, module name] with form 'gelu' or "
                            f"'gelu_tanh', on a converted QuantLinear, got {fused!r}")
        bn_training = entry.get("bn_training")
        if bn_training is not None and not (
                isinstance(bn_training, dict) and set(bn_training) == {"frozen", "steps", "freeze_after"}
                and type(bn_training["frozen"]) is bool and type(bn_training["steps"]) is int
                and bn_training["steps"] >= 0 and (bn_training["freeze_after"] is None or (
                    type(bn_training["freeze_after"]) is int and bn_training["freeze_after"] >= 0))
                and entry.get("folded_bn") is not None and not entry["converted"]):
            raise malformed(f"layer {name!r}: 'bn_training' must be {{frozen: bool, steps: int >= 0, freeze_after: "
                            f"int >= 0 or null}}, on a fake-quant layer with a folded BatchNorm, got {bn_training!r}")
        try:
            entry["config"] = QuantConfig.from_dict({"weight": entry["weight"], "activation": entry["activation"]})
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise malformed(f"layer {name!r} has an invalid quantization config: {e}") from None
        if fused is not None and not (QuantLinear.fuses_input_quantize(entry["config"].activation)
                                      and clamp == [None, None]):
            raise malformed(f"layer {name!r}: a 'fused_activation' needs 8-bit per-token dynamic activations rounded "
                            f"to nearest and no 'clamp' (QuantLinear.fuse_activation)")
    if "pipeline" in meta:
        pipeline = meta["pipeline"]
        # (the planning rules: absent from checkpoints saved before the pipeline applied them)
        if not isinstance(pipeline, dict) or not ({"config", "converted", "quantizers"} <= set(pipeline) <= {
                "config", "converted", "quantizers", *PIPELINE_RULES}):
            raise malformed(f"'pipeline' must be an object with keys config, converted, quantizers and optionally "
                            f"{', '.join(PIPELINE_RULES)}")
        for rule in PIPELINE_RULES:
            if rule in pipeline and not isinstance(pipeline[rule], bool):
                raise malformed(f"pipeline {rule!r} must be true or false, got {pipeline[rule]!r}")
        if not isinstance(pipeline["converted"], bool):
            raise malformed(f"pipeline 'converted' must be true or false, got {pipeline['converted']!r}")
        if not isinstance(pipeline["quantizers"], list) or not all(isinstance(q, str) for q in pipeline["quantizers"]):
            raise malformed("pipeline 'quantizers' must be a list of names")
        try:
            pipeline["config"] = QuantConfig.from_dict(pipeline["config"])
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise malformed(f"pipeline has an invalid quantization config: {e}") from None
        if not pipeline["config"].integer_pipeline:
            raise malformed("pipeline config must have integer_pipeline true")
    if not isinstance(aliases, dict):
        raise malformed(f"'aliases' must be an object, got {_json_type(aliases)}")
    for key, target in aliases.items():
        if not isinstance(target, str) or target not in tensor_names or key in tensor_names:
            raise malformed(f"alias {key!r} -> {target!r} does not name a stored tensor")
    return meta


def _read(path: str) -> tuple[dict, dict]:
    if os.path.isdir(path):
        raise IsADirectoryError(f"load: {path} is a directory, expected a checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"load: no such file: {path}")
    if not os.path.isfile(path):  # never opened: reading a pipe could wait forever
        raise ValueError(f"load: {path} is not a regular file (a device, pipe or socket), expected a checkpoint file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError, OverflowError) as e:
        why = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"load: {path} is not a readable safetensors file (truncated or another format): "
                         f"{why}") from None
    if FORMAT not in metadata:
        raise ValueError(f"load: {path} is a safetensors file but not a torchquant checkpoint (no "
                         f"'{FORMAT}' metadata; save it with torchquant.save)")
    meta = _parse_meta(path, metadata[FORMAT], tensors.keys())
    for key, target in meta["aliases"].items():
        tensors[key] = tensors[target]
    return meta, _folded_bn_under_its_name(meta, tensors)


def _folded_bn_under_its_name(meta: dict, tensors: dict) -> dict:
    """tensors with a prepared layer's folded BatchNorm under the BatchNorm's own name (bn1.weight): files that
    stored it inside the layer (conv1.bn.weight) load as those that store it under its name."""
    renamed = {}
    for name, entry in meta["layers"].items():
        inside, bn = f"{name}.bn.", entry.get("folded_bn")
        if bn is not None and not entry["converted"] and not any(k.startswith(f"{bn}.") for k in tensors):
            renamed.update({k: f"{bn}.{k[len(inside):]}" for k in tensors if k.startswith(inside)})
    return {renamed.get(k, k): t for k, t in tensors.items()}


def _first_bad(t: torch.Tensor, bad: torch.Tensor) -> str:
    index = tuple(i.item() for i in bad.nonzero()[0]) if bad.dim() else ()
    return f"{t[index].item()} at index {list(index)}"


def _check_scale(t: torch.Tensor) -> Optional[str]:
    bad = ~(torch.isfinite(t) & (t >= _TINY))
    if bad.any():
        return f"must be finite and positive (at least {_TINY:g}), got {_first_bad(t, bad)}"
    return None


def _check_int_range(t: torch.Tensor, low: int, high: int, what: str = "") -> Optional[str]:
    bad = (t < low) | (t > high)
    if bad.any():
        return f"must be in [{low}, {high}]{what}, got {_first_bad(t, bad)}"
    return None


def _check_qweight(t: torch.Tensor, bits: int, k: int) -> Optional[str]:
    """An integer weight of `bits` bits: int8 values, or (bits <= 4) two nibbles a byte with a zero pad nibble."""
    fmt = f" for {bits}-bit weights"
    if bits <= 4:
        if k % 2 and t.numel():
            problem = _check_int_range(t[:, -1] >> 4, 0, 0, " (the pad nibble of an odd row)")
            if problem:
                return problem
        t = unpack_int4(t, k)
    low, high = qrange(bits, True)
    problem = _check_int_range(t, low, high, fmt)
    if problem is None and bits == 1 and (t == 0).any():
        return f"must be -1 or +1{fmt}, got 0"
    return problem


def _check_observer_range(lo_key: str, tensors: dict) -> Callable:
    def check(hi: torch.Tensor) -> Optional[str]:
        lo = tensors.get(lo_key, hi)  # (a state dict loaded without strict may hold one of the two)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            return f"must be finite, as must {lo_key}"
        if (lo > hi).any():
            return f"must not be below {lo_key} (an observed range has lo <= hi)"
        return None
    return check


def _value_checks(model: nn.Module, tensors: dict) -> dict[str, Callable]:
    """key -> check(tensor) returning what is wrong (or None), for every tensor whose values a layer's format
    bounds: integer weights, scales, zero points and observed ranges."""
    checks: dict[str, Callable] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(module, QuantLayerBase) and module.converted:
            bits, k = module.config.weight.bits, module._weight_numel_per_channel()
            checks[prefix + "qweight"] = lambda t, bits=bits, k=k: _check_qweight(t, bits, k)
            checks[prefix + "weight_scale"] = _check_scale
        elif isinstance(module, WeightQuantizer) and module.spec.learn_scale:
            checks[prefix + "scale"] = _check_scale
        elif isinstance(module, InputQuantizer) and not module.spec.dynamic:
            low, high = qrange(module.spec.bits, module.spec.signed)
            checks[prefix + "scale"] = _check_scale
            checks[prefix + "zero_point"] = lambda t, low=low, high=high: _check_int_range(t, low, high)
        elif isinstance(module, Observer):
            checks[prefix + "hi"] = _check_observer_range(prefix + "lo", tensors)
            checks[prefix + "batches"] = lambda t: _check_int_range(t, 0, torch.iinfo(torch.int64).max)
    return checks


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how messages name a dtype."""
    return str(dtype).removeprefix("torch.")


def _check_tensors(path: str, model: nn.Module, tensors: dict) -> None:
    """Every tensor the model holds is in the file with exactly its dtype and shape (nothing is cast), nothing
    else is, and the values a layer's format bounds are in range."""
    expected = _file_tensors(model)
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise ValueError(f"load: {path} does not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    for key, want in expected.items():
        got = tensors[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(f"load: {path} does not fit the model: tensor {key!r} is {dtype_name(got.dtype)} "
                             f"{list(got.shape)}, the model expects {dtype_name(want.dtype)} "
                             f"{list(want.shape)}")
    for key, check in _value_checks(model, tensors).items():
        problem = check(tensors[key])
        if problem:
            raise ValueError(f"load: {path}: tensor {key!r} {problem}")


def check_before_load(model: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *args) -> None:
    """A load_state_dict pre-hook on the converted models convert() and load() make (guard_loads): the tensors of
    state_dict are checked as load() checks a file's (shapes, and the values a format bounds; load_state_dict casts
    other dtypes, but with assign=True it stores them as they are, so then a dtype must be the model's) before
    anything is copied, so that a bad one leaves the whole model as it was. (Each layer's own pre-hook sees only the
    layer's tensors, after the layers before it have loaded.)"""
    local = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    expected = model.state_dict()
    assign = local_metadata.get("assign_to_params_buffers", False)

    def refuse(key: str, problem: str) -> None:
        owner = _child(model, key.rpartition(".")[0])  # a pipeline's quantizer: name the layers reading it
        readers = [repr(prefix + name) for name, m in model.named_modules()
                   if isinstance(m, QuantLayerBase) and m.graph_input and m.input_quantizer is owner]
        read_by = f" (the input of {', '.join(readers)})" if readers else ""
        raise ValueError(f"load_state_dict: tensor {prefix + key!r}{read_by} {problem}; nothing was loaded")

    for key, got in local.items():
        want = expected.get(key)
        if want is None:
            continue
        # (load_state_dict also takes a [1] tensor for a 0-d one)
        if got.shape != want.shape and not (want.dim() == 0 and got.shape == (1,)):
            refuse(key, f"is {list(got.shape)}, the model expects {list(want.shape)}")
        if assign and got.dtype != want.dtype:
            refuse(key, f"is {dtype_name(got.dtype)}, the model expects {dtype_name(want.dtype)} "
                        f"(load_state_dict(assign=True) stores the state dict's tensors as they are: cast them, or "
                        f"load without assign)")
        local[key] = got.to(want.dtype)  # the values checked are those the copy stores
    for key, check in _value_checks(model, local).items():
        problem = check(local[key]) if key in local and not local[key].is_meta else None  # (meta: no values)
        if problem:
            refuse(key, problem)


def _check_before_submodule_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """check_before_load on the submodules of a converted model that hold converted state, for a load_state_dict
    called on the submodule itself (prefix ""); in a load of the whole model the model's hook checked its tensors.
    A converted pipeline's activation quantizers load only with the pipeline: the layers and lookups reading them
    keep their scales and zero points, refreshed when the pipeline loads."""
    if prefix:
        return
    if isinstance(module, ActivationQuantizer) or (
            isinstance(module, nn.ModuleDict) and any(isinstance(m, ActivationQuantizer) for m in module.values())):
        raise ValueError("load_state_dict: the activation quantizers of a converted integer pipeline load only with "
                         "the pipeline (the layers reading them keep their scales and zero points): call "
                         "load_state_dict on the pipeline; nothing was loaded")
    check_before_load(module, state_dict, prefix, *args)


def _holds_converted_state(module: nn.Module) -> bool:
    return any((isinstance(m, QuantLayerBase) and m.converted) or isinstance(m, ActivationQuantizer)
               for m in module.modules())


def guard_loads(model: nn.Module) -> nn.Module:
    """Registers check_before_load on model and _check_before_submodule_load on its submodules that hold converted
    state (once each)."""
    guards = (check_before_load, _check_before_submodule_load)
    for module in model.modules():
        if module is not model and not _holds_converted_state(module):
            continue
        hooks = module._load_state_dict_pre_hooks.values()
        if not any(getattr(h, "hook", h) in guards for h in hooks):
            module.register_load_state_dict_pre_hook(guards[module is not model])
    return model


# ---------------------------------------------------------------------------------------------------------------
# loading

def _paths(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(module) -> every (parent, key, name) under which the model holds it."""
    paths: dict[int, list] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for key, child in parent._modules.items():
            if child is not None:
                paths.setdefault(id(child), []).append((parent, key, f"{parent_name}.{key}" if parent_name else key))
    return paths


def _child(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The submodule called name (through child modules only: a name from a file never reaches attributes)."""
    module = model
    for part in name.split(".") if name else []:
        module = module._modules.get(part)
        if module is None:
            return None
    return None if module is model else module


def _built_layer(module: nn.Module, layer_type: type, config: QuantConfig) -> QuantLayerBase:
    """The layer a checkpoint entry describes, made beside the model: it shares no tensor with `module`, and every
    tensor of its own is then loaded from the file."""
    if isinstance(module, QuantLayerBase):  # quantized already, with the same config
        layer = copy.deepcopy(module)
    else:
        layer = layer_type._like(module, config, device="meta")  # no float weight initialisation
        for name in ("weight", "bias"):
            like = getattr(module, name)
            if like is not None:
                setattr(layer, name, nn.Parameter(torch.empty_like(like), requires_grad=like.requires_grad))
        layer._build_quantizers()  # on the weight's device, at their initial state
        layer.train(module.training)
        take_hooks(layer, module)  # as prepare's layer would
    return layer


def _described(thing) -> str:
    """'nothing', 'the function NAME' or 'a TYPE' for an error message."""
    if thing is None:
        return "nothing"
    if not isinstance(thing, nn.Module) and callable(thing) and hasattr(thing, "__name__"):
        return f"the function {thing.__name__}"  # (F.gelu is a builtin, F.relu a Python function)
    return f"a {type(thing).__name__}"


def _plan(path: str, model: nn.Module, layers: dict) -> list[tuple[nn.Module, str, nn.Module, nn.Module, str]]:
    """(parent, key, the model's module, the layer built for it, name) for every place a built layer goes.
    Changes nothing in the model."""
    paths = _paths(model)
    chosen: dict[int, tuple[nn.Module, str]] = {}  # id(module) -> (built layer or the module itself, first name)
    folds = []  # (parent, key, BatchNorm, identity, name) for BatchNorms folded into built layers
    for name, entry in layers.items():
        module = _child(model, name)
        if module is None:
            raise ValueError(f"load: {path} has a quantized layer {name!r} that the model does not have")
        if id(module) in chosen:
            continue
        layer_type, config, converted = _LAYER_TYPES[entry["type"]], entry["config"], entry["converted"]
        if isinstance(module, QuantLayerBase):
            if type(module) is not layer_type:
                raise ValueError(f"load: {name!r} is a {type(module).__name__} in the model but a {entry['type']} "
                                 f"in {path}")
            if (module.config.weight, module.config.activation) != (config.weight, config.activation):
                raise ValueError(f"load: {name!r} is quantized in the model with another config than in {path}; "
                                 f"load into the float model instead")
            if module.converted and not converted:
                raise ValueError(f"load: {name!r} is converted in the model but fake-quant in {path}; load into "
                                 f"the float or prepared model instead")
            if not converted:  # fake-quant in both: loaded in place, keeping its parameters (and an optimizer's)
                chosen[id(module)] = (module, name)
                continue
        elif not layer_type.replaces(module):
            raise ValueError(f"load: {name!r} is a {type(module).__name__} in the model but a {entry['type']} in "
                             f"{path}")
        try:
            layer = _built_layer(module, layer_type, config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"load: {name!r} cannot be quantized as {path} describes: {e}") from None
        if entry.get("folded_bn") is not None and not isinstance(module, QuantLayerBase):
            # the skeleton still has the BatchNorm the layer holds folded: its place gets a folded copy (loaded
            # from the file under the BatchNorm's name) or, converted, an identity
            parent, key, bn, folded = attach_folded_bn(model, module, layer, entry["folded_bn"], name)
            folds.append((parent, key, bn, nn.Identity() if converted else folded, entry["folded_bn"]))
        elif isinstance(module, QuantLayerBase) and module.folded_bn != entry.get("folded_bn"):
            raise ValueError(f"load: {name!r} has {module.folded_bn!r} folded in the model but "
                             f"{entry.get('folded_bn')!r} in {path}")
        elif isinstance(module, QuantLayerBase) and converted and module.bn is not None:
            # the prepared model's folded BatchNorm: converted, the layer holds it, an identity takes its place
            folds += [(parent, key, module.bn, nn.Identity(), bn_name)
                      for parent, key, bn_name in paths.get(id(module.bn), [])]
        if converted:
            layer._converted_skeleton()
        if entry.get("fused_activation") is not None:
            # the GELU the layer computes: the model's GELU module (a float skeleton) gives way to an identity
            # only where the model's forward feeds this layer's output, and nothing else, to that GELU (as convert()
            # fused it), or where an earlier load already fused it
            form, gelu_name = entry["fused_activation"]
            gelu = _child(model, gelu_name)
            parent_name, _, layer_key = name.rpartition(".")
            gelu_parent, _, gelu_key = gelu_name.rpartition(".")
            parent = _child(model, parent_name) if parent_name else model
            if gelu is None and gelu_parent == parent_name:  # a torch transformer layer's activation function
                gelu = transformer_activation(parent, gelu_key)
            if type(gelu) is nn.Identity and getattr(module, "fused_activation", None) == form:
                pass
            elif (activation_gelu_form(gelu) == form and gelu_parent == parent_name
                  and (layer_key, gelu_key) in _layer_gelu_pairs(parent, (nn.Linear, QuantLayerBase))):
                folds.append((parent, gelu_key, gelu, nn.Identity(), gelu_name))
            else:
                raise ValueError(f"load: {path} has the GELU {gelu_name!r} fused into {name!r}, but the model does "
                                 f"not pass that layer's output, and nothing else, to a GELU of that form there "
                                 f"(it has {_described(gelu)} there)")
        chosen[id(module)] = (layer, name)
    plan = []
    for module_id, (layer, first) in chosen.items():
        for parent, key, name in paths[module_id]:
            if layers.get(name) != layers[first]:
                raise ValueError(f"load: {path} does not describe {name!r} like {first!r}, which is the same module "
                                 f"in the model")
            if layer is not parent._modules[key]:
                plan.append((parent, key, parent._modules[key], layer, name))
    return plan + folds


def _retie(plan: list, aliases: dict) -> None:
    """A fake-quant layer built for a float layer whose weight or bias the file stores tied to other tensors (a
    language model's head and its embedding, two layers sharing a weight) takes the float layer's parameter, with
    the loaded values, as prepare() would: in a model of the same architecture that parameter is the one the model
    ties (the built layer's own copy would drift apart from it in training)."""
    tied = set(aliases) | set(aliases.values())
    for _, _, module, layer, name, *_ in plan:
        if not isinstance(layer, QuantLayerBase) or layer.converted or isinstance(module, QuantLayerBase):
            continue
        for attr in ("weight", "bias"):
            param = getattr(module, attr)
            if param is not None and f"{name}.{attr}" in tied:
                with torch.no_grad():
                    param.copy_(getattr(layer, attr))
                setattr(layer, attr, param)


def _install(plan, index: int) -> None:
    for entry in plan:
        parent, key, value = entry[0], entry[1], entry[index]
        if isinstance(value, nn.Module):
            parent.__dict__.pop(key, None)  # (a function attribute it replaces: a transformer layer's activation)
            parent._modules[key] = value
        else:  # that function put back
            del parent._modules[key]
            parent.__dict__[key] = value


def load(path, model: nn.Module) -> nn.Module:
    """Loads a checkpoint written by save() into model (a float skeleton of the same architecture, or the same
    prepared or converted model) and returns model. Layers the checkpoint holds quantized are quantized the same
    way; fake-quant layers of the model are loaded in place (an optimizer over their parameters stays valid),
    other quantized layers are replaced by new ones (a fake-quant one whose weight the file stores tied to another
    tensor takes the model's parameter, so that a tie of the model stays a tie).

    All-or-nothing: if the file is malformed (ValueError naming the file and the problem) or does not fit the
    model, or a tensor has another dtype or shape than the layer holding it expects, or values outside its format
    (an integer weight out of its bit range, a scale that is not finite and positive, a zero point out of range),
    ValueError is raised and the model is exactly as it was."""
    _check_model(model, "load")
    meta_tensor = next((key for key, t in model.state_dict().items() if t.is_meta), None)
    if meta_tensor is not None:  # (its values could not be written in place)
        raise ValueError(f"load: {meta_tensor} of the model is on the meta device; give the model storage first, "
                         f"e.g. model.to_empty(device='cpu'), then load")
    path = _check_path(path, "load")
    meta, tensors = _read(path)
    if "pipeline" in meta or is_pipeline(model):
        return _load_pipeline(path, model, meta, tensors)
    attention = _attention_plan(path, model, meta["attention"])
    _install(attention, 3)
    try:
        _load_layers(path, model, meta, tensors)
    except BaseException:
        _install(attention, 2)
        raise
    return model


def _attention_plan(path: str, model: nn.Module, names: list) -> list[tuple[nn.Module, str, nn.Module, nn.Module, str]]:
    """(parent, key, nn.MultiheadAttention, QuantMultiheadAttention, name) for every place of an attention that the
    file holds with its projections as layers and the model as an nn.MultiheadAttention (one QuantMultiheadAttention
    for a module under several names). Changes nothing in the model."""
    paths = _paths(model)
    built: dict[int, tuple[nn.Module, QuantMultiheadAttention]] = {}
    for name in names:
        module = _child(model, name)
        if isinstance(module, QuantMultiheadAttention):
            continue
        if type(module) is not nn.MultiheadAttention:
            raise ValueError(f"load: {path} has an attention {name!r} with its projections as layers, but the model "
                             f"has {_described(module)} there")
        if id(module) not in built:
            built[id(module)] = (module, QuantMultiheadAttention.from_float(module))
    return [(parent, key, module, attention, name) for module, attention in built.values()
            for parent, key, name in paths[id(module)]]


def _load_layers(path: str, model: nn.Module, meta: dict, tensors: dict) -> None:
    """load() of a layer-by-layer checkpoint, all-or-nothing, into model with its attentions restructured."""
    plan = _plan(path, model, meta["layers"])
    _install(plan, 3)
    try:
        _check_tensors(path, model, tensors)
    finally:
        _install(plan, 2)
    # built layers load their tensors beside the model (their hooks repack converted weights there) ...
    in_place, loaded = dict(tensors), set()
    for _, _, _, layer, name in plan:
        prefix = f"{name}."
        own = {key[len(prefix):]: in_place.pop(key) for key in list(in_place) if key.startswith(prefix)}
        if id(layer) not in loaded:  # once, though it may be reached by several names
            layer.load_state_dict(own)
            loaded.add(id(layer))
    # ... then the rest is copied in place (checked: the copies cannot fail), with empty modules where built
    # layers go (nothing to load, no hooks to run), and the built layers are installed
    plan = [entry + (nn.Module(),) for entry in plan]
    _install(plan, 5)
    try:
        model.load_state_dict(in_place)
    except BaseException:
        _install(plan, 2)
        raise
    _install(plan, 3)
    _retie(plan, meta["aliases"])
    unfuse_transformers(model)
    guard_loads(model)
    for name, entry in meta["layers"].items():  # the fused activations are part of each layer's function
        layer = _child(model, name)
        layer.set_activation_clamp(*entry.get("clamp", (None, None)))
        if entry.get("fused_activation") is not None:
            layer.fuse_activation(*entry["fused_activation"])
    _restore_bn_training(model, meta["layers"])
    set_conv_layouts(model)


def _restore_bn_training(model: nn.Module, layers: dict) -> None:
    """Each fake-quant layer's folded-BatchNorm training state as the file records it (files of earlier versions
    record none: the layer's stays)."""
    for name, entry in layers.items():
        state = entry.get("bn_training")
        if state is not None:
            layer = _child(model, name)
            layer.bn_frozen, layer.bn_steps = state["frozen"], state["steps"]
            layer.config = dataclasses.replace(layer.config, freeze_bn_after=state["freeze_after"])


def _load_pipeline(path: str, model: nn.Module, meta: dict, tensors: dict) -> nn.Module:
    """load() of an integer pipeline: into the same pipeline (in place), or into the float model, on which it is
    rebuilt (prepared as the file's config says and, for a converted file, converted) beside the model, which is
    left as it is; the new pipeline is returned."""
    from torchquant.convert import prepare  # (convert imports this module's neighbours; import when used)
    pipeline = meta.get("pipeline")
    if pipeline is None:
        raise ValueError(f"load: {path} holds a layer-by-layer model, but the model is an integer pipeline; "
                         f"load it into the float model instead")
    if is_pipeline(model):
        if model.meta[PIPELINE_META]["converted"] != pipeline["converted"]:
            state = "converted" if pipeline["converted"] else "prepared"
            raise ValueError(f"load: {path} holds a {state} integer pipeline, the model is not {state}; load it "
                             f"into the float model instead")
        built = model
    else:
        if quant_layers(model):
            raise ValueError(f"load: {path} holds an integer pipeline; load it into the float model")
        # the pipeline the file was saved from: planned with the rules it records, and of those it does not record,
        # with the ones whose plan has its quantizers and tensors (none has: the checks below refuse the first plan
        # with its quantizers, or else the first plan)
        first = fitting = None
        for rules in rules_a_checkpoint_may_have({r: pipeline[r] for r in PIPELINE_RULES if r in pipeline}):
            with warnings.catch_warnings(), pipeline_rules(**rules):
                warnings.simplefilter("ignore")  # prepare's notes on what stays float were given when it was made
                planned = prepare(model, pipeline["config"], inplace=False)
            if not is_pipeline(planned):
                raise ValueError(f"load: {path} holds an integer pipeline, but torch.fx cannot trace the model")
            first = planned if first is None else first
            if _quantizer_names(planned) != pipeline["quantizers"]:
                continue
            for name, entry in meta["layers"].items():  # layers given other weight bits (torchquant.budget)
                layer = _child(planned, name)
                if isinstance(layer, QuantLayerBase) and layer.config.weight != entry["config"].weight:
                    set_weight_spec(layer, entry["config"].weight)
            if pipeline["converted"]:
                converted_skeleton(planned)
            fitting = planned if fitting is None else fitting
            if _file_tensors(planned).keys() == tensors.keys():
                fitting = planned
                break
        built = first if fitting is None else fitting
    found = {"layers": _layer_layout(built), "quantizers": _quantizer_names(built)}
    for key, want in (("quantizers", pipeline["quantizers"]), ("layers", meta["layers"])):
        if key == "layers":
            found[key], want = ({name: {k: v for k, v in entry.items() if k not in _TRAINING_STATE_KEYS}
                                 for name, entry in layout.items()} for layout in (found[key], want))
        if found[key] != want:
            raise ValueError(f"load: {path} does not fit the model: its integer pipeline has other {key} than "
                             f"the model's")
    _check_tensors(path, built, tensors)
    built.load_state_dict(tensors)
    _restore_bn_training(built, meta["layers"])
    return guard_loads(built) if pipeline["converted"] else built
