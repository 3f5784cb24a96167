"""Real models on a GPU: torchquant's converted layers against the bf16 model, the baseline there, in one process.

Four parts, each written to --out as models-gpu-<part>.json and .md as soon as it ends:
- bert: a BERT-base-shaped encoder (12 post-norm layers, hidden 768, 12 heads, feed-forward 3072; random weights, a
  fixed seed) on [32, 128, 768] bf16 hidden states, in fp32, bf16 and torchquant int8-dynamic (converted from the
  bf16 model on the device: every Linear runs per-token quantize + int8 GEMM with the fused epilogue): latency and
  the output's cosine similarity to the fp32 model.
- minilm: all-MiniLM-L6-v2 on the device in fp32 (the quality reference), bf16 (the speed baseline) and quantized
  by torchquant from the bf16 model on the device (int8-dynamic, w4a8-dynamic, int8-static calibrated on sample
  sentences): embedding cosine, nearest-neighbour agreement and paraphrase retrieval against the fp32 model, and
  latency at batch 1, 8 and 64. The model comes from a bundle directory (see benchmarks/minilm.py: the GPU
  machine has no model package) or the installed package; without either the part is skipped with a note.
- convnets: the ResNet-style stages of benchmarks/models.py, channels-last, in fp32 and bf16 (cuDNN) and
  torchquant int8-static (calibrated and converted from the bf16 model on the device): latency at batch 1 and 32,
  and the relative error of the output against fp32.
- resnet: ResNet-18 and ResNet-50 of benchmarks/resnet.py (stem, four stages, pool and head) at 224x224,
  channels-last, in fp32, bf16, torchquant int8-static and int8-pipeline (integer activations between the layers),
  each quantized from the bf16 model; bf16 and the torchquant models also replayed from a CUDA graph captured for
  the input's shape (one launch for the whole network, as torch.compile's mode="reduce-overhead" runs it), which
  shows the device time where eager calls are bound by the host's launches. Then the CUDA kernels of one ResNet-50
  forward at the largest batch, per variant: the kernels that take the most device time.

Every variant is built and run once on a small batch before anything is measured: one that fails is reported in a
note row and left out, and the others still run. With --device cpu the same code runs on the CPU, which checks
the plumbing (the numbers mean little there).
"""
import argparse
import copy
import datetime
import json
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional, Sequence, TypeVar, Union

import torch
from torch import nn

import torchquant
from benchmarks import minilm as minilm_lib
from benchmarks import models
from benchmarks.models import latency_rows, on_device, relative_errors

