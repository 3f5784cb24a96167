"""Plain-PyTorch definitions of every torchquant op: the readable specification and the test oracle.

Nothing here is fast; everything here is meant to be obviously right. The compiled kernels must match these
functions bit for bit on integers (and up to float summation order on float outputs of matrix products).
"""
import torch

# ---------------------------------------------------------------------------------------------------------------
# Quantize family
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Integer matrix family
# ---------------------------------------------------------------------------------------------------------------


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b of int8 matrices: an int64 product (no overflow for K < 2^32 / 2^14) cast to int32."""
    return (a.cpu().to(torch.int64) @ b.cpu().to(torch.int64)).to(torch.int32).to(a.device)


def _requantize(y: torch.Tensor, out_scale: float, out_zero_point: int, out_dtype: torch.dtype) -> torch.Tensor:
    info = torch.iinfo(out_dtype)
    inv_scale = 1.0 / torch.tensor(out_scale, dtype=torch.float32)  # in float32, as the kernels compute it
    q = torch.round(y * inv_scale) + out_zero_point  # round half to even
    q = torch.where(torch.isnan(y), torch.full_like(q, out_zero_point), q)
    return q.clamp(info.min, info.max).to(out_dtype)


def int8_linear(x_q: torch.Tensor, x_scale, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias=None, *, out_dtype=torch.float32, out_scale=None, out_zero_point: int = 0) -> torch.Tensor:
    """y = (sum_k (x_q - x_zero_point) * w_q[n, k]) * x_scale * w_scale[n] + bias[n] over the last dim of
    x_q [..., K], with the unpacked int8 weight w_q [N, K]; x_scale per token (x_q.shape[:-1]) or 1 element.
    out_dtype float, or int8/uint8 requantized: clamp(rne(y * (1 / out_scale)) + out_zero_point)."""
    acc = (x_q.cpu().to(torch.int64) - x_zero_point) @ w_q.cpu().to(torch.int64).t()
    x_scale = torch.as_tensor(x_scale, dtype=torch.float32).cpu()
    x_scale = x_scale.reshape(()) if x_scale.numel() == 1 else x_scale.reshape(*x_q.shape[:-1], 1)
    y = acc.to(torch.int32).to(torch.float32) * x_scale * w_scale.cpu().float()
    if bias is not None:
        y = y + bias.cpu().float()
    out = _requantize(y, out_scale, out_zero_point, out_dtype) if out_scale is not None else y.to(out_dtype)
    return out.to(x_q.device)


def int8_conv2d(x_q: torch.Tensor, x_scale, x_zero_point: int, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias=None, *, stride=1, padding=0, dilation=1, groups=1, out_dtype=torch.float32) -> torch.Tensor:
    """Quantized conv2d with the unpacked weight w_q [OC, C/G, KH, KW]: the integer sums of (x_q - x_zero_point)
    * w_q (exact: a float64 convolution of integers far below 2^53), then acc * x_scale * w_scale[oc] + bias[oc]
    in float32; channels-last output like the kernels'."""
    xf = x_q.cpu().to(torch.float64) - x_zero_point
    acc = torch.nn.functional.conv2d(xf, w_q.cpu().to(torch.float64), None, stride, padding, dilation, groups)
    x_scale = torch.as_tensor(x_scale, dtype=torch.float32).cpu().reshape(())
    y = acc.to(torch.int64).to(torch.int32).to(torch.float32) * x_scale * w_scale.cpu().float().reshape(-1, 1, 1)
    if bias is not None:
        y = y + bias.cpu().float().reshape(-1, 1, 1)
    return y.to(out_dtype).contiguous(memory_format=torch.channels_last).to(x_q.device)
