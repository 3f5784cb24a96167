"""The mse observer's range search (w4a8-dynamic's weights, and any `observer="mse"`): torchquant's
fake_quantize_error kernel against the same search in PyTorch ops (search_in_torch_ops), and a quantization-aware
training step of an MLP with it against float.

    python -m benchmarks.bench_observers [--threads 1 2] [--repeats 15]

Interleaved medians in one process; 1 thread in the calling thread's CPU time, more in wall time. `G terms/s`:
clippings x elements per second of the kernel.
"""
import argparse
import copy
import dataclasses
import platform

import torch
import torch.nn as nn

import torchquant as tq
from torchquant import functional as F_q
from torchquant.config import QuantConfig, QuantSpec
from torchquant.observers import MSE_SHRINK_FACTORS, _minmax, _mse_range, qparams_from_range
from torchquant.timing import compare, latency_clock, markdown_table, num_threads

WEIGHTS = [(1024, 1024), (384, 1536), (3072, 768), (64, 576), (256, 27)]  # [out, in * kernel] rows of a weight


def search_in_torch_ops(rows: torch.Tensor, spec: QuantSpec):
    """The baseline: the same search in PyTorch ops, as torchquant made it before the kernel: clippings batched into
    calls of about 1M elements (the rows tiled once), each call's error computed in place in its output."""
    lo, hi = _minmax(rows)
    channels = rows.shape[0]
    factors = torch.tensor(MSE_SHRINK_FACTORS)
    per_call = max(1, (1 << 20) // rows.numel())
    tiled = rows if per_call == 1 else rows.repeat(min(per_call, factors.numel()), 1)
    errors = []
    for chunk in factors.split(per_call):
        scale, zero_point = qparams_from_range((chunk[:, None] * lo).reshape(-1), (chunk[:, None] * hi).reshape(-1),
                                               spec)
        candidates = tiled[:chunk.numel() * channels]
        approx = F_q.fake_quantize(candidates, scale, zero_point, bits=spec.bits, signed=spec.signed,
                                   rounding=spec.rounding, axis=0)
        errors.append(approx.sub_(candidates).square_().sum(dim=1).reshape(chunk.numel(), channels))
    best = torch.cat(errors).argmin(dim=0)
    return factors[best] * lo, factors[best] * hi


def qat_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, momentum: float = 0.0):
    """A training step of model on (x, target): cross-entropy, SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)

    def step():
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    spec = QuantConfig.preset("w4a8-dynamic").weight
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, CPU kernels "
          f"{tq.cpu_kernel_path()}")
    for threads in args.threads:
        with num_threads(threads):
            clock, clock_name = latency_clock()
            rows = []
            for shape in WEIGHTS:
                w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
                t = compare({"ours": lambda: _mse_range(w, spec), "torch": lambda: search_in_torch_ops(w, spec)},
                            repeats=args.repeats, clock=clock)
                rows.append({"weight rows": "x".join(map(str, shape)), "ours ms": t["ours"] * 1e3,
                             "torch ops ms": t["torch"] * 1e3, "vs torch ops": t["torch"] / t["ours"],
                             "G terms/s": len(MSE_SHRINK_FACTORS) * w.numel() / t["ours"] / 1e9})
            print(f"\nmse range search, {threads} thread(s), {clock_name}, median of {args.repeats}")
            print(markdown_table(rows, list(rows[0])))

            torch.manual_seed(0)
            base = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 10))
            x, target = torch.randn(64, 512), torch.randint(0, 10, (64,))
            preset = QuantConfig.preset("w4a8-dynamic")
            configs = {"float": None, "w4a8-dynamic": preset,
                       "w4a8-dynamic, minmax weights": QuantConfig(
                           weight=dataclasses.replace(preset.weight, observer="minmax"),
                           activation=preset.activation),
                       "int8-dynamic": "int8-dynamic"}
            steps = {}
            for name, config in configs.items():
                model = copy.deepcopy(base).train()
                steps[name] = qat_step(model if config is None else tq.prepare(model, config), x, target)
            t = compare(steps, repeats=args.repeats, clock=clock)
            rows = [{"model": name, "ms": s * 1e3, "vs float": s / t["float"]} for name, s in t.items()]
            print(f"\nQAT step (SGD), MLP 512-1024-1024-10, batch 64, {threads} thread(s), {clock_name}")
            print(markdown_table(rows, ["model", "ms", "vs float"]))


if __name__ == "__main__":
    main()
