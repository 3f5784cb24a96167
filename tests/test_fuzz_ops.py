"""Fuzzing every public op of torchquant.functional and every raw torch.ops.torchquant op.

Cases come from a seeded generator (the same cases on every run): random shapes (empty, 1, odd, huge through
expand), dtypes, layouts (transposed, strided, storage offsets, expanded), scales (0, negative, NaN, inf,
subnormal, huge), zero points (out of range, int64 beyond int32, wrong dtype), conv geometry up to 2**62,
mismatched packed weights and meta/cpu device mixes; packed weights are read back exactly; every raw op on meta
tensors (its fake kernel) against the CPU kernel; every public function with arguments of the wrong kind. The
contract: a call either returns exactly what torchquant.reference computes (bit for bit, NaN included) or raises
RuntimeError, ValueError, TypeError or MemoryError with a message; it raises exactly when the arguments are
invalid. Each family of cases runs in a child process, so a crash fails the test (naming the case that crashed)
instead of killing pytest.
"""
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import torchquant.functional as F
from torchquant import reference
from torchquant._ops import FLOAT_DTYPES as FLOATS, ops

from conftest import bit_patterns, randint8

ALLOWED = (RuntimeError, ValueError, TypeError, MemoryError)
ERROR = "error"  # the expected outcome of a call with invalid arguments
TINY, HUGE = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
SCALES = [0.1, 0.037, 1.0, 2.5e-3, 7.0, 0.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 1e-40, TINY, 3e38, 1e39]


def _scale_ok(s: float, smallest: float) -> bool:
    """Whether a scale passes the checks: finite as a float32, positive, at least `smallest`."""
    s32 = float(torch.tensor(s, dtype=torch.float32))
    return math.isfinite(s32) and s32 >= smallest and s32 > 0


def _same(got, want) -> bool:
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(map(_same, got, want))
    if not (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
            and got.device == want.device):
        return False
    if not got.is_floating_point():
        return torch.equal(got, want)
    # bit for bit (0.0 and -0.0 differ), except that any NaN matches any NaN (sign and payload carry no meaning)
    nan = torch.isnan(got)
    return torch.equal(nan, torch.isnan(want)) and torch.equal(bit_patterns(got)[~nan], bit_patterns(want)[~nan])


def _layout(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """t in another layout: transposed, strided or with a storage offset (same values), or its first row expanded
    (stride 0: different values, so use the result for the reference too)."""
    choice = rng.randrange(6)
    if choice == 1 and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if choice == 2 and t.dim() >= 1:
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if choice == 3:
        flat = torch.empty(t.numel() + 3, dtype=t.dtype)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape)
    if choice == 4 and t.dim() >= 1 and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t


def _values(rng: random.Random, shape, dtype=torch.float32) -> torch.Tensor:
    """Floats with ties at .5 steps, extremes, subnormals and non-finite values mixed in."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(shape, generator=g) * rng.choice([0.01, 1.0, 10.0, 300.0])
    if x.numel() and rng.random() < 0.5:
        specials = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-40, 0.0])
        mask = torch.rand(shape, generator=g) < 0.2
        x = torch.where(mask, specials[torch.randint(len(specials), shape, generator=g)], x)
    return x.to(dtype)


def _shape(rng: random.Random, max_dim: int = 3, min_dim: int = 0):
    return tuple(rng.choice([0, 1, 1, 2, 3, 5, 7, 16, 33]) for _ in range(rng.randint(min_dim, max_dim)))


def _int8(rng: random.Random, shape, dtype=torch.int8) -> torch.Tensor:
    return randint8(shape, rng.randrange(2**31), dtype=dtype)


def _out_format(rng: random.Random):
    """An integer op's output: (out_dtype, out_scale, out_zero_point, valid) with float or requantized int8/uint8
    outputs, sometimes a bad dtype, scale or zero point."""
    out_dtype = rng.choice(FLOATS + (torch.int8, torch.uint8)) if rng.random() < 0.97 else torch.int32
    valid = out_dtype != torch.int32
    out_scale, out_zp = None, 0
    if out_dtype in (torch.int8, torch.uint8):
        out_scale = rng.choice(SCALES[:5]) if rng.random() < 0.9 else rng.choice(SCALES)
        valid = valid and _scale_ok(out_scale, TINY)  # a normal float32: 1 / out_scale is finite
        low, high = (0, 255) if out_dtype == torch.uint8 else (-128, 127)
        out_zp = rng.randint(low, high) if rng.random() < 0.95 else high + 1
        valid = valid and low <= out_zp <= high
    return out_dtype, out_scale, out_zp, valid


def _clamp(seed: str):
    """A fused activation clamp (clamp_min, clamp_max) and whether it is valid: none, ReLU, ReLU6, one bound, a
    point, or a bad one (NaN, infinite as a float32, min > max). Drawn from its own generator seeded with the case's
    description, so that the family's other draws (and cases) stay as they were before the clamp existed."""
    rng = random.Random(seed)
    if rng.random() < 0.9:
        return rng.choice([(None, None), (None, None), (0.0, None), (0.0, 6.0), (None, 0.5), (-1.0, 1.0), (2.0, 2.0),
                           (-3e38, 3e38)]) + (True,)
    return rng.choice([(math.nan, None), (None, math.inf), (1.0, 0.0), (None, 1e39), (-math.inf, 0.0)]) + (False,)


# ---------------------------------------------------------------------------------------------------------------
# Quantize family: quantize, dequantize, fake_quantize (+ backward), quantize_per_token, choose_qparams,
# quantization_error
# ---------------------------------------------------------------------------------------------------------------

