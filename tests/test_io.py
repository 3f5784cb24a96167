import json
import struct

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import torchquant as tq
from torchquant import QuantConfig, QuantSpec
from torchquant.nn import QuantLinear

from test_convert import _batches, _net, _same_state, _state, _types


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
def test_round_trip_bit_identical(tmp_path, preset):
    model = tq.quantize_model(_net(), preset, calibration=_batches())
    x = _batches(1, seed=7)[0]
    path = tmp_path / "model.safetensors"
    tq.save(model, path)
    loaded = tq.load(path, _net(seed=3))
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    assert loaded.seq[0] is loaded.seq[2] and loaded.head.converted
    assert _same_state(_state(loaded), _state(model))


def test_round_trip_fake_quant_and_float(tmp_path):
    model = tq.prepare(_net(), "int8-static")
    tq.calibrate(model, _batches())
    x = _batches(1, seed=7)[0]
    tq.save(model, tmp_path / "fake.safetensors")
    loaded = tq.load(tmp_path / "fake.safetensors", _net(seed=3))
    assert not loaded.head.converted and torch.equal(_outputs(loaded, x), _outputs(model, x))
    plain = _net()
    tq.save(plain, str(tmp_path / "float.safetensors"))
    assert torch.equal(_outputs(tq.load(tmp_path / "float.safetensors", _net(seed=3)), x), _outputs(plain, x))
    # a model already prepared the same way loads too
    again = tq.load(tmp_path / "fake.safetensors", tq.prepare(_net(seed=4), "int8-static"))
    assert torch.equal(_outputs(again, x), _outputs(model, x))


def test_file_is_safetensors_with_json_layout(tmp_path):
    path = tmp_path / "m.safetensors"
    tq.save(tq.quantize_model(_net()), path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + header_len])
    layout = json.loads(header["__metadata__"]["torchquant"])
    assert layout["layers"]["head"]["converted"] and layout["layers"]["head"]["type"] == "QuantLinear"
    assert header["head.qweight"]["dtype"] == "I8"


def _state_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("bits, ratio", [(8, 1 / 4), (4, 1 / 8)])
def test_converted_size(bits, ratio):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128))
    float_bytes = _state_bytes(model)
    weight_bytes = sum(m.weight.numel() * 4 for m in model if isinstance(m, nn.Linear))
    tq.quantize_model(model, QuantConfig(QuantSpec(bits=bits)))
    small = _state_bytes(model)
    assert all(isinstance(t, torch.Tensor) for t in model.state_dict().values())
    assert weight_bytes * ratio < small < float_bytes * ratio * 1.05
    assert not any(t.is_floating_point() and t.numel() > 1000 for t in model.state_dict().values())


def test_load_errors(tmp_path):
    model = _net()
    with pytest.raises(FileNotFoundError, match="no such file"):
        tq.load(tmp_path / "missing.safetensors", model)
    good = tmp_path / "good.safetensors"
    tq.save(tq.quantize_model(_net()), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tq.load(truncated, model)
    pickled = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tq.load(pickled, model)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a torchquant checkpoint"):
        tq.load(foreign, model)
    with pytest.raises(TypeError, match="path must be a str"):
        tq.save(model, 3)
    assert _types(model) == _types(_net())


def test_load_into_wrong_model_leaves_it_unchanged(tmp_path):
    path = tmp_path / "m.safetensors"
    tq.save(tq.quantize_model(_net()), path)
    other = nn.Sequential(nn.Linear(5, 5))
    with pytest.raises(ValueError, match="does not have"):
        tq.load(path, other)
    assert type(other[0]) is nn.Linear
    small = tq.quantize_model(nn.Sequential(QuantLinear(4, 4)))
    tq.save(small, path)
    target = nn.Sequential(nn.Linear(4, 6))
    before = _state(target)
    with pytest.raises(ValueError, match="does not fit the model"):
        tq.load(path, target)
    assert type(target[0]) is nn.Linear and _same_state(before, _state(target))
