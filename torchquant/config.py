"""Quantization settings: QuantSpec (how one tensor is quantized) and QuantConfig (weights + activations + skip).

Both are validated when built, so a bad setting fails where it is written, not deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torchquant._ops import ROUNDINGS

GRANULARITIES = ("per_channel", "per_tensor", "per_token")
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")  # (per_token: activations quantized at run time)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"QuantSpec: {name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"QuantSpec: {name} must be a bool, got {type(value).__name__}")


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor (the weights or the activations of a layer) is quantized.

    bits: 1-8. signed: int8 storage (signed) or uint8 (unsigned). symmetric: zero point 0 (signed) versus an
    asymmetric range with a zero point. granularity: one scale per output channel, one per tensor, or (dynamic
    activations only) one per token (row). rounding: round half to even or truncate toward zero. observer: how
    the range is estimated, a name in torchquant.observers.OBSERVERS. dynamic: activations quantized with qparams
    computed from each input at run time instead of calibrated ones. learn_scale: the scale is a parameter
    trained with the LSQ gradient. percentile: the percentile (of |x|, or of x on each side) kept by the
    percentile observer. averaging_constant: the update weight of the moving_average observer.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: str = "per_channel"
    rounding: str = "nearest"
    observer: str = "minmax"
    dynamic: bool = False
    learn_scale: bool = False
    percentile: float = 99.99
    averaging_constant: float = 0.01

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"QuantSpec: bits must be an int in [1, 8], got {type(self.bits).__name__}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec: bits must be in [1, 8], got {self.bits}")
        for name in ("signed", "symmetric", "dynamic", "learn_scale"):
            _check_bool(name, getattr(self, name))
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_choice("observer", self.observer, tuple(_observer_table()))
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)):
            raise TypeError(f"QuantSpec: percentile must be a number, got {type(self.percentile).__name__}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantSpec: percentile must be in (50, 100], got {self.percentile}")
        if isinstance(self.averaging_constant, bool) or not isinstance(self.averaging_constant, (int, float)):
            raise TypeError(
                f"QuantSpec: averaging_constant must be a number, got {type(self.averaging_constant).__name__}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"QuantSpec: averaging_constant must be in (0, 1], got {self.averaging_constant}")
        if self.granularity == "per_token" and not self.dynamic:
            raise ValueError("QuantSpec: granularity='per_token' is only for dynamic activations (dynamic=True)")
        if self.dynamic and not (self.symmetric and self.signed):
            # run-time qparams must be known without a device sync: symmetric signed means zero point 0
            raise ValueError("QuantSpec: dynamic=True needs symmetric=True and signed=True (zero point 0)")
        if self.dynamic and self.learn_scale:
            raise ValueError("QuantSpec: learn_scale=True needs static qparams (dynamic=False)")
        if not self.signed and self.symmetric:
            raise ValueError("QuantSpec: an unsigned range needs symmetric=False (a symmetric range is signed)")
        if self.bits == 1 and self.signed and not self.symmetric:
            raise ValueError("QuantSpec: signed bits=1 is sign binarization and needs symmetric=True "
                             "(or signed=False for the affine range [0, 1])")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        if not isinstance(data, dict):
            raise TypeError(f"QuantSpec.from_dict: data must be a dict, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"QuantSpec.from_dict: unknown field(s) {sorted(unknown)}")
        return cls(**data)


def _observer_table() -> dict:
    # torchquant.observers.OBSERVERS, imported when needed because observers.py itself builds on QuantSpec
    from torchquant.observers import OBSERVERS
    return OBSERVERS


def _weight_spec(bits: int, observer: str = "minmax") -> QuantSpec:
    return QuantSpec(bits=bits, granularity="per_channel", observer=observer)


DYNAMIC_TOKEN_INT8 = QuantSpec(bits=8, granularity="per_token", dynamic=True)
STATIC_TENSOR_UINT8 = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor")


@dataclass(frozen=True)
class Preset:
    """A named configuration: `build()` makes its QuantConfig; `description` is what --help and the docs say."""
    build: Callable[[], "QuantConfig"]
    description: str


# The presets by name: QuantConfig.preset, the command line's --config choices and its help read this table, so
# adding a preset is one entry here (and its test).
PRESETS: dict[str, Preset] = {
    "int8-dynamic": Preset(lambda: QuantConfig(weight=_weight_spec(8), activation=DYNAMIC_TOKEN_INT8),
                           "int8 per-channel weights, int8 per-token activations quantized at run time"),
    "int8-static": Preset(lambda: QuantConfig(weight=_weight_spec(8), activation=STATIC_TENSOR_UINT8),
                          "int8 per-channel weights, uint8 per-tensor activations calibrated beforehand"),
    "int8-pipeline": Preset(lambda: QuantConfig(weight=_weight_spec(8), activation=STATIC_TENSOR_UINT8,
                                                integer_pipeline=True),
                            "int8-static traced into an integer pipeline: uint8 tensors between layers, integer "
                            "residual adds and pooling, one quantize at the input and one dequantize at the output"),
    # weights in [-64, 64]: the AVX2 kernels multiply them as bytes (vpmaddubsw, exact for them) instead of widened
    "w7a8-dynamic": Preset(lambda: QuantConfig(weight=_weight_spec(7), activation=DYNAMIC_TOKEN_INT8),
                           "7-bit per-channel weights, int8 per-token dynamic activations: int8-dynamic with a "
                           "weight bit less, 1.1-1.6x its speed on CPUs without AVX-512 VNNI (the same elsewhere)"),
    # 4-bit weights lose much more to outliers: the MSE-optimal clipping range is worth its search
    "w4a8-dynamic": Preset(lambda: QuantConfig(weight=_weight_spec(4, "mse"), activation=DYNAMIC_TOKEN_INT8),
                           "4-bit per-channel weights (MSE-searched ranges), int8 per-token dynamic activations"),
}
DEFAULT_PRESET = "int8-dynamic"


def _as_rules(skip):
    """One skip rule (a name glob, a module type or a callable) as a tuple of it; anything else as it is."""
    return (skip,) if isinstance(skip, (str, type)) or callable(skip) else skip


@dataclass(frozen=True)
class QuantConfig:
    """Weights spec, activation spec (None: activations stay float), the layers to leave float (skip) and
    BatchNorm folding.

    skip entries: a module name glob ("encoder.*", "head"), a module type (nn.Conv2d), or a callable
    (name, module) -> bool. fold_bn: prepare folds a BatchNorm2d that follows a Conv2d (a BatchNorm1d that
    follows a Linear) into the layer. freeze_bn_after: in quantization-aware training, a folded BatchNorm
    normalizes with the batch's statistics for this many training steps after prepare, then with its frozen
    running statistics (None: until torchquant.freeze_bn_stats is called).

    integer_pipeline: prepare traces the model with torch.fx and builds an integer pipeline (torchquant.graph):
    the input is quantized once, quantized layers pass uint8/int8 tensors to each other (through ReLU, max-pool,
    flatten, reshape, concatenation and residual adds, which run on integers) and the output is dequantized once.
    It needs static activations of 2 to 8 bits rounded to nearest (dynamic activations are quantized per call from
    float rows, so those configs keep the module swap); with fewer than 8 bits every op that writes a tensor clamps
    it to that range (7-bit uint8 activations, below 128, run the AVX2 kernels' byte products: --act-bits 7).
    integer_output: the converted pipeline returns its quantized outputs as integers
    (torchquant.graph.output_qparams gives their scales) instead of dequantizing them.
    """

    weight: QuantSpec = dataclasses.field(default_factory=lambda: _weight_spec(8))
    activation: QuantSpec | None = DYNAMIC_TOKEN_INT8
    skip: tuple = ()
    fold_bn: bool = True
    freeze_bn_after: int | None = None
    integer_pipeline: bool = False
    integer_output: bool = False

    def __post_init__(self):
        if not isinstance(self.weight, QuantSpec):
            raise TypeError(f"QuantConfig: weight must be a QuantSpec, got {type(self.weight).__name__}")
        w = self.weight
        if w.dynamic:
            raise ValueError("QuantConfig: weight spec cannot be dynamic (weights are quantized once)")
        if w.granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"QuantConfig: weight granularity must be 'per_channel' or 'per_tensor', got "
                             f"{w.granularity!r}")
        if not (w.signed and w.symmetric):
            # the integer kernels take weights with zero point 0 in int8 storage
            raise ValueError("QuantConfig: weight spec must be signed=True and symmetric=True")
        a = self.activation
        if a is not None:
            if not isinstance(a, QuantSpec):
                raise TypeError(f"QuantConfig: activation must be a QuantSpec or None, got {type(a).__name__}")
            if a.granularity == "per_channel":
                raise ValueError(
                    "QuantConfig: activation granularity must be 'per_tensor' or 'per_token' (dynamic), "
                    "got 'per_channel'")
            if a.bits == 1 and a.granularity == "per_token":
                raise ValueError("QuantConfig: per_token activations need bits in [2, 8] (a symmetric per-token "
                                 "range has no 1-bit form)")
        skip = _as_rules(self.skip)
        if not isinstance(skip, (tuple, list)):
            raise TypeError(f"QuantConfig: skip must be a tuple of name globs, types or callables, got {skip!r}")
        for rule in skip:
            if not (isinstance(rule, (str, type)) or callable(rule)):
                raise TypeError(f"QuantConfig: skip entries must be name globs, module types or callables, "
                                f"got {rule!r}")
        object.__setattr__(self, "skip", tuple(skip))
        if not isinstance(self.fold_bn, bool):
            raise TypeError(f"QuantConfig: fold_bn must be a bool, got {type(self.fold_bn).__name__}")
        after = self.freeze_bn_after
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise ValueError(f"QuantConfig: freeze_bn_after must be a non-negative int or None, got {after!r}")
        for name in ("integer_pipeline", "integer_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantConfig: {name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.integer_pipeline and (a is None or a.dynamic or a.bits < 2 or a.rounding != "nearest"):
            given = "float activations" if a is None else \
                f"{a.bits}-bit {'dynamic' if a.dynamic else 'static'} activations rounded by {a.rounding!r}"
            raise ValueError("QuantConfig: integer_pipeline=True needs static activations of 2 to 8 bits rounded to "
                             f"nearest, got {given}")
        if self.integer_output and not self.integer_pipeline:
            raise ValueError("QuantConfig: integer_output=True needs integer_pipeline=True")

    @classmethod
    def preset(cls, name: str) -> "QuantConfig":
        """The configuration of a preset of torchquant.config.PRESETS (DEFAULT_PRESET is 'int8-dynamic')."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"QuantConfig.preset: unknown preset {name!r}; expected one of "
                             f"{', '.join(PRESETS)}")
        return PRESETS[name].build()

    def with_skip(self, skip) -> "QuantConfig":
        """This config with skip's rules (one rule, or an iterable of them) added to its own."""
        skip = _as_rules(skip)
        try:
            rules = tuple(skip)
        except TypeError:  # (the constructor names what else is wrong)
            raise TypeError(f"QuantConfig.with_skip: skip must be a name glob, type or callable, or an iterable of "
                            f"them, got {skip!r}") from None
        return dataclasses.replace(self, skip=tuple(self.skip) + rules)

    def to_dict(self) -> dict:
        """JSON-ready form. Only name-glob skip rules can be written; types and callables raise TypeError."""
        for rule in self.skip:
            if not isinstance(rule, str):
                raise TypeError(f"QuantConfig.to_dict: only name-glob skip rules are serializable, got {rule!r}")
        return {
            "weight": self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "skip": list(self.skip),
            "fold_bn": self.fold_bn,
            "freeze_bn_after": self.freeze_bn_after,
            "integer_pipeline": self.integer_pipeline,
            "integer_output": self.integer_output,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        if not isinstance(data, dict):
            raise TypeError(f"QuantConfig.from_dict: data must be a dict, got {type(data).__name__}")
        unknown = set(data) - {"weight", "activation", "skip", "fold_bn", "freeze_bn_after", "integer_pipeline",
                               "integer_output"}
        if unknown or "weight" not in data:
            raise ValueError(f"QuantConfig.from_dict: expected keys weight, activation, skip, fold_bn, "
                             f"freeze_bn_after, integer_pipeline, integer_output; got {sorted(data)}")
        activation = data.get("activation")
        return cls(
            weight=QuantSpec.from_dict(data["weight"]),
            activation=None if activation is None else QuantSpec.from_dict(activation),
            skip=data.get("skip", ()),  # (tuple() of a single glob would split it into one-letter globs)
            fold_bn=data.get("fold_bn", True),
            freeze_bn_after=data.get("freeze_bn_after"),
            integer_pipeline=data.get("integer_pipeline", False),
            integer_output=data.get("integer_output", False),
        )


def resolve_config(config) -> QuantConfig:
    """A QuantConfig from a QuantConfig, a preset name or None (the default preset)."""
    if config is None:
        return QuantConfig.preset(DEFAULT_PRESET)
    if isinstance(config, str):
        return QuantConfig.preset(config)
    if isinstance(config, QuantConfig):
        return config
    raise TypeError(f"config must be a QuantConfig, a preset name or None, got {type(config).__name__}")
