"""ResNet-18 and ResNet-50 (torchvision's architecture, written here: torchvision's PyPI wheels are CUDA builds that
do not import against the CPU torch), and on request ResNeXt-50 32x4d (its 3x3 convs in 32 groups), int8-static on
the CPU: torchquant's integer pipeline (preset int8-pipeline,
and the same with 7-bit weights or with 7-bit activations, which the AVX2 kernels multiply as bytes) and its
layer-by-layer conversion (int8-static) against torch.ao FX graph mode (x86 engine) and the float32 model, at batch 1
and 8, 224x224, 1 and 2 threads; and the output SQNR of each against float.

On a shared machine the 1-thread rows are better timed in thread CPU time (--timer thread: the interleaved minimum
of the calling thread's CPU time per call, which other processes do not inflate; --warm adds the same with each
variant's calls back to back, its weights and activations still in the caches, as when one model runs over and
over); 2-thread rows are always wall time (median of interleaved samples). --layers adds a per-layer table of the
converted models (thread CPU time of each graph node at 1 thread, summed per conv shape or op: alone, and inside whole
forwards) against torch.ao's, with the convs' multiply-add rate and its fraction of one core's peak: the rate of
the kernel path's multiply-add instruction measured on this core (torchquant.bench.timing.multiply_add_peak), or
--peak-gmacs.

Weights are random (torchvision's initialisation) with BatchNorm statistics taken from a few batches of random
images, so activations have the ranges of a trained network's; calibration uses other random images.

    python -m benchmarks.resnet [--models resnet18 resnet50 resnext50_32x4d] [--batches 1 8] [--threads 1 2] [--repeats 5]
                                [--timer wall|thread] [--warm] [--layers] [--peak-gmacs G]
                                [--without-rules RULE ...] [--output benchmarks/results/resnet-cpu.md]
"""
import argparse
import copy
import dataclasses
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
from torch import fx, nn

import torchquant
from benchmarks.models import (CPU_BASELINES, TORCH_AO, _engine_for, _quantized_engine, _quiet_torch_ao,
                               latency_rows, torch_ao_static, write_tables)
from torchquant.bench.timing import multiply_add_peak
from torchquant.graph import PIPELINE_RULES, pipeline_rules
from torchquant.timing import num_threads


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """groups, base_width: ResNeXt's (the 3x3 conv in groups of base_width channels per 64 of the stage's)."""
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample=None, groups: int = 1,
                 base_width: int = 64):
        super().__init__()
        width = channels * base_width // 64 * groups
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # stride on the 3x3 (ResNet v1.5)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision.models.ResNet's layout and initialisation (without its options)."""

    def __init__(self, block, layers: Sequence[int], block_options: Optional[dict] = None, num_classes: int = 1000):
        super().__init__()
        self.block_options = block_options or {}
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block, channels: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_channels != channels * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.in_channels, channels * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(channels * block.expansion))
        layers = [block(self.in_channels, channels, stride, downsample, **self.block_options)]
        self.in_channels = channels * block.expansion
        layers += [block(self.in_channels, channels, **self.block_options) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


ARCHITECTURES = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3)),
                 "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), {"groups": 32, "base_width": 4})}
DEFAULT_MODELS = ("resnet18", "resnet50")


def resnet(name: str, *, seed: int = 0) -> ResNet:
    """A ResNet in eval mode with random weights and BatchNorm statistics measured on random images."""
    torch.manual_seed(seed)
    return with_batchnorm_statistics(ResNet(*ARCHITECTURES[name]))


