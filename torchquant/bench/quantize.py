"""CPU benchmark of the quantize family (quantize / dequantize / fake_quantize per tensor and per channel, float32
and bfloat16, and quantize_per_token) against PyTorch's own ops, at every size from 4K to 64M elements, at 1 and 2
threads. torchquant and PyTorch are timed interleaved in one process.

Bytes counted per element: quantize 4 read + 1 written, dequantize 1 + 4, fake_quantize 4 + 4 (float32; bfloat16
halves the float side); "of copy" compares that with `copy_` of a float32 buffer of the same elements. "output
memory" says whether successive calls of torchquant's op reuse freed memory for their output ("reused") or get fresh
pages, each page-faulted and zeroed by the kernel on first touch ("fresh"): glibc serves large blocks with mmap
(above its threshold, at most 32 MiB by default); torchquant's CPU outputs up to 64 MiB come from its cache of
freed outputs (torchquant.set_cpu_output_cache), PyTorch's from glibc. `--reuse-memory` sets glibc's mmap threshold
high so that every output reuses freed heap memory; it applies to every function timed, PyTorch's included. `--cpu-time` times the 1-thread rows in CPU time of the calling thread
(`time.thread_time`: it leaves out the time the thread waited for a core on a shared machine; the "clock" column
says which rows); 2-thread rows are always wall time. The load average is printed before and after.
"""
import argparse
import ctypes
import os
import platform
import resource
import statistics
import time
import warnings
from typing import List, Sequence

import torch

from torchquant import functional as F_q
from torchquant import reference
from torchquant._ops import cpu_kernel_path
from torchquant.bench.timing import copy_bandwidth
from torchquant.timing import compare, markdown_table, num_threads

COLUMNS = ["op", "granularity", "dtype", "elements", "threads", "clock", "busy threads", "output memory", "ours us",
           "torch us", "vs torch", "GB/s", "of copy"]
SIZES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def reuse_freed_memory() -> None:
    """Keep large freed blocks in the heap (glibc mallopt), so big outputs are not page-faulted on every call."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31)):
        raise RuntimeError("mallopt failed: cannot keep freed memory in the heap")


def _cpu_ticks_per_thread() -> dict:
    ticks = {}
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks[task] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def busy_threads(fn, seconds: float = 0.3):
    """How many OS threads of this process did a real share (>= 25% of the busiest) of the CPU work of calling fn
    for `seconds`: proof that at::parallel_for really runs on several threads. None where /proc is missing."""
    if not os.path.isdir("/proc/self/task"):
        return None
    before = _cpu_ticks_per_thread()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
    used = [t - before.get(task, 0) for task, t in _cpu_ticks_per_thread().items()]
    return sum(u >= 0.25 * max(used) for u in used) if max(used) > 0 else None


def bytes_per_element(op: str, dtype: str) -> int:
    """Bytes read + written per element: the float side (4 or 2) and the int8 side (1)."""
    float_bytes = 2 if dtype == "bfloat16" else 4
    return 2 * float_bytes if op == "fake_quantize" else float_bytes + 1


def output_memory(fn, calls: int = 5) -> str:
    """"fresh" when each call of fn page-faults about its output's pages (new memory from the OS), else "reused"."""
    out = fn()
    out_bytes = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))
    del out
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
    return "fresh" if faults >= 0.5 * out_bytes / PAGE else "reused"


def shape_of(numel: int) -> tuple:
    """[channels, numel / channels]: per-channel cases quantize along dim 0 (a weight's output channels)."""
    channels = min(4096, max(64, numel >> 12))
    return channels, numel // channels