def _qparams(rng, x, axis, bits, signed):
    """(scale, zero_point) as the functional API takes them (numbers or tensors), and whether they are valid."""
    channels = 1 if axis is None else x.shape[axis]
    low, high = (0, 0) if signed and bits == 1 else reference.qrange(bits, signed)
    good_scale = rng.random() < 0.75
    scale_values = [rng.choice(SCALES[:5]) if good_scale else rng.choice(SCALES) for _ in range(channels)]
    valid = all(_scale_ok(s, TINY) for s in scale_values)
    if axis is None and rng.random() < 0.5:
        scale = scale_values[0]
    else:
        scale = torch.tensor(scale_values, dtype=rng.choice([torch.float32, torch.float32, torch.float64]))
        if rng.random() < 0.05:
            scale, valid = torch.ones(channels + 1), False
    zp_values = [rng.randint(low, high) if rng.random() < 0.8 else rng.choice([low - 1, high + 1, 2**32, -2**31 - 1])
                 for _ in range(channels)]
    valid = valid and all(low <= z <= high for z in zp_values)
    kind = rng.randrange(5)
    if axis is None and kind == 0:
        zero_point = zp_values[0]
    elif kind == 1:
        zero_point = torch.tensor(zp_values, dtype=torch.float32)  # wrong dtype
        valid = False
    else:
        dtype = rng.choice([torch.int32, torch.int64, torch.int16])
        if any(not -2**31 <= z < 2**31 for z in zp_values):
            dtype = torch.int64
        elif dtype == torch.int16 and any(not -2**15 <= z < 2**15 for z in zp_values):
            dtype = torch.int32
        zero_point = torch.tensor(zp_values, dtype=dtype)
    return scale, zero_point, valid


def quantize_case(rng: random.Random):
    op = rng.choice(["quantize", "dequantize", "fake_quantize", "raw_quantize", "raw_fake_quantize",
                     "raw_fake_quantize_backward", "raw_dequantize"])
    shape = _shape(rng)
    valid = True
    bits = rng.choice([8, 8, 4, 2, 1, 7]) if rng.random() < 0.95 else rng.choice([0, 9, -1])
    valid = 1 <= bits <= 8
    signed = rng.random() < 0.5
    rounding = rng.choice(["nearest", "truncate"]) if rng.random() < 0.97 else "up"
    valid = valid and rounding in ("nearest", "truncate")
    axis = None if rng.random() < 0.5 or not shape else rng.randrange(len(shape))
    if op.endswith("dequantize"):
        q_dtype = rng.choice([torch.int8, torch.uint8, torch.uint8, torch.int8, torch.int32])
        x = _layout(rng, _int8(rng, shape, torch.uint8 if q_dtype == torch.uint8 else torch.int8).to(q_dtype))
        valid = q_dtype != torch.int32
        bits, signed = 8, q_dtype != torch.uint8
        out_dtype = rng.choice(FLOATS + (torch.float64,))
        valid = valid and out_dtype in FLOATS
    else:
        dtype = rng.choice(FLOATS + FLOATS + (torch.float64, torch.int32))
        x = _layout(rng, _values(rng, shape, dtype))
        valid = valid and dtype in FLOATS
    if rng.random() < 0.02:  # huge through expand: the output (2**40 elements) cannot be allocated
        x = torch.ones(1, dtype=x.dtype).expand(2**40)
        shape, axis, valid = x.shape, None, False
    base_valid = valid
    scale, zero_point, qp_valid = _qparams(rng, x, axis, bits if 1 <= bits <= 8 else 8, signed)
    valid = valid and qp_valid

    if op.startswith("raw"):
        # the raw ops take float32 scale and int32 zero point tensors of 1 or C elements, checked by the kernel
        scale_t = torch.as_tensor(scale).reshape(-1)
        zp_t = torch.as_tensor(zero_point).reshape(-1)
        if rng.random() < 0.1:
            scale_t = scale_t.to("meta")  # a device mix
        low, high = (0, 0) if signed and bits == 1 else reference.qrange(bits, signed) if base_valid else (0, 0)
        length = 1 if axis is None else x.shape[axis]
        valid = (base_valid and not scale_t.is_meta and scale_t.dtype == torch.float32 and zp_t.dtype == torch.int32
                 and scale_t.numel() == zp_t.numel() == length
                 and bool(((scale_t >= TINY) & torch.isfinite(scale_t)).all())
                 and bool(((zp_t >= low) & (zp_t <= high)).all()))
        if op == "raw_quantize":
            fn = lambda: ops.quantize(x, scale_t, zp_t, axis, bits, signed, rounding)  # noqa: E731
            want = lambda: reference.quantize(x, scale_t, zp_t, bits=bits, signed=signed, rounding=rounding,  # noqa
                                              axis=axis)
        elif op == "raw_fake_quantize":
            fn = lambda: ops.fake_quantize(x, scale_t, zp_t, axis, bits, signed, rounding)  # noqa: E731
            want = lambda: reference.fake_quantize(x, scale_t, zp_t, bits=bits, signed=signed,  # noqa: E731
                                                   rounding=rounding, axis=axis)
        elif op == "raw_dequantize":
            fn = lambda: ops.dequantize(x, scale_t, zp_t, axis, out_dtype)  # noqa: E731
            want = lambda: reference.dequantize(x, scale_t, zp_t, axis=axis, dtype=out_dtype)  # noqa: E731
        else:
            grad = _values(rng, x.shape, x.dtype) if x.dtype in FLOATS and x.numel() < 2**20 else x
            if rng.random() < 0.1:
                grad, valid = grad[..., :0] if grad.dim() and grad.shape[-1] else grad.double(), False
            fn = lambda: ops.fake_quantize_backward(grad, x, scale_t, zp_t, axis, bits, signed, rounding)  # noqa
            want = lambda: reference.fake_quantize_backward(grad, x, scale_t, zp_t, bits=bits, signed=signed,  # noqa
                                                            rounding=rounding, axis=axis)
        return f"{op}(x {tuple(x.shape)} {x.dtype} strides {x.stride()}, scale {scale_t.tolist() if not scale_t.is_meta else 'meta'}, zp {zp_t.tolist()} {zp_t.dtype}, axis {axis}, bits {bits}, signed {signed}, {rounding})", fn, want if valid else ERROR  # noqa: E501

    if op == "quantize":
        fn = lambda: F.quantize(x, scale, zero_point, bits=bits, signed=signed, rounding=rounding, axis=axis)  # noqa
        want = lambda: reference.quantize(x, scale, zero_point, bits=bits, signed=signed, rounding=rounding,  # noqa
                                          axis=axis)
    elif op == "fake_quantize":
        fn = lambda: F.fake_quantize(x, scale, zero_point, bits=bits, signed=signed, rounding=rounding,  # noqa
                                     axis=axis)
        want = lambda: reference.fake_quantize(x, scale, zero_point, bits=bits, signed=signed,  # noqa: E731
                                               rounding=rounding, axis=axis)
    else:
        fn = lambda: F.dequantize(x, scale, zero_point, axis=axis, dtype=out_dtype)  # noqa: E731
        want = lambda: reference.dequantize(x, scale, zero_point, axis=axis, dtype=out_dtype)  # noqa: E731
    return (f"{op}(x {tuple(x.shape)} {x.dtype} strides {x.stride()}, scale {scale!r}, zp {zero_point!r}, "
            f"axis {axis}, bits {bits}, signed {signed}, {rounding})", fn, want if valid else ERROR)


