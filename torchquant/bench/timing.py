"""The benchmarks' side of timing: copy bandwidth, the CPU's multiply-add peak and the table-registry command line
(the timing itself is torchquant.timing)."""
import argparse
import contextlib
import time
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from torchquant._ops import cpu_kernel_path
from torchquant.timing import compare, markdown_table


def copy_bandwidth(numel_bytes: int, *, device: str = "cpu", repeats: int = 15,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes per second (read + write counted) of `dst.copy_(src)` on buffers of numel_bytes each, timed by
    `clock` (see torchquant.timing.compare)."""
    src = torch.empty(numel_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = compare({"copy": lambda: dst.copy_(src)}, device=device, repeats=repeats, clock=clock)["copy"]
    return 2 * numel_bytes / seconds


def multiply_add_peak(repeats: int = 5, iterations: int = 10_000_000) -> float:
    """Multiply-adds per second of one core running nothing but the CPU kernel path's integer multiply-add
    instruction on independent accumulators (tdpbusd on avx512_amx; vpdpbusd on avx512_vnni; vpmaddwd + vpaddd, the
    exact AVX2 path's pair, on avx2), in thread CPU time, the best of `repeats` runs: the physical limit of the int8 GEMMs and convs on
    this core (times the thread count for more). 0.0 on the scalar path."""
    return max(torch.ops.torchquant.cpu_multiply_add_peak(iterations) for _ in range(repeats))


@contextlib.contextmanager
def torch_ao_engine(engine: str):
    """torch.backends.quantized.engine set to `engine` inside, with torch.ao's warnings silenced: it warns that it
    is deprecated on every use, and it is still the baseline users have."""
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = engine
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


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
    print(f"CPU kernels: {cpu_kernel_path()}, torch {torch.__version__}")
    for table in args.tables:
        print(f"\n### {table}\n")
        print(markdown_table([r for r in rows if r["table"] == table], registry[table][1]))