def with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """model in eval mode, its BatchNorm statistics measured on random images (the activation ranges of a trained
    network rather than those of fresh statistics)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 224, 224))
    return model.eval()


def sqnr_rows(model_name: str, variants: Dict[str, nn.Module], x: torch.Tensor) -> List[dict]:
    with torch.inference_mode(), _quiet_torch_ao():
        outputs = {}
        for name, model in variants.items():
            with _quantized_engine(_engine_for(name)):
                outputs[name] = model(x).float()
    reference = outputs["float"]
    return [{"model": model_name, "variant": name,
             "output SQNR dB": torchquant.functional.quantization_error(reference, y)["sqnr_db"]}
            for name, y in outputs.items() if name != "float"]


def thread_time_rows(model_name: str, variants: Dict[str, nn.Module], inputs: Dict[str, tuple], repeats: int,
                     warm: bool = False) -> List[dict]:
    """1-thread rows like latency_rows, timed in thread CPU time: per variant the minimum over `repeats` samples of
    one call each (after one more that warms up), interleaved across the variants, so that each call finds the caches
    holding the other variants' weights and activations; with `warm` each variant's calls run back to back, so that
    they find their own (a model run over and over on its own)."""
    rows = []
    rounds = range(repeats + 1)
    order = [(i, n) for n in variants for i in rounds] if warm else [(i, n) for i in rounds for n in variants]
    for input_name, args in inputs.items():
        best = {name: float("inf") for name in variants}
        with num_threads(1), torch.inference_mode(), _quiet_torch_ao():
            for i, name in order:
                with _quantized_engine(_engine_for(name)):
                    start = time.thread_time()
                    variants[name](*args)
                    if i > 0:
                        best[name] = min(best[name], time.thread_time() - start)
        reference = {column: next(best[n] for n in best if n.startswith(start)) for column, start in
                     CPU_BASELINES.items()}
        timer = "thread CPU, warm" if warm else "thread CPU"
        rows += [{"model": model_name, "input": input_name, "threads": 1, "timer": timer, "variant": name,
                  "ms": 1e3 * t, **{column: r / t for column, r in reference.items()}} for name, t in best.items()]
    return rows


def _is_conv_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    return hasattr(module, "in_channels") and hasattr(module, "kernel_size")


def residual_adds(gm: fx.GraphModule) -> Dict[str, str]:
    """{add node's name: the conv node's name} for each residual add (add, add_relu) whose input is a conv module's
    output that nothing else reads: torch.ao runs such an add as a node of its own where torchquant's pipeline adds
    in the conv's epilogue, so the tables count the two together (the first such input when both are convs)."""
    adds = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") in ("add", "add_relu", "iadd"):
            convs = [a for a in node.args if isinstance(a, fx.Node) and _is_conv_module(gm, a) and len(a.users) == 1]
            if convs:
                adds[node.name] = convs[0].name
    return adds


