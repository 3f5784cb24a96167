"""Quantize / dequantize / fake-quantize ops: wrappers and fake kernels (autograd: csrc/quantize_autograd.cpp).

Each wrapper first offers its arguments, as given, to its fast path in torchquant._C (csrc/python_calls.cpp),
which takes the common well-formed call straight to the op (Python-number scales and zero points as cached
tensors) and returns NotImplemented for anything else. The checked path below then validates the arguments
(Python exceptions naming the argument), turns Python numbers into the scale/zero_point tensors the compiled ops
take, and calls torch.ops.torchquant.*; it is also what torch.compile traces (torch.export's non-strict tracing
passes fake tensors, which the fast path leaves to it). Checks on tensor *values* (scale > 0,
zero point in range) are made by the CPU kernels themselves, and here only for tensors on other devices outside
torch.compile, so a compiled graph never breaks on them (once per tensor version: device_values_hold).
"""
import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch.compiler import is_compiling, is_dynamo_compiling

from torchquant import _C
from torchquant._ops import (FLOAT_DTYPES, ROUNDINGS, check_fake_devices, check_fake_dtype, device_values_hold,
                             ops)

__all__ = ["quantize", "dequantize", "fake_quantize", "choose_qparams", "quantize_per_token", "quantization_error"]

Number = Union[int, float]


def qrange(bits: int, signed: bool) -> Tuple[int, int]:
    """(qmin, qmax) of a format; signed 1 bit is sign binarization, {-1, +1}."""
    if signed and bits == 1:
        return -1, 1
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


# ---------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_tensor(t, name: str, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float_tensor(x, name: str, fn: str) -> None:
    _check_tensor(x, name, fn)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be a float32, float16 or bfloat16 tensor, got {x.dtype}")


def _check_bits(bits, fn: str, low: int = 1) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{fn}: bits must be an int, got {type(bits).__name__}")
    if not low <= bits <= 8:
        raise ValueError(f"{fn}: bits must be in [{low}, 8], got {bits}")


