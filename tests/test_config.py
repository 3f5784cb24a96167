import json

import pytest
import torch.nn as nn

from torchquant import QuantConfig, QuantSpec
from torchquant.config import PRESETS, resolve_config


def test_defaults_and_presets():
    assert QuantSpec() == QuantSpec(bits=8, signed=True, symmetric=True, granularity="per_channel",
                                    rounding="nearest", observer="minmax", dynamic=False, learn_scale=False)
    assert QuantConfig() == QuantConfig.preset("int8-dynamic") == resolve_config(None)
    dyn = QuantConfig.preset("int8-dynamic")
    assert dyn.weight.bits == 8 and dyn.weight.granularity == "per_channel" and dyn.weight.symmetric
    assert dyn.activation.dynamic and dyn.activation.granularity == "per_token"
    static = QuantConfig.preset("int8-static")
    assert not static.activation.dynamic and static.activation.granularity == "per_tensor"
    assert not static.activation.signed and not static.activation.symmetric
    w4 = QuantConfig.preset("w4a8-dynamic")
    assert w4.weight.bits == 4 and w4.activation.bits == 8 and w4.activation.dynamic
    w7 = QuantConfig.preset("w7a8-dynamic")  # weights in [-64, 64]: the AVX2 byte kernel's
    assert w7.weight.bits == 7 and w7.weight.symmetric and w7.activation == dyn.activation
    assert set(PRESETS) >= {"int8-dynamic", "int8-static", "w4a8-dynamic", "w7a8-dynamic"}
    assert resolve_config("int8-static") == static


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
def test_json_round_trip(name):
    config = QuantConfig.preset(name).with_skip(["head", "encoder.*"])
    data = json.loads(json.dumps(config.to_dict()))
    assert QuantConfig.from_dict(data) == config
    spec = QuantSpec(bits=3, rounding="truncate", observer="percentile", percentile=99.0)
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_with_skip_takes_one_rule_or_several():
    base = QuantConfig.preset("int8-static")
    assert base.with_skip("head*").skip == ("head*",)  # (a string is one glob, not its letters)
    assert base.with_skip(nn.Linear).with_skip(["a", "b"]).skip == (nn.Linear, "a", "b")
    assert base.with_skip({"a": 1}.keys()).with_skip(r for r in ("b",)).skip == ("a", "b")  # any iterable
    with pytest.raises(TypeError, match="QuantConfig.with_skip: skip must be"):
        base.with_skip(3)
    with pytest.raises(ValueError, match="QuantConfig.preset: unknown preset"):
        QuantConfig.preset(["int8-static"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(bits=0), ValueError, r"bits must be in \[1, 8\], got 0"),
    (dict(bits=9), ValueError, r"bits must be in \[1, 8\], got 9"),
    (dict(bits=8.0), TypeError, "bits must be an int"),
    (dict(bits=True), TypeError, "bits must be an int"),
    (dict(granularity="per_row"), ValueError, "granularity must be one of"),
    (dict(rounding="floor"), ValueError, "rounding must be one of"),
    (dict(observer="histogram"), ValueError, "observer must be one of"),
    (dict(signed=1), TypeError, "signed must be a bool"),
    (dict(granularity="per_token"), ValueError, "per_token.*only for dynamic"),
    (dict(dynamic=True, symmetric=False, signed=True), ValueError, "dynamic=True needs symmetric"),
    (dict(dynamic=True, learn_scale=True), ValueError, "learn_scale=True needs static"),
    (dict(signed=False), ValueError, "unsigned range needs symmetric=False"),
    (dict(bits=1, symmetric=False), ValueError, "signed bits=1 is sign binarization"),
    (dict(percentile=10.0), ValueError, "percentile must be in"),
    (dict(averaging_constant=0.0), ValueError, "averaging_constant must be in"),
])
def test_bad_spec(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantSpec(**kwargs)


def test_bad_config():
    with pytest.raises(TypeError, match="weight must be a QuantSpec"):
        QuantConfig(weight="int8")
    with pytest.raises(ValueError, match="weight spec must be signed=True and symmetric=True"):
        QuantConfig(weight=QuantSpec(signed=False, symmetric=False))
    with pytest.raises(ValueError, match="weight spec cannot be dynamic"):
        QuantConfig(weight=QuantSpec(granularity="per_token", dynamic=True))
    with pytest.raises(ValueError, match="activation granularity"):
        QuantConfig(activation=QuantSpec(granularity="per_channel"))
    with pytest.raises(ValueError, match=r"per_token activations need bits in \[2, 8\]"):
        QuantConfig(activation=QuantSpec(bits=1, granularity="per_token", dynamic=True))
    with pytest.raises(TypeError, match="skip entries"):
        QuantConfig(skip=(3,))
    with pytest.raises(ValueError, match="unknown preset 'int3'"):
        QuantConfig.preset("int3")
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        resolve_config(8)
    with pytest.raises(TypeError, match="only name-glob skip rules"):
        QuantConfig(skip=(nn.Linear,)).to_dict()
    with pytest.raises(ValueError, match="unknown field"):
        QuantSpec.from_dict({"bits": 8, "colour": "red"})


def test_from_dict_takes_skip_as_a_single_glob_or_a_list():
    # tuple("encoder.*") made one-letter globs (skipping any module named 'e', 'n', ...)
    base = QuantConfig().to_dict()
    assert QuantConfig.from_dict({**base, "skip": "encoder.*"}).skip == ("encoder.*",)
    assert QuantConfig.from_dict({**base, "skip": ["a", "b.*"]}).skip == ("a", "b.*")
    with pytest.raises(TypeError, match="skip must be a tuple"):
        QuantConfig.from_dict({**base, "skip": 5})


def test_skip_forms_and_frozen():
    rule = lambda name, module: name.startswith("x")  # noqa: E731
    config = QuantConfig(skip="head")
    assert config.skip == ("head",)
    assert QuantConfig(skip=[nn.Conv2d, rule]).skip == (nn.Conv2d, rule)
    with pytest.raises(Exception):
        config.weight = QuantSpec(bits=4)
