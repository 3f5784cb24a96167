"""Range observers: estimate the [lo, hi] range a tensor is quantized to, per tensor or per channel.

Every observer reduces a batch to one range per channel (`batch_range`) and folds it into running state kept in
float32 buffers (so it is saved with the model and follows `.to(device)` without being cast by `.half()`).
qparams come from the range through `functional.choose_qparams`, so observers and kernels share one formula.
Under torch.distributed the batch ranges are all-reduced, so every rank ends with the same qparams.

The observers are the entries of OBSERVERS (QuantSpec.observer names one; the command line's --observer choices
and QuantSpec's error messages read the table): adding one is one entry there (and its test).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from torchquant import functional as F_q
from torchquant._ops import ops
from torchquant.config import QuantSpec

# shrink factors searched by the mse observer: the clipped range is factor * (observed range)
MSE_SHRINK_FACTORS = torch.linspace(1.0, 0.2, 41).tolist()


def as_channel_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as a float [C, R] matrix: one row per channel along axis (one row in all for axis None)."""
    x = x.detach()
    if not x.is_floating_point():
        raise TypeError(f"observer input must be a floating-point tensor, got {x.dtype}")
    if axis is None:
        return x.reshape(1, -1).float()
    return x.movedim(axis, 0).reshape(x.shape[axis], -1).float()


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32 [C], zero_point int32 [C]) for ranges lo/hi [C], per functional.choose_qparams."""
    bounds = torch.stack([lo, hi], dim=1)  # [C, 2]: choose_qparams takes min/max over dim 1
    return F_q.choose_qparams(bounds, bits=spec.bits, signed=spec.signed, symmetric=spec.symmetric, axis=0)


def _minmax(rows: torch.Tensor, spec: QuantSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.aminmax over a dim runs a scalar loop on the CPU: 12-20x slower than amin and amax over it (a 1024 x 1024
    # weight: 2.3 ms against 0.11), which a whole-tensor aminmax beats again for one row
    if rows.shape[0] == 1:
        lo, hi = torch.aminmax(rows)
        return lo.reshape(1), hi.reshape(1)
    return rows.amin(1), rows.amax(1)


def _percentile_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    n = rows.shape[1]
    k_hi = max(1, min(n, int(round(spec.percentile / 100.0 * n))))
    if spec.symmetric:
        absmax = rows.abs().kthvalue(k_hi, dim=1).values
        return -absmax, absmax
    k_lo = max(1, n + 1 - k_hi)
    return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


def _mse_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The range factor * [min, max] (one factor per channel) whose fake-quantization error is smallest: one kernel
    (fake_quantize_error) sums the squared errors of every factor and channel, reading each row from cache once per
    factor, in an order that gives the same sums on every CPU path, thread count and CUDA."""
    lo, hi = _minmax(rows)
    factors = torch.tensor(MSE_SHRINK_FACTORS, device=rows.device)
    candidates = (factors.numel(), rows.shape[0])
    scale, zero_point = qparams_from_range((factors[:, None] * lo).reshape(-1), (factors[:, None] * hi).reshape(-1),
                                           spec)
    errors = ops.fake_quantize_error(rows, scale.view(candidates), zero_point.view(candidates), spec.bits,
                                     spec.signed, spec.rounding)
    best = errors.argmin(dim=0)  # first (widest) range among equals
    return factors[best] * lo, factors[best] * hi


# observers whose range comes out NaN or infinite whenever the data holds a NaN or an inf (it starts from the min and
# max), so that checking the range finds them; a percentile can stay finite but shifted by them
_RANGE_SHOWS_NON_FINITE = {"minmax", "moving_average", "mse"}


