"""Integer element-wise ops of an integer pipeline (quantized_add, quantized_mul, quantized_lookup), integer
max-pooling (1-d and 2-d), sums (quantized_sum) and average pooling (quantized_avg_pool1d / 2d,
quantized_adaptive_avg_pool1d / 2d): wrappers and fake kernels."""
import math
from typing import Optional, Sequence, Union

import torch
from torch.compiler import is_dynamo_compiling

from torchquant import _C
from torchquant._ops import FLOAT_DTYPES, check_fake_devices, check_fake_dtype, ops
from torchquant._ops.gemm import (_ACTIVATION_DTYPES, _as_int, _flag, _integer, _is_int, _optional_number, _pair,
                                  _require_dtype, _require_same_device, _require_tensor, _scale_tensor, as_float32)

_MAX_EXACT_WINDOW = (2 ** 24 - 1) // 255  # the most elements of a quantized_avg_pool2d window (csrc/arg_checks.h)

__all__ = ["quantized_adaptive_avg_pool1d", "quantized_adaptive_avg_pool2d", "quantized_add", "quantized_avg_pool1d",
           "quantized_avg_pool2d", "quantized_lookup", "quantized_max_pool1d", "quantized_max_pool2d", "quantized_mul",
           "quantized_sum"]


def quantized_add(a: torch.Tensor, a_scale, a_zero_point: int, b: torch.Tensor, b_scale, b_zero_point: int,
                  out_dtype: torch.dtype = torch.float32, out_scale: Optional[float] = None, out_zero_point: int = 0,
                  relu: bool = False, out_bits: int = 8) -> torch.Tensor:
    """The sum of two quantized tensors (a residual add in an integer pipeline), fused with an optional ReLU:

        y = float(a - a_zero_point) * a_scale + float(b - b_zero_point) * b_scale    (float32)
        y = max(y, 0) when relu

    a, b: int8 or uint8 (each either) of the same shape, any strides; a_scale, b_scale: positive finite Python
    floats or float32 tensors of 1 element. Returns a tensor of a's shape and memory format: float32, float16 or
    bfloat16 (y cast), or int8/uint8 requantized with out_scale, out_zero_point and out_bits as int8_linear does:
    clamp(rne(y * (1 / out_scale)) + out_zero_point) to the range of out_bits bits."""
    if not is_dynamo_compiling():  # the common CPU call, checked and made in C++ (csrc/python_calls.cpp)
        y = _C.quantized_add(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_dtype, out_scale, out_zero_point,
                             relu, out_bits)
        if y is not NotImplemented:
            return y
    op = "quantized_add"
    _require_operands(a, b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: a and b must have the same shape (no broadcasting), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a_scale, b_scale = _binary_scales(op, a, a_scale, b, b_scale, out_dtype)
    return ops.quantized_add(a, a_scale, _integer(op, "a_zero_point", a_zero_point), b, b_scale,
                             _integer(op, "b_zero_point", b_zero_point), out_dtype,
                             _optional_number(op, "out_scale", out_scale),
                             _integer(op, "out_zero_point", out_zero_point), _flag(op, "relu", relu),
                             _integer(op, "out_bits", out_bits))


def quantized_mul(a: torch.Tensor, a_scale, a_zero_point: int, b: torch.Tensor, b_scale, b_zero_point: int,
                  out_dtype: torch.dtype = torch.float32, out_scale: Optional[float] = None,
                  out_zero_point: int = 0, out_bits: int = 8) -> torch.Tensor:
    """The product of two quantized tensors (a squeeze-excitation block's x * gate in an integer pipeline):

        y = float(a - a_zero_point) * a_scale * (float(b - b_zero_point) * b_scale)    (float32, each product rounded)

    a, b: int8 or uint8 (each either), any strides, broadcast as torch's a * b does (a gate [N, C, 1, 1] against
    x [N, C, H, W]); a_scale, b_scale: positive finite Python floats or float32 tensors of 1 element. Returns a
    tensor of the broadcast shape, in the memory format of the operand of that shape (a's where both are): float32,
    float16 or bfloat16 (y cast), or int8/uint8 requantized with out_scale, out_zero_point and out_bits as
    quantized_add does."""
    if not is_dynamo_compiling():  # the common CPU call, checked and made in C++ (csrc/python_calls.cpp)
        y = _C.quantized_mul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_dtype, out_scale, out_zero_point,
                             out_bits)
        if y is not NotImplemented:
            return y
    op = "quantized_mul"
    _require_operands(a, b)
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"{op}: a and b must broadcast to one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}") from None
    a_scale, b_scale = _binary_scales(op, a, a_scale, b, b_scale, out_dtype)
    return ops.quantized_mul(a, a_scale, _integer(op, "a_zero_point", a_zero_point), b, b_scale,
                             _integer(op, "b_zero_point", b_zero_point), out_dtype,
                             _optional_number(op, "out_scale", out_scale),
                             _integer(op, "out_zero_point", out_zero_point), _integer(op, "out_bits", out_bits))


