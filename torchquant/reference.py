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
    """Symmetric per-row int8 quantization over the last dim. scale = (largest finite |x| of the row) / qmax, at
    least the smallest normal float32 (1 / scale stays finite), 1.0 for a row without a non-zero finite value;
    q = clamp(round(x * (1 / scale)), -qmax, qmax), NaN -> 0."""
    qmax = (1 << (bits - 1)) - 1
    x32 = x.float()
    if x.shape[-1] == 0:
        absmax = x32.new_zeros(x.shape[:-1])
    else:
        absmax = torch.where(torch.isfinite(x32), x32.abs(), 0.0).amax(-1)
    # a tensor divisor: torch divides by a Python scalar on CUDA as a multiplication by its reciprocal, which can
    # differ from true division in the last bit
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(absmax > 0, torch.clamp_min(absmax / torch.full_like(absmax, qmax), tiny), 1.0)
    q = torch.clamp(torch.round(x32 * (1.0 / scale)[..., None]), -qmax, qmax)
    q = torch.where(torch.isnan(x32), 0.0, q)
    return q.to(torch.int8), scale



# ---------------------------------------------------------------------------------------------------------------
# Integer matrix family
# ---------------------------------------------------------------------------------------------------------------


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b of int8 matrices: an int64 product cast to int32. Every sum fits int32 for K < 2^17 (at most
    K * 2^14 in magnitude); a longer one outside int32's range wraps modulo 2^32, as the kernels' and
    torch._int_mm's do."""
    return (a.cpu().to(torch.int64) @ b.cpu().to(torch.int64)).to(torch.int32).to(a.device)


def _requantize(y: torch.Tensor, out_scale: float, out_zero_point: int, out_dtype: torch.dtype,
                out_bits: int = 8) -> torch.Tensor:
    """clamp(rne(y * (1 / out_scale)) + out_zero_point) to the range of out_bits bits signed as out_dtype."""
    qmin, qmax = qrange(out_bits, out_dtype == torch.int8)
    inv_scale = 1.0 / torch.tensor(out_scale, dtype=torch.float32)  # in float32, as the kernels compute it
    q = torch.round(y * inv_scale) + out_zero_point  # round half to even
    q = torch.where(torch.isnan(y), torch.full_like(q, out_zero_point), q)
    return q.clamp(qmin, qmax).to(out_dtype)


def _activation_clamp(y: torch.Tensor, clamp_min, clamp_max) -> torch.Tensor:
    """The fused activation: y = min(max(y, float32(clamp_min)), float32(clamp_max)), each when given; NaN stays."""
    if clamp_min is None and clamp_max is None:
        return y
    return torch.clamp(y, clamp_min, clamp_max)


def _convert_output(y: torch.Tensor, out_dtype, out_scale, out_zero_point, out_bits: int = 8) -> torch.Tensor:
    """y cast to a float out_dtype, or requantized to int8/uint8 (out_bits of them) when out_scale is given."""
    if out_scale is None:
        return y.to(out_dtype)
    return _requantize(y, out_scale, out_zero_point, out_dtype, out_bits)


def int8_linear(x_q: torch.Tensor, x_scale, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias=None, *, out_dtype=torch.float32, out_scale=None, out_zero_point: int = 0, clamp_min=None,
                clamp_max=None, out_bits: int = 8) -> torch.Tensor:
    """y = (sum_k (x_q - x_zero_point) * w_q[n, k]) * x_scale * w_scale[n] + bias[n] over the last dim of
    x_q [..., K], with the unpacked int8 weight w_q [N, K]; x_scale per token (x_q.shape[:-1]) or 1 element.
    Then the fused activation clamp (clamp_min / clamp_max, each when given), and out_dtype float, or int8/uint8
    requantized: clamp(rne(y * (1 / out_scale)) + out_zero_point) to the range of out_bits bits."""
    acc = (x_q.cpu().to(torch.int64) - x_zero_point) @ w_q.cpu().to(torch.int64).t()
    x_scale = torch.as_tensor(x_scale, dtype=torch.float32).cpu()
    x_scale = x_scale.reshape(()) if x_scale.numel() == 1 else x_scale.reshape(*x_q.shape[:-1], 1)
    y = acc.to(torch.int32).to(torch.float32) * x_scale * w_scale.cpu().float()
    if bias is not None:
        y = y + bias.cpu().float()
    y = _activation_clamp(y, clamp_min, clamp_max)
    return _convert_output(y, out_dtype, out_scale, out_zero_point, out_bits).to(x_q.device)


