"""Integer matrix ops (int8_mm, int8_linear, int8_conv2d): wrappers and fake kernels.

The wrappers check what the message should name in Python terms (types, ranks, devices) and leave the rest
(sizes against the packed weight, zero-point ranges, ...) to the kernels' TORCH_CHECKs, so the small-batch path
stays cheap; int8_mm, int8_linear and int8_conv2d first offer their arguments to their torchquant._C entries, which
call the op on the common well-formed call (csrc/python_calls.cpp).
Packed weights are device specific: re-pack after moving a weight to another device.
"""
import math
import numbers
import struct
from typing import Optional, Sequence, Tuple, Union

import torch
from torch.compiler import is_dynamo_compiling

from torchquant import _C
from torchquant._ops import (FLOAT_DTYPES, check_fake_devices, check_fake_dtype, device_values_hold, dtype_names,
                             ops)

__all__ = [
    "int8_mm",
    "pack_int8_weight",
    "int8_linear",
    "dynamic_int8_linear",
    "pack_conv_weight",
    "int8_conv2d",
]

_ACTIVATION_DTYPES = (torch.int8, torch.uint8)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _require_dtype(name: str, t: torch.Tensor, dtypes: Tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")


def _require_same_device(device: torch.device, **tensors) -> None:
    """Each of tensors (None: an absent optional one) is a tensor on device."""
    for name, t in tensors.items():
        if t is None:
            continue
        _require_tensor(name, t)
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}: move all tensors to one device")


def _is_int(v) -> bool:
    """An int, a numpy integer or a SymInt; not a bool (True is not a size)."""
    # a plain int first: the check against the numbers.Integral ABC costs about a microsecond a call
    return type(v) is int or (isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool))


def _as_int(v):
    return v if type(v) is int or isinstance(v, torch.SymInt) else int(v)


def _pair(name: str, v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if _is_int(v):
        return (_as_int(v), _as_int(v))
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(i) for i in v):
        return (_as_int(v[0]), _as_int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _integer(op: str, name: str, value) -> int:
    """An integer argument (a zero point, a size) as the int the op takes: an int (or a SymInt while tracing), a
    numpy integer, an integral float or a one-element integer tensor; not a bool. Anything else raises naming it:
    int() would truncate 0.5 to 0 and fail on NaN without naming the argument, and an int past int64 would reach
    the op as a puzzling schema error."""
    if _is_int(value):
        value = _as_int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()
          and not value.is_complex() and value.dtype != torch.bool):
        value = int(value)
    else:
        raise TypeError(f"{op}: {name} must be an integer, got {value!r}")
    if type(value) is int and not -2**63 <= value < 2**63:
        raise ValueError(f"{op}: {name} is out of range, got {value}")
    return value


def _flag(op: str, name: str, value) -> bool:
    """A boolean argument: a bool, the int 0 or 1, a numpy bool or a one-element bool tensor. bool() would take any
    object, the string "no" as True."""
    if isinstance(value, int) and value in (0, 1):  # bool is an int
        return bool(value)
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    if getattr(getattr(value, "dtype", None), "kind", None) == "b" and getattr(value, "shape", None) == ():  # numpy
        return bool(value)
    raise TypeError(f"{op}: {name} must be a bool, got {value!r}")


def _require_positive_finite(op: str, name: str, scale: torch.Tensor) -> None:
    """The CPU kernels check scale values themselves; elsewhere this wrapper does (device_values_hold: once per
    tensor version), outside torch.compile so that a compiled graph never breaks on it (meta tensors have no
    values)."""
    if scale.device.type not in ("cpu", "meta") and not torch.compiler.is_compiling():
        if not device_values_hold(scale, "positive finite", lambda s: torch.isfinite(s) & (s > 0)):
            raise ValueError(f"{op}: {name} must be positive and finite, got {scale.tolist()}")