def _node_kind(gm: fx.GraphModule, node: fx.Node, args: tuple, with_add: bool = False) -> tuple:
    """(what a graph node computes: "conv KxK/S Cin->Cout" or the op's name, its first tensor's shape, multiply-adds
    of a conv); with_add: the conv's output goes to a residual add timed with it."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    fused_add = node.op == "call_function" and getattr(node.target, "__name__", "") == "integer_conv_add"
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "integer_layer" or fused_add:
        # torchquant's pipeline calls layers through integer_layer, or integer_conv_add with a residual add
        module, tensors = args[0], [args[1]]
    shape = tuple(tensors[0].shape) if tensors else ()
    if module is not None and hasattr(module, "in_channels") and hasattr(module, "kernel_size"):
        k, stride = module.kernel_size, module.stride
        k, stride = (k if isinstance(k, tuple) else (k, k)), (stride if isinstance(stride, tuple) else (stride,))
        b, _, h, w = shape
        pad = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
        out_h, out_w = (h + 2 * pad[0] - k[0]) // stride[0] + 1, (w + 2 * pad[-1] - k[1]) // stride[-1] + 1
        macs = b * out_h * out_w * module.out_channels * module.in_channels // module.groups * k[0] * k[1]
        kind = f"conv {k[0]}x{k[1]}/{stride[0]} {module.in_channels}->{module.out_channels}"
        return kind + (" + add" if fused_add or with_add else ""), shape, macs
    if module is not None:
        return type(module).__name__, shape, 0
    return getattr(node.target, "__name__", str(node.target)), shape, 0


def node_times(gm: fx.GraphModule, x: torch.Tensor, repeats: int) -> Dict[tuple, list]:
    """{(kind, input shape): [calls, seconds alone, multiply-adds, seconds in forward]} of gm at 1 thread: each
    node's minimum thread CPU time over `repeats` calls on the inputs the forward gives it (alone: caches warm), and
    its minimum over `repeats` whole forwards of its time inside them (its inputs and weights where the nodes before
    it left them). A residual add after a conv (residual_adds) counts in that conv's entry, not as a call."""
    totals: Dict[tuple, list] = defaultdict(lambda: [0, 0.0, 0, 0.0])
    keys: Dict[str, tuple] = {}
    conv_of_add = residual_adds(gm)
    convs_with_add = set(conv_of_add.values())
    in_forward: Dict[str, float] = defaultdict(lambda: float("inf"))

    class Timed(fx.Interpreter):
        def __init__(self, alone: bool):
            super().__init__(gm)
            self.alone = alone

        def run_node(self, node):
            if node.op not in ("call_module", "call_function", "call_method"):
                return super().run_node(node)
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            if not self.alone:
                start = time.thread_time()
                out = getattr(self, node.op)(node.target, args, kwargs)
                in_forward[node.name] = min(in_forward[node.name], time.thread_time() - start)
                return out
            best = float("inf")
            for _ in range(repeats):
                start = time.thread_time()
                out = getattr(self, node.op)(node.target, args, kwargs)
                best = min(best, time.thread_time() - start)
            if node.name in conv_of_add:
                keys[node.name] = keys[conv_of_add[node.name]]
                totals[keys[node.name]][1] += best
                return out
            kind, shape, macs = _node_kind(gm, node, args, with_add=node.name in convs_with_add)
            keys[node.name] = (kind, shape)
            entry = totals[(kind, shape)]
            entry[0] += 1
            entry[1] += best
            entry[2] += macs
            return out

    with num_threads(1), torch.inference_mode():
        Timed(alone=True).run(x)
        for _ in range(repeats):
            Timed(alone=False).run(x)
    for name, seconds in in_forward.items():
        totals[keys[name]][3] += seconds
    return totals


def layer_rows(model_name: str, ours: fx.GraphModule, theirs: fx.GraphModule, x: torch.Tensor, repeats: int,
               peak_gmacs: Optional[float]) -> List[dict]:
    """Per conv shape (and per other op) of the model: torchquant's time against torch.ao's."""
    with _quiet_torch_ao():
        with _quantized_engine("fbgemm"):
            mine = node_times(ours, x, repeats)
        with _quantized_engine("x86"):
            ao = node_times(theirs, x, repeats)
    rows = []
    for key in sorted(set(mine) | set(ao), key=lambda k: -max(mine.get(k, [0, 0.0])[1], ao.get(k, [0, 0.0])[1])):
        kind, shape = key
        calls, ours_s, macs, ours_in_forward = mine.get(key, [0, 0.0, 0, 0.0])
        ao_calls, ao_s, ao_macs, ao_in_forward = ao.get(key, [0, 0.0, 0, 0.0])
        row = {"model": model_name, "input": f"batch {x.shape[0]}", "op": kind, "input shape": "x".join(map(str,
               shape)), "calls": max(calls, ao_calls), "ms": 1e3 * ours_s if calls else "", "torch.ao ms": 1e3 * ao_s
               if ao_calls else "", "ms in forward": 1e3 * ours_in_forward if calls else "",
               "torch.ao ms in forward": 1e3 * ao_in_forward if ao_calls else ""}
        if calls and ao_calls:
            row["vs torch.ao"] = ao_s / ours_s
            row["vs torch.ao in forward"] = ao_in_forward / ours_in_forward
        if macs and calls:
            row["GMAC/s"] = macs / ours_s / 1e9
            row["torch.ao GMAC/s"] = ao_macs / ao_s / 1e9 if ao_calls else ""
            if peak_gmacs:
                row["% peak"] = 100 * macs / ours_s / 1e9 / peak_gmacs
                row["torch.ao % peak"] = 100 * ao_macs / ao_s / 1e9 / peak_gmacs if ao_calls else ""
        rows.append(row)
    total_ours, total_ao = (sum(v[1] for v in t.values()) for t in (mine, ao))
    forward_ours, forward_ao = (sum(v[3] for v in t.values()) for t in (mine, ao))
    rows.append({"model": model_name, "input": f"batch {x.shape[0]}", "op": "all nodes", "ms": 1e3 * total_ours,
                 "torch.ao ms": 1e3 * total_ao, "vs torch.ao": total_ao / total_ours,
                 "ms in forward": 1e3 * forward_ours, "torch.ao ms in forward": 1e3 * forward_ao,
                 "vs torch.ao in forward": forward_ao / forward_ours})
    return rows