def int8_conv2d(x_q: torch.Tensor, x_scale, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias=None, *, stride=1, padding=0, dilation=1, groups=1, out_dtype=torch.float32, out_scale=None,
                out_zero_point: int = 0, clamp_min=None, clamp_max=None, out_bits: int = 8) -> torch.Tensor:
    """Quantized conv2d with the unpacked weight w_q [OC, C/G, KH, KW]: the integer sums of (x_q - x_zero_point)
    * w_q (exact: a float64 convolution of integers far below 2^53), then acc * x_scale * w_scale[oc] + bias[oc]
    in float32, clamped, stored as out_dtype or requantized like int8_linear's; channels-last output like the
    kernels'."""
    xf = x_q.cpu().to(torch.float64) - x_zero_point
    acc = torch.nn.functional.conv2d(xf, w_q.cpu().to(torch.float64), None, stride, padding, dilation, groups)
    x_scale = torch.as_tensor(x_scale, dtype=torch.float32).cpu().reshape(())
    y = acc.to(torch.int64).to(torch.int32).to(torch.float32) * x_scale * w_scale.cpu().float().reshape(-1, 1, 1)
    if bias is not None:
        y = y + bias.cpu().float().reshape(-1, 1, 1)
    y = _activation_clamp(y, clamp_min, clamp_max)
    out = _convert_output(y, out_dtype, out_scale, out_zero_point, out_bits)
    return out.contiguous(memory_format=torch.channels_last).to(x_q.device)


def int8_conv2d_residual(x_q: torch.Tensor, x_scale, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor,
                         bias=None, *, residual: torch.Tensor, residual_scale, residual_zero_point: int,
                         relu: bool = False, stride=1, padding=0, dilation=1, groups=1, out_dtype=torch.float32,
                         out_scale=None, out_zero_point: int = 0, clamp_min=None, clamp_max=None,
                         out_bits: int = 8) -> torch.Tensor:
    """int8_conv2d with a residual add, as its steps: y = int8_conv2d's float32 output (clamped), then y +
    dequantize(residual) (float(residual - residual_zero_point) * residual_scale, the product rounded to float32,
    then the sum), max(y, 0) when relu, then out_dtype or requantized like int8_conv2d's output."""
    y = int8_conv2d(x_q, x_scale, x_zero_point, w_q, w_scale, bias, stride=stride, padding=padding,
                    dilation=dilation, groups=groups, out_dtype=torch.float32, clamp_min=clamp_min,
                    clamp_max=clamp_max).cpu()
    y = y + dequantize(residual.cpu(), torch.as_tensor(residual_scale, dtype=torch.float32).cpu().reshape(()),
                       residual_zero_point)
    if relu:
        y = torch.clamp(y, min=0.0)
    out = _convert_output(y, out_dtype, out_scale, out_zero_point, out_bits)
    return out.contiguous(memory_format=torch.channels_last).to(x_q.device)


# ---------------------------------------------------------------------------------------------------------------
# Integer element-wise family
# ---------------------------------------------------------------------------------------------------------------


def quantized_add(a: torch.Tensor, a_scale, a_zero_point: int, b: torch.Tensor, b_scale, b_zero_point: int, *,
                  out_dtype=torch.float32, out_scale=None, out_zero_point: int = 0, relu: bool = False,
                  out_bits: int = 8):
    """y = float(a - a_zero_point) * a_scale + float(b - b_zero_point) * b_scale in float32 (each product rounded,
    then the sum), max(y, 0) when relu, then cast to out_dtype or requantized like int8_linear's output."""
    a_scale = torch.as_tensor(a_scale, dtype=torch.float32).cpu().reshape(())
    b_scale = torch.as_tensor(b_scale, dtype=torch.float32).cpu().reshape(())
    y = (a.cpu().float() - a_zero_point) * a_scale + (b.cpu().float() - b_zero_point) * b_scale
    if relu:
        y = torch.clamp(y, min=0.0)
    return _convert_output(y, out_dtype, out_scale, out_zero_point, out_bits).to(a.device)


