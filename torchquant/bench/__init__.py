"""Kernel benchmarks: each module has `run(...) -> list of row dicts` and `main(argv)`; `torchquant bench` runs
them through run_benchmarks, the scripts in benchmarks/ through main. (The model benchmarks are in benchmarks/.)"""
import importlib
import inspect
from typing import Callable, List, Optional, Sequence

from torchquant.timing import markdown_table

# torchquant/bench/<name>.py, run in this order; "gpu" measures the GPU, the others the CPU
BENCHMARKS = ("quantize", "gemm_cpu", "layers", "elementwise", "gpu")

# Arguments for each benchmark's run() under --quick: small sizes, one thread, few samples (only the arguments its
# run() takes are passed, so that the GPU ones may be left out on the CPU; tests/test_bench.py checks each is taken).
QUICK = {
    "quantize": {"sizes": (4 << 10, 64 << 10, 1 << 20), "repeats": 3},
    "gemm_cpu": {"tables": ("linear",), "repeats": 3},
    "layers": {"tables": ("linear",), "repeats": 3},
    "elementwise": {"tables": ("add",), "repeats": 3},
    "gpu": {"quant_numel": 16 << 20, "sections": ("quantize", "linear")},
}


def _run_kwargs(name: str, run, device: str, quick: bool, threads: Optional[int]) -> dict:
    wanted = dict(QUICK.get(name, {})) if quick else {}
    wanted["device"] = device
    if threads is not None or quick:
        wanted["threads"] = (threads or 1,)
    parameters = inspect.signature(run).parameters
    return {key: value for key, value in wanted.items() if key in parameters}


def _print_rows(title: str, rows: List[dict]) -> None:
    """Rows as Markdown tables, one per value of a 'table' key when the benchmark tags its rows."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row.get("table"), []).append({k: v for k, v in row.items() if k != "table"})
    for table, group in groups.items():
        print(f"\n## {title}{'' if table is None else ' / ' + str(table)}\n")
        print(markdown_table(group, list(dict.fromkeys(key for row in group for key in row))))


def run_benchmarks(names: Sequence[str], device: str, *, quick: bool, threads: Optional[int],
                   status: Callable[[str], None]) -> int:
    """Runs the named benchmarks that measure `device` ("cpu" or "cuda") and prints their tables; `status` gets a
    line per benchmark run or skipped. Returns how many ran."""
    ran = 0
    for name in names:
        if (name == "gpu") != (device == "cuda"):
            status(f"skipping {name}: it measures the {'GPU' if name == 'gpu' else 'CPU'} "
                   f"(--device {'cuda' if name == 'gpu' else 'cpu'})")
            continue
        module = importlib.import_module(f"torchquant.bench.{name}")
        kwargs = _run_kwargs(name, module.run, device, quick, threads)
        status(f"running {name} ({', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'defaults'}) ...")
        _print_rows(f"{name} ({device})", module.run(**kwargs))
        ran += 1
    return ran