_PIPELINE = torchquant.QuantConfig.preset("int8-pipeline")
PIPELINE_7BIT_WEIGHTS = dataclasses.replace(_PIPELINE, weight=dataclasses.replace(_PIPELINE.weight, bits=7))
# uint8 activations in [0, 127], as torch.ao's x86 engine quantizes them (reduce_range)
PIPELINE_7BIT_ACTIVATIONS = dataclasses.replace(_PIPELINE,
                                                activation=dataclasses.replace(_PIPELINE.activation, bits=7))


def run(models=("resnet18", "resnet50"), batches=(1, 8), threads=(1, 2), repeats: int = 5, timer: str = "wall",
        layers: bool = False, peak_gmacs: Optional[float] = None, build=None, warm: bool = False,
        without_rules: Sequence[str] = ()) -> List[dict]:
    """The tables' rows for each model name, built by build(name) (default: resnet); with a variant of the integer
    pipeline planned without each rule of without_rules (torchquant.graph.PIPELINE_RULES: what the rule gains)."""
    rows = []
    generator = torch.Generator().manual_seed(1)
    for name in models:
        model = (build or resnet)(name)
        calibration = [torch.randn(8, 3, 224, 224, generator=generator) for _ in range(2)]
        variants = {"float": model,
                    "torchquant int8-pipeline": torchquant.quantize_model(copy.deepcopy(model), "int8-pipeline",
                                                                          calibration=calibration),
                    # weights in [-64, 64]: the AVX2 kernels multiply them as bytes (the same speed on AVX-512)
                    "torchquant int8-pipeline, 7-bit weights": torchquant.quantize_model(
                        copy.deepcopy(model), PIPELINE_7BIT_WEIGHTS, calibration=calibration),
                    # activations below 128: on AVX2 any int8 weight is multiplied as bytes too
                    "torchquant int8-pipeline, 7-bit activations": torchquant.quantize_model(
                        copy.deepcopy(model), PIPELINE_7BIT_ACTIVATIONS, calibration=calibration),
                    "torchquant int8-static (layer by layer)": torchquant.quantize_model(
                        copy.deepcopy(model), "int8-static", calibration=calibration),
                    f"{TORCH_AO} static (FX, x86)": torch_ao_static(model, calibration)}
        for rule in without_rules:
            with pipeline_rules(**{rule: False}):
                variants[f"torchquant int8-pipeline without {rule}"] = torchquant.quantize_model(
                    copy.deepcopy(model), "int8-pipeline", calibration=calibration)
        rows += [{"table": "sqnr", **row}
                 for row in sqnr_rows(name, variants, torch.randn(8, 3, 224, 224, generator=generator))]
        inputs = {f"batch {b} x 3x224x224": (torch.randn(b, 3, 224, 224, generator=generator),) for b in batches}
        wall_threads = [t for t in threads if t != 1 or timer == "wall"]
        if timer == "thread" and 1 in threads:
            rows += [{"table": "latency", **row} for row in thread_time_rows(name, variants, inputs, repeats)]
            if warm:
                rows += [{"table": "latency", **row}
                         for row in thread_time_rows(name, variants, inputs, repeats, warm=True)]
        rows += [{"table": "latency", "timer": "wall", **row}
                 for row in latency_rows(name, variants, inputs, wall_threads, repeats)]
        if layers:
            for (x,) in inputs.values():
                rows += [{"table": "layers", **row} for row in layer_rows(
                    name, variants["torchquant int8-pipeline"], variants[f"{TORCH_AO} static (FX, x86)"], x,
                    repeats, peak_gmacs)]
    return rows