def quantized_mul(a: torch.Tensor, a_scale, a_zero_point: int, b: torch.Tensor, b_scale, b_zero_point: int, *,
                  out_dtype=torch.float32, out_scale=None, out_zero_point: int = 0, out_bits: int = 8):
    """y = float(a - a_zero_point) * a_scale * (float(b - b_zero_point) * b_scale) in float32 (each product rounded),
    a and b broadcast, then cast to out_dtype or requantized like int8_linear's output."""
    a_scale = torch.as_tensor(a_scale, dtype=torch.float32).cpu().reshape(())
    b_scale = torch.as_tensor(b_scale, dtype=torch.float32).cpu().reshape(())
    y = ((a.cpu().float() - a_zero_point) * a_scale) * ((b.cpu().float() - b_zero_point) * b_scale)
    return _convert_output(y, out_dtype, out_scale, out_zero_point, out_bits).to(a.device)


def quantized_lookup(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[x's byte as uint8]: x & 255 maps int8 -128..-1 to 128..255 and leaves uint8 as it is."""
    return table[x.long() & 255]


def _window_counts(size: int, out: int, kernel: int, stride: int, pad: int) -> tuple:
    """Per output position along one axis: (elements of its window inside the input, elements inside the padded
    input), the window of output o starting at o * stride - pad (torch's average pool)."""
    inside, padded = [], []
    for o in range(out):
        start = o * stride - pad
        end = min(start + kernel, size + pad)
        inside.append(min(end, size) - max(start, 0))
        padded.append(end - start)
    return torch.tensor(inside, dtype=torch.float64), torch.tensor(padded, dtype=torch.float64)


def quantized_adaptive_avg_pool2d(x: torch.Tensor, scale: float, zero_point: int, output_size):
    """The adaptive average pool of x's dequantized values [B?, C, H, W] in float32, window by window: window (i, j)
    spans rows [floor(i * H / out_h), ceil((i + 1) * H / out_h)) and the columns alike; its exact sum of
    x - zero_point (float64 sums of integers) as float32, times float32(scale), over its element count."""
    x64 = x.cpu().double() - zero_point
    out_h, out_w = torch.nn.functional.adaptive_avg_pool2d(x64, output_size).shape[-2:]
    h, w = x.shape[-2:]
    y = torch.empty(*x.shape[:-2], out_h, out_w)
    for i in range(out_h):
        r0, r1 = i * h // out_h, -(-(i + 1) * h // out_h)
        for j in range(out_w):
            c0, c1 = j * w // out_w, -(-(j + 1) * w // out_w)
            total = x64[..., r0:r1, c0:c1].sum((-2, -1)).float()
            y[..., i, j] = total * torch.tensor(scale, dtype=torch.float32) / float((r1 - r0) * (c1 - c0))
    return y.to(x.device)


def quantized_avg_pool2d(x: torch.Tensor, scale: float, zero_point: int, kernel_size, stride, padding,
                         ceil_mode: bool = False, count_include_pad: bool = True, divisor_override=None):
    """The average pool of x's dequantized values [B?, C, H, W] in float32: each window's exact sum of x - zero_point
    (float64 sums of integers), as float32 times float32(scale), over the float32 divisor (divisor_override, the
    window's elements inside the padded input, or those inside the input)."""
    x64 = x.cpu().double() - zero_point
    sums = torch.nn.functional.avg_pool2d(x64, kernel_size, stride, padding, ceil_mode, True, 1)
    (h_in, h_pad), (w_in, w_pad) = (
        _window_counts(x.shape[-2 + i], sums.shape[-2 + i], kernel_size[i], stride[i], padding[i]) for i in range(2))
    if divisor_override is not None:
        divisor = torch.tensor(float(divisor_override), dtype=torch.float64)
    else:
        divisor = torch.outer(h_pad, w_pad) if count_include_pad else torch.outer(h_in, w_in)
    y = sums.float() * torch.tensor(scale, dtype=torch.float32) / divisor.float()
    return y.to(x.device)
