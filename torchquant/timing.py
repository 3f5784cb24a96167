"""Measuring on this machine: interleaved median timings, a temporary torch thread count, and Markdown tables of
the results. Used by `torchquant report`/`demo` and the benchmarks; never used to assert anything."""
import contextlib
import os
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["busy_machine_note", "compare", "latency_clock", "markdown_table", "num_threads"]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def compare(fns: Dict[str, Callable[[], object]], *, device: str = "cpu", repeats: int = 15,
            min_sample_s: float = 0.02, statistic: Callable[[List[float]], float] = statistics.median,
            clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median (or `statistic`, e.g. min on a loaded machine) seconds per call of each function, sampled interleaved
    (A B C A B C ...) so that drift and noise of the machine fall on all of them alike. Each sample repeats a call
    enough times to last min_sample_s. `clock`: wall time by default; time.thread_time measures the CPU time of
    the calling thread (steadier on a loaded machine, and complete only for single-threaded calls)."""
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
            start = clock()
            for _ in range(inner[name]):
                fn()
            _sync(device)
            samples[name].append((clock() - start) / inner[name])
    return {name: statistic(s) for name, s in samples.items()}


def latency_clock(device: str = "cpu") -> Tuple[Callable[[], float], str]:
    """The clock for `compare` and its name: on the CPU with one torch thread, the calling thread's CPU time, which
    leaves out the time spent waiting for a core while other jobs load the machine; else wall time (the only
    complete measure of multi-threaded or GPU work)."""
    if not str(device).startswith("cuda") and torch.get_num_threads() == 1:
        return time.thread_time, "thread CPU time"
    return time.perf_counter, "wall time"


def busy_machine_note(device: str = "cpu") -> Optional[str]:
    """A warning for multi-threaded CPU wall times taken while the 1-minute load average exceeds the number of
    cores: torch's threads then wait for cores at every parallel region (a 2-thread model on a 2-core machine
    running other jobs read 80x slower), which one thread's CPU time does not count. None otherwise."""
    threads = torch.get_num_threads()
    if str(device).startswith("cuda") or threads == 1 or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"the machine was busy while timing (load average {load:.1f} on {cores} cores, {threads} torch "
            f"threads): wall times include waits for a core; --threads 1 measures the thread's CPU time instead")


@contextlib.contextmanager
def num_threads(count: int) -> Iterator[None]:
    """torch's intra-op CPU thread count set to `count` inside, the previous count restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def markdown_table(rows: List[dict], columns: Sequence[str]) -> str:
    """Rows of dicts as a Markdown table; floats with 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
