"""What quantizing a model costs (error), saves (bytes) and gains (speed), per layer and in total: measured
and rendered (a terminal table, JSON, Markdown with a plot). The per-layer measurement also drives the
sensitivity-guided conversion of torchquant.budget.

Layer errors are measured in isolation: each quantized layer is fed exactly the input its float layer receives
in the float model, so a layer's output SQNR is the error that layer adds, not what it inherits from upstream.
The model's end-to-end output SQNR and its accuracy (or agreement with float) on an evaluation set show the sum.
"""
import dataclasses
import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from torchquant import functional as F_q
from torchquant._ops.gemm import GELU_APPROXIMATE
from torchquant.config import QuantConfig, resolve_config
from torchquant.convert import _run_batch, attention_as_layers
from torchquant.nn import is_conv1d_linear, quant_type
from torchquant.fold import fold_running
from torchquant.graph import (PIPELINE_READ_TENSORS, SWAP_READ_TENSORS, is_pipeline, layer_tensors_read,
                              pipeline_notes, read_reason)
from torchquant.nn.base import QuantLayerBase
from torchquant.timing import busy_machine_note, compare, latency_clock, markdown_table

__all__ = ["LayerReport", "ModelReport", "build_report", "state_bytes", "write_json", "write_markdown",
           "to_markdown"]


@dataclass
class LayerReport:
    """One Linear/Conv2d/Conv1d layer of the model. Latencies in seconds (median), errors in float64 math."""
    name: str
    type: str
    shape: List[int]
    quantized: bool
    weight_bits: Optional[int] = None
    activation: str = "float"  # "int8 dynamic", "uint8 static", ... or "float"
    weight_mse: Optional[float] = None
    weight_max_abs: Optional[float] = None
    weight_sqnr_db: Optional[float] = None
    output_sqnr_db: Optional[float] = None
    bytes_float: int = 0
    bytes_quantized: int = 0
    latency_float_s: Optional[float] = None
    latency_quantized_s: Optional[float] = None
    note: str = ""

    @property
    def speedup(self) -> Optional[float]:
        if self.latency_float_s is None or not self.latency_quantized_s:
            return None
        return self.latency_float_s / self.latency_quantized_s