def misc_quantize_case(rng: random.Random):
    op = rng.choice(["quantize_per_token", "raw_quantize_per_token", "choose_qparams", "quantization_error"])
    shape = _shape(rng, min_dim=0)
    dtype = rng.choice(FLOATS + FLOATS + (torch.float64, torch.int8))
    x = _layout(rng, _values(rng, shape, torch.float32).to(dtype) if dtype != torch.int8 else _int8(rng, shape))
    if op in ("quantize_per_token", "raw_quantize_per_token"):
        bits = rng.choice([8, 8, 4, 2]) if rng.random() < 0.9 else rng.choice([1, 9, 0])
        valid = dtype in FLOATS and 2 <= bits <= 8 and x.dim() >= 1
        call = F.quantize_per_token if op == "quantize_per_token" else None
        fn = (lambda: call(x, bits=bits)) if call else (lambda: ops.quantize_per_token(x, bits))
        return (f"{op}(x {tuple(x.shape)} {dtype} strides {x.stride()}, bits {bits})", fn,
                (lambda: reference.quantize_per_token(x, bits=bits)) if valid else ERROR)
    if op == "choose_qparams":
        bits = rng.choice([8, 4, 1, 2]) if rng.random() < 0.9 else rng.choice([0, 9])
        signed, symmetric = rng.random() < 0.5, rng.random() < 0.5
        axis = None if rng.random() < 0.5 or not shape else rng.randrange(len(shape))
        valid = dtype in FLOATS and 1 <= bits <= 8 and x.numel() > 0

        def checked():
            scale, zero_point = F.choose_qparams(x, bits=bits, signed=signed, symmetric=symmetric, axis=axis)
            # no reference function: the invariants it promises
            low, high = reference.qrange(bits, signed) if not (signed and bits == 1) else (0, 0)
            assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
            assert bool((torch.isfinite(scale) & (scale >= TINY)).all()), scale
            assert bool(((zero_point >= low) & (zero_point <= high)).all()), zero_point
            return scale.new_zeros(1)

        return (f"choose_qparams(x {tuple(x.shape)} {dtype}, bits {bits}, signed {signed}, symmetric {symmetric}, "
                f"axis {axis})", checked, (lambda: torch.zeros(1)) if valid else ERROR)
    x_hat = _layout(rng, x + 1 if dtype != torch.int8 else x)
    if rng.random() < 0.1:
        x_hat = x_hat[..., :0] if x_hat.dim() and x_hat.shape[-1] else x_hat.reshape(1, -1)
    valid = x.shape == x_hat.shape and x.numel() > 0

    def error_dict():
        e = F.quantization_error(x, x_hat)
        assert set(e) == {"mse", "max_abs", "sqnr_db"}
        return torch.zeros(1)

    return f"quantization_error(x {tuple(x.shape)} {dtype}, x_hat {tuple(x_hat.shape)})", error_dict, \
        (lambda: torch.zeros(1)) if valid else ERROR


# ---------------------------------------------------------------------------------------------------------------
# Integer matrix family: int8_mm, pack_int8_weight, int8_linear, dynamic_int8_linear
# ---------------------------------------------------------------------------------------------------------------

SIZES = [0, 1, 1, 2, 3, 5, 17, 63, 64, 65, 130]


def mm_case(rng: random.Random):
    raw = rng.random() < 0.5
    m, k, n = (rng.choice(SIZES) for _ in range(3))
    k_b = k if rng.random() < 0.9 else rng.choice(SIZES)
    a_dtype = torch.int8 if rng.random() < 0.9 else rng.choice([torch.uint8, torch.int32, torch.float32])
    a = _layout(rng, _int8(rng, (m, k)).to(a_dtype))
    b = _layout(rng, _int8(rng, (k_b, n)))
    if rng.random() < 0.3:
        b = _layout(rng, _int8(rng, (n, k_b))).t()  # the weight.t() fast path
    valid = a_dtype == torch.int8 and k_b == k
    if rng.random() < 0.05:
        a, b, valid = a.to("meta"), b, False
    if rng.random() < 0.05:  # huge through expand: the packed b would be 2**46 bytes
        a = torch.ones(1, 1, dtype=torch.int8).expand(2, 2**40)
        b = torch.ones(1, 1, dtype=torch.int8).expand(2**40, 2)
        desc = "int8_mm(expand(2, 2**40), expand(2**40, 2))"
        return desc, (lambda: ops.int8_mm(a, b)) if raw else (lambda: F.int8_mm(a, b)), ERROR
    fn = (lambda: ops.int8_mm(a, b)) if raw else (lambda: F.int8_mm(a, b))
    desc = f"{'raw ' if raw else ''}int8_mm(a {tuple(a.shape)} {a.dtype} {a.stride()}, b {tuple(b.shape)} {b.stride()})"
    return desc, fn, (lambda: reference.int8_mm(a, b)) if valid else ERROR