def _check_flag(value, name: str, fn: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def _check_rounding(rounding, fn: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"{fn}: rounding must be 'nearest' or 'truncate', got {rounding!r}")


def _normalized_axis(axis, x: torch.Tensor, fn: str) -> Optional[int]:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{fn}: axis must be an int or None, got {type(axis).__name__}")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"{fn}: axis must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d tensor, got {axis}")
    return axis % x.dim()


_TINY = torch.finfo(torch.float32).tiny  # the smallest scale: 1 / scale stays finite
_HUGE = torch.finfo(torch.float32).max


def _eager_value_check(t: torch.Tensor) -> bool:
    """Whether this wrapper checks the values of t (see the module docstring)."""
    return not t.is_cpu and not t.is_meta and not is_compiling()


def _number_qparam(value: Number, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Python-number scale or zero point as a tensor of `length` entries (per tensor 1, per channel C)."""
    return torch.full((length,), value, dtype=dtype, device=device)


_WIDER_THAN_INT32 = (torch.int64, torch.uint32, torch.uint64)


def _tensor_qparam(value: torch.Tensor, name: str, x: torch.Tensor, axis: Optional[int], dtype: torch.dtype,
                   fn: str) -> torch.Tensor:
    """A scale or zero_point tensor as the 1-D tensor of dtype the ops take: [1] per tensor, [C] per channel."""
    length = 1 if axis is None else x.shape[axis]
    if value.device != x.device:
        raise ValueError(f"{fn}: {name} must be on x's device ({x.device}), got {value.device}")
    if value.dtype != dtype:
        if dtype == torch.int32 and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise TypeError(f"{fn}: {name} must be an integer tensor or an int, got {value.dtype}")
        if dtype == torch.float32 and not value.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a float tensor or a number, got {value.dtype}")
    if value.numel() != length:
        where = "per-tensor" if axis is None else f"per-channel (x.shape[{axis}] = {length})"
        raise ValueError(f"{fn}: {name} must have {length} element(s) for {where} quantization, "
                         f"got shape {tuple(value.shape)}")
    if dtype == torch.int32 and value.dtype in _WIDER_THAN_INT32:
        # saturate rather than wrap (2**32 would become 0, an unsigned 2**32 - 1 would become -1): the range checks
        # then reject it. Through float64, which holds every int32 exactly (the unsigned types have no clamp).
        value = value.double().clamp(torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max)
    if value.dim() != 1:
        value = value.reshape(length)
    return value if value.dtype == dtype else value.to(dtype)


def _check_number(value, name: str, fn: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number or a tensor, got {type(value).__name__}")


def _scale_message(fn: str) -> str:
    return f"{fn}: scale must be positive and finite (at least {_TINY:g})"


def _scale_values_ok(scale: torch.Tensor) -> torch.Tensor:
    """Where a float32 scale tensor holds a scale the kernels take (finite, at least the smallest normal float)."""
    return torch.isfinite(scale) & (scale >= _TINY)


def _checked_scale(scale, x: torch.Tensor, axis: Optional[int], fn: str) -> torch.Tensor:
    """scale as the float32 tensor the ops take (a number is broadcast to every channel)."""
    if isinstance(scale, torch.Tensor):
        scale_t = _tensor_qparam(scale, "scale", x, axis, torch.float32, fn)
        if _eager_value_check(scale_t):
            good = device_values_hold(scale_t, "scale", _scale_values_ok)
        elif scale.dtype == torch.float64 and type(scale_t) is torch.Tensor and scale_t.is_cpu \
                and not is_compiling():  # (a FakeTensor is a subclass)
            # the CPU kernels check the values, but would see and report a float64 value past float32's range as
            # inf, or one below its normal range as 0 or a subnormal
            good = bool(_scale_values_ok(scale_t).all())
        else:
            good = True
        if not good:
            raise ValueError(f"{_scale_message(fn)}, got {scale.reshape(-1).tolist()}")
        return scale_t
    _check_number(scale, "scale", fn)
    if not _TINY <= scale <= _HUGE:  # also false for NaN; huge: finite as a float32
        raise ValueError(f"{_scale_message(fn)}, got {scale!r}")
    # float(): an int scale past int64 (2**70) is still a float32 scale
    return _number_qparam(float(scale), 1 if axis is None else x.shape[axis], torch.float32, x.device)


def _checked_zero_point(zero_point, x: torch.Tensor, axis: Optional[int], zp_range: "_ZeroPointRange",
                        fn: str) -> torch.Tensor:
    """zero_point as the int32 tensor the ops take (a number is broadcast to every channel)."""
    low, high = zp_range.low, zp_range.high
    if isinstance(zero_point, torch.Tensor):
        zp_t = _tensor_qparam(zero_point, "zero_point", x, axis, torch.int32, fn)
        if _eager_value_check(zp_t):
            inside = device_values_hold(zp_t, f"zero point in [{low}, {high}]", lambda z: (z >= low) & (z <= high))
        elif zero_point.dtype in _WIDER_THAN_INT32 and type(zp_t) is torch.Tensor and zp_t.is_cpu \
                and not is_compiling():  # (a FakeTensor is a subclass)
            # the CPU kernels check the values, but would see and report this type's values saturated to int32
            values = zp_t.tolist()
            inside = not values or (low <= min(values) and max(values) <= high)
        else:
            inside = True
        if not inside:
            raise ValueError(f"{zp_range.message(fn)}, got {zero_point.reshape(-1).tolist()}")
        return zp_t
    _check_number(zero_point, "zero_point", fn)
    if not low <= zero_point <= high:
        raise ValueError(f"{zp_range.message(fn)}, got {zero_point!r}")
    if not isinstance(zero_point, int) and not zero_point.is_integer():
        raise TypeError(f"{fn}: zero_point must be an integer, got {zero_point!r}")
    return _number_qparam(zero_point, 1 if axis is None else x.shape[axis], torch.int32, x.device)


class _ZeroPointRange:
    """The zero points a format allows, and why (for the error message)."""

    def __init__(self, low: int, high: int, why: str):
        self.low, self.high, self.why = low, high, why

    def message(self, fn: str) -> str:
        return f"{fn}: zero_point must be in [{self.low}, {self.high}] ({self.why})"


def _format_zero_point_range(bits: int, signed: bool) -> _ZeroPointRange:
    if signed and bits == 1:
        return _ZeroPointRange(0, 0, "sign binarization has no zero point")
    return _ZeroPointRange(*qrange(bits, signed), f"the {'signed' if signed else 'unsigned'} {bits}-bit range")


# Every (bits, signed) quantize / fake_quantize take, and the two integer dtypes dequantize takes.
_FORMAT_ZERO_POINTS = {(bits, signed): _format_zero_point_range(bits, signed)
                       for bits in range(1, 9) for signed in (False, True)}
_DTYPE_ZERO_POINTS = {dtype: _ZeroPointRange(low, high, f"the range of {dtype}")
                      for dtype, (low, high) in ((torch.int8, (-128, 127)), (torch.uint8, (0, 255)))}


def _quant_args(fn, x, scale, zero_point, bits, signed, rounding, axis):
    """Shared validation of quantize / fake_quantize: returns (scale, zero_point, axis) as the ops take them."""
    _check_float_tensor(x, "x", fn)
    _check_bits(bits, fn)
    _check_flag(signed, "signed", fn)
    _check_rounding(rounding, fn)
    axis = _normalized_axis(axis, x, fn)
    scale_t = _checked_scale(scale, x, axis, fn)
    zp_t = _checked_zero_point(zero_point, x, axis, _FORMAT_ZERO_POINTS[bits, signed], fn)
    return scale_t, zp_t, axis


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor, scale: Union[Number, torch.Tensor], zero_point: Union[int, torch.Tensor] = 0, *,
             bits: int = 8, signed: bool = True, rounding: str = "nearest", axis: Optional[int] = None
             ) -> torch.Tensor:
    """q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax): int8 (signed) or uint8 (unsigned).

    rounding "nearest" rounds half to even, "truncate" toward zero. axis given: per-channel scale/zero_point
    along that axis. NaN -> zero_point, +-inf -> qmax/qmin; signed 1 bit is sign binarization (+1 / -1)."""
    if not is_dynamo_compiling():
        q = _C.quantize(x, scale, zero_point, axis, bits, signed, rounding)
        if q is not NotImplemented:
            return q
    scale_t, zp_t, axis = _quant_args("quantize", x, scale, zero_point, bits, signed, rounding, axis)
    return ops.quantize(x, scale_t, zp_t, axis, bits, signed, rounding)


def dequantize(q: torch.Tensor, scale: Union[Number, torch.Tensor], zero_point: Union[int, torch.Tensor] = 0, *,
               axis: Optional[int] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - zero_point) * scale, computed in float32 and returned as dtype (float32, float16 or bfloat16)."""
    if not is_dynamo_compiling():
        y = _C.dequantize(q, scale, zero_point, axis, dtype)
        if y is not NotImplemented:
            return y
    fn = "dequantize"
    _check_tensor(q, "q", fn)
    if q.dtype not in _DTYPE_ZERO_POINTS:
        raise TypeError(f"{fn}: q must be an int8 or uint8 tensor, got {q.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    axis = _normalized_axis(axis, q, fn)
    scale_t = _checked_scale(scale, q, axis, fn)
    zp_t = _checked_zero_point(zero_point, q, axis, _DTYPE_ZERO_POINTS[q.dtype], fn)
    return ops.dequantize(q, scale_t, zp_t, axis, dtype)


def fake_quantize(x: torch.Tensor, scale: Union[Number, torch.Tensor], zero_point: Union[int, torch.Tensor] = 0, *,
                  bits: int = 8, signed: bool = True, rounding: str = "nearest", axis: Optional[int] = None
                  ) -> torch.Tensor:
    """dequantize(quantize(x)) in one pass, in x's dtype; NaN stays NaN.

    Differentiable w.r.t. x: the gradient passes where round(x / scale) + zero_point lies inside [qmin, qmax]
    (sign binarization: |x| <= scale) and is zero elsewhere, as in torch.fake_quantize_per_tensor_affine."""
    if not is_dynamo_compiling():
        y = _C.fake_quantize(x, scale, zero_point, axis, bits, signed, rounding)
        if y is not NotImplemented:
            return y
    scale_t, zp_t, axis = _quant_args("fake_quantize", x, scale, zero_point, bits, signed, rounding, axis)
    return ops.fake_quantize(x, scale_t, zp_t, axis, bits, signed, rounding)


def choose_qparams(x: torch.Tensor, *, bits: int = 8, signed: bool = True, symmetric: bool = True,
                   axis: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) covering the range of x (NaN and inf are ignored), [1] per tensor or
    one entry per channel along axis.

    symmetric, signed: scale = absmax / qmax, zero point 0 (also for sign binarization, 1 bit);
    symmetric, unsigned: the zero point in the middle, scale = absmax / ((qmax - qmin) / 2);
    asymmetric: the range [min, max] widened to include 0, scale = (max - min) / (qmax - qmin),
    zero_point = clamp(qmin - round(min / scale), qmin, qmax).
    A zero range gives scale 1.0; scales are at least the smallest normal float32, so 1 / scale is finite, and at
    most the largest float32, so they are finite even for ranges near the float32 limits."""
    fn = "choose_qparams"
    _check_float_tensor(x, "x", fn)
    _check_bits(bits, fn)
    _check_flag(signed, "signed", fn)
    _check_flag(symmetric, "symmetric", fn)
    axis = _normalized_axis(axis, x, fn)
    if x.numel() == 0:
        raise ValueError(f"{fn}: x must not be empty (it has no range), got shape {tuple(x.shape)}")
    x32 = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).float()
    if axis is None:
        low, high = x32.amin().reshape(1), x32.amax().reshape(1)
    else:
        rows = x32.movedim(axis, 0).reshape(x.shape[axis], -1)
        low, high = rows.amin(1), rows.amax(1)
    low, high = low.clamp(max=0), high.clamp(min=0)
    qmin, qmax = qrange(bits, signed)
    if symmetric or (signed and bits == 1):
        absmax = torch.maximum(-low, high)
        if signed:
            scale = absmax / qmax
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = absmax / ((qmax - qmin) / 2)
            zero_point = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int32)
    else:
        scale = (high - low) / (qmax - qmin)
        # the width of a range such as [-3e38, 3e38] overflows float32: take it in float64 there
        scale = torch.where(torch.isinf(scale), ((high.double() - low.double()) / (qmax - qmin)).float(), scale)
        zero_point = None
    f32 = torch.finfo(torch.float32)
    scale = torch.where(scale > 0, scale, 1.0).clamp(f32.tiny, f32.max)  # f32.max: a range wider than any scale
    if zero_point is None:
        zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize_per_token(x: torch.Tensor, *, bits: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization over the last dim: (q int8 shaped like x, scale float32 of x.shape[:-1]).

    scale = (largest finite |x| of the row) / (2^(bits-1) - 1), 1.0 for a row of zeros; q = clamp(round(x * (1 /
    scale)), -qmax, qmax) with NaN -> 0 and +-inf -> +-qmax. dequantize: q * scale[..., None]. Not
    differentiable: no gradient reaches x."""
    if not is_dynamo_compiling():
        out = _C.quantize_per_token(x, bits)
        if out is not NotImplemented:
            return out
    fn = "quantize_per_token"
    _check_float_tensor(x, "x", fn)
    _check_bits(bits, fn, low=2)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least 1 dimension (tokens along the last), got a 0-d tensor")
    return ops.quantize_per_token(x, bits)


def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> Dict[str, float]:
    """{"mse", "max_abs", "sqnr_db"} of x_hat against x, in float64. SQNR = 10 log10(mean(x^2) / mse):
    inf when x_hat == x."""
    fn = "quantization_error"
    _check_tensor(x, "x", fn)
    _check_tensor(x_hat, "x_hat", fn)
    if x.shape != x_hat.shape:
        raise ValueError(f"{fn}: x_hat must have x's shape {tuple(x.shape)}, got {tuple(x_hat.shape)}")
    if x.device != x_hat.device:
        raise ValueError(f"{fn}: x_hat must be on x's device ({x.device}), got {x_hat.device}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: x must not be empty")
    if x.is_complex() or x_hat.is_complex() or x.dtype == torch.bool or x_hat.dtype == torch.bool:
        raise TypeError(f"{fn}: x and x_hat must be real numeric tensors, got {x.dtype} and {x_hat.dtype}")
    x64 = x.detach().double()  # a measurement: no autograd graph (and no warning about reading grad tensors)
    diff = x64 - x_hat.detach().double()
    mse = float(diff.square().mean())
    signal = float(x64.square().mean())
    if mse == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / mse)
    return {"mse": mse, "max_abs": float(diff.abs().max()), "sqnr_db": sqnr}


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, for torch.compile and opcheck. Outputs are laid out as
# torch.empty_like's (the kernels run in the input's memory order), per-token quantize's contiguous.
# ---------------------------------------------------------------------------------------------------------------


@torch.library.register_fake("torchquant::quantize")
def _quantize_fake(x, scale, zero_point, axis, bits, signed, rounding):
    check_fake_devices("quantize", "x", x, scale=scale, zero_point=zero_point)
    check_fake_dtype("quantize", "x", x, FLOAT_DTYPES)
    return torch.empty_like(x, dtype=torch.int8 if signed else torch.uint8)


@torch.library.register_fake("torchquant::dequantize")
def _dequantize_fake(q, scale, zero_point, axis, dtype):
    check_fake_devices("dequantize", "q", q, scale=scale, zero_point=zero_point)
    check_fake_dtype("dequantize", "q", q, (torch.int8, torch.uint8))
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dequantize: dtype must be float32, float16 or bfloat16, got {dtype}")
    return torch.empty_like(q, dtype=dtype)


@torch.library.register_fake("torchquant::fake_quantize")
def _fake_quantize_fake(x, scale, zero_point, axis, bits, signed, rounding):
    check_fake_devices("fake_quantize", "x", x, scale=scale, zero_point=zero_point)
    check_fake_dtype("fake_quantize", "x", x, FLOAT_DTYPES)
    return torch.empty_like(x)


@torch.library.register_fake("torchquant::fake_quantize_backward")
def _fake_quantize_backward_fake(grad, x, scale, zero_point, axis, bits, signed, rounding):
    check_fake_devices("fake_quantize_backward", "x", x, grad=grad, scale=scale, zero_point=zero_point)
    return torch.empty_like(x)


@torch.library.register_fake("torchquant::fake_quantize_error")
def _fake_quantize_error_fake(rows, scale, zero_point, bits, signed, rounding):
    check_fake_devices("fake_quantize_error", "rows", rows, scale=scale, zero_point=zero_point)
    check_fake_dtype("fake_quantize_error", "rows", rows, (torch.float32,))
    check_fake_dtype("fake_quantize_error", "scale", scale, (torch.float32,))
    check_fake_dtype("fake_quantize_error", "zero_point", zero_point, (torch.int32,))
    torch._check(rows.dim() == 2 and scale.dim() == 2 and scale.shape[1] == rows.shape[0]
                 and zero_point.shape == scale.shape,
                 lambda: f"fake_quantize_error: rows must be [channels, length] and scale and zero_point [candidates, "
                         f"channels], got {list(rows.shape)}, {list(scale.shape)} and {list(zero_point.shape)}")
    return scale.new_empty(scale.shape, dtype=torch.float64)


@torch.library.register_fake("torchquant::quantize_per_token")
def _quantize_per_token_fake(x, bits):
    check_fake_dtype("quantize_per_token", "x", x, FLOAT_DTYPES)
    torch._check(x.dim() >= 1, lambda: "quantize_per_token: x must have at least 1 dimension (tokens along the last)")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)
