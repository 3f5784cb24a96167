"""CPU benchmark of the integer pipeline's element-wise ops on ResNet activation shapes (channels-last), at 1 and 2
threads, every row timed interleaved with its baselines in this process:

- residual add: quantized_add of two uint8 tensors requantized to uint8 (with and without the fused ReLU) against
  torch.ao's `torch.ops.quantized.add` / `add_relu` on quint8 tensors (x86 engine) and a float32 add (`a + b`, and
  `relu(a + b)`, on the dequantized values); bytes moved 2 read + 1 written per element (the float add: 8 + 4),
  "of copy" compares ours with `copy_` bandwidth at the same size.
- product: a squeeze-excitation product as quantized_mul (uint8 MobileNetV3 activations, channels-last, times a uint8
  gate [N, C, 1, 1], requantized to uint8) against the float round trip it replaces in an integer pipeline
  (dequantize, the product with the float gate, quantize) and torch.ao's `torch.ops.quantized.mul` on quint8
  tensors (x86 engine, the gate broadcast too). Thread CPU time at 1 thread.
- max-pool: quantized_max_pool2d 3x3 stride 2 (ResNet's stem) on uint8 against torch's float32 max_pool2d (torch's
  own integer kernel fails on channels-last inputs of more than 127 pixels).
- lookup: a hardswish as quantized_lookup on uint8 MobileNetV3 activations (channels-last) against the float round
  trip it replaces in an integer pipeline (dequantize, F.hardswish, quantize), torch.ao's quantized hardswish on
  quint8 (x86 engine), torch indexing (`table[x.long()]`) and our kernel's plain byte loop (the path it runs where
  the CPU lacks AVX-512 VBMI). At 1 thread the times are the calling thread's CPU time (time.thread_time).
- average pool: an integer pipeline's average pool (quantized_avg_pool2d's exact window sums, then quantize: uint8
  in, uint8 out) on DenseNet / Inception / ResNet-D pool inputs against the float path it replaces (torch's float32
  avg_pool2d of the dequantized tensor, then quantize) and torch.ao's quantized avg_pool2d on quint8 (x86 engine;
  it keeps the input's scale rather than requantizing). Thread CPU time at 1 thread.
- adaptive average pool: the same for adaptive average pools of VGG / AlexNet classifiers at other input sizes than
  224 (quantized_adaptive_avg_pool2d: a fixed window where the output size divides the input's, else the op
  quantized_adaptive_avg_pool2d's exact window sums) against torch's float32 adaptive_avg_pool2d of the
  dequantized tensor, then quantize, and torch.ao's quantized adaptive_avg_pool2d on quint8.
"""
import os
import time
from typing import List, Sequence

import torch

from torchquant import functional as F_q
from torchquant._ops import cpu_kernel_path
from torchquant.bench.timing import copy_bandwidth, run_tables, tables_main, torch_ao_engine
from torchquant.timing import compare, num_threads

ADD_SHAPES = (  # name, batch, channels, size: the outputs of ResNet-18 / ResNet-50 stages, where residual adds are
    ("R18 stage 1", 1, 64, 56),
    ("R50 stage 1", 1, 256, 56),
    ("R50 stage 2", 1, 512, 28),
    ("R50 stage 3", 1, 1024, 14),
    ("R50 stage 4", 1, 2048, 7),
    ("R50 stage 1 b8", 8, 256, 56),
)
PRODUCT_SHAPES = (  # name, batch, channels, size: MobileNetV3-Large's squeeze-excitation products
    ("V3 stage 2 SE", 1, 72, 28),
    ("V3 stage 3 SE", 1, 120, 28),
    ("V3 stage 4 SE", 1, 672, 14),
    ("V3 stage 5 SE", 1, 960, 7),
    ("V3 stage 3 SE b8", 8, 120, 28),
)
POOL_SHAPES = (("R50 stem", 1, 64, 112), ("R50 stem b8", 8, 64, 112))
LOOKUP_SHAPES = (  # name, batch, channels, size: MobileNetV3-Large activations that a hardswish reads
    ("V3 stem", 1, 16, 112),
    ("V3 stage 3 expand", 1, 240, 28),
    ("V3 stage 4 expand", 1, 480, 14),
    ("V3 stage 5 expand", 1, 960, 7),
    ("V3 stage 3 expand b8", 8, 240, 28),
)