def batch_range(x: torch.Tensor, spec: QuantSpec, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's (lo, hi) float32 [C] per the spec's observer (moving_average uses min/max per batch)."""
    rows = as_channel_rows(x, axis)
    if rows.shape[1] == 0:
        raise ValueError("observer input must not be empty")
    # NaN and inf are ignored, as choose_qparams ignores them (taken as 0, which every range holds): a min or max
    # of inf, which choose_qparams then drops, would make one inf clip everything on its side to 0, and one NaN
    # would make the whole range NaN. No torch reduction skips them (no nanmin/nanmax; a mask or torch.where is an
    # element-wise pass too), so they are replaced: in eager mode on the CPU only when the range shows one (no extra
    # pass over finite data); on a GPU (a check would make it wait), in traced graphs (no values to check) and for
    # the percentile observer always, by an element-wise pass before the reduction.
    check = rows.is_cpu and not torch.compiler.is_compiling() and spec.observer in _RANGE_SHOWS_NON_FINITE
    if not check:
        rows = torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = OBSERVERS[spec.observer].batch_range(rows, spec)
    # (the sum of the widths is finite only where every bound is; finite widths whose sum overflows redo it needlessly)
    if check and not math.isfinite((hi - lo).sum().item()):
        lo, hi = OBSERVERS[spec.observer].batch_range(torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0), spec)
    return lo, hi


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sync_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks agree on the batch range: the global min/max, or the mean for estimated (clipped) ranges."""
    world = _distributed_world()
    if world == 1:
        return lo, hi
    lo, hi = lo.clone(), hi.clone()
    if OBSERVERS[spec.observer].extremes:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    else:
        both = torch.stack([lo, hi])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        lo, hi = (both / world).unbind(0)
    return lo, hi


def moved_state(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Quantization state t on device with its dtype. A meta tensor has no values to move (model.to_empty): it becomes
    the placeholder a new layer starts from (ones for floats, a valid scale; zeros for integers) until a state dict
    loads."""
    if not t.is_meta:
        return t.to(device)
    return (torch.ones_like if t.is_floating_point() else torch.zeros_like)(t, device=device)


class Float32StateModule(nn.Module):
    """A module whose own tensors are quantization state: `.to(device)` moves them, dtype casts leave them, and a
    state dict without any of them (a float checkpoint) loads, keeping the current state."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = [prefix + name for name in self._parameters]
        own += [prefix + name for name in self._buffers if name not in self._non_persistent_buffers_set]
        absent = not any(key in state_dict for key in own)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if absent:
            missing_keys[:] = [key for key in missing_keys if key not in own]

    def _apply(self, fn, recurse=True):
        if recurse:
            for child in self.children():
                child._apply(fn)
        for tensors in (self._parameters, self._buffers):
            for name, t in tensors.items():
                if t is None:
                    continue
                device = fn(t.new_empty(0)).device  # what fn would do, for the device only
                if not isinstance(t, nn.Parameter):
                    tensors[name] = moved_state(t, device)
                    continue
                moved = moved_state(t.data, device)
                if torch._has_compatible_shallow_copy_type(t, moved):
                    t.data = moved  # the same Parameter object, so an optimizer holding it stays valid
                else:  # e.g. to or from "meta": a new Parameter, as nn.Module._apply does
                    tensors[name] = nn.Parameter(moved, requires_grad=t.requires_grad)
        return self


class Observer(Float32StateModule):
    """Running range of the tensors it sees: per tensor (axis None) or per channel along axis.

    Buffers: lo, hi (float32 [C]) and batches (int64 count of batches seen).
    """

    def __init__(self, spec: QuantSpec, axis: int | None = None, num_channels: int = 1, sync: bool = True):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"Observer: spec must be a QuantSpec, got {type(spec).__name__}")
        if axis is None and num_channels != 1:
            raise ValueError(f"Observer: a per-tensor observer has num_channels 1, got {num_channels}")
        if num_channels < 1:
            raise ValueError(f"Observer: num_channels must be >= 1, got {num_channels}")
        self.spec = spec
        self.axis = axis
        self.sync = sync
        self.register_buffer("lo", torch.zeros(num_channels))
        self.register_buffer("hi", torch.zeros(num_channels))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    @property
    def has_data(self) -> bool:
        return bool(self.batches.item() > 0)

    def reset(self) -> None:
        self.lo.zero_()
        self.hi.zero_()
        self.batches.zero_()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Records x's range and returns x unchanged. Empty tensors carry no range and are ignored."""
        if x.numel() == 0:
            return x
        if self.axis is not None and x.shape[self.axis] != self.lo.numel():
            raise ValueError(f"Observer: expected {self.lo.numel()} channels along axis {self.axis}, "
                             f"got {x.shape[self.axis]}")
        lo, hi = batch_range(x, self.spec, self.axis)
        if self.sync:
            lo, hi = _sync_range(lo, hi, self.spec)
        if lo.device != self.lo.device:
            lo, hi = lo.to(self.lo.device), hi.to(self.lo.device)
        # the first batch's range is taken as it is, later ones folded in: selected by the count as a tensor, not
        # branched on its value, so that a compiled training step keeps one graph (and a GPU does not wait)
        first = self.batches == 0
        folded_lo, folded_hi = OBSERVERS[self.spec.observer].fold(self, lo, hi)
        self.lo.copy_(torch.where(first, lo, folded_lo))
        self.hi.copy_(torch.where(first, hi, folded_hi))
        self.batches.add_(1)
        return x

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32 [C], zero_point int32 [C]) of the recorded range."""
        if not self.has_data:
            raise RuntimeError("Observer.qparams: the observer has seen no data (run calibration first)")
        return qparams_from_range(self.lo, self.hi, self.spec)

    def extra_repr(self) -> str:
        return f"observer={self.spec.observer}, axis={self.axis}, channels={self.lo.numel()}"


# ----------------------------------------------------------------------------------------------------------
# the observers

def _fold_extremes(observer: Observer, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.minimum(observer.lo, lo), torch.maximum(observer.hi, hi)


def _moved_toward(running: torch.Tensor, new: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """running + weight * (new - running); where the difference of two finite values overflows float32 (ranges near
    its limit, of opposite signs) running * (1 - weight) + new * weight, which cannot."""
    step = (new - running) * weight
    overflow = ~torch.isfinite(step) & torch.isfinite(new) & torch.isfinite(running)
    return torch.where(overflow, running * (1 - weight) + new * weight, running + step)


def _fold_moving_average(observer: Observer, lo: torch.Tensor,
                         hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = observer.spec.averaging_constant
    return _moved_toward(observer.lo, lo, c), _moved_toward(observer.hi, hi, c)


def _fold_mean(observer: Observer, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of the per-batch estimates (observer.batches of them folded so far)."""
    weight = 1 / (observer.batches + 1)
    return _moved_toward(observer.lo, lo, weight), _moved_toward(observer.hi, hi, weight)


