"""Pickle-free save/load of (partly) quantized models: tensors in safetensors, the layer layout as JSON in the
safetensors metadata. load() rebuilds that layout on a float model skeleton, then loads the tensors."""
from __future__ import annotations

import json
import os

import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from torchquant.config import QuantConfig
from torchquant.convert import QUANT_TYPES, _check_model, _swap
from torchquant.fold import attach_folded_bn
from torchquant.nn.base import QuantLayerBase

FORMAT = "torchquant"
FORMAT_VERSION = 1
_LAYER_TYPES = {cls.__name__: cls for cls in QUANT_TYPES.values()}


def _check_path(path, where: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


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
    return layout


def save(model: nn.Module, path) -> None:
    """Writes model's state dict (float, fake-quant or converted layers) and its layer layout to path."""
    _check_model(model, "save")
    path = _check_path(path, "save")
    tensors, aliases, storages = {}, {}, {}
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ptr in storages:  # a tied tensor: stored once
            aliases[key] = storages[ptr]
            continue
        storages[ptr] = key
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "layers": _layer_layout(model), "aliases": aliases}
    save_file(tensors, path, metadata={FORMAT: json.dumps(meta)})


def _read(path: str) -> tuple[dict, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: no such file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"load: {path} is not a readable safetensors file (truncated or another format): {e}") \
            from None
    if FORMAT not in metadata:
        raise ValueError(f"load: {path} is a safetensors file but not a torchquant checkpoint (no "
                         f"'{FORMAT}' metadata; save it with torchquant.save)")
    try:
        meta = json.loads(metadata[FORMAT])
        if meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
            raise ValueError("missing format or layers")
    except ValueError as e:
        raise ValueError(f"load: {path} has malformed torchquant metadata: {e}") from None
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"load: {path} has format version {meta.get('version')}, this torchquant reads "
                         f"{FORMAT_VERSION}")
    for key, target in meta.get("aliases", {}).items():
        tensors[key] = tensors[target]
    return meta, tensors


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, key = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if parent is None or key not in parent._modules:
        raise ValueError(f"load: the checkpoint has a quantized layer {name!r} that the model does not have")
    return parent, key


def load(path, model: nn.Module) -> nn.Module:
    """Loads a checkpoint written by save() into model (a float skeleton of the same architecture, or the same
    prepared model): float layers the checkpoint holds quantized are prepared/converted first. Returns model.
    If the checkpoint does not fit the model, the model's layers are restored and ValueError is raised."""
    _check_model(model, "load")
    meta, tensors = _read(_check_path(path, "load"))
    plan, replacements = [], {}
    for name, entry in meta["layers"].items():
        parent, key = _parent_of(model, name)
        module = parent._modules[key]
        layer_type = _LAYER_TYPES.get(entry.get("type"))
        if layer_type is None:
            raise ValueError(f"load: unknown layer type {entry.get('type')!r} for {name!r}")
        if isinstance(module, QuantLayerBase):
            continue
        if type(module) is not layer_type.FLOAT_TYPE:
            raise ValueError(f"load: {name!r} is a {type(module).__name__} in the model but a "
                             f"{entry['type']} in the checkpoint")
        if id(module) not in replacements:
            config = QuantConfig.from_dict({"weight": entry["weight"], "activation": entry["activation"]})
            replacements[id(module)] = (layer_type.from_float(module, config), entry["converted"])
        plan.append((parent, key, module, replacements[id(module)][0]))
        if entry.get("folded_bn") is not None:  # the skeleton still has the BatchNorm the layer holds folded
            plan.append(attach_folded_bn(model, module, replacements[id(module)][0],
                                         entry["folded_bn"], name))
    _swap(plan)
    try:
        for name, entry in meta["layers"].items():
            layer = model.get_submodule(name)
            if entry["converted"] and not layer.converted:
                layer._converted_skeleton()
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape
                       or expected[k].dtype.is_floating_point != tensors[k].dtype.is_floating_point)
        if missing or unexpected or wrong:
            raise ValueError(f"load: checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, wrong shape/kind {wrong[:5]}")
        model.load_state_dict(tensors)
    except BaseException:
        _swap(plan, undo=True)
        raise
    return model