def linear_case(rng: random.Random):
    op = rng.choice(["int8_linear", "raw_int8_linear", "dynamic_int8_linear", "raw_int8_linear_dynamic"])
    k, n = rng.choice(SIZES[1:]), rng.choice(SIZES[1:])
    w_q = _layout(rng, _int8(rng, (n, k)))
    packed = F.pack_int8_weight(w_q)
    valid = True
    if rng.random() < 0.1:  # a weight packed for another K or N that pads to the same size
        k_x = rng.choice([kk for kk in range(1, 131) if (kk + 63) // 64 == (k + 63) // 64])
        valid = k_x == k
    else:
        k_x = k
    n_arg = n if rng.random() < 0.95 else rng.choice([0, n + 1, max(n - 1, 1)])
    valid = valid and n_arg == n
    lead = _shape(rng, max_dim=2)
    w_sum = w_q.sum(1, dtype=torch.int32)
    if rng.random() < 0.05:
        w_sum, valid = w_sum[:-1], False
    w_scale_values = [rng.choice(SCALES[:5]) if rng.random() < 0.97 else rng.choice(SCALES) for _ in range(n)]
    w_scale = torch.tensor(w_scale_values)
    valid = valid and all(_scale_ok(s, 0.0) for s in w_scale_values)
    bias = None
    if rng.random() < 0.6:
        bias = _values(rng, (n,), rng.choice([torch.float32, torch.float32, torch.float16]))
        bias = torch.where(torch.isfinite(bias), bias, 0.0) if rng.random() < 0.8 else bias
    if rng.random() < 0.05:
        w_scale, valid = w_scale.to("meta"), False

    if op in ("dynamic_int8_linear", "raw_int8_linear_dynamic"):
        dtype = rng.choice(FLOATS + (torch.float64,))
        valid = valid and dtype in FLOATS
        x = _layout(rng, _values(rng, (*lead, k_x), dtype if dtype != torch.float64 else torch.float32).to(dtype))

        def want():
            x_q, x_scale = reference.quantize_per_token(x)
            return reference.int8_linear(x_q, x_scale, 0, w_q, w_scale, bias, out_dtype=dtype)

        if op == "dynamic_int8_linear":
            fn = lambda: F.dynamic_int8_linear(x, packed, w_sum, w_scale, bias, out_features=n_arg)  # noqa: E731
        else:
            fn = lambda: ops.int8_linear_dynamic(x, packed, w_sum, w_scale, bias, n_arg)  # noqa: E731
        desc = f"{op}(x {tuple(x.shape)} {dtype}, w [{n}, {k}], out_features {n_arg}, w_scale {w_scale_values})"
        return desc, fn, want if valid else ERROR

    x_dtype = rng.choice([torch.int8, torch.uint8]) if rng.random() < 0.95 else torch.int32
    valid = valid and x_dtype != torch.int32
    x_q = _layout(rng, _int8(rng, (*lead, k_x), torch.uint8 if x_dtype == torch.uint8 else torch.int8).to(x_dtype))
    zp_low, zp_high = (0, 255) if x_dtype == torch.uint8 else (-128, 127)
    x_zp = rng.randint(zp_low, zp_high) if rng.random() < 0.9 else rng.choice([zp_low - 1, zp_high + 1, 2**32])
    valid = valid and zp_low <= x_zp <= zp_high
    rows = math.prod(lead)
    per_token = rng.random() < 0.5
    x_scale_values = [rng.choice(SCALES[:5]) if rng.random() < 0.97 else rng.choice(SCALES)
                      for _ in range(rows if per_token else 1)]
    valid = valid and all(_scale_ok(s, 0.0) for s in x_scale_values)
    x_scale = torch.tensor(x_scale_values).reshape(lead if per_token else (1,))
    if not per_token and op == "int8_linear" and rng.random() < 0.5:
        x_scale = x_scale_values[0]
    out_dtype, out_scale, out_zp, out_ok = _out_format(rng)
    valid = valid and out_ok
    clamp_min, clamp_max, clamp_ok = _clamp(f"{tuple(x_q.shape)} {x_zp} {w_scale_values} {out_dtype}")
    valid = valid and clamp_ok
    if op == "int8_linear":
        fn = lambda: F.int8_linear(x_q, x_scale, x_zp, packed, w_sum, w_scale, bias, out_features=n_arg,  # noqa
                                   out_dtype=out_dtype, out_scale=out_scale, out_zero_point=out_zp,
                                   clamp_min=clamp_min, clamp_max=clamp_max)
    else:
        x_scale_t = torch.as_tensor(x_scale, dtype=torch.float32)
        fn = lambda: ops.int8_linear(x_q, x_scale_t, x_zp, packed, w_sum, w_scale, bias, n_arg, out_dtype,  # noqa
                                     out_scale, out_zp, clamp_min, clamp_max)
    want = lambda: reference.int8_linear(x_q, x_scale, x_zp, w_q, w_scale, bias, out_dtype=out_dtype,  # noqa: E731
                                         out_scale=out_scale, out_zero_point=out_zp, clamp_min=clamp_min,
                                         clamp_max=clamp_max)
    desc = (f"{op}(x_q {tuple(x_q.shape)} {x_dtype} {x_q.stride()}, x_scale {x_scale_values}, zp {x_zp}, "
            f"w [{n}, {k}], out_features {n_arg}, w_scale {w_scale_values}, bias {bias is not None}, "
            f"{out_dtype}, out_scale {out_scale}, out_zp {out_zp}, clamp {clamp_min} {clamp_max})")
    return desc, fn, want if valid else ERROR


def pack_case(rng: random.Random):
    """pack_int8_weight / pack_conv_weight on any input; a packed weight is read back exactly through int8_linear
    with an identity activation (y[k, n] = w[n, k])."""
    op = rng.choice(["pack_int8_weight", "raw_pack_int8_weight", "pack_conv_weight"])
    dims = rng.choice([2, 2, 3, 3, 4, 1, 0]) if op != "pack_conv_weight" else rng.choice([4, 4, 4, 3])
    shape = tuple(rng.choice([0, 1, 2, 3, 17, 64, 65]) if rng.random() < 0.1 else rng.choice([1, 2, 3, 17, 64, 65])
                  for _ in range(dims))
    dtype = torch.int8 if rng.random() < 0.9 else rng.choice([torch.uint8, torch.int32, torch.float32])
    w = _layout(rng, _int8(rng, shape).to(dtype))
    valid = dtype == torch.int8 and w.numel() > 0
    if op == "pack_conv_weight":
        groups = rng.choice([1, 1, 2, 3]) if rng.random() < 0.95 else rng.choice([0, -1])
        valid = valid and dims == 4 and groups >= 1 and shape[0] % groups == 0
        desc = f"pack_conv_weight(w {shape} {dtype} {w.stride()}, groups {groups})"

        def packed_conv():
            packed = F.pack_conv_weight(w, groups)
            oc, cg, kh, kw = w.shape
            assert packed.shape == (groups, oc // groups, kh, kw, cg), packed.shape
            return torch.zeros(1)

        return desc, packed_conv, (lambda: torch.zeros(1)) if valid else ERROR
    valid = valid and dims in (2, 3)
    if rng.random() < 0.03:  # huge through expand: 2**46 packed bytes cannot be allocated
        w, valid = torch.ones(1, 1, dtype=torch.int8).expand(2**40, 3), False
    pack = F.pack_int8_weight if op == "pack_int8_weight" else ops.pack_int8_weight

    def read_back():
        packed = pack(w)
        assert packed.shape == w.shape and packed.dtype == torch.int8, (packed.shape, packed.dtype)
        groups = [packed] if w.dim() == 2 else list(packed)
        sources = [w] if w.dim() == 2 else list(w)
        rows = []
        for p, src in zip(groups, sources):
            n, k = src.shape
            eye = torch.eye(k, dtype=torch.int8)
            rows.append(F.int8_linear(eye, 1.0, 0, p, src.sum(1, dtype=torch.int32), torch.ones(n), out_features=n))
        return torch.stack(rows)

    def want():
        sources = [w] if w.dim() == 2 else list(w)
        return torch.stack([src.t().float() for src in sources])

    return f"{op}(w {tuple(w.shape)} {w.dtype} {w.stride()})", read_back, want if valid else ERROR


# ---------------------------------------------------------------------------------------------------------------
# int8_conv2d, pack_conv_weight
# ---------------------------------------------------------------------------------------------------------------

def _conv_valid(h, w, kernel, stride, padding, dilation) -> bool:
    """The geometry checks in exact integers: every parameter in range, the dilated kernel inside the padded
    input, and every derived size below 2**63."""
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0 or min(dilation) < 1:
        return False
    limit = 2**63
    sizes = []
    for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation):
        padded, extent = size + 2 * p, d * (k - 1) + 1
        if padded >= limit or extent >= limit or extent > padded:
            return False
        sizes.append((padded - extent) // s + 1)
    return True


def conv_case(rng: random.Random):
    raw = rng.random() < 0.3
    groups = rng.choice([1, 1, 2, 3])
    cg, ocg = rng.choice([1, 2, 3, 4, 16]), rng.choice([1, 2, 5, 64])
    if rng.random() < 0.15:  # depthwise: one channel per group, many groups
        groups, cg, ocg = rng.choice([5, 16, 64, 70]), 1, 1
    elif rng.random() < 0.1:  # as many channels in as out per group: the depthwise kernel's passes, the dword kernel
        groups, cg = rng.choice([2, 5, 17]), rng.choice([2, 4, 8, 16, 32])
        ocg = cg
    kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    b, h, w = rng.choice([0, 1, 2]), rng.choice([1, 3, 6]), rng.choice([1, 4, 7])
    oc = groups * ocg
    w_q = _int8(rng, (oc, cg, kh, kw))
    packed = F.pack_conv_weight(w_q, groups)
    channels = groups * cg
    kernel = [kh, kw]
    stride, padding, dilation = [rng.choice([1, 1, 2, 3]) for _ in range(2)], [rng.choice([0, 0, 1, 2]) for _ in
                                                                                 range(2)], [1, 1]
    if rng.random() < 0.3:
        dilation = [rng.choice([1, 2]) for _ in range(2)]
    geometry_giant = rng.random() < 0.15
    if geometry_giant:  # up to 2**62: must be rejected (overflow, or a kernel larger than the padded input)
        which = rng.randrange(4)
        big = rng.choice([2**31, 2**40, 2**61, 2**62, 2**62 + 1, 2**63 - 1])
        if which == 0:
            kernel = [kh, big]
        elif which == 1:
            dilation = [big, 1]
        elif which == 2:
            padding = [0, big] if rng.random() < 0.5 else [big, big]
            kernel = [kh, big]
        else:
            kernel, dilation = [kh, rng.choice([2, 5])], [1, big]
    if rng.random() < 0.1:
        channels += rng.choice([-1, 1, groups])  # does not match the packed weight
    x_dtype = rng.choice([torch.int8, torch.uint8])
    x_q = _layout(rng, _int8(rng, (b, max(channels, 0), h, w), x_dtype))
    if rng.random() < 0.3:
        x_q = x_q.contiguous(memory_format=torch.channels_last)
    x_zp = rng.randint(0, 255) if x_dtype == torch.uint8 else rng.randint(-128, 127)
    w_scale = torch.rand(oc) * 0.01 + 1e-4
    bias = torch.randn(oc) if rng.random() < 0.5 else None
    out_dtype = rng.choice(FLOATS + (torch.int8, torch.uint8))
    out_scale = 0.3 if out_dtype in (torch.int8, torch.uint8) else None
    clamp_min, clamp_max, clamp_ok = _clamp(f"{tuple(x_q.shape)} {x_zp} {kernel} {stride} {out_dtype}")
    valid = (channels == groups * cg and kernel == [kh, kw] and clamp_ok
             and _conv_valid(h, w, kernel, stride, padding, dilation))
    w_sum = w_q.sum((1, 2, 3), dtype=torch.int32)
    args = (x_q, 0.05, x_zp, packed, w_sum, w_scale, bias)
    if raw:
        fn = lambda: ops.int8_conv2d(x_q, torch.tensor([0.05]), x_zp, packed, w_sum, w_scale, bias, oc,  # noqa
                                     kernel, stride, padding, dilation, groups, out_dtype, out_scale, 0, clamp_min,
                                     clamp_max)
    else:
        fn = lambda: F.int8_conv2d(*args, out_channels=oc, kernel_size=kernel, stride=stride, padding=padding,  # noqa
                                   dilation=dilation, groups=groups, out_dtype=out_dtype, out_scale=out_scale,
                                   clamp_min=clamp_min, clamp_max=clamp_max)
    want = lambda: reference.int8_conv2d(x_q, 0.05, x_zp, w_q, w_scale, bias, stride=stride, padding=padding,  # noqa
                                         dilation=dilation, groups=groups, out_dtype=out_dtype, out_scale=out_scale,
                                         clamp_min=clamp_min, clamp_max=clamp_max)
    desc = (f"{'raw ' if raw else ''}int8_conv2d(x {tuple(x_q.shape)} {x_dtype} {x_q.stride()}, w {tuple(w_q.shape)},"
            f" groups {groups}, kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation}, {out_dtype},"
            f" clamp {clamp_min} {clamp_max})")
    return desc, fn, want if valid else ERROR


# ---------------------------------------------------------------------------------------------------------------
# Integer element-wise ops: quantized_add, quantized_max_pool2d
# ---------------------------------------------------------------------------------------------------------------

def add_case(rng: random.Random):
    raw = rng.random() < 0.3
    shape = _shape(rng, max_dim=4)
    b_shape = shape if rng.random() < 0.95 else _shape(rng, max_dim=4)
    dtypes = [rng.choice([torch.int8, torch.uint8]) if rng.random() < 0.95 else rng.choice([torch.int32, torch.float32])
              for _ in range(2)]
    a = _layout(rng, _int8(rng, shape, torch.uint8 if dtypes[0] == torch.uint8 else torch.int8).to(dtypes[0]))
    b = _layout(rng, _int8(rng, b_shape, torch.uint8 if dtypes[1] == torch.uint8 else torch.int8).to(dtypes[1]))
    if len(shape) == 4 and rng.random() < 0.3:
        a = a.contiguous(memory_format=torch.channels_last)
    valid = all(d in (torch.int8, torch.uint8) for d in dtypes) and b_shape == shape
    zps, scales = [], []
    for t in (a, b):
        low, high = (0, 255) if t.dtype == torch.uint8 else (-128, 127)
        zps.append(rng.randint(low, high) if rng.random() < 0.95 else rng.choice([low - 1, high + 1]))
        valid = valid and low <= zps[-1] <= high
        scales.append(rng.choice(SCALES[:5]) if rng.random() < 0.9 else rng.choice(SCALES))
        valid = valid and _scale_ok(scales[-1], 0.0)
    out_dtype, out_scale, out_zp, out_ok = _out_format(rng)
    valid = valid and out_ok
    relu = rng.random() < 0.5
    if raw:
        sa, sb = torch.tensor([scales[0]]), torch.tensor([scales[1]])
        fn = lambda: ops.quantized_add(a, sa, zps[0], b, sb, zps[1], out_dtype, out_scale, out_zp, relu)  # noqa
    else:
        fn = lambda: F.quantized_add(a, scales[0], zps[0], b, scales[1], zps[1], out_dtype, out_scale, out_zp,  # noqa
                                     relu)
    want = lambda: reference.quantized_add(a, scales[0], zps[0], b, scales[1], zps[1], out_dtype=out_dtype,  # noqa
                                           out_scale=out_scale, out_zero_point=out_zp, relu=relu)
    desc = (f"{'raw ' if raw else ''}quantized_add(a {tuple(a.shape)} {a.dtype} {a.stride()}, b {tuple(b.shape)} "
            f"{b.dtype} {b.stride()}, scales {scales}, zps {zps}, {out_dtype}, out_scale {out_scale}, out_zp {out_zp}, "
            f"relu {relu})")
    return desc, fn, want if valid else ERROR


def pool_case(rng: random.Random):
    shape = tuple(rng.choice([0, 1, 2, 3, 5, 9, 16]) if rng.random() < 0.1 else rng.choice([1, 2, 3, 5, 9, 16])
                  for _ in range(rng.choice([4, 4, 3, 2])))
    dtype = rng.choice([torch.int8, torch.uint8]) if rng.random() < 0.95 else torch.float32
    x = _layout(rng, _int8(rng, shape, torch.uint8 if dtype == torch.uint8 else torch.int8).to(dtype))
    if len(shape) == 4 and rng.random() < 0.4:
        x = x.contiguous(memory_format=torch.channels_last)
    kernel = [rng.choice([1, 2, 3]) if rng.random() < 0.95 else rng.choice([0, 7]) for _ in range(2)]
    stride = [rng.choice([1, 2, 3]) if rng.random() < 0.95 else 0 for _ in range(2)]
    padding = [rng.choice([0, 0, 1]) if rng.random() < 0.9 else rng.choice([2, -1]) for _ in range(2)]
    dilation = [rng.choice([1, 1, 2]) for _ in range(2)]
    ceil_mode = rng.random() < 0.4
    args = (kernel, stride, padding, dilation, ceil_mode)
    try:  # torch's own rules decide what is valid (on a float copy: its pooling takes any float input)
        # a window without a tap inside the input gives -inf: the integer type's lowest value
        lowest = 0 if dtype == torch.uint8 else -128
        expected = torch.nn.functional.max_pool2d(x.float().contiguous(), *args).clamp(min=lowest).to(dtype)
        valid = dtype != torch.float32
    except RuntimeError:
        valid = False
    fn = lambda: F.quantized_max_pool2d(x, *args)  # noqa: E731
    desc = f"quantized_max_pool2d(x {tuple(x.shape)} {x.dtype} {x.stride()}, {args})"
    return desc, fn, (lambda: expected) if valid else ERROR


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels against the CPU kernels
# ---------------------------------------------------------------------------------------------------------------

def _on_meta(arg):
    if isinstance(arg, torch.Tensor):
        return torch.empty_strided(arg.shape, arg.stride(), dtype=arg.dtype, device="meta")
    if isinstance(arg, (list, tuple)):
        return type(arg)(_on_meta(a) for a in arg)
    return arg


def _geometry(rng: random.Random, low: int):
    """A 2-entry kernel/stride/padding/dilation list, sometimes of another length or out of range."""
    if rng.random() < 0.05:
        return [rng.randint(low, 3) for _ in range(rng.choice([0, 1, 3]))]
    return [rng.randint(low, 3) if rng.random() < 0.9 else rng.choice([-1, 0, 9]) for _ in range(2)]


def meta_case(rng: random.Random):
    """A raw op on random (often invalid) arguments, called on CPU tensors and on meta tensors of the same shapes,
    strides and dtypes. The meta call (a fake kernel) must give the CPU result's shape, dtype and strides when the
    CPU call works, and may only raise the allowed exceptions otherwise; it cannot check values (scales, zero
    points), so it may accept what the CPU kernel rejects for a value."""
    op = rng.choice(["quantize", "dequantize", "quantize_per_token", "int8_mm", "pack_int8_weight", "int8_linear",
                     "int8_conv2d", "quantized_add", "quantized_max_pool2d"])
    dtype = lambda *good: rng.choice(good) if rng.random() < 0.9 else rng.choice(  # noqa: E731
        [torch.int32, torch.float64, torch.int8, torch.float32, torch.uint8])
    shape = _shape(rng, max_dim=4)
    if op in ("quantize", "dequantize"):
        x = _layout(rng, torch.zeros(shape, dtype=dtype(*FLOATS) if op == "quantize" else dtype(torch.int8)))
        axis = None if rng.random() < 0.5 or not shape else rng.randrange(len(shape))
        length = 1 if axis is None else shape[axis]
        qparams = (torch.ones(length), torch.zeros(length, dtype=torch.int32))
        if op == "quantize":
            args = (x, *qparams, axis, rng.choice([8, 4, 1, 0, 9]), rng.random() < 0.5,
                    rng.choice(["nearest", "nearest", "up"]))
        else:
            args = (x, *qparams, axis, dtype(*FLOATS))
    elif op == "quantize_per_token":
        args = (_layout(rng, torch.zeros(shape, dtype=dtype(*FLOATS))), rng.choice([8, 4, 1, 9]))
    elif op == "int8_mm":
        m, k, n = (rng.choice([0, 1, 3, 65]) for _ in range(3))
        args = (torch.zeros(m, k, dtype=dtype(torch.int8)),
                _layout(rng, torch.zeros(k if rng.random() < 0.9 else k + 1, n, dtype=dtype(torch.int8))))
    elif op == "pack_int8_weight":
        args = (_layout(rng, torch.zeros(tuple(d + 1 for d in shape), dtype=dtype(torch.int8))),)
    elif op == "int8_linear":
        k, n = rng.choice([1, 3, 65]), rng.choice([1, 3, 65])
        w = F.pack_int8_weight(torch.zeros(n, k, dtype=torch.int8))
        x_q = torch.zeros((*_shape(rng, max_dim=2), k) if rng.random() < 0.95 else (), dtype=dtype(torch.int8))
        args = (x_q, torch.ones(1), 0, w, torch.zeros(n, dtype=torch.int32), torch.ones(n), None,
                n if rng.random() < 0.9 else rng.choice([0, -1, n + 1]), dtype(*FLOATS), None, 0, None, None)
    elif op == "int8_conv2d":
        groups, cg, ocg = rng.choice([1, 2]), rng.choice([1, 3]), rng.choice([1, 2])
        kernel, stride, padding, dilation = (_geometry(rng, 1), _geometry(rng, 1), _geometry(rng, 0),
                                             _geometry(rng, 1))
        kh, kw = (kernel + [1, 1])[:2] if len(kernel) != 2 else kernel
        w = F.pack_conv_weight(torch.zeros(groups * ocg, cg, max(kh, 1), max(kw, 1), dtype=torch.int8), groups)
        x_shape = (rng.choice([0, 1, 2]), groups * cg, rng.choice([1, 4, 6]), rng.choice([1, 5]))
        x_q = torch.zeros(x_shape if rng.random() < 0.95 else x_shape[1:], dtype=dtype(torch.int8, torch.uint8))
        if x_q.dim() == 4 and rng.random() < 0.3:
            x_q = x_q.contiguous(memory_format=torch.channels_last)
        oc = groups * ocg
        args = (x_q, torch.ones(1), 0, w, torch.zeros(oc, dtype=torch.int32), torch.ones(oc), None, oc, kernel, stride,
                padding, dilation, groups, dtype(*FLOATS), None, 0, None, None)
    elif op == "quantized_add":
        a = _layout(rng, torch.zeros(shape, dtype=dtype(torch.int8, torch.uint8)))
        b = _layout(rng, torch.zeros(shape if rng.random() < 0.95 else _shape(rng), dtype=dtype(torch.int8)))
        args = (a, torch.ones(1), 0, b, torch.ones(1), 0, dtype(*FLOATS), None, 0, rng.random() < 0.5)
    else:
        x = _layout(rng, torch.zeros(tuple(rng.choice([1, 2, 5]) for _ in range(rng.choice([3, 4, 4, 2]))),
                                     dtype=dtype(torch.int8, torch.uint8)))
        if x.dim() == 4 and rng.random() < 0.4:
            x = x.contiguous(memory_format=torch.channels_last)
        args = (x, _geometry(rng, 1), _geometry(rng, 1), _geometry(rng, 0), _geometry(rng, 1), rng.random() < 0.5)
    call = getattr(ops, op)

    def compare():
        try:
            want = call(*args)
        except ALLOWED:
            want = None
        try:
            got = call(*_on_meta(args))  # another exception type is reported by check_case
        except ALLOWED as e:
            assert want is None, f"the meta call raised where the CPU call works: {type(e).__name__}: {e}"
            assert str(e).strip(), f"the meta call raised {type(e).__name__} without a message"
            return torch.zeros(1)
        if want is None:
            return torch.zeros(1)  # the meta call may accept what the CPU kernel rejects for a value
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert (g.shape, g.dtype) == (w.shape, w.dtype), (g.shape, g.dtype, w.shape, w.dtype)
            strides = [(a, b) for a, b, size in zip(g.stride(), w.stride(), w.shape) if size > 1]  # others: any
            assert g.numel() == 0 or op == "quantized_max_pool2d" or all(a == b for a, b in strides), strides
        return torch.zeros(1)

    desc = f"meta {op}(" + ", ".join(f"{tuple(a.shape)} {a.dtype}" if isinstance(a, torch.Tensor) else repr(a)
                                     for a in args) + ")"
    return desc, compare, lambda: torch.zeros(1)


# ---------------------------------------------------------------------------------------------------------------
# Arguments of the wrong kind to every public function
# ---------------------------------------------------------------------------------------------------------------

ANY = "any"  # the expected outcome of a call that may work or raise (checked: only the allowed exceptions)


def _junk(rng: random.Random):
    return rng.choice([None, "x", b"nearest", [1, 2], (3,), {"a": 1}, object(), 2**70, -2**70, math.nan, math.inf,
                       True, 0, 1, -1, 0.5, 8, 1 + 2j, torch.int8, torch.float32, torch.float64, torch.tensor(1.5),
                       torch.tensor([1, 2]), torch.zeros((), dtype=torch.int8), torch.zeros(3, dtype=torch.int8),
                       torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.int32)])


def _public_calls():
    """(function, positional arguments, keyword arguments) of a valid call of each public function."""
    w = randint8((4, 8), 1)
    packed, w_sum, w_scale = F.pack_int8_weight(w), w.sum(1, dtype=torch.int32), torch.ones(4)
    cw = randint8((4, 2, 3, 3), 2)
    x8 = torch.zeros(3, dtype=torch.int8)
    return [
        (F.quantize, [torch.randn(3, 4), 0.1, 0], dict(bits=8, signed=True, rounding="nearest", axis=None)),
        (F.dequantize, [torch.zeros(3, 4, dtype=torch.int8), 0.1, 0], dict(axis=None, dtype=torch.float32)),
        (F.fake_quantize, [torch.randn(3, 4), 0.1, 0], dict(bits=8, signed=True, rounding="nearest", axis=None)),
        (F.choose_qparams, [torch.randn(3, 4)], dict(bits=8, signed=True, symmetric=True, axis=None)),
        (F.quantize_per_token, [torch.randn(3, 4)], dict(bits=8)),
        (F.quantization_error, [torch.randn(3, 4), torch.randn(3, 4)], {}),
        (F.int8_mm, [torch.zeros(2, 8, dtype=torch.int8), w.t()], {}),
        (F.pack_int8_weight, [w], {}),
        (F.int8_linear, [torch.zeros(2, 8, dtype=torch.int8), 0.1, 0, packed, w_sum, w_scale, None],
         dict(out_features=4, out_dtype=torch.float32, out_scale=None, out_zero_point=0, clamp_min=None,
              clamp_max=None)),
        (F.dynamic_int8_linear, [torch.randn(2, 8), packed, w_sum, w_scale, None], dict(out_features=4)),
        (F.pack_conv_weight, [cw, 1], {}),
        (F.int8_conv2d, [torch.zeros(1, 2, 5, 5, dtype=torch.int8), 0.1, 0, F.pack_conv_weight(cw),
                         cw.sum((1, 2, 3), dtype=torch.int32), w_scale, None],
         dict(out_channels=4, kernel_size=3, stride=1, padding=0, dilation=1, groups=1, out_dtype=torch.float32,
              out_scale=None, out_zero_point=0, clamp_min=None, clamp_max=None)),
        (F.quantized_add, [x8, 0.1, 0, x8, 0.1, 0, torch.float32, None, 0, False], {}),
        (F.quantized_max_pool2d, [torch.zeros(1, 2, 4, 4, dtype=torch.int8), 2, None, 0, 1, False], {}),
        (F.quantized_max_pool1d, [torch.zeros(1, 2, 6, dtype=torch.int8), 2, None, 0, 1, False], {}),
    ]


def args_case(rng: random.Random):
    """A public function with one or two of its arguments replaced by a value of another kind (None, a string, a
    list, a huge int, NaN, a dtype, a tensor of another dtype or shape, ...): it works or raises an allowed
    exception with a message, never another exception (an AttributeError or IndexError from the wrapper). This
    family checks the kind of failure only: whether a value of another kind should have been refused, or computes
    the right thing when it is taken, is for the targeted tests (tests/test_robustness.py)."""
    fn, args, kwargs = rng.choice(_public_calls())
    slots = [("arg", i) for i in range(len(args))] + [("kwarg", k) for k in kwargs]
    changed = []
    for kind, key in rng.sample(slots, min(len(slots), rng.choice([1, 1, 2]))):
        value = _junk(rng)
        if kind == "arg":
            args[key] = value
        else:
            kwargs[key] = value
        changed.append(f"{key}={value!r}")
    return f"{fn.__name__}({', '.join(changed)})", lambda: fn(*args, **kwargs), ANY


# ---------------------------------------------------------------------------------------------------------------
# Running the cases (in a child process: python tests/test_fuzz_ops.py FAMILY SEED COUNT LAST_CASE_FILE)
# ---------------------------------------------------------------------------------------------------------------

FAMILIES = {"quantize": quantize_case, "misc": misc_quantize_case, "mm": mm_case, "pack": pack_case,
            "linear": linear_case, "conv": conv_case, "add": add_case, "pool": pool_case, "meta": meta_case,
            "args": args_case}
# cases per family: a few thousand in all, about two minutes on a 2-core CI machine
COUNTS = {"quantize": 2500, "misc": 800, "mm": 1000, "pack": 400, "linear": 2000, "conv": 1500, "add": 1000,
          "pool": 600, "meta": 1000, "args": 1500}


def check_case(desc, fn, want):
    """None when the call keeps the contract, else what went wrong."""
    try:
        got = fn()
    except ALLOWED as e:
        if not str(e).strip():
            return f"raised {type(e).__name__} without a message"
        if want is not ERROR and want is not ANY:
            return f"raised on valid arguments: {type(e).__name__}: {e}"
        return None
    except Exception as e:  # noqa: BLE001 (any other exception type breaks the contract)
        return f"raised {type(e).__name__} (not RuntimeError/ValueError/TypeError/MemoryError): {e}"
    if want is ANY:
        return None
    if want is ERROR:
        return "accepted invalid arguments"
    expected = want()
    if not _same(got, expected):
        return f"result differs from the reference:\n  got  {got}\n  want {expected}"
    return None


def run_family(family: str, seed: int, count: int, last_case_file: str) -> int:
    rng = random.Random(f"{family}-{seed}")
    torch.manual_seed(seed)
    failures = 0
    for i in range(count):
        desc, fn, want = FAMILIES[family](rng)
        with open(last_case_file, "w") as f:  # what was running, should the process crash
            f.write(f"{family} case {i}: {desc}")
        problem = check_case(desc, fn, want)
        if problem is not None:
            failures += 1
            print(f"FAIL {family} case {i}: {desc}\n  {problem}", flush=True)
    print(f"{family}: {count} cases, {failures} failures")
    return failures


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz(family, tmp_path):
    last_case = tmp_path / "last_case"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), family, "0", str(COUNTS[family]),
                           str(last_case)], capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and "FAIL" not in proc.stdout:
        running = last_case.read_text() if last_case.exists() else "(none)"
        pytest.fail(f"the child process died (exit {proc.returncode}) while running {running}\n{output[-4000:]}")
    assert proc.returncode == 0, output[-8000:]


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(1 if run_family(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]) else 0)