FP32, BF16 = "fp32", "bf16"
BASELINES = {"vs bf16": BF16, "vs fp32": FP32}  # speed-up columns: column -> baseline variant
MINILM_PRESETS = ("int8-dynamic", "w4a8-dynamic", "int8-static")
PARTS = ("bert", "minilm", "convnets", "resnet")
TITLES = {
    "bert": "BERT-base-shaped encoder on the GPU (random weights, hidden 768, 12 heads): latency and output "
            "cosine to fp32",
    "minilm-quality": "all-MiniLM-L6-v2 on the GPU: embeddings against the fp32 model (86 sentences, "
                      "26 paraphrase groups)",
    "minilm-latency": "all-MiniLM-L6-v2 on the GPU: latency (encoder + mean pooling)",
    "convnets": "ResNet-style stages on the GPU (random weights, four stages halving the input, channels-last): "
                "latency",
    "resnet": "ResNet-18 and ResNet-50 on the GPU (224x224, random weights, channels-last): latency",
    "resnet-kernels": "ResNet-50 on the GPU: the CUDA kernels of one forward that take the most device time",
}
COLUMNS = {
    "bert": ["input", "variant", "ms", "vs bf16", "vs fp32", "cosine"],
    "minilm-quality": ["variant", "cos_mean", "cos_min", "nn_agreement", "group_accuracy"],
    "minilm-latency": ["input", "variant", "ms", "vs bf16", "vs fp32"],
    "convnets": ["model", "input", "variant", "ms", "vs bf16", "vs fp32", "rel. error"],
    "resnet": ["model", "input", "variant", "ms", "vs bf16", "vs bf16 graph", "vs fp32", "rel. error"],
    "resnet-kernels": ["input", "variant", "kernel", "calls", "us", "share"],
}
LEGEND = {  # what the columns of each table mean, printed under the tables that are there
    "all": ["fp32 / bf16: the float model in that dtype (fp32: TF32 off for matmuls, cuDNN's default for convs).",
            "torchquant rows: quantized from the bf16 model on the device; bf16 activations in and out of the "
            "integer kernels.",
            "ms: median of interleaved, synchronized samples; vs bf16 / vs fp32: speed-up over that baseline "
            "(> 1 is faster)."],
    "minilm-quality": [
        "cos_mean / cos_min: cosine similarity of each sentence's embedding to the fp32 model's (mean, worst).",
        "nn_agreement: fraction of sentences whose nearest neighbour (among the 86) is the one the fp32 model finds.",
        "group_accuracy: fraction of sentences whose nearest neighbour is a paraphrase from their own group."],
    "convnets": ["rel. error: ||y - y_fp32|| / ||y_fp32|| of the network output."],
    "resnet": ["rel. error: ||y - y_fp32|| / ||y_fp32|| of the logits at the first batch.",
               "+ CUDA graph: the model captured once for that input's shape and replayed (the input copied in); "
               "vs bf16 graph: speed-up over bf16 replayed the same way."],
    "resnet-kernels": ["us: device time of that kernel over one forward (all its calls); share: of the forward's "
                       "kernel time; kernel names cut at 90 characters."],
    "bert": ["cosine: cosine similarity of each token's output vector to the fp32 model's, the mean over tokens."],
}

T = TypeVar("T")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _note(text: str, *, failed: bool) -> dict:
    return {"table": "note", "text": text, "failed": failed}


def _synchronize(device: torch.device) -> None:
    # CUDA reports kernel errors asynchronously: synchronizing pins an error on the step that caused it
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attempt(rows: List[dict], what: str, device: torch.device, fn: Callable[[], T]) -> Optional[T]:
    """fn(), or None after a note row (and the traceback on stderr) when it raises: one failing variant or table
    must not take the others down."""
    _log(f"[models-gpu] {what}")
    try:
        result = fn()
        _synchronize(device)
        return result
    except Exception as e:  # noqa: BLE001  (reported in the table; the run goes on)
        traceback.print_exc()
        message = " ".join(str(e).split())[:300]
        rows.append(_note(f"{what} failed: {type(e).__name__}: {message}", failed=True))
        return None


Builder = Callable[[Dict[str, nn.Module]], nn.Module]


def _checked_variants(rows: List[dict], builders: Dict[str, Builder], probes: Dict[str, tuple],
                      device: torch.device) -> Dict[str, nn.Module]:
    """The variants whose builder and one forward on probes[name] (the largest input measured) succeed, in order
    (notes for the others). Builders run in order and get the variants built so far, so a later one may start
    from an earlier one."""
    variants: Dict[str, nn.Module] = {}

    def build_and_run(name: str) -> nn.Module:
        model = builders[name](variants)
        with torch.inference_mode():
            model(*probes[name])
        return model

    for name in builders:
        model = _attempt(rows, f"variant {name}", device, lambda name=name: build_and_run(name))
        if model is not None:
            variants[name] = model
    return variants


def _current_threads() -> tuple:
    """The thread counts to time at: only the one torch uses (the device does the work)."""
    return (torch.get_num_threads(),)


# ---------------------------------------------------------------- MiniLM

