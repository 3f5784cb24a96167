"""A quantization-aware training step, eager and under torch.compile: a small CNN with BatchNorm (folded into its
convs), static activations (calibrated ranges that every step observes) and learned scales, against the float
model's step, eager and compiled.

    python -m benchmarks.bench_qat_compile [--threads 1] [--repeats 15] [--batch 32]

Interleaved medians in one process (1 thread: the calling thread's CPU time); each compiled step is compiled once
(inductor) before timing, and the table says how many graphs dynamo made of its forward.
"""
import argparse
import copy
import dataclasses
import platform

import torch
import torch.nn as nn

import torchquant as tq
from torchquant.config import QuantConfig, QuantSpec
from torchquant.timing import compare, latency_clock, markdown_table, num_threads

from benchmarks.bench_observers import qat_step

_STATIC = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor")
CONFIGS = {
    "float": None,
    "int8-static": "int8-static",
    "w4a8 static, learned scales": QuantConfig(weight=QuantSpec(bits=4, learn_scale=True),
                                               activation=dataclasses.replace(_STATIC, learn_scale=True)),
}


def cnn() -> nn.Module:
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def graph_count(model: nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(copy.deepcopy(model))(x).graph_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, CPU kernels "
          f"{tq.cpu_kernel_path()}")
    torch.manual_seed(0)
    base = cnn()
    x, target = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    for threads in args.threads:
        with num_threads(threads):
            clock, clock_name = latency_clock()
            steps, graphs = {}, {}
            for name, config in CONFIGS.items():
                model = copy.deepcopy(base).train()
                if config is not None:
                    model = tq.prepare(model, config)
                    model(x)  # (the first batch initialises ranges and learned scales)
                graphs[name] = graph_count(model, x)
                eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
                steps[(name, "eager")] = qat_step(eager, x, target, momentum=0.9)
                steps[(name, "compiled")] = qat_step(torch.compile(compiled), x, target, momentum=0.9)
                steps[(name, "compiled")]()  # compiled here, not inside the timing
            t = compare(steps, repeats=args.repeats, clock=clock)
            float_eager = t[("float", "eager")]
            rows = [{"model": name, "mode": mode, "graphs": graphs[name] if mode == "compiled" else "-",
                     "ms": s * 1e3, "vs float eager": s / float_eager,
                     "compiled vs eager": t[(name, "eager")] / s if mode == "compiled" else "-"}
                    for (name, mode), s in t.items()]
            print(f"\ntraining step (SGD), CNN 3-32-64-64-128 with BatchNorm, batch {args.batch} x 3 x 32 x 32, "
                  f"{threads} thread(s), {clock_name}, median of {args.repeats}")
            print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
