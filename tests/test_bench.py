"""The kernel benchmarks' own logic (the numbers they print are never asserted)."""
import torch
from torch import nn

from torchquant import _C
from torchquant.bench import layers
from torchquant.nn import QuantLinear


def test_module_overhead_is_timed_without_the_kernel(monkeypatch):
    """The kernel's run-to-run noise dwarfs the module's own cost, so the overhead is timed with the kernel
    replaced: apart from the one call that makes the stub's output, every timed call must miss the kernel."""
    layer = QuantLinear.from_float(nn.Linear(16, 8), "int8-dynamic").eval().convert()
    kernel = _C.int8_linear_dynamic
    calls = []

    def counted(*args):
        calls.append(1)
        return kernel(*args)
    monkeypatch.setattr(_C, "int8_linear_dynamic", counted)
    x = torch.randn(4, 16)
    layer(x)
    assert len(calls) == 1, "the converted int8-dynamic Linear should run the fused kernel"
    with torch.no_grad():
        seconds = layers.module_overhead_s(layer, x, repeats=1)
    assert len(calls) == 2
    assert _C.int8_linear_dynamic is counted  # the stub is gone again
    assert isinstance(seconds, float)


def test_pool_benchmarks_time_what_they_name():
    """The average-pool tables run every shape once, with the integer path, the float path and torch.ao's."""
    from torchquant.bench import elementwise
    rows = elementwise.run(("avg_pool", "adaptive_avg_pool"), threads=(1,), repeats=1)
    assert len(rows) == len(elementwise.AVG_POOL_SHAPES) + len(elementwise.ADAPTIVE_AVG_POOL_SHAPES)
    assert all(r["ours us"] > 0 and r["float pool us"] > 0 and r["torch.ao us"] > 0 for r in rows)
    assert [r["pool"] for r in rows[-4:]] == ["14 -> 7 (fixed window)"] * 2 + ["7 -> 6"] * 2


def test_product_benchmark_times_what_it_names():
    """The squeeze-excitation product table runs every shape once, against the float round trip and torch.ao's
    mul."""
    from torchquant.bench import elementwise
    rows = elementwise.run(("product",), threads=(1,), repeats=1)
    assert len(rows) == len(elementwise.PRODUCT_SHAPES)
    assert all(r["ours us"] > 0 and r["float round trip us"] > 0 and r["torch.ao us"] > 0 for r in rows)


def test_quick_arguments_are_taken_by_each_benchmark():
    """`torchquant bench --quick` passes each benchmark only the arguments its run() takes: an argument renamed in
    run() was dropped without a word (the quantize table ran every size up to 64M elements under --quick)."""
    import importlib
    import inspect

    from torchquant.bench import BENCHMARKS, QUICK
    for name in BENCHMARKS:
        parameters = inspect.signature(importlib.import_module(f"torchquant.bench.{name}").run).parameters
        assert set(QUICK.get(name, {})) <= set(parameters), name
