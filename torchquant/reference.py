"""Plain-PyTorch definitions of every torchquant op: the readable specification and the test oracle.

Nothing here is fast; everything here is meant to be obviously right. The compiled kernels must match these
functions bit for bit on integers (and up to float summation order on float outputs of matrix products).
"""
import torch

# ---------------------------------------------------------------------------------------------------------------
# Quantize family
# ---------------------------------------------------------------------------------------------------------------


def qrange(bits: int, signed: bool):
    """(qmin, qmax) of a format; signed 1 bit is sign binarization, {-1, +1}."""
    if signed and bits == 1:
        return -1, 1
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _along(param, x: torch.Tensor, axis):
    """A per-tensor (number or [1]) or per-channel ([C]) parameter as float32, shaped to broadcast against x."""
    param = torch.as_tensor(param, device=x.device).float()
    if axis is None:
        return param.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def _rounded(x32: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, rounding: str):
    """round(x * (1 / scale)) + zero_point in float32, un-clamped: 1 / scale is taken in float32 first."""
    v = x32 * (1.0 / scale)
    return (torch.round(v) if rounding == "nearest" else torch.trunc(v)) + zero_point


def quantize_float(x, scale, zero_point, *, bits=8, signed=True, rounding="nearest", axis=None):
    """The quantized values as an integer-valued float32 tensor (NaN -> zero_point, +-inf -> qmax/qmin)."""
    qmin, qmax = qrange(bits, signed)
    x32 = x.float()
    s = _along(scale, x, axis)
    z = _along(zero_point, x, axis)
    if signed and bits == 1:
        q = torch.where(x32 >= 0, 1.0, -1.0)
    else:
        q = torch.clamp(_rounded(x32, s, z, rounding), qmin, qmax)
    return torch.where(torch.isnan(x32), z.expand_as(x32), q)


def quantize(x, scale, zero_point, *, bits=8, signed=True, rounding="nearest", axis=None):
    """q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax) as int8 (signed) or uint8."""
    q = quantize_float(x, scale, zero_point, bits=bits, signed=signed, rounding=rounding, axis=axis)
    return q.to(torch.int8 if signed else torch.uint8)


def dequantize(q, scale, zero_point, *, axis=None, dtype=torch.float32):
    """(q - zero_point) * scale, computed in float32, returned as dtype."""
    s = _along(scale, q, axis)
    z = _along(zero_point, q, axis)
    return ((q.float() - z) * s).to(dtype)


def fake_quantize(x, scale, zero_point, *, bits=8, signed=True, rounding="nearest", axis=None):
    """dequantize(quantize(x)) in float32, returned in x's dtype; NaN stays NaN."""
    q = quantize_float(x, scale, zero_point, bits=bits, signed=signed, rounding=rounding, axis=axis)
    s = _along(scale, x, axis)
    z = _along(zero_point, x, axis)
    x32 = x.float()
    return torch.where(torch.isnan(x32), x32, (q - z) * s).to(x.dtype)


def fake_quantize_grad_mask(x, scale, zero_point, *, bits=8, signed=True, rounding="nearest", axis=None):
    """Where the straight-through gradient passes: the un-clamped quantized value lies in [qmin, qmax]
    (sign binarization: |x| <= scale). False for NaN."""
    qmin, qmax = qrange(bits, signed)
    x32 = x.float()
    s = _along(scale, x, axis)
    if signed and bits == 1:
        return x32.abs() <= s
    r = _rounded(x32, s, _along(zero_point, x, axis), rounding)
    return (r >= qmin) & (r <= qmax)


def fake_quantize_backward(grad, x, scale, zero_point, *, bits=8, signed=True, rounding="nearest", axis=None):
    """grad * mask (a product, so an inf/NaN gradient outside the range gives NaN, as in torch)."""
    mask = fake_quantize_grad_mask(x, scale, zero_point, bits=bits, signed=signed, rounding=rounding, axis=axis)
    return (grad.float() * mask.float()).to(grad.dtype)


def quantize_per_token(x, *, bits=8):
    """Symmetric per-row int8 quantization over the last dim. scale = (largest finite |x| of the row) / qmax,
    1.0 for a row without a non-zero finite value; q = clamp(round(x * (1 / scale)), -qmax, qmax), NaN -> 0."""
    qmax = (1 << (bits - 1)) - 1
    x32 = x.float()
    if x.shape[-1] == 0:
        absmax = x32.new_zeros(x.shape[:-1])
    else:
        absmax = torch.where(torch.isfinite(x32), x32.abs(), 0.0).amax(-1)
    scale = torch.where(absmax > 0, absmax / qmax, 1.0)
    q = torch.clamp(torch.round(x32 * (1.0 / scale)[..., None]), -qmax, qmax)
    q = torch.where(torch.isnan(x32), 0.0, q)
    return q.to(torch.int8), scale



# ---------------------------------------------------------------------------------------------------------------
# Integer matrix family
# ---------------------------------------------------------------------------------------------------------------