AVG_POOL_SHAPES = (  # name, batch, channels, size, (kernel, stride, padding, ceil_mode, count_include_pad)
    ("DenseNet-121 transition 1", 1, 128, 56, (2, 2, 0, False, True)),
    ("DenseNet-121 transition 1 b8", 8, 128, 56, (2, 2, 0, False, True)),
    ("Inception-v3 pool branch", 1, 192, 35, (3, 1, 1, False, True)),
    ("Inception-v3 pool branch b8", 8, 192, 35, (3, 1, 1, False, True)),
    ("ResNet-D shortcut", 1, 256, 56, (2, 2, 0, True, False)),
    ("ResNet-D shortcut b8", 8, 256, 56, (2, 2, 0, True, False)),
)
ADAPTIVE_AVG_POOL_SHAPES = (  # name, batch, channels, size, output size
    ("VGG-16 classifier at 448", 1, 512, 14, 7),
    ("VGG-16 classifier at 448 b8", 8, 512, 14, 7),
    ("AlexNet classifier at 256", 1, 256, 7, 6),
    ("AlexNet classifier at 256 b8", 8, 256, 7, 6),
)


def _uint8(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=g)
    return x.contiguous(memory_format=torch.channels_last)


def bench_add(threads: int, repeats: int) -> List[dict]:
    rows = []
    a_scale, a_zp, b_scale, b_zp, out_scale, out_zp = 0.05, 120, 0.03, 130, 0.07, 100
    for name, batch, channels, size in ADD_SHAPES:
        a, b = _uint8(batch, channels, size, 0), _uint8(batch, channels, size, 1)
        numel = a.numel()
        with torch_ao_engine("x86"):
            qa = torch._make_per_tensor_quantized_tensor(a, a_scale, a_zp)
            qb = torch._make_per_tensor_quantized_tensor(b, b_scale, b_zp)
            fa, fb = qa.dequantize(), qb.dequantize()
            for relu in (False, True):
                ours = lambda: F_q.quantized_add(a, a_scale, a_zp, b, b_scale, b_zp, torch.uint8, out_scale,  # noqa
                                                 out_zp, relu)
                ao_op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
                ao = lambda: ao_op(qa, qb, out_scale, out_zp)  # noqa: E731
                flt = (lambda: torch.relu(fa + fb)) if relu else (lambda: fa + fb)
                with num_threads(threads):
                    copy_bw = copy_bandwidth(numel, repeats=repeats)
                    t = compare({"ours": ours, "ao": ao, "float": flt}, repeats=repeats)
                bandwidth = 3 * numel / t["ours"]
                rows.append({"threads": threads, "shape": f"{name} [{batch}, {channels}, {size}, {size}]",
                             "relu": relu, "ours us": t["ours"] * 1e6, "torch.ao us": t["ao"] * 1e6,
                             "vs torch.ao": t["ao"] / t["ours"], "float us": t["float"] * 1e6,
                             "vs float": t["float"] / t["ours"], "GB/s": bandwidth / 1e9,
                             "of copy": bandwidth / copy_bw})
    return rows


def bench_product(threads: int, repeats: int) -> List[dict]:
    rows = []
    x_scale, x_zp, gate_scale, gate_zp, out_scale, out_zp = 0.05, 110, 1 / 255, 0, 0.04, 100
    for name, batch, channels, size in PRODUCT_SHAPES:
        x = _uint8(batch, channels, size, 6)
        gate = torch.randint(0, 256, (batch, channels, 1, 1), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(7))
        gate_float = F_q.dequantize(gate, gate_scale, gate_zp)
        with torch_ao_engine("x86"):
            qx = torch._make_per_tensor_quantized_tensor(x, x_scale, x_zp)
            qgate = torch._make_per_tensor_quantized_tensor(gate, gate_scale, gate_zp)
        fns = {"ours": lambda: F_q.quantized_mul(x, x_scale, x_zp, gate, gate_scale, gate_zp, torch.uint8, out_scale,
                                                 out_zp),
               "float": lambda: F_q.quantize(F_q.dequantize(x, x_scale, x_zp) * gate_float, out_scale, out_zp,
                                             signed=False),
               "ao": lambda: torch.ops.quantized.mul(qx, qgate, out_scale, out_zp)}
        with torch_ao_engine("x86"), num_threads(threads):
            t = compare(fns, repeats=repeats, clock=time.thread_time if threads == 1 else time.perf_counter)
        rows.append({"threads": threads, "shape": f"{name} [{batch}, {channels}, {size}, {size}]",
                     "ours us": t["ours"] * 1e6, "float round trip us": t["float"] * 1e6,
                     "vs float": t["float"] / t["ours"], "torch.ao us": t["ao"] * 1e6,
                     "vs torch.ao": t["ao"] / t["ours"], "GB/s": 2 * x.numel() / t["ours"] / 1e9})
    return rows