TITLES = {"latency": "Latency (CPU, 224x224, random weights)", "sqnr": "Output SQNR against float32 (batch 8)",
          "layers": "Per layer, 1 thread (thread CPU time of each graph node, summed per conv shape or op)"}
COLUMNS = {"latency": ["model", "input", "threads", "timer", "variant", "ms", "vs float", "vs torch.ao"],
           "sqnr": ["model", "variant", "output SQNR dB"],
           "layers": ["model", "input", "op", "input shape", "calls", "ms", "torch.ao ms", "vs torch.ao", "GMAC/s",
                      "torch.ao GMAC/s", "% peak", "torch.ao % peak", "ms in forward", "torch.ao ms in forward",
                      "vs torch.ao in forward"]}
LEGEND = ("ms: wall time (median of interleaved samples) or thread CPU time (minimum of interleaved samples, "
          "1 thread; warm: of each variant's calls back to back), as the timer column says; vs float / vs torch.ao: "
          "speed-up over that baseline (> 1 is faster). Per layer: the minimum of repeated calls of each node on its "
          "own (warm caches), so the sum differs from a whole forward; conv + add: the conv with the residual add "
          "after it (in torchquant's epilogue; torch.ao's add_relu node counted in its conv's row); in forward: the "
          "minimum over whole forwards of the node's time inside them (its inputs and weights where the nodes before "
          "it left them).")


def main(argv=None, prog: str = "python -m benchmarks.resnet", architectures=tuple(ARCHITECTURES), build=resnet,
         title: str = "ResNet int8-static on the CPU", description: str = __doc__,
         default_models: Sequence[str] = DEFAULT_MODELS) -> None:
    """The command line of this benchmark, for the given model names built by build(name) (default_models unless
    --models says)."""
    parser = argparse.ArgumentParser(prog=prog, description=description.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(architectures), default=list(default_models))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved samples per timing (median)")
    parser.add_argument("--timer", choices=["wall", "thread"], default="wall",
                        help="how 1-thread rows are timed: wall time (median) or thread CPU time (minimum)")
    parser.add_argument("--layers", action="store_true", help="add the per-layer table (1 thread)")
    parser.add_argument("--warm", action="store_true",
                        help="with --timer thread, also time each variant's 1-thread calls back to back (caches warm)")
    parser.add_argument("--peak-gmacs", type=float,
                        help="one core's int8 multiply-add peak for the per-layer table (default: measured here)")
    parser.add_argument("--without-rules", nargs="+", choices=PIPELINE_RULES, default=[],
                        help="add a variant of the integer pipeline planned without each of these rules")
    parser.add_argument("--output", help="also write the tables, with the machine and date, to this Markdown file")
    args = parser.parse_args(argv)
    peak_gmacs = args.peak_gmacs
    if args.layers and peak_gmacs is None:
        peak_gmacs = multiply_add_peak() / 1e9 or None  # (none on the scalar path)
    rows = run(args.models, args.batches, args.threads, args.repeats, args.timer, args.layers, peak_gmacs, build,
               args.warm, args.without_rules)
    write_tables(rows, title, args.output, TITLES, COLUMNS, LEGEND)


if __name__ == "__main__":
    main()