@dataclass
class ModelReport:
    config: dict
    layers: List[LayerReport]
    bytes_float: int
    bytes_quantized: int
    batch_shape: Optional[List[int]] = None
    latency_float_s: Optional[float] = None
    latency_quantized_s: Optional[float] = None
    latency_clock: Optional[str] = None  # "thread CPU time" (CPU, one thread) or "wall time"
    output_sqnr_db: Optional[float] = None
    eval_metric: Optional[str] = None  # "accuracy" (labels given) or "agreement" (top-1 agreement with float)
    eval_samples: int = 0
    eval_class_dim: int = -1  # the outputs' dimension that holds the classes (1 for [N, C, H, W] outputs)
    eval_float: Optional[float] = None
    eval_quantized: Optional[float] = None
    min_sqnr: Optional[float] = None
    min_speedup: Optional[float] = None
    decisions: Dict[str, str] = field(default_factory=dict)  # layer -> why the budget changed it
    notes: List[str] = field(default_factory=list)

    @property
    def speedup(self) -> Optional[float]:
        if self.latency_float_s is None or not self.latency_quantized_s:
            return None
        return self.latency_float_s / self.latency_quantized_s

    def to_dict(self) -> dict:
        """JSON-ready: non-finite floats (an SQNR of an exact layer is +inf) become None."""
        data = asdict(self)
        data["speedup"] = self.speedup
        for layer, row in zip(self.layers, data["layers"]):
            row["speedup"] = layer.speedup
        return _finite_or_none(data)

    def format_table(self) -> str:
        """The per-layer table and the totals, for a terminal."""
        header = ["layer", "type", "weight shape", "W bits", "activations", "W SQNR dB", "out SQNR dB",
                  "KiB float", "KiB quant", "float us", "quant us", "speed-up", "note"]
        rows = [[layer.name, layer.type, "x".join(map(str, layer.shape)), _fmt(layer.weight_bits),
                 layer.activation, _fmt(layer.weight_sqnr_db, 1), _fmt(layer.output_sqnr_db, 1),
                 _fmt(layer.bytes_float / 1024, 1), _fmt(layer.bytes_quantized / 1024, 1),
                 _fmt_us(layer.latency_float_s), _fmt_us(layer.latency_quantized_s), _fmt_x(layer.speedup),
                 layer.note] for layer in self.layers]
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [""] + self.summary_lines())

    def summary_lines(self) -> List[str]:
        lines = [f"model size: {self.bytes_float / 1024:.1f} KiB float -> {self.bytes_quantized / 1024:.1f} KiB "
                 f"quantized ({self.bytes_float / max(self.bytes_quantized, 1):.2f}x smaller)"]
        if self.speedup is not None:
            lines.append(f"latency (batch {'x'.join(map(str, self.batch_shape))}, {self.latency_clock}): "
                         f"{self.latency_float_s * 1e3:.3f} ms float -> {self.latency_quantized_s * 1e3:.3f} ms "
                         f"quantized ({_fmt_x(self.speedup)})")
        if self.output_sqnr_db is not None:
            lines.append(f"end-to-end output SQNR: {self.output_sqnr_db:.1f} dB")
        if self.eval_metric == "accuracy":
            lines.append(f"accuracy on {self.eval_samples} samples: {self.eval_float:.2f}% float, "
                         f"{self.eval_quantized:.2f}% quantized ({self.eval_quantized - self.eval_float:+.2f} "
                         f"points)")
        elif self.eval_metric == "agreement":
            over = "" if self.eval_class_dim == -1 else f" (classes along dim {self.eval_class_dim})"
            lines.append(f"top-1 agreement with float{over} on {self.eval_samples} predictions: "
                         f"{self.eval_quantized:.2f}%")
        if self.min_sqnr is not None or self.min_speedup is not None:
            budget = ", ".join(text for text in (
                None if self.min_sqnr is None else f"output SQNR >= {self.min_sqnr:g} dB",
                None if self.min_speedup is None else f"speed-up >= {self.min_speedup:g}x") if text)
            lines.append(f"budget ({budget}): {len(self.decisions)} layer(s) changed"
                         + "".join(f"\n  {name}: {why}" for name, why in self.decisions.items()))
        return lines + self.notes


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _fmt_us(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _fmt_x(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


# ----------------------------------------------------------------------------------------------------------
# measurement

class _ErrorSums:
    """quantization_error's SQNR accumulated over batches: sums of ref^2 and (ref - approx)^2 in float64."""

    def __init__(self):
        self.signal = 0.0
        self.error = 0.0

    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        ref, approx = ref.detach().double(), approx.detach().double()
        self.signal += ref.square().sum().item()
        self.error += (ref - approx).square().sum().item()

    @property
    def sqnr_db(self) -> float:
        if self.error == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.error) if self.signal > 0 else -math.inf


def _first_tensor(output):
    """The tensor a model or layer output leads with (a tensor, or the first tensor of a tuple/list/dict)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def state_bytes(module: nn.Module) -> int:
    """Bytes of the tensors in the module's state dict (what a checkpoint stores), each storage once."""
    seen, total = set(), 0
    for tensor in module.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _layer_pairs(float_model: nn.Module, quantized_model: nn.Module):
    """(name, float layer, layer of the quantized model) for every layer of the float model that conversion
    swaps."""
    quantized = dict(quantized_model.named_modules())
    return [(name, module, quantized.get(name)) for name, module in float_model.named_modules()
            if quant_type(module) is not None]


def float_only_layers(model: nn.Module) -> List[str]:
    """'name (type)' of the modules with a weight matrix of their own (a parameter named *weight* with 2 or more
    dimensions: not a class token or a position embedding) that no quantized layer type replaces (an LSTM, a
    ConvTranspose2d, a Linear subclass, ...): they stay float in every preset. Embedding tables are lookups, not
    matrix products, and are left out; an nn.MultiheadAttention is quantized through its projections."""
    attention = [name + "." for name, module in model.named_modules() if type(module) is nn.MultiheadAttention]
    return [f"{name or '(the model)'} ({type(module).__name__})" for name, module in model.named_modules()
            if quant_type(module) is None and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))
            and not any((name + ".").startswith(prefix) for prefix in attention)  # (swapped with its projections)
            and any("weight" in key and p.dim() >= 2 and p.is_floating_point()
                    for key, p in module.named_parameters(recurse=False))]


def _float_weight(layer: nn.Module) -> torch.Tensor:
    """A float layer's weight in the [out, ...] layout of its quantized layer (a transformers Conv1D's transposed)."""
    return layer.weight.t() if is_conv1d_linear(layer) else layer.weight


def _is_quantized(module) -> bool:
    return isinstance(module, QuantLayerBase) and module.converted


