"""The compiled ops (torch.ops.torchquant.*) and their typed Python wrappers.

Importing this package loads torchquant._C, which registers every op schema (csrc/ops.cpp) and the CPU
(and, when built, CUDA) kernels with the dispatcher.
"""
import weakref
from typing import Callable, Dict, Tuple

import torch

from torchquant import _C  # noqa: F401  (loading the library registers the ops)

ops = torch.ops.torchquant

# What the float side of every op takes, and the rounding modes of the quantize ops (csrc/ops.cpp).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUNDINGS = ("nearest", "truncate")


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("torchquant::quantize", "CUDA")


def cpu_kernel_path() -> str:
    """The instruction-set path the CPU kernels run now: "avx512_amx" (avx512_vnni with the GEMMs on AMX tiles),
    "avx512_vnni", "avx2" or "scalar" (the best this CPU supports, or the one the environment variable
    TORCHQUANT_CPU_ISA forces)."""
    return ops.cpu_kernel_path()


def set_cpu_output_cache(max_bytes: int) -> None:
    """Sets how many bytes of freed outputs of torchquant's CPU ops are kept for the next outputs (64 MiB by default;
    0 keeps none). Without them an output of a few MB is often fresh memory from the OS, page-faulted and zeroed on
    first touch, on every call; the oldest kept blocks are let go past the limit."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"set_cpu_output_cache: max_bytes must be an int, got {type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"set_cpu_output_cache: max_bytes must be >= 0, got {max_bytes}")
    _C.set_cpu_output_cache(max_bytes)


def cpu_output_cache_info() -> Dict[str, int]:
    """The CPU output cache: "limit" (bytes kept at most), "cached_bytes" and "cached_blocks" (kept now), "reused"
    (outputs served from kept blocks) and "allocated" (outputs of 64 KiB or more that took new memory)."""
    return _C.cpu_output_cache_info()


# The tensors device_values_hold found good: (id, check) -> (a weak reference to the tensor, its version and data
# pointer then). Kept outside the tensor, so that a deep copy or a pickle of it carries no verdict along.
_GOOD_VALUES: Dict[Tuple[int, str], Tuple[weakref.ref, int, int]] = {}
_GOOD_VALUES_KEPT = 4096  # entries at most: past it the dead ones go, and if none are dead, all


def device_values_hold(t: torch.Tensor, check: str, condition: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether the boolean tensor condition(t) is true everywhere, for t on an accelerator: one device->host copy,
    a device sync. A tensor found good is remembered under the name `check` with its version counter, which every
    in-place op on it advances, and its data pointer, so that the same tensor, unchanged, is not read again: a
    layer's weight scale or a calibrated input scale costs no sync per call. A write that bypasses the version
    counter (through `t.data` or the storage) is not seen until the tensor is written in place or replaced.
    Inference tensors have no version counter: checked on every call."""
    try:
        version = t._version
    except RuntimeError:
        version = None
    key = (id(t), check)
    seen = _GOOD_VALUES.get(key)
    if version is not None and seen is not None and seen[0]() is t and seen[1:] == (version, t.data_ptr()):
        return True
    if not bool(condition(t).all()):
        return False
    if version is not None:
        if len(_GOOD_VALUES) >= _GOOD_VALUES_KEPT:
            for dead in [k for k, (ref, _, _) in _GOOD_VALUES.items() if ref() is None]:
                del _GOOD_VALUES[dead]
            if len(_GOOD_VALUES) >= _GOOD_VALUES_KEPT:
                _GOOD_VALUES.clear()
        _GOOD_VALUES[key] = (weakref.ref(t), version, t.data_ptr())
    return True


def check_fake_devices(op: str, anchor_name: str, anchor: torch.Tensor, **tensors) -> None:
    """For fake (meta) kernels: every tensor in tensors must be on anchor's device. The meta kernel also runs for
    a call that mixes meta and real tensors, where it must raise rather than return an uninitialized tensor."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == anchor.device,
                         lambda: f"{op}: {name} must be on {anchor_name}'s device ({anchor.device}), got {t.device}")


def dtype_names(dtypes) -> str:
    """"int8 or uint8": dtypes as error messages name them."""
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_fake_dtype(op: str, name: str, t: torch.Tensor, dtypes) -> None:
    """For fake (meta) kernels: t's dtype must be one of dtypes, as the device kernels require (a meta call raises
    where a real one would, instead of returning a result)."""
    torch._check(t.dtype in dtypes, lambda: f"{op}: {name} must be {dtype_names(dtypes)}, got {t.dtype}")