def as_float32(value: float) -> float:
    """value rounded to float32, as the kernels read it (inf past float32's range)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _scale_tensor(op: str, name: str, scale, device: torch.device) -> torch.Tensor:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale32 = as_float32(scale)  # (1e-46 is 0 as a float32)
        if not (math.isfinite(scale32) and scale32 > 0):
            raise ValueError(f"{op}: {name} must be positive and finite (as a float32), got {scale!r}")
        # (torch.full fills on the device: no host-to-device copy, which would wait for the device)
        return torch.full((1,), float(scale), dtype=torch.float32, device=device)
    _require_tensor(name, scale)
    _require_dtype(name, scale, (torch.float32,))
    _require_positive_finite(op, name, scale)
    return scale.reshape(-1)


def _optional_number(op: str, name: str, value) -> Optional[float]:
    """None, or a real number as the float an op takes: a Python or numpy number or a one-element real tensor; not
    a bool or a string, which float() would take as 1.0 or parse, or fail on without naming the argument."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return float(value)
    elif isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{op}: {name} must be a number or None, got {value!r}")


def _clamp_bound(op: str, name: str, value) -> Optional[float]:
    """A fused activation bound as the kernels take it: None or a finite float (the kernels check the float32 value
    and the order of the two)."""
    bound = _optional_number(op, name, value)
    if bound is not None and not math.isfinite(bound):
        raise ValueError(f"{op}: {name} must be finite, got {value!r}")
    return bound


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 [M, N] = a [M, K] int8 @ b [K, N] int8, for any sizes and strides (b = w.t() of an [N, K]
    weight is the fast case). Every sum fits int32 for K < 2^17; a sum of more products outside int32's range
    wraps modulo 2^32, as torch._int_mm's does."""
    if not is_dynamo_compiling():
        out = _C.int8_mm(a, b)
        if out is not NotImplemented:
            return out
    _require_tensor("a", a)
    _require_tensor("b", b)
    _require_dtype("a", a, (torch.int8,))
    _require_dtype("b", b, (torch.int8,))
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"int8_mm: a and b must be 2-d, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_mm: inner sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    _require_same_device(a.device, b=b)
    return ops.int8_mm(a, b)


