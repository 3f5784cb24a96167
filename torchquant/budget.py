"""Sensitivity-guided conversion: quantize a model, measure each layer (torchquant.report), and keep a layer float
(or give it 8-bit weights) where quantizing it misses an output-SQNR or speed-up budget."""
import copy
import math
from dataclasses import replace
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from torchquant.config import QuantConfig, resolve_config
from torchquant.convert import calibrate, convert, prepare
from torchquant.nn import quant_type
from torchquant.nn.base import QuantLayerBase, quant_layers, set_weight_spec
from torchquant.report import LayerMeasurement, eval_mode, measure_layers

__all__ = ["quantize_with_budget"]


def _float_layer_names(model: nn.Module) -> set:
    return {name for name, module in model.named_modules() if quant_type(module) is not None}


def _quantize_copy(model: nn.Module, config: QuantConfig, calibration, plan: Optional[Dict[str, Optional[int]]] = None,
                   *, progress: bool = False) -> nn.Module:
    """A converted copy of model. plan: layer name -> None (keep it float) or the weight bits it gets instead
    of config's; layers not in the plan follow config. Each group of layers is prepared in a pass of its own
    whose skip rule names the layers outside the group."""
    plan = plan or {}
    layers = _float_layer_names(model)
    result = copy.deepcopy(model)
    if config.integer_pipeline:
        return _quantize_pipeline_copy(result, config, calibration, plan, progress=progress)
    groups = [(config, layers - set(plan))]
    for bits in sorted({bits for bits in plan.values() if bits is not None}):
        group_config = replace(config, weight=replace(config.weight, bits=bits), skip=())
        groups.append((group_config, {name for name, b in plan.items() if b == bits}))
    for group_config, names in groups:
        others = layers - names
        if names:
            prepare(result, group_config.with_skip([lambda name, module: name in others])
                    if others else group_config)
    if not quant_layers(result):
        return result  # every layer kept float
    if calibration is not None and config.activation is not None and not config.activation.dynamic:
        calibrate(result, calibration, progress=progress)
    return convert(result)


def _quantize_pipeline_copy(model: nn.Module, config: QuantConfig, calibration, plan: Dict[str, Optional[int]], *,
                            progress: bool) -> nn.Module:
    """_quantize_copy for an integer pipeline: one graph, in which the layers the plan keeps float are skipped and
    the others get the plan's weight bits."""
    kept = {name for name, bits in plan.items() if bits is None}
    result = prepare(model, config.with_skip([lambda name, module: name in kept]) if kept else config)
    for name, bits in plan.items():
        if bits is not None and isinstance(layer := result.get_submodule(name), QuantLayerBase):
            set_weight_spec(layer, replace(config.weight, bits=bits))
    if not quant_layers(result):
        return model  # every layer kept float
    calibrate(result, calibration, progress=progress)
    return convert(result)


def _fails(measurement: LayerMeasurement, min_sqnr, min_speedup) -> Optional[str]:
    """Why the layer misses the budget, or None."""
    sqnr = measurement.output.sqnr_db
    if min_sqnr is not None and sqnr < min_sqnr:
        return f"output SQNR {sqnr:.1f} dB < {min_sqnr:g} dB"
    if min_speedup is not None and measurement.latency_quantized_s:
        speedup = measurement.latency_float_s / measurement.latency_quantized_s
        if speedup < min_speedup:
            return f"speed-up {speedup:.2f}x < {min_speedup:g}x"
    return None


def quantize_with_budget(model: nn.Module, config=None, calibration: Optional[Iterable[torch.Tensor]] = None, *,
                         min_sqnr: Optional[float] = None, min_speedup: Optional[float] = None,
                         fallback_bits: int = 8, repeats: int = 5, progress: bool = False
                         ) -> Tuple[nn.Module, Dict[str, str]]:
    """A quantized copy of `model` (left unchanged) in which every quantized layer meets the budget: output
    SQNR >= min_sqnr dB and speed-up >= min_speedup, measured per layer on the calibration batches.

    A layer that misses it with fewer than `fallback_bits` weight bits is tried at fallback_bits; if it still
    misses (or is already at fallback_bits) it stays float. Returns (quantized model, {layer name: reason}).
    Without a budget this is quantize_model on a copy and the reasons are empty.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_with_budget: model must be an nn.Module, got {type(model).__name__}")
    config = resolve_config(config)
    for name, value in (("min_sqnr", min_sqnr), ("min_speedup", min_speedup)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or math.isnan(value)):
            raise TypeError(f"quantize_with_budget: {name} must be a number or None, got {value!r}")
    if min_speedup is not None and min_speedup <= 0:
        raise ValueError(f"quantize_with_budget: min_speedup must be positive, got {min_speedup}")
    if not isinstance(fallback_bits, int) or not 1 <= fallback_bits <= 8:
        raise ValueError(f"quantize_with_budget: fallback_bits must be an int in [1, 8], got {fallback_bits!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"quantize_with_budget: repeats must be a positive int, got {repeats!r}")
    batches = None if calibration is None else list(calibration)
    if min_sqnr is None and min_speedup is None:
        return _quantize_copy(model, config, batches, progress=progress), {}
    if not batches:
        raise ValueError("quantize_with_budget: a budget (min_sqnr / min_speedup) needs calibration batches")
    time_layers = min_speedup is not None
    trial = _quantize_copy(model, config, batches, progress=progress)
    with eval_mode(model, trial):
        measured, _, _ = measure_layers(model, trial, batches, time_layers=time_layers, repeats=repeats,
                                  progress=progress)
    failing = {name: why for name, m in measured.items() if (why := _fails(m, min_sqnr, min_speedup))}
    plan: Dict[str, Optional[int]] = {name: None for name in failing}
    decisions = {name: f"kept float: {why}" for name, why in failing.items()}
    if failing and config.weight.bits < fallback_bits:
        # everything else float: each failing layer is measured with only its own error
        layers = _float_layer_names(model)
        retry = _quantize_copy(model, config, batches, {name: fallback_bits if name in failing else None
                                                        for name in layers}, progress=progress)
        with eval_mode(model, retry):
            remeasured, _, _ = measure_layers(model, retry, batches, names=set(failing), time_layers=time_layers,
                                        repeats=repeats, progress=progress,
                                        desc=f"trying {fallback_bits}-bit weights")
        for name, why in failing.items():
            why_again = _fails(remeasured[name], min_sqnr, min_speedup)
            if why_again is None:
                plan[name] = fallback_bits
                decisions[name] = f"{fallback_bits}-bit weights: {why} at {config.weight.bits} bits"
            else:
                decisions[name] = (f"kept float: {why} at {config.weight.bits} bits, {why_again} at "
                                   f"{fallback_bits} bits")
    final = _quantize_copy(model, config, batches, plan, progress=progress)
    return final, decisions
