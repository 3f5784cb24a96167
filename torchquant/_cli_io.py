"""Files the command line reads and writes: models, weights, input tensors, and outputs written atomically.

Every problem with a user's file becomes a UsageError whose message is one line naming the option and the file;
the CLI prints it and exits with status 2. Input files are only ever read.
"""
import importlib
import importlib.util
import json
import os
import re
import sys
import warnings
import zipfile
from contextlib import contextmanager
from typing import Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from torchquant.io import atomic_write, check_destination, tensor_identity

__all__ = ["UsageError", "load_model", "load_inputs", "batches_of", "atomic_output", "check_output", "same_file"]


class UsageError(Exception):
    """A problem with the command line or its files, reported as one line without a traceback."""


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, prefixed with its type when that adds meaning."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_readable(path: str, option: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{option}: no such file: {path}")
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path} is a directory, expected a file")
    if not os.path.isfile(path):  # never opened: reading a pipe could wait forever
        raise UsageError(f"{option}: {path} is not a regular file (a device, pipe or socket)")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option}: {path} is not readable")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{option}: {path} is empty")


def _is_safetensors(path: str) -> bool:
    """A .safetensors name, or a safetensors file under another name: its 8-byte little-endian header length (below
    100 MB, safetensors' own limit), then the JSON header's opening brace (a truncated one too, which reading it as
    safetensors then reports)."""
    if path.endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def _torchquant_meta(metadata: Optional[dict]) -> Optional[dict]:
    """The torchquant metadata among a safetensors file's metadata (what torchquant.save wrote), or None."""
    from torchquant.io import FORMAT
    text = (metadata or {}).get(FORMAT)
    try:
        meta = None if text is None else json.loads(text)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def checkpoint_meta(path: str) -> Optional[dict]:
    """The torchquant metadata of a checkpoint torchquant.save wrote (safetensors), or None for any other file."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return _torchquant_meta(f.metadata())
    except Exception:  # noqa: BLE001 -- not a safetensors file: a state dict or a bad file
        return None


def holds_quantized_model(meta: dict) -> bool:
    """Whether checkpoint metadata describes a prepared or converted model (not a float one torchquant.save wrote)."""
    return bool(meta.get("layers") or meta.get("pipeline") or meta.get("attention"))


def _load_safetensors(path: str, option: str, check_meta=None) -> Tuple[dict, Optional[dict]]:
    """(tensors, torchquant metadata or None) of a safetensors file, its header read once; check_meta(metadata),
    if given, runs before any tensor is read (to refuse the file by what it holds)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = _torchquant_meta(f.metadata())
            if check_meta is not None:
                check_meta(meta)
            return {name: f.get_tensor(name) for name in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{option}: cannot read {path} as safetensors (truncated or not a safetensors file): "
                         f"{_one_line(exc)}") from exc


def _looks_like_zip(path: str) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # (e.g. a damaged directory claiming several disks): a zip archive, damaged
        return True


def _weights_only_load(path: str):
    """(content, None), or (None, why) when torch.load with weights_only=True (which never runs code from the
    file) fails: why is "objects" for a torch.save archive holding more than tensors and plain containers,
    else the reason the file cannot be read."""
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a plain pickle: the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as exc:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        if not _looks_like_zip(path):  # torch.save writes a zip archive; its directory is at the end
            with open(path, "rb") as f:
                plain_pickle = f.read(1) == b"\x80"  # the PROTO opcode that starts every pickle since protocol 2
            return None, "a plain pickle, not a torch.save archive" if plain_pickle else ""
        if "weights only" in str(exc).lower().replace("_", " "):
            return None, "objects"
        return None, _one_line(exc)


def _unreadable(option: str, path: str, why: str) -> UsageError:
    if path.endswith(".py"):
        return UsageError(f"{option}: {path} is Python source, not a file written by torch.save"
                          + ("; give the model as module:factory, e.g. "
                             f"{os.path.splitext(os.path.basename(path))[0]}:MyModel" if option == "MODEL" else ""))
    return UsageError(f"{option}: cannot read {path} (truncated, or not a file written by torch.save)"
                      + (f": {why}" if why else ""))


def _load_torch_tensors(path: str, option: str, expected: str):
    content, why = _weights_only_load(path)
    if why == "objects":
        raise UsageError(f"{option}: {path} holds Python objects, expected {expected}")
    if why is not None:
        raise _unreadable(option, path, why)
    return content


@contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on the import path while a user's model is imported, built or unpickled, as the
    last entry, so a file there never shadows an installed package (and is not looked at once the model is
    built: a matplotlib.py there stays unimported). Modules imported meanwhile stay imported."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_factory(spec: str):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise UsageError(f"MODEL: {spec!r} is neither a file nor a 'package.module:factory' spec")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"MODEL: no module named {exc.name!r} (from {spec!r}) in the installed packages or "
                             f"the current directory") from exc
        raise UsageError(f"MODEL: importing {module_name!r} failed: {_one_line(exc)}") from exc
    except Exception as exc:
        raise UsageError(f"MODEL: importing {module_name!r} failed: {_one_line(exc)}") from exc
    factory = module
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"MODEL: module {module_name!r} has no attribute {attr_path!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"MODEL: {spec!r} is not callable (a class or function returning an nn.Module)")
    return factory


def _names_missing_file(spec: str) -> bool:
    """Whether MODEL, which does not exist as a file, names a file all the same (and no factory to import)."""
    return spec.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in spec.partition(":")[0]


def factory_sources(spec: str) -> List[str]:
    """The Python files that MODEL's factory module (package.module:factory) is made of: the module's and its parent
    packages' `__init__.py`, where they can be found without running the module itself (its parent packages are
    imported, as loading the model does); none for a file MODEL, one that names a missing file, or a module that
    cannot be found (loading the model says why)."""
    module_name = spec.partition(":")[0]
    if os.path.exists(spec) or ":" not in spec or not module_name or _names_missing_file(spec):
        return []
    parts = module_name.split(".")
    sources = []
    with _cwd_importable():
        for i in range(1, len(parts) + 1):
            try:
                found = importlib.util.find_spec(".".join(parts[:i]))
            except Exception:  # (a parent package that fails to import: load_model reports it)
                break
            origin = getattr(found, "origin", None)
            if origin is not None and os.path.isfile(origin):
                sources.append(origin)
    return sources


def _model_from_factory(spec: str) -> nn.Module:
    with _cwd_importable():
        factory = _import_factory(spec)
        try:
            model = factory()
        except Exception as exc:
            raise UsageError(f"MODEL: calling {spec} failed: {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"MODEL: {spec} returned {type(model).__name__}, expected an nn.Module")
    return model


def _missing_class(exc: Exception) -> str:
    """What an unpickling ModuleNotFoundError/AttributeError says is missing, and where it was looked for."""
    if isinstance(exc, ModuleNotFoundError):
        return (f"no module named {exc.name!r} in the installed packages or the current directory (run from the "
                f"folder that holds it, or add that folder to PYTHONPATH)")
    found = re.search(r"attribute '([^']+)' on <module '([^']+)'", str(exc))
    if found is None:
        return _one_line(exc)
    attr, module = found.groups()
    if module == "__main__" or module.endswith(".__main__"):  # (shown as package.__main__ under python -m)
        return (f"class {attr} was defined in the script that saved the model (__main__); move it into a module "
                f"and save again, or give the model as module:factory with --weights")
    return f"module {module!r} has no {attr!r} (was the class renamed or moved?)"


def _model_from_pickle(path: str, trust_pickle: bool) -> nn.Module:
    if _is_safetensors(path):
        raise UsageError(f"MODEL: {path} holds weights only; give the architecture as package.module:factory "
                         f"and this file as --weights")
    if not trust_pickle:
        # A weights-only load is safe: it tells a state dict (fine, with a factory) from a pickled model.
        _, why = _weights_only_load(path)
        if why == "objects":
            raise UsageError(f"MODEL: {path} is a pickled model and unpickling runs code from the file; "
                             f"pass --trust-pickle if you trust its source")
        if why is not None:
            raise _unreadable("MODEL", path, why)
        raise UsageError(f"MODEL: {path} holds weights, not a model; give the architecture as "
                         f"package.module:factory and this file as --weights")
    try:
        with _cwd_importable():  # the model's class is looked up as a factory's module would be
            model = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise UsageError(f"MODEL: {path} is a pickled model whose class cannot be found: {_missing_class(exc)}") \
            from exc
    except Exception as exc:
        raise _unreadable("MODEL", path, _one_line(exc)) from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"MODEL: {path} holds a {type(model).__name__}, expected a model saved with "
                         f"torch.save(model)")
    return model