def bench_max_pool(threads: int, repeats: int) -> List[dict]:
    rows = []
    for name, batch, channels, size in POOL_SHAPES:
        x = _uint8(batch, channels, size, 2)
        xf = x.float()
        with num_threads(threads):
            t = compare({"ours": lambda: F_q.quantized_max_pool2d(x, 3, 2, 1),
                         "float": lambda: torch.nn.functional.max_pool2d(xf, 3, 2, 1)}, repeats=repeats)
        rows.append({"threads": threads, "shape": f"{name} [{batch}, {channels}, {size}, {size}]",
                     "ours us": t["ours"] * 1e6, "float us": t["float"] * 1e6, "vs float": t["float"] / t["ours"]})
    return rows


def _on_path(isa: str, fn):
    """fn run with the CPU kernels forced onto one instruction-set path (the variable is read on every call)."""
    def call():
        before = os.environ.get("TORCHQUANT_CPU_ISA")
        os.environ["TORCHQUANT_CPU_ISA"] = isa
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["TORCHQUANT_CPU_ISA"]
            else:
                os.environ["TORCHQUANT_CPU_ISA"] = before
    return call


def bench_lookup(threads: int, repeats: int) -> List[dict]:
    rows = []
    in_scale, in_zp, out_scale, out_zp = 0.04, 128, 0.03, 13
    codes = F_q.dequantize(torch.arange(256, dtype=torch.uint8), in_scale, in_zp)
    table = F_q.quantize(torch.nn.functional.hardswish(codes), out_scale, out_zp, signed=False)
    for name, batch, channels, size in LOOKUP_SHAPES:
        x = _uint8(batch, channels, size, 3)
        with torch_ao_engine("x86"):
            qx = torch._make_per_tensor_quantized_tensor(x, in_scale, in_zp)
        fns = {
            "ours": _on_path(cpu_kernel_path(), lambda: F_q.quantized_lookup(x, table)),  # (the same overhead)
            "loop": _on_path("scalar", lambda: F_q.quantized_lookup(x, table)),
            "ao": lambda: torch.ops.quantized.hardswish(qx, out_scale, out_zp),
            "index": lambda: table[x.long()],
            "float": lambda: F_q.quantize(torch.nn.functional.hardswish(F_q.dequantize(x, in_scale, in_zp)),
                                          out_scale, out_zp, signed=False),
        }
        with torch_ao_engine("x86"), num_threads(threads):
            t = compare(fns, repeats=repeats, clock=time.thread_time if threads == 1 else time.perf_counter)
        rows.append({"threads": threads, "shape": f"{name} [{batch}, {channels}, {size}, {size}]",
                     "ours us": t["ours"] * 1e6, "byte loop us": t["loop"] * 1e6, "vs loop": t["loop"] / t["ours"],
                     "torch.ao us": t["ao"] * 1e6, "vs torch.ao": t["ao"] / t["ours"],
                     "table[x.long()] us": t["index"] * 1e6, "vs index": t["index"] / t["ours"],
                     "float round trip us": t["float"] * 1e6, "vs float": t["float"] / t["ours"],
                     "GB/s": 2 * x.numel() / t["ours"] / 1e9})
    return rows