@dataclass(frozen=True)
class ObserverKind:
    """One way of estimating a range.

    batch_range(rows [C, R] float32, spec) -> (lo, hi) [C]: one batch's range per channel.
    fold(observer, lo, hi) -> (lo, hi): the observer's range with a batch's range folded in (after the first batch,
    which is taken as it is; observer.batches counts the batches folded before).
    extremes: the batch ranges are true extremes, so ranks agree on their min/max under torch.distributed (else on
    their mean).
    description: one line for --help and the docs.
    """
    batch_range: Callable[[torch.Tensor, QuantSpec], tuple[torch.Tensor, torch.Tensor]]
    fold: Callable[[Observer, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    extremes: bool
    description: str


OBSERVERS: dict[str, ObserverKind] = {
    "minmax": ObserverKind(_minmax, _fold_extremes, True, "the min and max of everything seen"),
    "moving_average": ObserverKind(_minmax, _fold_moving_average, True,
                                   "a moving average of each batch's min and max (averaging_constant)"),
    "percentile": ObserverKind(_percentile_range, _fold_mean, False,
                               "the mean over batches of a percentile of the values (percentile)"),
    "mse": ObserverKind(_mse_range, _fold_mean, False,
                        "the mean over batches of the clipping range with the least fake-quantization error"),
}