def minilm_rows(device: Union[str, torch.device] = "cuda", *, minilm_dir: Union[str, os.PathLike, None] = None,
                presets: Sequence[str] = MINILM_PRESETS, batches: Sequence[int] = (1, 8, 64),
                repeats: int = 21) -> List[dict]:
    """The minilm-quality and minilm-latency rows on `device` (notes for what was skipped or failed)."""
    device = torch.device(device)
    reason = minilm_lib.unavailable_reason(minilm_dir)
    if reason is not None:
        return [_note(f"MiniLM skipped: {reason}", failed=False)]
    rows: List[dict] = []
    minilm = _attempt(rows, f"loading MiniLM from {minilm_lib.model_dir(minilm_dir)}", device,
                      lambda: minilm_lib.load_minilm(minilm_dir))
    if minilm is None:
        return rows
    sentences = minilm_lib.evaluation_sentences()
    # the largest batch timed, at most the batch the quality table encodes at once
    probe = on_device(minilm.tokenize(sentences[:min(max(batches), 64)]), device)
    calibration = [on_device(batch, device) for batch in minilm_lib.calibration_batches(minilm)]
    builders = {FP32: lambda _: copy.deepcopy(minilm.encoder).to(device),
                BF16: lambda _: copy.deepcopy(minilm.encoder).to(device, torch.bfloat16)}
    for preset in presets:
        builders[f"torchquant {preset}"] = lambda done, preset=preset: models.torchquant_quantized(
            done[BF16], preset, calibration if "static" in preset else None)
    variants = _checked_variants(rows, builders, {name: probe for name in builders}, device)
    if FP32 in variants:
        quality = _attempt(rows, "MiniLM quality", device, lambda: models.minilm_quality(
            minilm, variants, reference=FP32, device=device))
        rows += quality or []
    else:
        rows.append(_note("MiniLM quality skipped: it needs the fp32 model", failed=False))
    latency = _attempt(rows, "MiniLM latency", device, lambda: models.minilm_latency(
        minilm, variants, repeats=repeats, batches=batches, device=device, baselines=BASELINES,
        threads=_current_threads()))
    return rows + (latency or [])


# ---------------------------------------------------------------- BERT-base-shaped encoder