def cases(numel: int, channels_last: bool = False):
    """(op, granularity, dtype, ours, torch) for each benchmarked op at numel elements; channels_last: of an
    activation [N, 64, 8, 8] laid out channels-last, per channel along dim 1 (no per-token row)."""
    channels, cols = shape_of(numel)
    x = torch.randn(channels, cols) * 3
    axis = 0
    if channels_last:
        x, channels, axis = x.view(-1, 64, 8, 8).contiguous(memory_format=torch.channels_last), 64, 1
    x_bf16 = x.bfloat16()
    scale, zp = 0.05, 3
    scales = torch.rand(channels) * 0.05 + 0.01
    zps = torch.randint(-10, 10, (channels,), dtype=torch.int32)
    q = F_q.quantize(x, scale, zp)
    qc = F_q.quantize(x, scales, zps, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's quantized tensors are deprecated; they are the baseline here
        q_torch = torch.quantize_per_tensor(x, scale, zp, torch.qint8)
        qc_torch = torch.quantize_per_channel(x, scales.double(), zps.long(), axis, torch.qint8)
    rows = [
        ("quantize", "per-tensor", "float32", lambda: F_q.quantize(x, scale, zp),
         lambda: torch.quantize_per_tensor(x, scale, zp, torch.qint8)),
        ("quantize", "per-tensor", "bfloat16", lambda: F_q.quantize(x_bf16, scale, zp),
         lambda: torch.quantize_per_tensor(x_bf16.float(), scale, zp, torch.qint8)),  # takes float32 only
        ("quantize", "per-channel", "float32", lambda: F_q.quantize(x, scales, zps, axis=axis),
         lambda: torch.quantize_per_channel(x, scales, zps, axis, torch.qint8)),
        ("quantize", "per-channel", "bfloat16", lambda: F_q.quantize(x_bf16, scales, zps, axis=axis),
         lambda: torch.quantize_per_channel(x_bf16.float(), scales, zps, axis, torch.qint8)),
        ("dequantize", "per-tensor", "float32", lambda: F_q.dequantize(q, scale, zp), q_torch.dequantize),
        ("dequantize", "per-channel", "float32", lambda: F_q.dequantize(qc, scales, zps, axis=axis),
         qc_torch.dequantize),
        ("fake_quantize", "per-tensor", "float32", lambda: F_q.fake_quantize(x, scale, zp),
         lambda: torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127)),
        ("fake_quantize", "per-tensor", "bfloat16", lambda: F_q.fake_quantize(x_bf16, scale, zp),
         lambda: torch.fake_quantize_per_tensor_affine(x_bf16, scale, zp, -128, 127)),
        ("fake_quantize", "per-channel", "float32", lambda: F_q.fake_quantize(x, scales, zps, axis=axis),
         lambda: torch.fake_quantize_per_channel_affine(x, scales, zps, axis, -128, 127)),
        ("fake_quantize", "per-channel", "bfloat16", lambda: F_q.fake_quantize(x_bf16, scales, zps, axis=axis),
         lambda: torch.fake_quantize_per_channel_affine(x_bf16, scales, zps, axis, -128, 127)),
    ]
    if channels_last:
        return rows
    tokens = x.view(-1, 1024) if numel >= 1024 * 64 else x  # rows of a hidden size as an activation has
    return rows + [
        # PyTorch has no per-token op: its baseline is the same computation in PyTorch ops (torchquant.reference)
        ("quantize_per_token", f"rows of {tokens.shape[1]}", "float32", lambda: F_q.quantize_per_token(tokens),
         lambda: reference.quantize_per_token(tokens)),
    ]


def run(sizes: Sequence[int] = SIZES, threads: Sequence[int] = (1, 2), repeats: int = 15,
        statistic=statistics.median, cpu_time: bool = False, channels_last: bool = False) -> List[dict]:
    """One row per (size, thread count, op): statistic (median by default) of `repeats` interleaved samples;
    cpu_time: 1-thread rows in CPU time of this thread (see the module docstring); channels_last: see cases."""
    rows = []
    for numel in sizes:
        for n_threads in threads:
            clock = time.thread_time if cpu_time and n_threads == 1 else time.perf_counter
            with num_threads(n_threads):
                copy_bw = copy_bandwidth(4 * numel, repeats=repeats, clock=clock)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for op, granularity, dtype, ours, theirs in cases(numel, channels_last):
                        t = compare({"ours": ours, "torch": theirs}, repeats=repeats, statistic=statistic,
                                    clock=clock)
                        bandwidth = bytes_per_element(op, dtype) * numel / t["ours"]
                        rows.append({"op": op, "granularity": granularity, "dtype": dtype, "elements": numel,
                                     "threads": n_threads, "clock": "cpu" if clock is time.thread_time else "wall",
                                     "busy threads": busy_threads(ours, 0.1),
                                     "output memory": output_memory(ours),
                                     "ours us": t["ours"] * 1e6, "torch us": t["torch"] * 1e6,
                                     "vs torch": t["torch"] / t["ours"], "GB/s": bandwidth / 1e9,
                                     "of copy": bandwidth / copy_bw})
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


def size_label(numel: int) -> str:
    return f"{numel >> 20}M" if numel >= 1 << 20 else f"{numel >> 10}K"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="float elements (default 4K-64M)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved samples per timing")
    parser.add_argument("--min", action="store_true", help="report the minimum of the samples, not the median "
                        "(steadier on a loaded machine)")
    parser.add_argument("--reuse-memory", action="store_true", help="keep freed outputs in the heap (see above)")
    parser.add_argument("--cpu-time", action="store_true", help="1-thread rows in thread CPU time (see above)")
    parser.add_argument("--channels-last", action="store_true", help="inputs [N, 64, 8, 8] laid out channels-last, "
                        "per channel along dim 1")
    args = parser.parse_args(argv)
    if args.reuse_memory:
        reuse_freed_memory()
    load_before = load_average()
    rows = run(args.sizes, tuple(args.threads), args.repeats, min if args.min else statistics.median, args.cpu_time,
               args.channels_last)
    for row in rows:
        row["elements"] = size_label(row["elements"])
    layout = "channels-last [N, 64, 8, 8] inputs" if args.channels_last else "contiguous inputs"
    print(f"quantize family on {layout}, {cpu_name()} (CPU kernels: {cpu_kernel_path()}), torch {torch.__version__}, "
          f"{'minimum' if args.min else 'median'} of {args.repeats} interleaved samples, "
          f"{'outputs reuse freed heap memory' if args.reuse_memory else 'default allocator'}; "
          f"load average (1 min) {load_before} before, {load_average()} after")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
