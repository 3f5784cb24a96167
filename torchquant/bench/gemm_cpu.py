"""CPU integer matrix kernels against PyTorch: int8_mm, the int8-dynamic linear and the int8 conv2d.

Three tables, each at 1 and 2 threads, every row timed interleaved with its baselines in this process:
- int8_mm: GOP/s (2 per multiply-add), fraction of the peak of the kernel path's multiply-add instruction measured on
  this machine (torchquant.bench.timing.multiply_add_peak, times the threads), ratio to torch._int_mm (oneDNN) and
  to float32 torch.mm.
- dynamic linear (per-token activation quantize + GEMM + epilogue, float32 in and out) on MiniLM/BERT shapes,
  4096x4096 and 4096x11008 against torch.ao.quantization.quantize_dynamic's Linear (fbgemm) and float F.linear;
  "weight GB/s" is the int8 weight's bytes over the time, against memory's speed where few rows read a weight
  too large for the caches.
- conv2d on ResNet-style layers (uint8 channels-last activations, per-channel int8 weights, float32 output)
  against torch.ao.nn.quantized.Conv2d (x86 engine; quint8 output) and the float channels-last conv.
"""
from typing import List, Sequence

import torch
from torch import nn

from torchquant import functional as F_q
from torchquant.bench.timing import multiply_add_peak, run_tables, tables_main, torch_ao_engine
from torchquant.timing import compare, num_threads

MM_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (128, 4096, 4096), (16, 4096, 4096), (32, 4096, 11008))  # M, K, N
LINEAR_SHAPES = ((384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768), (4096, 4096),
                 (4096, 11008))  # K, N
LINEAR_ROWS = (1, 4, 16, 128, 512)
CONV_LAYERS = (  # name, in_channels, size, out_channels, kernel, stride, padding
    ("3x3 64->64 @56", 64, 56, 64, 3, 1, 1),
    ("1x1 64->256 @56", 64, 56, 256, 1, 1, 0),
    ("3x3 128->128 @28", 128, 28, 128, 3, 1, 1),
    ("3x3 128->256 s2 @28", 128, 28, 256, 3, 2, 1),
    ("1x1 256->1024 @14", 256, 14, 1024, 1, 1, 0),
    ("3x3 256->256 @14", 256, 14, 256, 3, 1, 1),
    ("3x3 512->512 @7", 512, 7, 512, 3, 1, 1),
    ("1x1 2048->512 @7", 2048, 7, 512, 1, 1, 0),
)
CONV_BATCHES = (1, 8)


def _int8(*shape) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def _per_channel_int8(w: torch.Tensor):
    """Symmetric per-output-channel int8 weight of a float weight [OC, ...]: (w_q, scale float32 [OC])."""
    scale = w.abs().flatten(1).amax(1).clamp_min(1e-8) / 127
    w_q = torch.round(w / scale.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
    return w_q, scale.float()


def bench_int8_mm(threads: int, repeats: int) -> List[dict]:
    rows = []
    peak_gops = 2 * multiply_add_peak() / 1e9 * threads
    for m, k, n in MM_SHAPES:
        a, w = _int8(m, k), _int8(n, k)
        b = w.t()  # the nn.Linear weight layout
        af, bf = a.float(), b.float()
        with num_threads(threads):
            t = compare({"tq": lambda: F_q.int8_mm(a, b), "int_mm": lambda: torch._int_mm(a, b),
                         "fp32": lambda: torch.mm(af, bf)}, repeats=repeats)
        gops = 2 * m * n * k / t["tq"] / 1e9
        rows.append({"threads": threads, "M x K x N": f"{m}x{k}x{n}", "ms": t["tq"] * 1e3, "GOP/s": gops,
                     "of peak": gops / peak_gops if peak_gops else "",
                     "_int_mm GOP/s": 2 * m * n * k / t["int_mm"] / 1e9, "vs _int_mm": t["int_mm"] / t["tq"],
                     "vs fp32 mm": t["fp32"] / t["tq"]})
    return rows


def bench_dynamic_linear(threads: int, repeats: int) -> List[dict]:
    rows = []
    for k, n in LINEAR_SHAPES:
        linear = nn.Linear(k, n)
        w_q, w_scale = _per_channel_int8(linear.weight.detach())
        packed, w_sum = F_q.pack_int8_weight(w_q), w_q.sum(1, dtype=torch.int32)
        bias = linear.bias.detach()
        with torch_ao_engine("fbgemm"):
            ao_linear = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, torch.qint8)
        for m in LINEAR_ROWS:
            x = torch.randn(m, k)
            with num_threads(threads), torch.no_grad(), torch_ao_engine("fbgemm"):
                t = compare({"tq": lambda: F_q.dynamic_int8_linear(x, packed, w_sum, w_scale, bias, out_features=n),
                             "ao": lambda: ao_linear(x),
                             "fp32": lambda: nn.functional.linear(x, linear.weight, bias)}, repeats=repeats)
            rows.append({"threads": threads, "K x N": f"{k}x{n}", "M": m, "us": t["tq"] * 1e6,
                         "GOP/s": 2 * m * n * k / t["tq"] / 1e9, "weight GB/s": n * k / t["tq"] / 1e9,
                         "vs quantize_dynamic": t["ao"] / t["tq"],
                         "vs fp32 F.linear": t["fp32"] / t["tq"]})
    return rows