class EncoderLayer(nn.Module):
    """A BERT encoder layer: self-attention (separate query/key/value projections) and a GELU feed-forward, each
    followed by the residual sum and LayerNorm."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)
        self.output_norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, h // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        attention = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, h)
        x = self.attention_norm(x + self.attention_out(attention))
        return self.output_norm(x + self.down(nn.functional.gelu(self.up(x))))


def bert_encoder(layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072) -> nn.Sequential:
    return nn.Sequential(*(EncoderLayer(hidden, heads, ffn) for _ in range(layers))).eval()


def bert_rows(device: Union[str, torch.device] = "cuda", *, batch: int = 32, tokens: int = 128, layers: int = 12,
              repeats: int = 21, seed: int = 0) -> List[dict]:
    """The bert rows on `device`: fp32 and bf16 against torchquant int8-dynamic (from the bf16 model)."""
    device = torch.device(device)
    rows: List[dict] = []
    torch.manual_seed(seed)
    model = bert_encoder(layers)
    x = torch.randn(batch, tokens, 768, generator=torch.Generator().manual_seed(seed))
    quantized = "torchquant int8-dynamic"
    dtypes = {FP32: torch.float32, BF16: torch.bfloat16, quantized: torch.bfloat16}
    builders = {FP32: lambda _: copy.deepcopy(model).to(device),
                BF16: lambda _: copy.deepcopy(model).to(device, torch.bfloat16),
                quantized: lambda done: models.torchquant_quantized(done[BF16], "int8-dynamic")}
    variants = _checked_variants(rows, builders, {v: on_device((x,), device, dtypes[v]) for v in builders}, device)

    def cosines() -> Dict[str, float]:
        with torch.inference_mode():
            outputs = {name: m(*on_device((x,), device, dtypes[name])).float() for name, m in variants.items()}
        return {name: nn.functional.cosine_similarity(y, outputs[FP32], dim=-1).mean().item()
                for name, y in outputs.items()}

    similarity = _attempt(rows, "BERT output cosine", device, cosines) if FP32 in variants else None
    latency = _attempt(rows, "BERT latency", device, lambda: latency_rows(
        "BERT-base-shaped", variants, {f"{layers} layers, batch {batch} x {tokens} tokens": (x,)}, _current_threads(), repeats,
        device=device, baselines=BASELINES, dtypes=dtypes)) or []
    for row in latency:
        if similarity and row["variant"] in similarity:
            row["cosine"] = similarity[row["variant"]]
        rows.append({"table": "bert", **row})
    return rows


# ---------------------------------------------------------------- ResNet-style convnets

def _cudnn_autotune():
    """cuDNN picks its fastest algorithm per shape (during the untimed warm-up call), as a tuned deployment would."""
    return models.setting(torch.backends.cudnn, "benchmark", True)


def convnet_rows(device: Union[str, torch.device] = "cuda", *, batches: Sequence[int] = (1, 32), size: int = 56,
                 calibration_batch: int = 8, repeats: int = 21, seed: int = 0) -> List[dict]:
    """The convnets rows on `device`: fp32 and bf16 cuDNN against torchquant int8-static, all channels-last, on
    [B, 64, size, size] inputs."""
    device = torch.device(device)
    cl = torch.channels_last
    rows: List[dict] = []
    generator = torch.Generator().manual_seed(seed)
    quantized = "torchquant int8-static"
    dtypes = {FP32: torch.float32, BF16: torch.bfloat16, quantized: torch.bfloat16}
    with _cudnn_autotune():
        for block in ("basic", "bottleneck"):
            name = "ResNet-18 stages" if block == "basic" else "ResNet-50 stages"
            torch.manual_seed(seed)
            model = models.resnet_stages(block)
            calibration = [torch.randn(calibration_batch, 64, size, size, generator=generator).relu()
                           .to(device, torch.bfloat16, memory_format=cl) for _ in range(2)]
            inputs = {f"batch {b} x 64x{size}x{size}":
                      (torch.randn(b, 64, size, size, generator=generator).relu().contiguous(memory_format=cl),)
                      for b in batches}
            x_error = next(iter(inputs.values()))[0]
            x_largest = inputs[f"batch {max(batches)} x 64x{size}x{size}"][0]
            builders = {FP32: lambda _: copy.deepcopy(model).to(device, memory_format=cl),
                        BF16: lambda _: copy.deepcopy(model).to(device, torch.bfloat16, memory_format=cl),
                        quantized: lambda done: models.torchquant_quantized(done[BF16], "int8-static", calibration)}
            probes = {v: on_device((x_largest,), device, dtypes[v]) for v in builders}
            variants = _checked_variants(rows, builders, probes, device)
            errors = {}
            if FP32 in variants:
                errors = _attempt(rows, f"{name}: output error", device, lambda: relative_errors(
                    variants, x_error, reference=FP32, device=device, dtypes=dtypes)) or {}
            latency = _attempt(rows, f"{name}: latency", device, lambda: latency_rows(
                name, variants, inputs, _current_threads(), repeats, device=device, baselines=BASELINES,
                dtypes=dtypes)) or []
            for row in latency:
                if row["variant"] in errors:
                    row["rel. error"] = errors[row["variant"]]
                rows.append({"table": "convnets", **row})
    return rows


# ---------------------------------------------------------------- whole ResNets

GRAPH_SUFFIX = " + CUDA graph"  # the name of a variant replayed from a CUDA graph: the variant's and this
STATIC, PIPELINE = "torchquant int8-static", "torchquant int8-pipeline"
RESNET_PRESETS = {STATIC: "int8-static", PIPELINE: "int8-pipeline"}
RESNET_TITLES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}


class CudaGraphed(nn.Module):
    """`model` captured in a CUDA graph for inputs shaped like `example` and replayed on each call: the input is
    copied into the graph's input buffer and the graph's own output buffer is returned (overwritten by the next
    call, as with torch.compile's mode="reduce-overhead"); inputs of other shapes or dtypes are refused.
    `difference`: the largest absolute difference between the replay's output and an eager call's on `example` (0
    where the kernels are deterministic)."""

    def __init__(self, model: nn.Module, example: Sequence[torch.Tensor]):
        super().__init__()
        self.model = model
        self.inputs = tuple(a.clone() for a in example)  # (outside inference mode: forward copies into them)
        with torch.inference_mode():
            expected = model(*self.inputs).clone()
            # warm-up on a side stream (lazy initialisation, cuDNN's algorithm search) before the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = model(*self.inputs)
            self.graph.replay()
            self.difference = (self.output.float() - expected.float()).abs().max().item()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if len(args) != len(self.inputs) or any(a.shape != b.shape or a.dtype != b.dtype
                                                for a, b in zip(args, self.inputs)):
            raise ValueError(f"CudaGraphed: captured for {[(tuple(b.shape), b.dtype) for b in self.inputs]}, got "
                             f"{[(tuple(a.shape), a.dtype) for a in args]}")
        for buffer, a in zip(self.inputs, args):
            buffer.copy_(a)
        self.graph.replay()
        return self.output


def kernel_rows(table: str, variants: Dict[str, nn.Module], args: Dict[str, tuple], input_name: str,
                top: int = 12, name_length: int = 90) -> List[dict]:
    """Rows of `table`: the `top` CUDA kernels of one eager forward of each variant by device time (torch.profiler,
    after a warm-up; memory copies and sets left out), kernels grouped by their names cut at name_length, then the
    total of all kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    rows = []
    for name, model in variants.items():
        with torch.inference_mode():
            model(*args[name])
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(*args[name])
                torch.cuda.synchronize()
        totals: Dict[str, List[float]] = {}
        for event in prof.events():
            if event.device_type == DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset")):
                calls_and_us = totals.setdefault(event.name[:name_length], [0, 0.0])
                calls_and_us[0] += 1
                calls_and_us[1] += event.time_range.elapsed_us()
        whole = sum(us for _, us in totals.values())
        for kernel, (calls, us) in sorted(totals.items(), key=lambda item: -item[1][1])[:top]:
            rows.append({"table": table, "input": input_name, "variant": name, "kernel": kernel, "calls": calls,
                         "us": us, "share": f"{100 * us / whole:.1f}%"})
        rows.append({"table": table, "input": input_name, "variant": name, "kernel": "(all kernels)",
                     "calls": sum(c for c, _ in totals.values()), "us": whole, "share": "100%"})
    return rows


def _graphed(rows: List[dict], what: str, variants: Dict[str, nn.Module], names: Sequence[str], args: tuple,
             device: torch.device, dtypes: Dict[str, torch.dtype]) -> Dict[str, nn.Module]:
    """CudaGraphed copies of the variants `names` (those built) for `args`, named with GRAPH_SUFFIX (their input
    dtypes added to `dtypes`); a note row for each that fails to capture or replays other values than it computes
    eagerly."""
    graphed: Dict[str, nn.Module] = {}
    for name in names:
        if name not in variants:
            continue
        replay = _attempt(rows, f"{what}: {name}{GRAPH_SUFFIX}", device,
                          lambda: CudaGraphed(variants[name], on_device(args, device, dtypes[name])))
        if replay is None:
            continue
        graphed[name + GRAPH_SUFFIX] = replay
        dtypes[name + GRAPH_SUFFIX] = dtypes[name]
        if replay.difference:
            rows.append(_note(f"{what}: {name}{GRAPH_SUFFIX} replays values up to {replay.difference:.3g} away from an "
                              "eager call's", failed=False))
    return graphed


def resnet_rows(device: Union[str, torch.device] = "cuda", *, names: Sequence[str] = ("resnet18", "resnet50"),
                batches: Sequence[int] = (1, 32), size: int = 224, calibration_batch: int = 8, repeats: int = 21,
                seed: int = 0) -> List[dict]:
    """The resnet rows on `device` (CUDA graphs and the kernel table only on a GPU)."""
    from benchmarks import resnet as resnet_lib
    device = torch.device(device)
    cl = torch.channels_last
    rows: List[dict] = []
    generator = torch.Generator().manual_seed(seed)
    quantized = tuple(RESNET_PRESETS)
    with _cudnn_autotune():
        for model_name in names:
            model = resnet_lib.resnet(model_name, seed=seed)
            title = RESNET_TITLES[model_name]
            calibration = [torch.randn(calibration_batch, 3, size, size, generator=generator)
                           .to(device, torch.bfloat16, memory_format=cl) for _ in range(2)]
            inputs = {f"batch {b} x 3x{size}x{size}":
                      (torch.randn(b, 3, size, size, generator=generator).contiguous(memory_format=cl),)
                      for b in batches}
            dtypes = {FP32: torch.float32, BF16: torch.bfloat16, **{q: torch.bfloat16 for q in quantized}}
            builders = {FP32: lambda _: copy.deepcopy(model).to(device, memory_format=cl),
                        BF16: lambda _: copy.deepcopy(model).to(device, torch.bfloat16, memory_format=cl)}
            for variant, preset in RESNET_PRESETS.items():
                builders[variant] = lambda done, preset=preset: models.torchquant_quantized(done[BF16], preset,
                                                                                            calibration)
            largest = f"batch {max(batches)} x 3x{size}x{size}"
            x_largest = inputs[largest][0]
            variants = _checked_variants(rows, builders, {v: on_device((x_largest,), device, dtypes[v])
                                                          for v in builders}, device)
            errors = {}
            if FP32 in variants:
                errors = _attempt(rows, f"{title}: output error", device, lambda: relative_errors(
                    variants, next(iter(inputs.values()))[0], reference=FP32, device=device, dtypes=dtypes)) or {}
            for input_name, args in inputs.items():
                timed = dict(variants)
                if device.type == "cuda":
                    timed.update(_graphed(rows, f"{title}, {input_name}", variants, (BF16, *quantized), args,
                                          device, dtypes))
                latency = _attempt(rows, f"{title}: latency, {input_name}", device, lambda: latency_rows(
                    title, timed, {input_name: args}, _current_threads(), repeats, device=device,
                    baselines={**BASELINES, "vs bf16 graph": BF16 + GRAPH_SUFFIX}, dtypes=dtypes)) or []
                for row in latency:
                    if row["variant"] in errors:
                        row["rel. error"] = errors[row["variant"]]
                    rows.append({"table": "resnet", **row})
                if device.type == "cuda" and model_name == "resnet50" and input_name == largest:
                    profiled = {n: variants[n] for n in (BF16, *quantized) if n in variants}
                    profiled_args = {n: on_device(args, device, dtypes[n]) for n in profiled}
                    rows += _attempt(rows, f"{title}: kernels, {input_name}", device, lambda: kernel_rows(
                        "resnet-kernels", profiled, profiled_args, input_name)) or []
    return rows


# ---------------------------------------------------------------- running and reporting

def run(parts: Sequence[str] = PARTS, *, device: Union[str, torch.device] = "cuda",
        bert_batch: int = 32, bert_tokens: int = 128, bert_layers: int = 12,
        minilm_dir: Union[str, os.PathLike, None] = None, minilm_batches: Sequence[int] = (1, 8, 64),
        conv_batches: Sequence[int] = (1, 32), conv_size: int = 56, resnet_batches: Sequence[int] = (1, 32),
        resnet_size: int = 224, repeats: int = 21,
        progress: Optional[Callable[[str, List[dict]], None]] = None) -> List[dict]:
    """Rows of every requested part ("table" names its table; notes say what was skipped or failed, "failed"
    whether it failed); progress(part, its rows) after each part."""
    unknown = [p for p in parts if p not in PARTS]
    if isinstance(parts, str) or unknown:
        raise ValueError(f"parts must be among {PARTS}, got {parts!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but torch.cuda.is_available() is False")
    for name, sizes in (("minilm_batches", minilm_batches), ("conv_batches", conv_batches),
                        ("resnet_batches", resnet_batches)):
        if not sizes or not all(isinstance(b, int) and b >= 1 for b in sizes):
            raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {sizes!r}")
    if not isinstance(conv_size, int) or conv_size < 8:
        raise ValueError(f"conv_size must be an int >= 8 (four stages halve it three times), got {conv_size!r}")
    if not isinstance(resnet_size, int) or resnet_size < 32:
        raise ValueError(f"resnet_size must be an int >= 32 (the network halves it five times), got {resnet_size!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    for name, value in (("bert_batch", bert_batch), ("bert_tokens", bert_tokens), ("bert_layers", bert_layers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    bodies = {
        "bert": lambda: bert_rows(device, batch=bert_batch, tokens=bert_tokens, layers=bert_layers, repeats=repeats),
        "minilm": lambda: minilm_rows(device, minilm_dir=minilm_dir, batches=minilm_batches, repeats=repeats),
        "convnets": lambda: convnet_rows(device, batches=conv_batches, size=conv_size, repeats=repeats),
        "resnet": lambda: resnet_rows(device, batches=resnet_batches, size=resnet_size, repeats=repeats),
    }
    rows: List[dict] = []
    for part in parts:
        part_rows: List[dict] = []
        part_rows += _attempt(part_rows, f"part {part}", device, bodies[part]) or []
        if progress is not None:
            progress(part, part_rows)
        rows += part_rows
    return rows


def device_description(device: torch.device) -> str:
    """The device, torch version and date: the header of every results file."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                f"torchquant CUDA kernels {'built' if torchquant.has_cuda_kernels() else 'MISSING'}, {date}")
    return f"CPU run (a plumbing check, not a GPU result): {models.machine_description()}"


def format_report(rows: List[dict], machine: str) -> str:
    """The tables of `rows`, the legend of their columns and the machine, as Markdown."""
    tables = {r["table"] for r in rows} - {"note"}
    legend = [line for key, lines in LEGEND.items() if key in tables or (key == "all" and tables) for line in lines]
    return f"{models.format_tables(rows, TITLES, COLUMNS)}\n" + "\n".join(legend) + f"\n\nMachine: {machine}\n"


def main(argv=None) -> int:
    """Runs the parts, prints their tables; returns 1 when anything failed (a note row says what), else 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models_gpu",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the plumbing)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", help="folder for models-gpu-<part>.json and .md (each written when its part ends)")
    parser.add_argument("--minilm-dir", help="the MiniLM bundle or model directory (default: "
                                             f"${minilm_lib.DIR_ENV}, else the installed package)")
    parser.add_argument("--bert-batch", type=int, default=32)
    parser.add_argument("--bert-tokens", type=int, default=128)
    parser.add_argument("--bert-layers", type=int, default=12)
    parser.add_argument("--minilm-batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--conv-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--conv-size", type=int, default=56, help="input height and width of the convnets")
    parser.add_argument("--resnet-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--resnet-size", type=int, default=224, help="input height and width of the ResNets")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved samples per timing (median)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    machine = device_description(device)

    def save(part: str, part_rows: List[dict]) -> None:
        if not args.out:
            return
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"models-gpu-{part}")
        with open(stem + ".json", "w") as f:
            json.dump({"machine": machine, "part": part, "rows": part_rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(format_report(part_rows, machine))

    try:
        rows = run(args.parts, device=device, bert_batch=args.bert_batch, bert_tokens=args.bert_tokens,
                   bert_layers=args.bert_layers, minilm_dir=args.minilm_dir, minilm_batches=tuple(args.minilm_batches),
                   conv_batches=tuple(args.conv_batches), conv_size=args.conv_size,
                   resnet_batches=tuple(args.resnet_batches), resnet_size=args.resnet_size, repeats=args.repeats,
                   progress=save)
    except ValueError as e:
        parser.error(str(e))
    print(format_report(rows, machine))
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