def _folded_bn(float_model: nn.Module, quantized_layer) -> Optional[nn.Module]:
    """The float model's BatchNorm that quantized_layer holds folded, if any: the float function of the layer
    ends after it."""
    name = getattr(quantized_layer, "folded_bn", None)
    return None if name is None else float_model.get_submodule(name)


@contextmanager
def eval_mode(*models: nn.Module):
    """Every module in eval mode inside, each module's own training flag restored afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@dataclass
class LayerMeasurement:
    output: _ErrorSums = field(default_factory=_ErrorSums)
    latency_float_s: Optional[float] = None
    latency_quantized_s: Optional[float] = None


@torch.no_grad()
def measure_layers(float_model, quantized_model, batches: Sequence[torch.Tensor], *, names: Optional[set] = None,
                   time_layers: bool = True, repeats: int = 5, progress: bool = False, desc: str = "measuring layers"
                   ) -> Tuple[Dict[str, LayerMeasurement], _ErrorSums,
                              Optional[Tuple[float, float, str, Optional[str]]]]:
    """Per quantized layer (restricted to `names` when given): isolated output error over all batches and,
    with time_layers, the median latency of the float and the quantized layer on the first batch's input.
    Also the end-to-end output error and (with time_layers) the whole models' latencies on the first batch, with the
    name of the clock that timed them and busy_machine_note's warning (None on a machine that was not busy).
    An attention's projections are measured against those of the float model's attention_as_layers form."""
    with attention_as_layers(float_model):
        return _measure_layers(float_model, quantized_model, batches, names, time_layers, repeats, progress, desc)


def _measure_layers(float_model, quantized_model, batches, names, time_layers, repeats, progress, desc):
    pairs = [(n, f, q) for n, f, q in _layer_pairs(float_model, quantized_model)
             if _is_quantized(q) and (names is None or n in names)]
    measured = {name: LayerMeasurement() for name, _, _ in pairs}
    first_inputs: Dict[str, torch.Tensor] = {}
    last_inputs: Dict[str, torch.Tensor] = {}
    # the float function of a layer with a folded BatchNorm is layer then BatchNorm: its input is the layer's,
    # its output the BatchNorm's
    ends = {n: _folded_bn(float_model, q) or f for n, f, q in pairs}

    def record_input(name):
        def hook(module, inputs):
            first_inputs.setdefault(name, inputs[0])
            last_inputs[name] = inputs[0]
        return hook

    def compare_output(name, quantized_layer):
        def hook(module, inputs, output):
            # a layer with a fused GELU (convert() fuses the one after an int8-dynamic Linear) or an activation clamp
            # (a fused ReLU of an integer pipeline) computes the activation of the output
            gelu = getattr(quantized_layer, "fused_activation", None)
            if gelu is not None:
                output = nn.functional.gelu(output, approximate=GELU_APPROXIMATE[gelu])
            clamp = (quantized_layer.clamp_min, quantized_layer.clamp_max)
            reference = output if clamp == (None, None) else output.clamp(*clamp)
            measured[name].output.add(reference, quantized_layer(last_inputs.pop(name)))
        return hook

    end_to_end = _ErrorSums()
    # the input before the layer's own pre-hooks (the quantized layer has them too): feeding the quantized layer, and
    # the timed calls of both, the hooked input would apply an input-changing hook twice
    handles = [f.register_forward_pre_hook(record_input(n), prepend=True) for n, f, q in pairs]
    handles += [ends[n].register_forward_hook(compare_output(n, q)) for n, f, q in pairs]
    try:
        for i, batch in enumerate(tqdm(batches, desc=desc, disable=None if progress else True, leave=False)):
            reference = _first_tensor(_run_batch(float_model, batch, i))
            end_to_end.add(reference, _first_tensor(_run_batch(quantized_model, batch, i)))
    finally:
        for handle in handles:
            handle.remove()
    model_latency = None
    if time_layers and batches:
        device = str(_first_tensor(batches[0]).device)
        clock, clock_name = latency_clock(device)
        for name, f, q in tqdm(pairs, desc="timing layers", disable=None if progress else True, leave=False):
            x = first_inputs.get(name)
            if x is None:  # a layer the model never called
                continue
            end = ends[name]
            float_layer = (lambda: f(x)) if end is f else (lambda: end(f(x)))
            times = compare({"float": float_layer, "quantized": lambda: q(x)}, device=device, repeats=repeats,
                            min_sample_s=0.005, clock=clock)
            measured[name].latency_float_s, measured[name].latency_quantized_s = times["float"], times["quantized"]
        b = batches[0]
        times = compare({"float": lambda: _run_batch(float_model, b, 0),
                         "quantized": lambda: _run_batch(quantized_model, b, 0)},
                        device=device, repeats=repeats, clock=clock)
        model_latency = times["float"], times["quantized"], clock_name, busy_machine_note(device)
    return measured, end_to_end, model_latency


def _activation_label(spec) -> str:
    if spec is None:
        return "float"
    storage = "int" if spec.signed else "uint"
    return f"{storage}{spec.bits} {'dynamic' if spec.dynamic else 'static'}"


def _class_dim(output: torch.Tensor) -> int:
    """The dimension of a model output that holds the classes: 1 of [N, C, H, W, ...] (a prediction per pixel, as
    cross_entropy reads it), the last of [N, C] and of a 3-D output, read as [N, tokens, vocabulary] (a language
    model's logits; a Conv1d's [N, C, L] is read that way too)."""
    return 1 if output.dim() >= 4 else -1


@torch.no_grad()
def _evaluate(float_model, quantized_model, evaluation, progress: bool):
    """(metric, predictions, float value, quantized value, class dim): accuracy % with labels, else top-1
    agreement % over the outputs' class dimension (_class_dim)."""
    batches, labels = evaluation
    correct_float = correct_quantized = agree = samples = 0
    dim = -1
    for i, batch in enumerate(tqdm(batches, desc="evaluating", disable=None if progress else True, leave=False)):
        ref = _first_tensor(_run_batch(float_model, batch, i))
        out = _first_tensor(_run_batch(quantized_model, batch, i))
        dim = _class_dim(ref)
        top_ref, top_out = ref.argmax(dim).cpu(), out.argmax(dim).cpu()
        samples += top_ref.numel()
        agree += (top_ref == top_out).sum().item()
        if labels is not None:
            if top_ref.shape != labels[i].shape:
                raise ValueError(f"evaluation labels of shape {list(labels[i].shape)} do not match the predictions "
                                 f"of outputs of shape {list(ref.shape)} (classes along dim {dim}: predictions of "
                                 f"shape {list(top_ref.shape)})")
            correct_float += (top_ref == labels[i]).sum().item()
            correct_quantized += (top_out == labels[i]).sum().item()
    if labels is not None:
        return "accuracy", samples, 100.0 * correct_float / samples, 100.0 * correct_quantized / samples, dim
    return "agreement", samples, 100.0, 100.0 * agree / samples, dim


