"""Converted int8-dynamic QuantLinear against torch.ao quantize_dynamic's Linear (fbgemm) on every MiniLM/BERT-base
Linear shape, timed by the calling thread's CPU time: on a loaded shared machine the wall clock also counts the
time the process waited for a core, the thread CPU time does not (with more than one thread it misses the other
threads' work, so use it at --threads 1 and read the wall columns otherwise).

Each row: both layers interleaved in one process, REPEATS samples of ~4 ms of calls each; minimum CPU time and
minimum / median wall time per call. One JSON object per row on stdout (so runs of two builds can be compared).

    python -m benchmarks.bench_linear_cpu_time [--threads 1] [--repeats 11]
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn

import torchquant as tq
from torchquant.bench.layers import LINEAR_ROWS, LINEAR_SHAPES
from torchquant.bench.timing import torch_ao_engine


def samples(fns: dict, repeats: int) -> dict:
    """{name: (wall seconds per call, thread CPU seconds per call) lists}, interleaved (ABBA...)."""
    inner = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(0.004 / (time.perf_counter() - start)))
    out = {name: ([], []) for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(inner[name]):
                fns[name]()
            out[name][1].append((time.thread_time() - cpu) / inner[name])
            out[name][0].append((time.perf_counter() - wall) / inner[name])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.no_grad(), torch_ao_engine("fbgemm"):
        for k, n in LINEAR_SHAPES:
            torch.manual_seed(0)
            linear = nn.Linear(k, n)
            layer = tq.nn.QuantLinear.from_float(linear, "int8-dynamic").eval().convert()
            ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, torch.qint8)
            for m in LINEAR_ROWS:
                x = torch.randn(m, k)
                s = samples({"tq": lambda: layer(x), "ao": lambda: ao(x)}, args.repeats)
                row = {"threads": args.threads, "K x N": f"{k}x{n}", "M": m}
                for name, (wall, cpu) in s.items():
                    row[f"{name} cpu min us"] = min(cpu) * 1e6
                    row[f"{name} wall min us"] = min(wall) * 1e6
                    row[f"{name} wall median us"] = statistics.median(wall) * 1e6
                row["vs quantize_dynamic (cpu min)"] = row["ao cpu min us"] / row["tq cpu min us"]
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