def _state_dict_from(path: str) -> Mapping[str, torch.Tensor]:
    _check_readable(path, "--weights")
    expected = "a state dict of tensors (it may be a whole pickled model: pass it as MODEL with --trust-pickle)"

    def refuse_quantized(meta: Optional[dict]) -> None:
        if meta is not None and holds_quantized_model(meta):
            raise UsageError(f"--weights: {path} holds a quantized model (a torchquant checkpoint), expected the "
                             f"float model's weights (`torchquant export` exports such a checkpoint as it is)")
    if _is_safetensors(path):
        state, meta = _load_safetensors(path, "--weights", refuse_quantized)
    else:  # only safetensors files carry torchquant's metadata
        state, meta = _load_torch_tensors(path, "--weights", expected), None
    if meta is not None:  # a float model torchquant.save wrote: each tied tensor is stored once
        aliases = meta.get("aliases", {})
        if not isinstance(aliases, dict):
            raise UsageError(f"--weights: {path} is not a checkpoint torchquant.save wrote: its metadata's "
                             f"aliases are a {type(aliases).__name__}, expected a mapping")
        state.update({key: state[first] for key, first in aliases.items() if first in state})
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # training checkpoints often nest it
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise UsageError(f"--weights: {path} is not a state dict (a mapping of names to tensors)")
    return state