def build_report(float_model: nn.Module, quantized_model: nn.Module, config=None, *,
                 calibration: Optional[Iterable[torch.Tensor]] = None,
                 evaluation: Optional[Tuple[Sequence[torch.Tensor], Optional[Sequence[torch.Tensor]]]] = None,
                 decisions: Optional[Dict[str, str]] = None, repeats: int = 5, time_layers: bool = True,
                 progress: bool = False, min_sqnr: Optional[float] = None, min_speedup: Optional[float] = None
                 ) -> ModelReport:
    """The report on quantizing float_model into quantized_model (both left unchanged).

    calibration: batches the layer errors and latencies are measured on (else the evaluation inputs; without
    either, only weight errors and sizes are reported), each a tensor, a tuple of positional inputs or a dict of
    keyword inputs, as calibrate takes them. evaluation: (input batches, label batches or None).
    decisions: layer name -> why it was kept float or at 8 bits (from torchquant.budget.quantize_with_budget).
    """
    if not isinstance(float_model, nn.Module) or not isinstance(quantized_model, nn.Module):
        raise TypeError("build_report: float_model and quantized_model must be nn.Modules")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"build_report: repeats must be a positive int, got {repeats!r}")
    with attention_as_layers(float_model):  # (rows for an attention's projections)
        return _build_report(float_model, quantized_model, config, calibration, evaluation, decisions, repeats,
                             time_layers, progress, min_sqnr, min_speedup)