def _require_operands(a, b) -> None:
    """quantized_add's / quantized_mul's a and b: int8 or uint8 tensors on one device."""
    _require_tensor("a", a)
    _require_tensor("b", b)
    _require_dtype("a", a, _ACTIVATION_DTYPES)
    _require_dtype("b", b, _ACTIVATION_DTYPES)
    _require_same_device(a.device, b=b)


def _binary_scales(op: str, a: torch.Tensor, a_scale, b: torch.Tensor, b_scale, out_dtype) -> tuple:
    """quantized_add's / quantized_mul's scales as float32 tensors on a's device, out_dtype checked."""
    a_scale = _scale_tensor(op, "a_scale", a_scale, a.device)
    b_scale = _scale_tensor(op, "b_scale", b_scale, a.device)
    _require_same_device(a.device, a_scale=a_scale, b_scale=b_scale)
    if out_dtype not in FLOAT_DTYPES + _ACTIVATION_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, float16, bfloat16, int8 or uint8, got {out_dtype}")
    return a_scale, b_scale


def quantized_lookup(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """An element-wise function of a quantized tensor as a 256-entry table (an activation in an integer pipeline):

        y[i] = table[x[i] as uint8 bits]    (int8 x: -128 -> table[128], -1 -> table[255])

    x: int8 or uint8, any shape and strides; table: int8 or uint8, 1-d with 256 entries, on x's device. Returns a
    tensor of x's shape and memory format with the table's dtype."""
    _require_tensor("x", x)
    _require_tensor("table", table)
    _require_dtype("x", x, _ACTIVATION_DTYPES)
    _require_dtype("table", table, _ACTIVATION_DTYPES)
    if table.shape != (256,):
        raise ValueError(f"quantized_lookup: table must be 1-d with 256 entries, got shape {tuple(table.shape)}")
    _require_same_device(x.device, table=table)
    return ops.quantized_lookup(x, table)


def quantized_max_pool2d(x: torch.Tensor, kernel_size: Union[int, Sequence[int]],
                         stride: Optional[Union[int, Sequence[int]]] = None, padding: Union[int, Sequence[int]] = 0,
                         dilation: Union[int, Sequence[int]] = 1, ceil_mode: bool = False) -> torch.Tensor:
    """torch.nn.functional.max_pool2d of an int8/uint8 x [B, C, H, W] (or [C, H, W]) on the CPU and on CUDA (where
    torch's takes floating types only; on the CPU its channels-last kernel fails for H * W > 127): the same output
    size, argument rules and memory format. The maximum of integers commutes with the (monotonic) dequantization,
    so the output keeps x's scale and zero point."""
    if not is_dynamo_compiling():  # the common CPU call, checked and made in C++ (csrc/python_calls.cpp)
        y = _C.quantized_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        if y is not NotImplemented:
            return y
    _require_tensor("x", x)
    _require_dtype("x", x, _ACTIVATION_DTYPES)
    kernel = _pair("kernel_size", kernel_size)
    return ops.quantized_max_pool2d(x, kernel, kernel if stride is None else _pair("stride", stride),
                                    _pair("padding", padding), _pair("dilation", dilation),
                                    _flag("quantized_max_pool2d", "ceil_mode", ceil_mode))


def quantized_sum(x: torch.Tensor, dim: Union[int, Sequence[int]], keepdim: bool = False) -> torch.Tensor:
    """torch.sum(x, dim, keepdim, dtype=torch.int32) of an int8/uint8 x: exact int32 sums (the sums of an average
    pool on integers), on the CPU over H and W of a channels-last [B, C, H, W] x in vector registers (torch's
    integer sum there runs at a fraction of the memory's speed)."""
    _require_tensor("x", x)
    _require_dtype("x", x, _ACTIVATION_DTYPES)
    dims = [dim] if _is_int(dim) else list(dim) if isinstance(dim, (tuple, list)) else None
    if not dims or not all(_is_int(d) for d in dims):
        raise TypeError(f"quantized_sum: dim must be an int or a non-empty sequence of ints, got {dim!r}")
    return ops.quantized_sum(x, [_as_int(d) for d in dims], _flag("quantized_sum", "keepdim", keepdim))


def quantized_avg_pool2d(x: torch.Tensor, scale: float, zero_point: int, kernel_size: Union[int, Sequence[int]],
                         stride: Optional[Union[int, Sequence[int]]] = None, padding: Union[int, Sequence[int]] = 0,
                         ceil_mode: bool = False, count_include_pad: bool = True,
                         divisor_override: Optional[int] = None) -> torch.Tensor:
    """torch.nn.functional.avg_pool2d of the values an int8/uint8 x [B, C, H, W] (or [C, H, W]) stands for,
    (x - zero_point) * scale, as float32, with the same output size, argument rules and memory format: each window's
    sum of x - zero_point over its elements inside the input (padding adds 0.0, the zero point) is exact, then it is
    multiplied by scale and divided by the divisor in float32: the same values on every device. On the CPU a
    channels-last x sums its integers in int32 registers, 64 channels at a time; elsewhere torch's float32 average
    pool sums them (exactly: a window may have at most 65793 elements)."""
    _require_tensor("x", x)
    _require_dtype("x", x, _ACTIVATION_DTYPES)
    op = "quantized_avg_pool2d"
    if scale is None or isinstance(scale, str):
        raise TypeError(f"{op}: scale must be a number, got {scale!r}")
    kernel = _pair("kernel_size", kernel_size)
    return ops.quantized_avg_pool2d(x, _optional_number(op, "scale", scale), _integer(op, "zero_point", zero_point),
                                    kernel, kernel if stride is None else _pair("stride", stride),
                                    _pair("padding", padding), _flag(op, "ceil_mode", ceil_mode),
                                    _flag(op, "count_include_pad", count_include_pad),
                                    None if divisor_override is None
                                    else _integer(op, "divisor_override", divisor_override))


def quantized_avg_pool1d(x: torch.Tensor, scale: float, zero_point: int, kernel_size: Union[int, Sequence[int]],
                         stride: Optional[Union[int, Sequence[int]]] = None, padding: Union[int, Sequence[int]] = 0,
                         ceil_mode: bool = False, count_include_pad: bool = True) -> torch.Tensor:
    """torch.nn.functional.avg_pool1d of the values an int8/uint8 x [B, C, L] (or [C, L]) stands for, as float32:
    quantized_avg_pool2d over x as [B, C, 1, L]."""
    kernel, stride, padding = _pool1d_arguments("quantized_avg_pool1d", x, kernel_size, stride, padding)
    try:
        y = quantized_avg_pool2d(x.unsqueeze(-2), scale, zero_point, (1, kernel), (1, stride), (0, padding),
                                 ceil_mode, count_include_pad)
    except RuntimeError:
        # the 2-d op names 2-d sizes; torch's avg_pool1d has the same rules and says what is wrong in 1-d terms
        torch.nn.functional.avg_pool1d(torch.empty(x.shape, device="meta"), kernel, stride, padding, ceil_mode,
                                       count_include_pad)
        raise
    return y.squeeze(-2)


def quantized_adaptive_avg_pool2d(x: torch.Tensor, scale: float, zero_point: int,
                                  output_size: Union[int, None, Sequence[Optional[int]]]) -> torch.Tensor:
    """torch.nn.functional.adaptive_avg_pool2d of the values an int8/uint8 x [B, C, H, W] (or [C, H, W]) stands for,
    (x - zero_point) * scale, as float32, with the same output size and argument rules (None: the input's size).
    Each window's sum of x - zero_point is exact, multiplied by scale and divided by the window's element count in
    float32, as quantized_avg_pool2d computes: where each output size divides the input's, the windows are a fixed
    window's and quantized_avg_pool2d runs them (windows of at most 65793 elements). Other sizes give windows of two
    sizes: the op quantized_adaptive_avg_pool2d (on the CPU a kernel of the exact int32 sums of a channels-last x;
    elsewhere torch's adaptive pool of x - zero_point, each window's sum recovered exactly from its mean)."""
    op = "quantized_adaptive_avg_pool2d"
    _require_tensor("x", x)
    _require_dtype("x", x, _ACTIVATION_DTYPES)
    if x.dim() not in (3, 4):
        raise ValueError(f"{op}: x must be 3-d [C, H, W] or 4-d [B, C, H, W], got {x.dim()}-d")
    if scale is None or isinstance(scale, str):
        raise TypeError(f"{op}: scale must be a number, got {scale!r}")
    scale, zero_point = _optional_number(op, "scale", scale), _integer(op, "zero_point", zero_point)
    if not is_dynamo_compiling():  # (torch.compile takes the pipeline's constants as they are)
        _check_scale_and_zero_point(op, x, scale, zero_point)
    h, w = x.shape[-2:]
    out_h, out_w = _adaptive_output_size(x, output_size)
    fixed = out_h > 0 and out_w > 0 and h % out_h == 0 and w % out_w == 0
    if fixed and (h // out_h) * (w // out_w) <= _MAX_EXACT_WINDOW:
        kernel = [h // out_h, w // out_w]
        return ops.quantized_avg_pool2d(x, scale, zero_point, kernel, kernel, [0, 0], False, True, None)
    return ops.quantized_adaptive_avg_pool2d(x, scale, zero_point, [out_h, out_w])


def _check_scale_and_zero_point(op: str, x: torch.Tensor, scale: float, zero_point: int) -> None:
    """scale positive and finite as a float32, the zero point in x's integer range (quantized_avg_pool2d's rules)."""
    scale32 = as_float32(scale)
    if not (math.isfinite(scale32) and scale32 > 0):
        raise ValueError(f"{op}: scale must be positive and finite (as a float32), got {scale}")
    low, high = (-128, 127) if x.dtype == torch.int8 else (0, 255)
    if not low <= zero_point <= high:
        raise ValueError(f"{op}: zero_point must lie in [{low}, {high}] for {x.dtype} x, got {zero_point}")


def _adaptive_output_size(x: torch.Tensor, output_size) -> tuple:
    """(out_h, out_w) of torch's adaptive_avg_pool2d: an int, or a pair of ints >= 0 or None (x's size); anything
    else goes to torch on the meta device, which raises its error (or gives the size of a form it also takes)."""
    pair = (output_size, output_size) if _is_int(output_size) else output_size
    if isinstance(pair, (tuple, list)) and len(pair) == 2 and all(v is None or _is_int(v) and v >= 0 for v in pair):
        return tuple(x.shape[-2 + i] if v is None else _as_int(v) for i, v in enumerate(pair))
    return tuple(torch.nn.functional.adaptive_avg_pool2d(torch.empty(x.shape, device="meta"), output_size).shape[-2:])


def quantized_adaptive_avg_pool1d(x: torch.Tensor, scale: float, zero_point: int,
                                  output_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """torch.nn.functional.adaptive_avg_pool1d of the values an int8/uint8 x [B, C, L] (or [C, L]) stands for, as
    float32: quantized_adaptive_avg_pool2d over x as [B, C, 1, L]."""
    _require_tensor("x", x)
    _require_dtype("x", x, _ACTIVATION_DTYPES)
    if x.dim() not in (2, 3):
        raise ValueError(f"quantized_adaptive_avg_pool1d: x must be 2-d [C, L] or 3-d [B, C, L], got {x.dim()}-d")
    size = output_size[0] if isinstance(output_size, (tuple, list)) and len(output_size) == 1 else output_size
    if not (_is_int(size) and size >= 0):  # torch's rules and message (on the meta device: nothing is computed)
        torch.nn.functional.adaptive_avg_pool1d(torch.empty(x.shape, device="meta"), output_size)
    return quantized_adaptive_avg_pool2d(x.unsqueeze(-2), scale, zero_point, (1, _single("output_size", output_size))
                                         ).squeeze(-2)


def _single(name: str, v: Union[int, Sequence[int]]) -> int:
    if _is_int(v):
        return _as_int(v)
    if isinstance(v, (tuple, list)) and len(v) == 1 and _is_int(v[0]):
        return _as_int(v[0])
    raise TypeError(f"{name} must be an int or a 1-tuple of ints, got {v!r}")


def _pool1d_arguments(op: str, x: torch.Tensor, kernel_size, stride, padding) -> tuple:
    """A 1-d pool's checked input and (kernel, stride, padding) as ints (stride None: the kernel)."""
    _require_tensor("x", x)
    _require_dtype("x", x, _ACTIVATION_DTYPES)
    if x.dim() not in (2, 3):
        raise ValueError(f"{op}: x must be 2-d [C, L] or 3-d [B, C, L], got {x.dim()}-d")
    kernel = _single("kernel_size", kernel_size)
    return kernel, kernel if stride is None else _single("stride", stride), _single("padding", padding)


def quantized_max_pool1d(x: torch.Tensor, kernel_size: Union[int, Sequence[int]],
                         stride: Optional[Union[int, Sequence[int]]] = None, padding: Union[int, Sequence[int]] = 0,
                         dilation: Union[int, Sequence[int]] = 1, ceil_mode: bool = False) -> torch.Tensor:
    """torch.nn.functional.max_pool1d of an int8/uint8 x [B, C, L] (or [C, L]) on the CPU and on CUDA: the same
    output size and argument rules; quantized_max_pool2d's kernels over x as [B, C, 1, L]. The output keeps x's
    scale and zero point."""
    kernel, stride, padding = _pool1d_arguments("quantized_max_pool1d", x, kernel_size, stride, padding)
    dilation = _single("dilation", dilation)
    ceil_mode = _flag("quantized_max_pool1d", "ceil_mode", ceil_mode)
    try:
        y = quantized_max_pool2d(x.unsqueeze(-2), (1, kernel), (1, stride), (0, padding), (1, dilation), ceil_mode)
    except RuntimeError:
        # the 2-d op names 2-d sizes; torch's max_pool1d has the same rules and says what is wrong in 1-d terms
        torch.nn.functional.max_pool1d(torch.empty(x.shape, device="meta"), kernel, stride, padding, dilation,
                                       ceil_mode)
        raise
    return y.squeeze(-2)


# ---- fake kernels: shapes and dtypes only, for torch.compile / meta tensors ----

@torch.library.register_fake("torchquant::quantized_add")
def _quantized_add_fake(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_dtype, out_scale=None,
                        out_zero_point=0, relu=False, out_bits=8):
    check_fake_devices("quantized_add", "a", a, a_scale=a_scale, b=b, b_scale=b_scale)
    check_fake_dtype("quantized_add", "a", a, _ACTIVATION_DTYPES)
    check_fake_dtype("quantized_add", "b", b, _ACTIVATION_DTYPES)
    torch._check(a.shape == b.shape, lambda: "quantized_add: a and b must have the same shape (no broadcasting)")
    return torch.empty_like(a, dtype=out_dtype, memory_format=torch.preserve_format)


@torch.library.register_fake("torchquant::quantized_mul")
def _quantized_mul_fake(a, a_scale, a_zero_point, b, b_scale, b_zero_point, out_dtype, out_scale=None,
                        out_zero_point=0, out_bits=8):
    check_fake_devices("quantized_mul", "a", a, a_scale=a_scale, b=b, b_scale=b_scale)
    check_fake_dtype("quantized_mul", "a", a, _ACTIVATION_DTYPES)
    check_fake_dtype("quantized_mul", "b", b, _ACTIVATION_DTYPES)
    shape = torch.broadcast_shapes(a.shape, b.shape)
    like = a if a.shape == shape or b.shape != shape else b  # (the operand of the output's shape, a where both are)
    return torch.empty_like(like.expand(shape), dtype=out_dtype, memory_format=torch.preserve_format)


@torch.library.register_fake("torchquant::quantized_lookup")
def _quantized_lookup_fake(x, table):
    check_fake_devices("quantized_lookup", "x", x, table=table)
    check_fake_dtype("quantized_lookup", "x", x, _ACTIVATION_DTYPES)
    check_fake_dtype("quantized_lookup", "table", table, _ACTIVATION_DTYPES)
    torch._check(table.shape == (256,), lambda: f"quantized_lookup: table must be 1-d with 256 entries, got shape "
                                                f"{tuple(table.shape)}")
    return torch.empty_like(x, dtype=table.dtype, memory_format=torch.preserve_format)


@torch.library.register_fake("torchquant::quantized_max_pool2d")
def _quantized_max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
    check_fake_dtype("quantized_max_pool2d", "x", x, _ACTIVATION_DTYPES)
    torch._check(x.dim() in (3, 4), lambda: f"quantized_max_pool2d: x must be 3-d [C, H, W] or 4-d [B, C, H, W], got "
                                            f"{x.dim()}-d")  # torch's meta max_pool2d raises an IndexError
    return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.register_fake("torchquant::quantized_adaptive_avg_pool2d")
def _quantized_adaptive_avg_pool2d_fake(x, scale, zero_point, output_size):
    op = "quantized_adaptive_avg_pool2d"
    check_fake_dtype(op, "x", x, _ACTIVATION_DTYPES)
    torch._check(x.dim() in (3, 4), lambda: f"{op}: x must be 3-d [C, H, W] or 4-d [B, C, H, W], got {x.dim()}-d")
    return torch.nn.functional.adaptive_avg_pool2d(torch.empty_like(x, dtype=torch.float32), output_size)


@torch.library.register_fake("torchquant::quantized_avg_pool2d")
def _quantized_avg_pool2d_fake(x, scale, zero_point, kernel_size, stride, padding, ceil_mode=False,
                               count_include_pad=True, divisor_override=None):
    op = "quantized_avg_pool2d"
    check_fake_dtype(op, "x", x, _ACTIVATION_DTYPES)
    torch._check(x.dim() in (3, 4), lambda: f"{op}: x must be 3-d [C, H, W] or 4-d [B, C, H, W], got {x.dim()}-d")
    torch._check(divisor_override != 0, lambda: f"{op}: divisor_override must not be 0")
    torch._check(kernel_size[0] * kernel_size[1] <= _MAX_EXACT_WINDOW,
                 lambda: f"{op}: the window may have at most {_MAX_EXACT_WINDOW} elements (exact float32 sums), got "
                         f"kernel_size {list(kernel_size)}")
    return torch.nn.functional.avg_pool2d(torch.empty_like(x, dtype=torch.float32), kernel_size, stride, padding,
                                          ceil_mode, count_include_pad, divisor_override)