def bench_conv(threads: int, repeats: int) -> List[dict]:
    rows = []
    for name, c, size, oc, kernel, stride, padding in CONV_LAYERS:
        conv = nn.Conv2d(c, oc, kernel, stride, padding)
        w_q, w_scale = _per_channel_int8(conv.weight.detach())
        packed, w_sum = F_q.pack_conv_weight(w_q), w_q.sum((1, 2, 3), dtype=torch.int32)
        bias = conv.bias.detach()
        x_scale, x_zp = 0.05, 64
        with torch_ao_engine("x86"):
            ao_conv = torch.ao.nn.quantized.Conv2d(c, oc, kernel, stride, padding)
            ao_weight = torch.quantize_per_channel(conv.weight.detach(), w_scale.double(), torch.zeros(oc).long(), 0,
                                                   torch.qint8)
            ao_conv.set_weight_bias(ao_weight, bias)
            ao_conv.scale, ao_conv.zero_point = 0.1, 64
        for batch in CONV_BATCHES:
            xf = torch.randn(batch, c, size, size).contiguous(memory_format=torch.channels_last)
            x_q = torch.quantize_per_tensor(xf, x_scale, x_zp, torch.quint8)
            x_u8 = x_q.int_repr()  # channels-last uint8
            with num_threads(threads), torch.no_grad(), torch_ao_engine("x86"):
                t = compare({"tq": lambda: F_q.int8_conv2d(x_u8, x_scale, x_zp, packed, w_sum, w_scale, bias,
                                                           out_channels=oc, kernel_size=kernel, stride=stride,
                                                           padding=padding),
                             "ao": lambda: ao_conv(x_q),
                             "fp32": lambda: conv(xf)}, repeats=repeats)
            out = size // stride
            macs = batch * out * out * oc * c * kernel * kernel
            rows.append({"threads": threads, "layer": name, "batch": batch, "ms": t["tq"] * 1e3,
                         "GOP/s": 2 * macs / t["tq"] / 1e9, "vs ao Conv2d (x86)": t["ao"] / t["tq"],
                         "vs fp32 conv": t["fp32"] / t["tq"]})
    return rows


TABLES = {
    "int8_mm": (bench_int8_mm, ("threads", "M x K x N", "ms", "GOP/s", "of peak", "_int_mm GOP/s", "vs _int_mm",
                                "vs fp32 mm")),
    "linear": (bench_dynamic_linear, ("threads", "K x N", "M", "us", "GOP/s", "weight GB/s", "vs quantize_dynamic",
                                      "vs fp32 F.linear")),
    "conv": (bench_conv, ("threads", "layer", "batch", "ms", "GOP/s", "vs ao Conv2d (x86)", "vs fp32 conv")),
}


def run(tables: Sequence[str] = tuple(TABLES), threads: Sequence[int] = (1, 2), repeats: int = 9) -> List[dict]:
    """Rows of every requested table ("int8_mm", "linear", "conv"), each tagged with its table name."""
    return run_tables(TABLES, tables, threads, repeats)


def main(argv=None) -> None:
    tables_main(TABLES, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