def _build_report(float_model, quantized_model, config, calibration, evaluation, decisions, repeats, time_layers,
                  progress, min_sqnr, min_speedup) -> ModelReport:
    config = resolve_config(config)
    decisions = dict(decisions or {})
    batches = list(calibration) if calibration is not None else list(evaluation[0]) if evaluation else []
    with eval_mode(float_model, quantized_model):
        measured, end_to_end, model_latency = (
            measure_layers(float_model, quantized_model, batches, time_layers=time_layers, repeats=repeats,
                     progress=progress) if batches else ({}, None, None))
    layers = []
    read = None  # layer_tensors_read(float_model), once a float layer needs a reason
    fused, graph_notes = pipeline_notes(quantized_model)
    for name, float_layer, layer in _layer_pairs(float_model, quantized_model):
        row = LayerReport(name=name, type=type(float_layer).__name__, shape=list(_float_weight(float_layer).shape),
                          quantized=_is_quantized(layer), bytes_float=state_bytes(float_layer),
                          note=decisions.get(name, ""))
        row.bytes_quantized = row.bytes_float if layer is None else state_bytes(layer)
        if row.quantized:
            row.weight_bits = layer.config.weight.bits
            row.activation = _activation_label(layer.config.activation)
            bn = _folded_bn(float_model, layer)
            float_weight = _float_weight(float_layer).detach()
            if bn is not None:
                float_weight = fold_running(float_weight, None, bn)[0].detach()
                row.note = "; ".join(filter(None, [row.note, f"bn folded ({layer.folded_bn})"]))
            error = F_q.quantization_error(float_weight.float(),
                                           layer.dequantized_weight().to(float_layer.weight.device))
            row.weight_mse, row.weight_max_abs, row.weight_sqnr_db = (error["mse"], error["max_abs"],
                                                                      error["sqnr_db"])
            if name in measured:
                m = measured[name]
                row.output_sqnr_db = m.output.sqnr_db
                row.latency_float_s, row.latency_quantized_s = m.latency_float_s, m.latency_quantized_s
        elif not row.note:
            reason = quant_type(float_layer).unsupported(float_layer)
            left_float = quant_type(layer) is not None  # (else the model holds something else there)
            if reason is None and left_float:
                if read is None:
                    read = layer_tensors_read(float_model, tensors=PIPELINE_READ_TENSORS
                                              if is_pipeline(quantized_model) else SWAP_READ_TENSORS)
                reason = read_reason(read[id(float_layer)]) if id(float_layer) in read else None
            row.note = (f"kept float: {reason}" if reason is not None else "kept float (skip rule)"
                        if left_float else "not converted")
        if name in fused:
            row.note = "; ".join(filter(None, [row.note, fused[name]]))
        layers.append(row)
    float_only = float_only_layers(float_model)
    if float_only:
        graph_notes.append("kept float, no quantized layer type for them: " + ", ".join(float_only))
    report = ModelReport(config=_config_dict(config), layers=layers, bytes_float=state_bytes(float_model),
                         bytes_quantized=state_bytes(quantized_model), min_sqnr=min_sqnr, min_speedup=min_speedup,
                         decisions=decisions, notes=graph_notes)
    if batches:
        report.batch_shape = list(_first_tensor(batches[0]).shape)  # (a model of several inputs: its first)
        report.output_sqnr_db = end_to_end.sqnr_db
        if report.output_sqnr_db < USELESS_SQNR_DB:
            report.notes.append(_low_sqnr_warning(report))
        if model_latency is not None:
            report.latency_float_s, report.latency_quantized_s, report.latency_clock, busy = model_latency
            if busy:
                report.notes.append(busy)
            if fused:  # a pipeline's layer timed alone is not the call the pipeline makes
                report.notes.append("float us / quant us: each layer alone, from a float input to a float output; "
                                    "the integer pipeline passes integers between its layers (its time: the "
                                    "latency line)")
    else:
        report.notes.append("no calibration or evaluation inputs: output errors and latencies not measured")
    if evaluation is not None:
        with eval_mode(float_model, quantized_model):
            (report.eval_metric, report.eval_samples, report.eval_float, report.eval_quantized,
             report.eval_class_dim) = _evaluate(float_model, quantized_model, evaluation, progress)
    return report


USELESS_SQNR_DB = 6.0  # below it the error's RMS is more than half the output's


def _low_sqnr_warning(report: ModelReport) -> str:
    worst = min((layer for layer in report.layers if layer.output_sqnr_db is not None),
                key=lambda layer: layer.output_sqnr_db, default=None)
    where = "" if worst is None else f"; most error added by {worst.name} ({worst.output_sqnr_db:.1f} dB)"
    return (f"warning: the quantized model's output is mostly error (end-to-end SQNR {report.output_sqnr_db:.1f} dB "
            f"< {USELESS_SQNR_DB:g} dB: the error's RMS over half the output's){where}; try more bits, a clipping "
            f"observer (percentile, mse), keeping sensitive layers float (--min-sqnr) or quantization-aware training")