def _with_tied_names(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict:
    """state with each missing name of the model's tied tensors filled from a name of the same tensor it holds (as
    safetensors.torch.save_model writes tied weights: under one of their names)."""
    names_of: dict = {}
    for name, t in own.items():
        if t.numel():
            names_of.setdefault(tensor_identity(t), []).append(name)
    filled = dict(state)
    for names in names_of.values():
        present = next((name for name in names if name in state), None)
        if present is not None:
            filled.update({name: state[present] for name in names if name not in state})
    return filled


def _load_weights(model: nn.Module, path: str) -> None:
    own = model.state_dict()
    state = _with_tied_names(_state_dict_from(path), own)
    missing = [k for k in own if k not in state]  # in model order, so the first named is the first layer
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and own[k].shape != state[k].shape]

    def first(names):
        return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    problems = []
    if missing:
        problems.append(f"missing {first(missing)}")
    if unexpected:
        problems.append(f"unexpected {first(unexpected)}")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(f"shape of {k} is {list(state[k].shape)}, the model has {list(own[k].shape)}"
                        + (f" (+{len(wrong_shape) - 1} more)" if len(wrong_shape) > 1 else ""))
    if problems:
        raise UsageError(f"--weights: {path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)


def load_model(spec: str, *, weights: Optional[str] = None, trust_pickle: bool = False) -> nn.Module:
    """The float model named by MODEL (a torch.save'd file, or package.module:factory plus --weights), in eval
    mode on the CPU."""
    if os.path.exists(spec):
        _check_readable(spec, "MODEL")
        model = _model_from_pickle(spec, trust_pickle)
    else:
        if _names_missing_file(spec):
            raise UsageError(f"MODEL: no such file: {spec}")
        model = _model_from_factory(spec)
    if weights is not None:
        _load_weights(model, weights)
    return model.eval()


def load_inputs(path: str, option: str, *, want_labels: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(inputs, labels or None) from a .pt/.safetensors file holding a tensor of samples (dim 0), a dict with
    'inputs' and optionally 'labels', or (.pt only) a pair (inputs, labels) or a list of input batches."""
    _check_readable(path, option)
    kinds = "a tensor of inputs, {'inputs': ..., 'labels': ...}, (inputs, labels) or a list of input batches"
    if _is_safetensors(path):
        content, _ = _load_safetensors(path, option)
        if len(content) == 1 and "labels" not in content:
            content = {"inputs": next(iter(content.values()))}
    else:
        content = _load_torch_tensors(path, option, kinds)
    if isinstance(content, torch.Tensor):
        inputs, labels = content, None
    elif isinstance(content, Mapping) and "inputs" in content:
        unknown = sorted(set(content) - {"inputs", "labels"})
        if unknown:
            raise UsageError(f"{option}: {path} has unexpected entries {unknown}; expected 'inputs' and 'labels'")
        inputs, labels = content["inputs"], content.get("labels")
    elif _is_batch_list(content):
        inputs, labels = torch.cat(list(content)), None
    elif (mismatch := _batch_mismatch(content)) is not None:
        raise UsageError(f"{option}: the batches in {path} differ in {mismatch}; they are joined into one tensor, so "
                         f"they need one sample shape and dtype (pad or crop them to one size)")
    elif isinstance(content, (tuple, list)) and len(content) == 2:
        inputs, labels = content
    else:
        raise UsageError(f"{option}: {path} holds a {type(content).__name__}"
                         f"{' with keys ' + str(sorted(content)) if isinstance(content, Mapping) else ''}; "
                         f"expected {kinds}")
    if isinstance(inputs, torch.Tensor) and not _holds_values(inputs):
        raise UsageError(f"{option}: the inputs in {path} must be a dense tensor that holds values, got a "
                         f"{_tensor_kind(inputs)} tensor")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise UsageError(f"{option}: the inputs in {path} must be a tensor with at least one sample (dim 0)")
    if labels is not None:
        if (not isinstance(labels, torch.Tensor) or not _holds_values(labels) or labels.dtype not in _LABEL_DTYPES
                or labels.dim() != 1):
            raise UsageError(f"{option}: the labels in {path} must be a 1-D integer tensor")
        if labels.shape[0] != inputs.shape[0]:
            raise UsageError(f"{option}: {path} has {inputs.shape[0]} inputs but {labels.shape[0]} labels")
        if not want_labels:
            labels = None
    return inputs, labels


_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _holds_values(t: torch.Tensor) -> bool:
    """Whether t is an ordinary dense tensor with values: not sparse, nested, meta (no data) or quantized, which
    the model's float layers cannot take (their errors would not say what is wrong with the file)."""
    return t.layout == torch.strided and not (t.is_nested or t.is_meta or t.is_quantized)


def _tensor_kind(t: torch.Tensor) -> str:
    """What is wrong with a tensor _holds_values refuses, for the message."""
    if t.is_nested:
        return "nested"
    if t.is_meta:
        return "meta (it has no data)"
    if t.is_quantized:
        return "quantized"
    return str(t.layout).replace("torch.", "")


def _is_batch_list(content) -> bool:
    """A list or tuple of float tensors of one sample shape (batches as a calibration loop takes them), other than
    an (inputs, labels) pair."""
    return (isinstance(content, (tuple, list)) and len(content) > 0
            and all(isinstance(t, torch.Tensor) and _holds_values(t) and t.dtype.is_floating_point
                    and t.dim() >= 1 for t in content)
            and len({tuple(t.shape[1:]) for t in content}) == 1 and len({t.dtype for t in content}) == 1)


def _batch_mismatch(content) -> Optional[str]:
    """For a list or tuple of float tensors of two or more dimensions that _is_batch_list refuses (batches of
    variable-length sequences, say): what the first batch unlike batch 0 differs in, for the message. None for
    anything else (an (inputs, labels) pair has 1-D integer labels)."""
    if not (isinstance(content, (tuple, list)) and len(content) > 1
            and all(isinstance(t, torch.Tensor) and _holds_values(t) and t.dtype.is_floating_point and t.dim() >= 2
                    for t in content)):
        return None
    first = content[0]
    for i, t in enumerate(content):
        if t.shape[1:] != first.shape[1:]:
            return f"sample shape (batch 0: {list(first.shape[1:])}, batch {i}: {list(t.shape[1:])})"
        if t.dtype != first.dtype:
            return f"dtype (batch 0: {str(first.dtype).replace('torch.', '')}, batch {i}: " \
                   f"{str(t.dtype).replace('torch.', '')})"
    return None


def batches_of(inputs: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive integer, got {batch_size!r}")
    return list(inputs.split(batch_size))


def same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_output(path: str, option: str, *, force: bool = False) -> None:
    """A UsageError unless `path` can be written: its directory exists and lets us create files, it is not a
    directory, and it is not a read-only file (unless --force)."""
    try:
        check_destination(path, option, force=force, force_hint="--force")
    except OSError as exc:
        raise UsageError(str(exc)) from exc


@contextmanager
def atomic_output(path: str, option: str, *, force: bool = False) -> Iterator[str]:
    """Yields a temporary path beside `path`; on success renames it to `path`, on any failure (SIGINT and
    SIGTERM included) removes it, so a reader never sees a partial file and nothing is left behind."""
    check_output(path, option, force=force)
    with atomic_write(path, option, force=force, force_hint="--force") as temp:
        yield temp
