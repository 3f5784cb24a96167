"""ResNet's 3x3 convs on their own, as the integer pipeline calls them: torchquant's int8_conv2d (uint8 channels-last
input with the given zero point, uint8 output, bias, fused ReLU) against torch.ao's quantized conv2d_relu (x86
engine) on the same integers and float32 F.conv2d + ReLU on channels-last floats, 1 thread, thread CPU time (minimum
of interleaved samples, each a loop of calls of about 0.2 G multiply-adds). GMAC/s count every tap of every window,
the padding included; with --peak-gmacs (one core's u8 x s8 multiply-add peak) also its fraction. A zero point of 0
(ReLU outputs) lets both kernels skip taps in the padding; other zero points make torch.ao's kernel multiply them.
--grouped: ResNeXt-50 32x4d's grouped 3x3 convs (32 groups of 4 to 32 channels) instead of ResNet's.

    python -m benchmarks.resnet_convs [--batches 1 8] [--zero-point 0] [--repeats 9] [--peak-gmacs G] [--grouped]
"""
import argparse
import time

import torch

import torchquant.functional as F
from benchmarks.models import _quantized_engine, _quiet_torch_ao
from torchquant.timing import markdown_table, num_threads

CONVS = ((64, 56), (128, 28), (256, 14), (512, 7))  # channels in and out, output size (stride 1, padding 1)
GROUPED_CONVS = ((128, 56), (256, 28), (512, 14), (1024, 7))  # ResNeXt-50 32x4d's, 32 groups
RESNEXT_GROUPS = 32


def conv_kernels(batch: int, channels: int, size: int, zero_point: int, groups: int = 1) -> dict:
    """The kernels of one conv shape, each a call returning its output: torchquant's and torch.ao's on the same
    integers (a uint8 tensor, a quint8 one), float32's on their float values."""
    g = torch.Generator().manual_seed(channels)
    # about half the values at the zero point, as after a ReLU
    x = torch.randint(-100, 100, (batch, channels, size, size), generator=g).clamp(0, 255).to(torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (channels, channels // groups, 3, 3), dtype=torch.int8, generator=g)
    w_scale = torch.full((channels,), 0.001)
    bias = torch.randn(channels, generator=g)
    w_packed, w_sum = F.pack_conv_weight(w, groups), w.sum((1, 2, 3), dtype=torch.int32)
    x_ao = torch._make_per_tensor_quantized_tensor(x, 0.02, zero_point)
    w_ao = torch.quantize_per_channel(w.float() * 0.001, w_scale.double(), torch.zeros(channels, dtype=torch.long), 0,
                                      torch.qint8)
    packed_ao = torch.ops.quantized.conv2d_prepack(w_ao, bias, [1, 1], [1, 1], [1, 1], groups)
    x_float, w_float = (x.float() - zero_point) * 0.02, w.float() * 0.001
    return {
        "torchquant": lambda: F.int8_conv2d(x, 0.02, zero_point, w_packed, w_sum, w_scale, bias,
                                            out_channels=channels, kernel_size=3, padding=1, groups=groups,
                                            out_dtype=torch.uint8, out_scale=0.5, clamp_min=0.0),
        "torch.ao": lambda: torch.ops.quantized.conv2d_relu(x_ao, packed_ao, 0.5, 0),
        "float32": lambda: torch.relu_(torch.nn.functional.conv2d(x_float, w_float, bias, padding=1, groups=groups)),
    }


def conv_row(batch: int, channels: int, size: int, zero_point: int, repeats: int, peak_gmacs, groups: int = 1) -> dict:
    """One conv shape's row: the kernels' times and multiply-add rates."""
    kernels = conv_kernels(batch, channels, size, zero_point, groups)
    macs = batch * size * size * channels * (channels // groups) * 9
    calls = max(1, round(2e8 / macs))
    best = {name: float("inf") for name in kernels}
    for sample in range(repeats + 1):  # the first round warms up
        for name, kernel in kernels.items():
            start = time.thread_time()
            for _ in range(calls):
                kernel()
            if sample:
                best[name] = min(best[name], (time.thread_time() - start) / calls)
    row = {"conv": f"3x3/1 {channels}->{channels}" + (f" g{groups}" if groups > 1 else ""),
           "input": f"{batch}x{channels}x{size}x{size}",
           "ms": 1e3 * best["torchquant"], "torch.ao ms": 1e3 * best["torch.ao"],
           "vs torch.ao": best["torch.ao"] / best["torchquant"], "vs float32": best["float32"] / best["torchquant"],
           "GMAC/s": macs / best["torchquant"] / 1e9,
           "torch.ao GMAC/s": macs / best["torch.ao"] / 1e9}
    if peak_gmacs:
        row["% peak"] = 100 * row["GMAC/s"] / peak_gmacs
        row["torch.ao % peak"] = 100 * row["torch.ao GMAC/s"] / peak_gmacs
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resnet_convs", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--zero-point", type=int, default=0, help="the input's zero point (0: ReLU outputs)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved samples per conv (minimum)")
    parser.add_argument("--peak-gmacs", type=float, help="one core's int8 multiply-add peak")
    parser.add_argument("--grouped", action="store_true", help="ResNeXt-50 32x4d's grouped convs")
    args = parser.parse_args(argv)
    convs, groups = (GROUPED_CONVS, RESNEXT_GROUPS) if args.grouped else (CONVS, 1)
    with num_threads(1), torch.inference_mode(), _quiet_torch_ao(), _quantized_engine("x86"):
        rows = [conv_row(b, c, s, args.zero_point, args.repeats, args.peak_gmacs, groups)
                for b in args.batches for c, s in convs]
    columns = ["conv", "input", "ms", "torch.ao ms", "vs torch.ao", "vs float32", "GMAC/s", "torch.ao GMAC/s"]
    print(markdown_table(rows, columns + (["% peak", "torch.ao % peak"] if args.peak_gmacs else [])))


if __name__ == "__main__":
    main()
