"""Converted layers (float in, float out) against PyTorch's quantized layers, on the CPU.

- QuantLinear int8-dynamic on MiniLM/BERT shapes against torch.ao.quantization.quantize_dynamic's Linear (fbgemm)
  and float F.linear, with the module's own cost per call around its kernel.
- QuantConv2d int8-static on ResNet-style layers, float channels-last input, against the same pipeline in
  torch.ao (quantize_per_tensor -> torch.ao.nn.quantized.Conv2d (x86) -> dequantize) and the float conv.
- small: the per-call fixed cost at small sizes, where it dominates: small Linears (int8-dynamic and
  int8-static) against quantize_dynamic and float, and the layers of the digits CNN (torchquant.examples).
- few_channels: the first conv of a network on 1- to 3-channel images (grayscale, spectrograms, RGB) with its
  ReLU, contiguous float in and out: QuantConv2d int8-static and the int8-pipeline model against the float conv.
"""
from __future__ import annotations

import contextlib
from typing import List, Sequence
from unittest import mock

import torch
from torch import nn

import torchquant as tq
from torchquant import _C
from torchquant.bench.timing import run_tables, tables_main, torch_ao_engine
from torchquant.timing import compare, num_threads

LINEAR_SHAPES = ((384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768))  # in, out: MiniLM, BERT-base
LINEAR_ROWS = (1, 16, 128, 512)
CONV_LAYERS = (  # name, in_channels, size, out_channels, kernel, stride, padding
    ("3x3 64->64 @56", 64, 56, 64, 3, 1, 1),
    ("3x3 128->256 s2 @28", 128, 28, 256, 3, 2, 1),
    ("1x1 256->1024 @14", 256, 14, 1024, 1, 1, 0),
)
CONV_BATCHES = (1, 8)
SMALL_LINEARS = ((384, 384, 1), (768, 768, 16), (64, 10, 32))  # in, out, rows
FEW_CHANNEL_CONVS = (  # in_channels, size, out_channels, kernel, batch
    (1, 32, 16, 3, 32), (1, 28, 32, 3, 64), (2, 32, 16, 3, 32), (1, 64, 16, 7, 8), (3, 32, 16, 3, 32),
    (3, 224, 64, 7, 1),
)
DIGITS_BATCH = 32


@contextlib.contextmanager
def _settings(threads: int, engine: str):
    """Thread count and torch.ao engine for one measurement, without autograd."""
    with num_threads(threads), torch_ao_engine(engine), torch.no_grad():
        yield


def module_overhead_s(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Seconds per call a converted QuantLinear spends outside its kernel call (nn.Module dispatch, the forward's
    Python): layer(x) with the kernel call (torchquant._C.int8_linear_dynamic, which checks x in C++ and calls the
    op) replaced by a stub that returns a ready output, minus the stub alone. Timed without the kernel because the
    kernel's own run-to-run noise is far larger than this cost at most shapes."""
    out = layer(x)

    def stub(*args):
        return out
    with mock.patch.object(_C, "int8_linear_dynamic", stub):
        t = compare({"layer": lambda: layer(x), "stub": lambda: stub(x)}, repeats=repeats)
    return t["layer"] - t["stub"]


def bench_linear(threads: int, repeats: int) -> List[dict]:
    rows = []
    for k, n in LINEAR_SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(k, n)
        layer = tq.nn.QuantLinear.from_float(linear, "int8-dynamic").eval().convert()
        with _settings(threads, "fbgemm"):
            ao_linear = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, torch.qint8)
        for m in LINEAR_ROWS:
            x = torch.randn(m, k)
            with _settings(threads, "fbgemm"):
                t = compare({"layer": lambda: layer(x), "ao": lambda: ao_linear(x), "fp32": lambda: linear(x)},
                            repeats=repeats)
                overhead = module_overhead_s(layer, x, repeats)
            rows.append({"threads": threads, "in x out": f"{k}x{n}", "M": m, "us": t["layer"] * 1e6,
                         "vs quantize_dynamic": t["ao"] / t["layer"], "vs fp32": t["fp32"] / t["layer"],
                         "module overhead us": overhead * 1e6})
    return rows


def bench_conv(threads: int, repeats: int) -> List[dict]:
    rows = []
    for name, c, size, oc, kernel, stride, padding in CONV_LAYERS:
        torch.manual_seed(0)
        conv = nn.Conv2d(c, oc, kernel, stride, padding)
        calibration = [torch.randn(2, c, size, size)]
        model = tq.quantize_model(nn.Sequential(conv), "int8-static", calibration, inplace=False).eval()
        layer = model[0]
        x_scale, x_zp = layer.input_quantizer.scale.item(), layer.input_zero_point
        with _settings(threads, "x86"):
            ao_conv = torch.ao.nn.quantized.Conv2d(c, oc, kernel, stride, padding)
            w_scale = layer.weight_scale.double()
            ao_weight = torch.quantize_per_channel(conv.weight.detach(), w_scale, torch.zeros(oc).long(), 0,
                                                   torch.qint8)
            ao_conv.set_weight_bias(ao_weight, conv.bias.detach())
            ao_conv.scale, ao_conv.zero_point = 0.1, 64
        for batch in CONV_BATCHES:
            x = torch.randn(batch, c, size, size).contiguous(memory_format=torch.channels_last)

            def ao_pipeline():
                return ao_conv(torch.quantize_per_tensor(x, x_scale, x_zp, torch.quint8)).dequantize()

            with _settings(threads, "x86"):
                t = compare({"layer": lambda: layer(x), "ao": ao_pipeline, "fp32": lambda: conv(x)},
                            repeats=repeats)
            rows.append({"threads": threads, "layer": name, "batch": batch, "ms": t["layer"] * 1e3,
                         "vs ao Conv2d pipeline": t["ao"] / t["layer"], "vs fp32": t["fp32"] / t["layer"]})
    return rows


