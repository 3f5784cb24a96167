"""Timing for the benchmarks: interleaved runs, medians, ratio tables. Never used to assert anything."""
import argparse
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def compare(fns: Dict[str, Callable[[], object]], *, device: str = "cpu", repeats: int = 15,
            min_sample_s: float = 0.02) -> Dict[str, float]:
    """Median seconds per call of each function, sampled interleaved (A B C A B C ...) so that drift and noise
    of the machine fall on all of them alike. Each sample repeats a call enough times to last min_sample_s."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up (allocations, lazy init, caches)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        inner[name] = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(numel_bytes: int, *, device: str = "cpu", repeats: int = 15) -> float:
    """Bytes per second (read + write counted) of `dst.copy_(src)` on buffers of numel_bytes each."""
    src = torch.empty(numel_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = compare({"copy": lambda: dst.copy_(src)}, device=device, repeats=repeats)["copy"]
    return 2 * numel_bytes / seconds


def markdown_table(rows: List[dict], columns: Sequence[str]) -> str:
    """Rows of dicts as a Markdown table; floats with 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# A table registry maps a table name to (function(threads, repeats) -> rows, the columns to print).
TableRegistry = Dict[str, Tuple[Callable[[int, int], List[dict]], Sequence[str]]]


def run_tables(registry: TableRegistry, tables: Sequence[str], threads: Sequence[int], repeats: int) -> List[dict]:
    """Rows of every requested table at every thread count, each tagged with its table name."""
    rows = []
    for table in tables:
        for n in threads:
            rows += [{"table": table, **r} for r in registry[table][0](n, repeats)]
    return rows


def tables_main(registry: TableRegistry, description: str, argv=None) -> None:
    """Command line of a table-registry benchmark: --tables, --threads, --repeats; prints Markdown tables."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tables", nargs="+", choices=list(registry), default=list(registry))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved samples per timing (median)")
    args = parser.parse_args(argv)
    rows = run_tables(registry, args.tables, args.threads, args.repeats)
    for table in args.tables:
        print(f"\n### {table}\n")
        print(markdown_table([r for r in rows if r["table"] == table], registry[table][1]))