def pack_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Lays out an int8 weight [N, K] (or [G, N, K]) once for the device's GEMM. The result has w's shape (the
    kernels check it against their other arguments) and strides [round_up(N, 64) * round_up(K, 64)?,
    round_up(K, 64), 1] over a zero-padded buffer whose bytes are in the device's own order: pass it to the ops
    as it is (a copy such as .clone() or .contiguous() drops the padding and is rejected)."""
    _require_tensor("w", w)
    _require_dtype("w", w, (torch.int8,))
    if w.dim() not in (2, 3) or w.numel() == 0:
        raise ValueError(f"pack_int8_weight: w must be a non-empty [N, K] or [G, N, K] tensor, got {tuple(w.shape)}")
    return ops.pack_int8_weight(w)


def int8_linear(x_q: torch.Tensor, x_scale, x_zero_point: int, w_packed: torch.Tensor, w_sum: torch.Tensor,
                w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None, *, out_features: int,
                out_dtype: torch.dtype = torch.float32, out_scale: Optional[float] = None,
                out_zero_point: int = 0, clamp_min: Optional[float] = None,
                clamp_max: Optional[float] = None, out_bits: int = 8) -> torch.Tensor:
    """y = (sum_k (x_q - x_zero_point) * w) * x_scale * w_scale + bias over the last dim of x_q [..., K].

    x_scale: float32, one per token (shape x_q.shape[:-1]) or 1 element (or a Python float); w_sum = w.sum(1)
    (int32 [N]) of the weight w_packed packs, which the kernels take as given (checking it would read the whole
    weight on every call): other sums give other outputs; w_scale float32 [N]. clamp_min / clamp_max: a fused
    activation, y = min(max(y, clamp_min), clamp_max) (each when given; ReLU: clamp_min=0, ReLU6: 0 and 6).
    out_dtype float32/float16/bfloat16, or int8/uint8 with out_scale and out_zero_point (requantized:
    clamp(rne(y / out_scale) + out_zero_point)), clamped to the range of out_bits bits (2-8, signed as out_dtype:
    [0, 2^out_bits - 1] for uint8, [-2^(out_bits - 1), 2^(out_bits - 1) - 1] for int8), the integers of an activation
    fake-quantized with that many bits."""
    if not is_dynamo_compiling():
        y = _C.int8_linear(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_features, out_dtype,
                           out_scale, out_zero_point, clamp_min, clamp_max, out_bits)
        if y is not NotImplemented:
            return y
    _require_tensor("x_q", x_q)
    _require_dtype("x_q", x_q, _ACTIVATION_DTYPES)
    if x_q.dim() < 1:
        raise ValueError("int8_linear: x_q must have at least 1 dimension [..., K]")
    _require_tensor("w_packed", w_packed)
    _require_tensor("w_sum", w_sum)
    _require_tensor("w_scale", w_scale)
    x_scale = _scale_tensor("int8_linear", "x_scale", x_scale, x_q.device)
    _require_same_device(x_q.device, x_scale=x_scale, w_packed=w_packed, w_sum=w_sum, w_scale=w_scale, bias=bias)
    _require_positive_finite("int8_linear", "w_scale", w_scale)
    if out_dtype not in FLOAT_DTYPES + _ACTIVATION_DTYPES:
        raise TypeError(f"int8_linear: out_dtype must be float32, float16, bfloat16, int8 or uint8, got {out_dtype}")
    op = "int8_linear"
    return ops.int8_linear(x_q, x_scale, _integer(op, "x_zero_point", x_zero_point), w_packed, w_sum, w_scale, bias,
                           _integer(op, "out_features", out_features), out_dtype,
                           _optional_number(op, "out_scale", out_scale),
                           _integer(op, "out_zero_point", out_zero_point),
                           _clamp_bound("int8_linear", "clamp_min", clamp_min),
                           _clamp_bound("int8_linear", "clamp_max", clamp_max), _integer(op, "out_bits", out_bits))


# dynamic_int8_linear's fused activations, and torch.nn.functional.gelu's `approximate` for each
GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def dynamic_int8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_sum: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, *, out_features: int,
                        activation: Optional[str] = None) -> torch.Tensor:
    """The int8-dynamic Linear forward: per-token symmetric int8 quantization of x [..., K] (float32, float16 or
    bfloat16), then int8_linear against the packed weight; the output has x's dtype. activation: None, or "gelu" /
    "gelu_tanh": torch.nn.functional.gelu (approximate "none" / "tanh") of the float32 result before the cast,
    computed in the GEMM's epilogue on the CPU."""
    if activation is not None and activation not in GELU_APPROXIMATE:
        raise ValueError(f"dynamic_int8_linear: activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
    _require_tensor("x", x)
    _require_dtype("x", x, FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("dynamic_int8_linear: x must have at least 1 dimension [..., K]")
    _require_tensor("w_packed", w_packed)
    _require_tensor("w_sum", w_sum)
    _require_tensor("w_scale", w_scale)
    _require_same_device(x.device, w_packed=w_packed, w_sum=w_sum, w_scale=w_scale, bias=bias)
    _require_positive_finite("dynamic_int8_linear", "w_scale", w_scale)
    # one dispatcher call (quantize_per_token + int8_linear in C++): no Python autograd kernel, no second op call
    out_features = _integer("dynamic_int8_linear", "out_features", out_features)
    if activation is None:
        return ops.int8_linear_dynamic(x, w_packed, w_sum, w_scale, bias, out_features)
    return ops.int8_linear_dynamic.activation(x, w_packed, w_sum, w_scale, bias, out_features, activation)


def pack_conv_weight(w_q: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Packs an int8 conv weight [OC, IC/G, KH, KW] for int8_conv2d: pack_int8_weight of the [G, OC/G, KH*KW*IC/G]
    matrix whose reduction index runs (kh, kw, c), with the shape [G, OC/G, KH, KW, IC/G]."""
    _require_tensor("w_q", w_q)
    _require_dtype("w_q", w_q, (torch.int8,))
    if w_q.dim() != 4 or w_q.numel() == 0:
        raise ValueError(f"pack_conv_weight: w_q must be a non-empty [OC, IC/G, KH, KW] tensor, got {tuple(w_q.shape)}")
    if not _is_int(groups) or groups < 1 or w_q.shape[0] % groups:
        raise ValueError(f"pack_conv_weight: groups must be a positive int dividing out_channels ({w_q.shape[0]}), "
                         f"got {groups!r}")
    groups = _as_int(groups)
    oc, cg, kh, kw = w_q.shape
    # [G, OC/G, KH, KW, C/G]: int8_conv2d checks each against its input (and the CPU packs a depthwise weight's
    # kernel layouts with it)
    return ops.pack_int8_weight(w_q.permute(0, 2, 3, 1).reshape(groups, oc // groups, kh, kw, cg))


def int8_conv2d(x_q: torch.Tensor, x_scale, x_zero_point: int, w_packed: torch.Tensor, w_sum: torch.Tensor,
                w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None, *, out_channels: int,
                kernel_size: Union[int, Sequence[int]], stride: Union[int, Sequence[int]] = 1,
                padding: Union[int, Sequence[int]] = 0, dilation: Union[int, Sequence[int]] = 1, groups: int = 1,
                out_dtype: torch.dtype = torch.float32, out_scale: Optional[float] = None,
                out_zero_point: int = 0, clamp_min: Optional[float] = None,
                clamp_max: Optional[float] = None, residual: Optional[torch.Tensor] = None, residual_scale=None,
                residual_zero_point: int = 0, relu: bool = False, out_bits: int = 8) -> torch.Tensor:
    """Quantized conv2d: x_q [B, C, H, W] int8/uint8 with a per-tensor x_scale and x_zero_point, a weight from
    pack_conv_weight with w_sum[oc] = w_q[oc].sum() and w_scale [OC]; returns [B, OC, OH, OW] of out_dtype in
    channels-last memory format: float32/float16/bfloat16, or int8/uint8 requantized with out_scale,
    out_zero_point and out_bits as in int8_linear (an integer-only pipeline's next input), after the fused activation
    clamp (clamp_min / clamp_max, as in int8_linear).

    residual: a quantized tensor of the output's shape (int8/uint8, on x_q's device; channels-last is read without a
    copy) added before the output conversion, with residual_scale (a positive finite float or float32 tensor of 1
    element) and residual_zero_point, then ReLU when relu (a residual block's add in an integer pipeline):

        y = conv's float32 y (clamped) + float(residual - residual_zero_point) * residual_scale
        y = max(y, 0) when relu

    The CPU kernel adds it in the conv's epilogue; the CUDA kernel in one element-wise pass after the conv."""
    if residual is None and residual_scale is None and relu is False and not is_dynamo_compiling():
        y = _C.int8_conv2d(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels, kernel_size,
                           stride, padding, dilation, groups, out_dtype, out_scale, out_zero_point, clamp_min,
                           clamp_max, out_bits)
        if y is not NotImplemented:
            return y
    _require_tensor("x_q", x_q)
    _require_dtype("x_q", x_q, _ACTIVATION_DTYPES)
    if x_q.dim() != 4:
        raise ValueError(f"int8_conv2d: x_q must be 4-d [B, C, H, W], got shape {tuple(x_q.shape)}")
    _require_tensor("w_packed", w_packed)
    _require_tensor("w_sum", w_sum)
    _require_tensor("w_scale", w_scale)
    x_scale = _scale_tensor("int8_conv2d", "x_scale", x_scale, x_q.device)
    _require_same_device(x_q.device, x_scale=x_scale, w_packed=w_packed, w_sum=w_sum, w_scale=w_scale, bias=bias)
    _require_positive_finite("int8_conv2d", "w_scale", w_scale)
    out_channels = _integer("int8_conv2d", "out_channels", out_channels)
    if not _is_int(groups) or groups < 1 or x_q.shape[1] % groups or out_channels % groups:
        raise ValueError(f"int8_conv2d: groups must be a positive int dividing the input channels ({x_q.shape[1]}) "
                         f"and out_channels ({out_channels}), got {groups!r}")
    groups = _as_int(groups)
    if out_dtype not in FLOAT_DTYPES + _ACTIVATION_DTYPES:
        raise TypeError(f"int8_conv2d: out_dtype must be float32, float16, bfloat16, int8 or uint8, got {out_dtype}")
    op = "int8_conv2d"
    args = (x_q, x_scale, _integer(op, "x_zero_point", x_zero_point), w_packed, w_sum, w_scale, bias, out_channels,
            _pair("kernel_size", kernel_size), _pair("stride", stride), _pair("padding", padding),
            _pair("dilation", dilation), groups, out_dtype, _optional_number(op, "out_scale", out_scale),
            _integer(op, "out_zero_point", out_zero_point), _clamp_bound(op, "clamp_min", clamp_min),
            _clamp_bound(op, "clamp_max", clamp_max))
    out_bits = _integer(op, "out_bits", out_bits)
    if residual is None:
        if residual_scale is not None or relu is not False:
            raise ValueError("int8_conv2d: residual_scale and relu apply to a residual: pass residual too")
        return ops.int8_conv2d(*args, out_bits)
    _require_tensor("residual", residual)
    _require_dtype("residual", residual, _ACTIVATION_DTYPES)
    _require_same_device(x_q.device, residual=residual)
    if residual_scale is None:
        raise ValueError("int8_conv2d: a residual needs its residual_scale")
    residual_scale = _scale_tensor(op, "residual_scale", residual_scale, x_q.device)
    _require_same_device(x_q.device, residual_scale=residual_scale)
    return ops.int8_conv2d.residual(*args, residual, residual_scale,
                                    _integer(op, "residual_zero_point", residual_zero_point),
                                    _flag(op, "relu", relu), out_bits)


# ---- fake kernels: shapes and dtypes only, for torch.compile / meta tensors ----

@torch.library.register_fake("torchquant::int8_mm")
def _int8_mm_fake(a, b):
    check_fake_devices("int8_mm", "a", a, b=b)
    check_fake_dtype("int8_mm", "a", a, (torch.int8,))
    check_fake_dtype("int8_mm", "b", b, (torch.int8,))
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "int8_mm: a and b must be 2-d")
    torch._check(a.shape[1] == b.shape[0], lambda: "int8_mm: inner sizes differ")
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


def _packed_strides(shape):
    """The strides of pack_int8_weight's result for a weight of this shape ([N, K], [G, N, K] or [G, N, KH, KW, C]:
    see its docstring and pack_conv_weight's)."""
    n_dim = 0 if len(shape) == 2 else 1
    k_strides = [1]
    for size in reversed(shape[n_dim + 2:]):
        k_strides.insert(0, k_strides[0] * size)
    kp = _round_up(math.prod(shape[n_dim + 1:]), _C.PACK_ALIGN)
    return ((_round_up(shape[n_dim], _C.PACK_ALIGN) * kp,) if n_dim else ()) + (kp, *k_strides)


@torch.library.register_fake("torchquant::pack_int8_weight")
def _pack_int8_weight_fake(w):
    check_fake_dtype("pack_int8_weight", "w", w, (torch.int8,))
    torch._check(w.dim() in (2, 3, 5) and w.numel() > 0,
                 lambda: f"pack_int8_weight: w must be a non-empty [N, K], [G, N, K] or [G, N, KH, KW, C] tensor, "
                         f"got {tuple(w.shape)}")
    return w.new_empty_strided(w.shape, _packed_strides(w.shape), dtype=torch.int8)


@torch.library.register_fake("torchquant::int8_linear")
def _int8_linear_fake(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_features, out_dtype,
                      out_scale=None, out_zero_point=0, clamp_min=None, clamp_max=None, out_bits=8):
    check_fake_devices("int8_linear", "x_q", x_q, x_scale=x_scale, w_packed=w_packed, w_sum=w_sum, w_scale=w_scale,
                       bias=bias)
    check_fake_dtype("int8_linear", "x_q", x_q, _ACTIVATION_DTYPES)
    torch._check(out_dtype in FLOAT_DTYPES + _ACTIVATION_DTYPES,
                 lambda: f"int8_linear: out_dtype must be float32, float16, bfloat16, int8 or uint8, got {out_dtype}")
    torch._check(x_q.dim() >= 1, lambda: "int8_linear: x_q must have at least 1 dimension [..., K]")
    torch._check(out_features >= 1, lambda: f"int8_linear: out_features must be >= 1, got {out_features}")
    return x_q.new_empty((*x_q.shape[:-1], out_features), dtype=out_dtype)


@torch.library.register_fake("torchquant::int8_linear_dynamic")
def _int8_linear_dynamic_fake(x, w_packed, w_sum, w_scale, bias, out_features):
    check_fake_devices("int8_linear_dynamic", "x", x, w_packed=w_packed, w_sum=w_sum, w_scale=w_scale, bias=bias)
    check_fake_dtype("int8_linear_dynamic", "x", x, FLOAT_DTYPES)
    torch._check(x.dim() >= 1, lambda: "int8_linear_dynamic: x must have at least 1 dimension [..., K]")
    torch._check(out_features >= 1, lambda: f"int8_linear_dynamic: out_features must be >= 1, got {out_features}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("torchquant::int8_linear_dynamic.activation")
def _int8_linear_dynamic_activation_fake(x, w_packed, w_sum, w_scale, bias, out_features, activation):
    torch._check(activation in GELU_APPROXIMATE,
                 lambda: f"int8_linear_dynamic: activation must be 'gelu' or 'gelu_tanh', got '{activation}'")
    return _int8_linear_dynamic_fake(x, w_packed, w_sum, w_scale, bias, out_features)


def _conv_out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.register_fake("torchquant::int8_conv2d")
def _int8_conv2d_fake(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels, kernel_size, stride,
                      padding, dilation, groups, out_dtype, out_scale=None, out_zero_point=0, clamp_min=None,
                      clamp_max=None, out_bits=8):
    op = "int8_conv2d"
    check_fake_devices(op, "x_q", x_q, x_scale=x_scale, w_packed=w_packed, w_sum=w_sum, w_scale=w_scale, bias=bias)
    check_fake_dtype(op, "x_q", x_q, _ACTIVATION_DTYPES)
    # the argument checks the output size needs (the CPU kernel's messages); the rest are left to the kernels
    torch._check(x_q.dim() == 4, lambda: f"{op}: x_q must be 4-d [B, C, H, W], got {x_q.dim()}-d")
    torch._check(all(len(v) == 2 for v in (kernel_size, stride, padding, dilation)),
                 lambda: f"{op}: kernel_size, stride, padding and dilation must have 2 entries each")
    torch._check(min(kernel_size) >= 1 and min(stride) >= 1 and min(padding) >= 0 and min(dilation) >= 1,
                 lambda: f"{op}: kernel_size, stride and dilation must be >= 1 and padding >= 0, got {kernel_size}, "
                         f"{stride}, {padding} and {dilation}")
    b, _, h, w = x_q.shape
    oh = _conv_out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _conv_out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    for out_size in (oh, ow):
        torch._check(out_size >= 1, lambda: f"{op}: the (dilated) kernel {kernel_size} is larger than the padded "
                                            f"input {[h, w]} with padding {padding}")
    return x_q.new_empty((b, oh, ow, out_channels), dtype=out_dtype).permute(0, 3, 1, 2)


@torch.library.register_fake("torchquant::int8_conv2d.residual")
def _int8_conv2d_residual_fake(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels, kernel_size,
                               stride, padding, dilation, groups, out_dtype, out_scale, out_zero_point, clamp_min,
                               clamp_max, residual, residual_scale, residual_zero_point, relu, out_bits):
    out = _int8_conv2d_fake(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_channels, kernel_size,
                            stride, padding, dilation, groups, out_dtype, out_scale, out_zero_point, clamp_min,
                            clamp_max)
    op = "int8_conv2d"
    check_fake_devices(op, "x_q", x_q, residual=residual, residual_scale=residual_scale)
    check_fake_dtype(op, "residual", residual, _ACTIVATION_DTYPES)
    torch._check(residual.shape == out.shape,
                 lambda: f"{op}: residual must have the output's shape {list(out.shape)} (no broadcasting), "
                         f"got {list(residual.shape)}")
    return out