def _config_dict(config: QuantConfig) -> dict:
    """config.to_dict(), with skip rules that are not name globs written as their repr."""
    plain = dataclasses.replace(config, skip=tuple(rule for rule in config.skip if isinstance(rule, str)))
    data = plain.to_dict()
    data["skip"] += [repr(rule) for rule in config.skip if not isinstance(rule, str)]
    return data


# ----------------------------------------------------------------------------------------------------------
# output

def write_json(report: ModelReport, destination) -> None:
    """The report as JSON to a path or an open text file."""
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
    if hasattr(destination, "write"):
        destination.write(text)
    else:
        with open(destination, "w") as handle:
            handle.write(text)


def to_markdown(report: ModelReport, image: Optional[str] = None) -> str:
    """The report as Markdown; `image` is the file name of the plot to embed, if any."""
    columns = ["layer", "type", "weight shape", "W bits", "activations", "W SQNR dB", "W max abs err",
               "out SQNR dB", "KiB float", "KiB quant", "speed-up", "note"]
    rows = [{"layer": layer.name, "type": layer.type, "weight shape": "x".join(map(str, layer.shape)),
             "W bits": _fmt(layer.weight_bits), "activations": layer.activation,
             "W SQNR dB": _fmt(layer.weight_sqnr_db, 1),
             "W max abs err": "-" if layer.weight_max_abs is None else f"{layer.weight_max_abs:.3g}",
             "out SQNR dB": _fmt(layer.output_sqnr_db, 1), "KiB float": _fmt(layer.bytes_float / 1024, 1),
             "KiB quant": _fmt(layer.bytes_quantized / 1024, 1), "speed-up": _fmt_x(layer.speedup),
             "note": layer.note} for layer in report.layers]
    weight, activation = report.config["weight"], report.config["activation"]
    config_line = (f"weights: {weight['bits']}-bit {weight['granularity']} ({weight['observer']}, "
                   f"{weight['rounding']}); activations: "
                   + ("float" if activation is None else
                      f"{activation['bits']}-bit {'dynamic' if activation['dynamic'] else 'static'} "
                      f"{activation['granularity']} ({activation['rounding']})"))
    parts = ["# torchquant quantization report", "", config_line, "", markdown_table(rows, columns), ""]
    # (a line's own lines, the budget's layers, as items of a nested list: indented text would join the item's)
    parts += ["- " + line.replace("\n  ", "\n  - ") for line in report.summary_lines()]
    if image:
        parts += ["", f"![per-layer output SQNR and speed-up]({image})"]
    return "\n".join(parts) + "\n"


def _plot(report: ModelReport, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    layers = [layer for layer in report.layers if layer.quantized]
    names = [layer.name for layer in layers]
    sqnr = [layer.output_sqnr_db if layer.output_sqnr_db is not None and math.isfinite(layer.output_sqnr_db)
            else 0.0 for layer in layers]
    speedup = [layer.speedup or 0.0 for layer in layers]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 0.4 * len(names) + 1.5), sharey=True)
    left.barh(names, sqnr, color="tab:blue")
    left.set_xlabel("output SQNR (dB)")
    if report.min_sqnr is not None:
        left.axvline(report.min_sqnr, color="tab:red", linestyle="--")
    right.barh(names, speedup, color="tab:green")
    right.axvline(1.0, color="grey", linestyle=":")
    right.set_xlabel("speed-up vs float (x)")
    left.invert_yaxis()
    figure.suptitle("torchquant: per-layer quantization error and speed-up")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_markdown(report: ModelReport, path: str,
                   atomic: Callable[[str], "contextmanager"] = lambda p: nullcontext(p)) -> str:
    """Writes the Markdown report to `path` and, when matplotlib is importable, a PNG plot beside it
    (same name, .png). `atomic(path)` yields the temporary path to write each file to. Returns a note on
    the plot ("" when it was drawn)."""
    image_path = os.path.splitext(path)[0] + ".png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        image, note = None, "plot skipped: matplotlib is not installed (pip install 'torchquant[plot]')"
    else:
        with atomic(image_path) as temp:
            _plot(report, temp)
        image, note = os.path.basename(image_path), ""
    text = to_markdown(report, image)
    if note:
        text += f"\n_{note}_\n"
    with atomic(path) as temp, open(temp, "w") as handle:
        handle.write(text)
    return note