def _pool_rows(threads: int, repeats: int, cases) -> List[dict]:
    """A row per (shape, pool, x, ours(x), float(dequantized x), torch.ao(quint8 x)) of cases, x uint8."""
    rows = []
    in_scale, in_zp, out_scale, out_zp = 0.04, 128, 0.02, 120
    for shape, pool, x, ours, in_float, in_ao in cases:
        xf = F_q.dequantize(x, in_scale, in_zp)
        with torch_ao_engine("x86"):
            qx = torch._make_per_tensor_quantized_tensor(x, in_scale, in_zp)
        # (both outputs quantized in memory order: channels-last, as the pipeline's quantize_input does)
        fns = {"ours": lambda: F_q.quantize(ours(x, in_scale, in_zp), out_scale, out_zp, signed=False),
               "float": lambda: F_q.quantize(in_float(xf), out_scale, out_zp, signed=False),
               "ao": lambda: in_ao(qx)}
        with torch_ao_engine("x86"), num_threads(threads):
            t = compare(fns, repeats=repeats, clock=time.thread_time if threads == 1 else time.perf_counter)
        rows.append({"threads": threads, "shape": shape, "pool": pool, "ours us": t["ours"] * 1e6,
                     "float pool us": t["float"] * 1e6, "vs float": t["float"] / t["ours"],
                     "torch.ao us": t["ao"] * 1e6, "vs torch.ao": t["ao"] / t["ours"]})
    return rows


def bench_avg_pool(threads: int, repeats: int) -> List[dict]:
    avg_pool2d = torch.nn.functional.avg_pool2d
    return _pool_rows(threads, repeats, [
        (f"{name} [{batch}, {channels}, {size}, {size}]",
         f"{args[0]}/{args[1]}/{args[2]}{' ceil' if args[3] else ''}{'' if args[4] else ' excl. pad'}",
         _uint8(batch, channels, size, 4),
         lambda x, scale, zp, args=args: F_q.quantized_avg_pool2d(x, scale, zp, *args),
         lambda x, args=args: avg_pool2d(x, *args), lambda x, args=args: avg_pool2d(x, *args))
        for name, batch, channels, size, args in AVG_POOL_SHAPES])


def bench_adaptive_avg_pool(threads: int, repeats: int) -> List[dict]:
    adaptive_avg_pool2d = torch.nn.functional.adaptive_avg_pool2d
    return _pool_rows(threads, repeats, [
        (f"{name} [{batch}, {channels}, {size}, {size}]",
         f"{size} -> {out}" + (" (fixed window)" if size % out == 0 else ""), _uint8(batch, channels, size, 5),
         lambda x, scale, zp, out=out: F_q.quantized_adaptive_avg_pool2d(x, scale, zp, out),
         lambda x, out=out: adaptive_avg_pool2d(x, out), lambda x, out=out: adaptive_avg_pool2d(x, out))
        for name, batch, channels, size, out in ADAPTIVE_AVG_POOL_SHAPES])


TABLES = {
    "add": (bench_add, ["threads", "shape", "relu", "ours us", "torch.ao us", "vs torch.ao", "float us", "vs float",
                        "GB/s", "of copy"]),
    "product": (bench_product, ["threads", "shape", "ours us", "float round trip us", "vs float", "torch.ao us",
                                "vs torch.ao", "GB/s"]),
    "max_pool": (bench_max_pool, ["threads", "shape", "ours us", "float us", "vs float"]),
    "lookup": (bench_lookup, ["threads", "shape", "ours us", "byte loop us", "vs loop", "torch.ao us", "vs torch.ao",
                              "table[x.long()] us", "vs index", "float round trip us", "vs float", "GB/s"]),
    "avg_pool": (bench_avg_pool, ["threads", "shape", "pool", "ours us", "float pool us", "vs float", "torch.ao us",
                                  "vs torch.ao"]),
    "adaptive_avg_pool": (bench_adaptive_avg_pool, ["threads", "shape", "pool", "ours us", "float pool us",
                                                    "vs float", "torch.ao us", "vs torch.ao"]),
}


def run(tables: Sequence[str] = tuple(TABLES), threads: Sequence[int] = (1, 2), repeats: int = 9) -> List[dict]:
    """Rows of every requested table at every thread count."""
    return run_tables(TABLES, tables, threads, repeats)


def main(argv=None) -> None:
    tables_main(TABLES, __doc__.split("\n\n")[0], argv)