def _small_linear_rows(threads: int, repeats: int) -> List[dict]:
    rows = []
    for k, n, m in SMALL_LINEARS:
        torch.manual_seed(0)
        linear = nn.Linear(k, n)
        x = torch.randn(m, k)
        with _settings(threads, "fbgemm"):
            ao_linear = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, torch.qint8)
            for config in ("int8-dynamic", "int8-static"):
                layer = tq.quantize_model(nn.Sequential(linear), config, [x], inplace=False).eval()
                t = compare({"layer": lambda: layer(x), "ao": lambda: ao_linear(x), "fp32": lambda: linear(x)},
                            repeats=repeats)
                rows.append({"threads": threads, "layer": f"Linear {k}->{n}", "config": config, "rows": m,
                             "us": t["layer"] * 1e6, "ao us": t["ao"] * 1e6, "fp32 us": t["fp32"] * 1e6})
    return rows


def _digits_rows(threads: int, repeats: int) -> List[dict]:
    from torchquant.examples import DigitsCNN

    torch.manual_seed(0)
    cnn = DigitsCNN().eval()
    x = torch.randn(DIGITS_BATCH, 1, 8, 8)
    inputs = {}  # each layer's float input in the float model (torch.ao has no counterpart of these configs)
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0]))
             for m in (cnn.conv1, cnn.conv2, cnn.fc1, cnn.fc2)]
    with torch.no_grad():
        cnn(x)
    for h in hooks:
        h.remove()
    rows = []
    for name in ("conv1", "conv2", "fc1", "fc2"):
        float_layer = getattr(cnn, name)
        layer_x = inputs[float_layer]
        for config in ("int8-dynamic", "int8-static"):
            layer = tq.quantize_model(nn.Sequential(float_layer), config, [layer_x], inplace=False).eval()
            with _settings(threads, "fbgemm"):
                t = compare({"layer": lambda: layer(layer_x), "fp32": lambda: float_layer(layer_x)}, repeats=repeats)
            rows.append({"threads": threads, "layer": f"digits {name} {tuple(layer_x.shape)}", "config": config,
                         "rows": layer_x.shape[0], "us": t["layer"] * 1e6,
                         "fp32 us": t["fp32"] * 1e6})
    return rows


def bench_small(threads: int, repeats: int) -> List[dict]:
    return _small_linear_rows(threads, repeats) + _digits_rows(threads, repeats)


def bench_few_channels(threads: int, repeats: int) -> List[dict]:
    rows = []
    for c, size, oc, kernel, batch in FEW_CHANNEL_CONVS:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(c, oc, kernel, padding=kernel // 2), nn.ReLU()).eval()
        x = torch.randn(batch, c, size, size)
        layer = tq.quantize_model(model, "int8-static", [x], inplace=False).eval()
        pipeline = tq.quantize_model(model, "int8-pipeline", [x], inplace=False).eval()
        with _settings(threads, "x86"):
            t = compare({"layer": lambda: layer(x), "pipeline": lambda: pipeline(x), "fp32": lambda: model(x)},
                        repeats=repeats)
        rows.append({"threads": threads, "conv": f"{kernel}x{kernel} {c}->{oc} @{size}", "batch": batch,
                     "int8-static ms": t["layer"] * 1e3, "int8-pipeline ms": t["pipeline"] * 1e3,
                     "fp32 ms": t["fp32"] * 1e3, "int8-static vs fp32": t["fp32"] / t["layer"],
                     "int8-pipeline vs fp32": t["fp32"] / t["pipeline"]})
    return rows


TABLES = {
    "linear": (bench_linear, ("threads", "in x out", "M", "us", "vs quantize_dynamic", "vs fp32",
                              "module overhead us")),
    "conv": (bench_conv, ("threads", "layer", "batch", "ms", "vs ao Conv2d pipeline", "vs fp32")),
    "small": (bench_small, ("threads", "layer", "config", "rows", "us", "ao us", "fp32 us")),
    "few_channels": (bench_few_channels, ("threads", "conv", "batch", "int8-static ms", "int8-pipeline ms",
                                          "fp32 ms", "int8-static vs fp32", "int8-pipeline vs fp32")),
}


def run(tables: Sequence[str] = tuple(TABLES), threads: Sequence[int] = (1, 2), repeats: int = 9) -> List[dict]:
    """Rows of every requested table ("linear", "conv", "small", "few_channels"), each tagged with its table
    name."""
    return run_tables(TABLES, tables, threads, repeats)


def main(argv=None) -> None:
    tables_main(TABLES, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
