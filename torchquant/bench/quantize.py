"""CPU benchmark of quantize / dequantize / fake_quantize (per-tensor and per-channel) against PyTorch's own
quantization ops and against copy_ bandwidth, at 1 and 2 threads.

Bytes counted per element: quantize 4 read + 1 written, dequantize 1 + 4, fake_quantize 4 + 4 (float32).
`--reuse-memory` sets glibc's mmap threshold high so that the large outputs of successive calls reuse freed heap
memory instead of fresh mmap'ed pages (each of which is page-faulted and zeroed by the kernel on first touch);
it applies to every function timed, PyTorch's included.
"""
import argparse
import ctypes
import os
import platform
import time
import warnings
from typing import List

import torch

from torchquant import functional as F_q
from torchquant._ops import cpu_kernel_path
from torchquant.bench.timing import copy_bandwidth
from torchquant.timing import compare, markdown_table, num_threads

COLUMNS = ["op", "granularity", "threads", "busy threads", "ours ms", "torch ms", "GB/s", "copy GB/s", "of copy", "vs torch"]
BYTES_PER_ELEMENT = {"quantize": 5, "dequantize": 5, "fake_quantize": 8}


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


def cases(numel: int, channels: int):
    """(op, granularity, ours, torch) for each benchmarked op; x is float32 [channels, numel / channels]."""
    x = torch.randn(channels, numel // channels) * 3
    scale, zp = 0.05, 3
    scales = torch.rand(channels) * 0.05 + 0.01
    zps = torch.randint(-10, 10, (channels,), dtype=torch.int32)
    q = F_q.quantize(x, scale, zp)
    qc = F_q.quantize(x, scales, zps, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's quantized tensors are deprecated; they are the baseline here
        q_torch = torch.quantize_per_tensor(x, scale, zp, torch.qint8)
        qc_torch = torch.quantize_per_channel(x, scales.double(), zps.long(), 0, torch.qint8)
    return [
        ("quantize", "per-tensor", lambda: F_q.quantize(x, scale, zp),
         lambda: torch.quantize_per_tensor(x, scale, zp, torch.qint8)),
        ("quantize", "per-channel", lambda: F_q.quantize(x, scales, zps, axis=0),
         lambda: torch.quantize_per_channel(x, scales, zps, 0, torch.qint8)),
        ("dequantize", "per-tensor", lambda: F_q.dequantize(q, scale, zp), q_torch.dequantize),
        ("dequantize", "per-channel", lambda: F_q.dequantize(qc, scales, zps, axis=0), qc_torch.dequantize),
        ("fake_quantize", "per-tensor", lambda: F_q.fake_quantize(x, scale, zp),
         lambda: torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127)),
        ("fake_quantize", "per-channel", lambda: F_q.fake_quantize(x, scales, zps, axis=0),
         lambda: torch.fake_quantize_per_channel_affine(x, scales, zps, 0, -128, 127)),
    ]


def run(numel: int = 64 << 20, channels: int = 4096, threads=(1, 2), repeats: int = 7) -> List[dict]:
    rows = []
    for n_threads in threads:
        with num_threads(n_threads):
            copy_bw = copy_bandwidth(4 * numel, repeats=repeats)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for op, granularity, ours, theirs in cases(numel, channels):
                    t = compare({"ours": ours, "torch": theirs}, repeats=repeats)
                    bandwidth = BYTES_PER_ELEMENT[op] * numel / t["ours"]
                    rows.append({"op": op, "granularity": granularity, "threads": n_threads,
                                 "busy threads": busy_threads(ours),
                                 "ours ms": t["ours"] * 1e3, "torch ms": t["torch"] * 1e3, "GB/s": bandwidth / 1e9,
                                 "copy GB/s": copy_bw / 1e9, "of copy": bandwidth / copy_bw,
                                 "vs torch": t["torch"] / t["ours"]})
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=64 << 20, help="float32 elements (default 64M)")
    parser.add_argument("--channels", type=int, default=4096, help="channels of the per-channel cases (axis 0)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--reuse-memory", action="store_true", help="keep freed outputs in the heap (see above)")
    args = parser.parse_args(argv)
    if args.numel % args.channels:
        parser.error("--numel must be a multiple of --channels")
    if args.reuse_memory:
        reuse_freed_memory()
    rows = run(args.numel, args.channels, tuple(args.threads), args.repeats)
    print(f"quantize family, {args.numel} float32 elements, {cpu_name()} (CPU kernels: {cpu_kernel_path()}), "
          f"torch {torch.__version__}, "
          f"{'outputs reuse freed heap memory' if args.reuse_memory else 'default allocator (fresh pages per call)'}")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
