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
