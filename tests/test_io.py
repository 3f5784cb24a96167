import json
import os
import signal
import stat
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
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


def test_load_refuses_special_files_without_opening_them(tmp_path):
    # they were reported as missing; a pipe is never opened (a read would wait for a writer)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        with pytest.raises(ValueError, match="is not a regular file"):
            tq.load(path, _net())


def test_save_never_replaces_a_special_file(tmp_path):
    # the temporary file was renamed over it: saving to /dev/null as root replaced the device with a regular file
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(FileExistsError, match="is not a regular file .* it is never replaced"):
        tq.save(_small(), fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["pipe.safetensors"]


def test_save_writes_through_a_symbolic_link(tmp_path):
    # the rename replaced the link itself with the new file (/dev/stdout, redirected to a file, as root)
    model = _small()
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "target.safetensors"
    target.write_bytes(b"old\n")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    tq.save(model, str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old\n"
    assert sorted(os.listdir(tmp_path / "real")) == ["target.safetensors"]  # no temporary file left
    again = tq.load(str(target), _small())
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "real" / "new.safetensors")
    tq.save(model, str(dangling))
    assert dangling.is_symlink() and (tmp_path / "real" / "new.safetensors").is_file()
    os.chmod(target, 0o444)
    with pytest.raises(PermissionError, match="read-only"):
        tq.save(model, str(link))


def test_save_refuses_a_model_on_the_meta_device(tmp_path):
    # every meta tensor's storage is at address 0, so they all looked tied; then copying one failed with
    # "Cannot copy out of meta tensor"
    model = tq.quantize_model(nn.Sequential(nn.Linear(8, 4, device="meta")))
    with pytest.raises(ValueError, match=r"save: 0\.bias is on the meta device, which holds no values"):
        tq.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_model_on_the_meta_device(tmp_path):
    # (a dynamic model loaded nothing and said nothing; a static one failed inside with Tensor.item())
    path = tmp_path / "m.safetensors"
    tq.save(_small(), path)
    with torch.device("meta"):
        model = _skeleton()
    with pytest.raises(ValueError, match=r"load: 0\.weight of the model is on the meta device; .*to_empty"):
        tq.load(path, model)
    assert _types(model) == _types(_skeleton())
    loaded = tq.load(path, model.to_empty(device="cpu"))
    x = torch.randn(4, 5)
    assert torch.equal(_outputs(loaded, x), _outputs(_small(), x))


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


# ------------------------------------------------------------------------------------------------------------
# a failed load leaves the model exactly as it was, whatever its state

QAT = QuantConfig(QuantSpec(bits=4, learn_scale=True),
                  QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", learn_scale=True))


def _trained_step(model):
    """One QAT step, so learned scales and observers hold trained values."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(_batches(1, seed=5)[0]).square().mean().backward()
    optimizer.step()
    return model


STATES = {
    "float": lambda model: model,
    "prepared-dynamic": lambda model: tq.prepare(model, "int8-dynamic"),
    "prepared-static": lambda model: tq.calibrate(tq.prepare(model, "int8-static"), _batches(), progress=False),
    "qat": lambda model: _trained_step(tq.prepare(model, QAT)),
    "converted-dynamic": lambda model: tq.quantize_model(model, "int8-dynamic"),
    "converted-static": lambda model: tq.quantize_model(model, "int8-static", calibration=_batches()),
    "converted-qat": lambda model: tq.convert(_trained_step(tq.prepare(model, QAT))),
    "converted-w4": lambda model: tq.quantize_model(model, "w4a8-dynamic"),
}
# (state of the model, state of the checkpoint loaded into it); fake-quant into fake-quant loads in place, the
# others build new layers
LOADS = [("float", "converted-static"), ("float", "prepared-static"), ("prepared-dynamic", "converted-dynamic"),
         ("prepared-static", "converted-static"), ("prepared-static", "prepared-static"), ("qat", "qat"),
         ("qat", "converted-qat"), ("converted-static", "converted-static"), ("converted-w4", "converted-w4")]
BOUNDED = {"prepared-static": "head.input_quantizer.scale", "qat": "head.weight_quantizer.scale"}


def _snapshot(model):
    """Everything a failed load must not change: module objects and types under every name, parameter and buffer
    objects and values, requires_grad, training flags, and the output."""
    modules = [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    tensors = [(name, id(t), t.requires_grad, t.dtype, t.detach().clone()) for name, t in named]
    flags = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        output = model.eval()(_batches(1, seed=7)[0])
    for m, training in flags:
        m.training = training
    return modules, tensors, [training for _, training in flags], output


def _assert_same(a, b):
    assert a[0] == b[0], "modules changed"
    assert [t[:4] for t in a[1]] == [t[:4] for t in b[1]], "parameter or buffer objects changed"
    for (name, *_, before), (*_, after) in zip(a[1], b[1]):
        assert torch.equal(before, after), f"{name} changed"
    assert a[2] == b[2], "training flags changed"
    assert torch.equal(a[3], b[3]), "output changed"


def _rewrite(source, target, tensors=None, layout=None):
    """Copies a checkpoint; tensors(dict) and layout(dict) may edit its tensors and its JSON layout on the way."""
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if tensors is not None:
        tensors(stored)
    meta = json.loads(metadata["torchquant"])
    if layout is not None:
        layout(meta)
    metadata["torchquant"] = json.dumps(meta)
    save_file(stored, str(target), metadata=metadata)
    return target


def _bad_checkpoint(failure, kind, tmp_path):
    good = tmp_path / "good.safetensors"
    tq.save(STATES[kind](_net(9)), good)
    bad = tmp_path / "bad.safetensors"
    if failure == "other shape":
        other = _net(9)
        other.head = nn.Linear(5, 3)
        tq.save(STATES[kind](other), bad)
    elif failure == "bad value":
        key = BOUNDED.get(kind, "head.weight_scale")
        _rewrite(good, bad, tensors=lambda t: t[key].view(-1)[0].fill_(float("nan")))
    elif failure == "layout":
        _rewrite(good, bad, layout=lambda m: m["layers"]["head"].update(type="QuantConv2d"))
    elif failure == "missing tensor":
        _rewrite(good, bad, tensors=lambda t: t.pop("head.bias"))
    else:
        return good
    return bad


FAILURES = ["other shape", "bad value", "layout", "missing tensor", "fails loading a built layer",
            "fails loading in place"]


@pytest.mark.parametrize("state, kind, failure", [
    (state, kind, failure) for state, kind in LOADS for failure in FAILURES
    # (fake-quant into fake-quant loads in place: no layer is built)
    if not (failure == "fails loading a built layer" and state == kind and "converted" not in state)])
def test_failed_load_leaves_the_model_exactly_as_it_was(tmp_path, monkeypatch, state, kind, failure):
    model = STATES[state](_net(0))
    path = _bad_checkpoint(failure, kind, tmp_path)
    before = _snapshot(model)
    if failure.startswith("fails loading"):
        real = nn.Module.load_state_dict

        def failing(self, *args, **kwargs):
            if (self is model) == (failure == "fails loading in place"):
                raise RuntimeError("injected failure")
            return real(self, *args, **kwargs)
        monkeypatch.setattr(nn.Module, "load_state_dict", failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            tq.load(path, model)
        monkeypatch.undo()
    else:
        with pytest.raises(ValueError, match="bad.safetensors"):
            tq.load(path, model)
    _assert_same(before, _snapshot(model))
    # the good checkpoint loads into the very same model: the failure above was the only obstacle
    expected = _snapshot(tq.load(tmp_path / "good.safetensors", _net(3)))[3]
    assert torch.equal(_snapshot(tq.load(tmp_path / "good.safetensors", model))[3], expected)


# ------------------------------------------------------------------------------------------------------------
# every tensor is checked against the format of the layer that holds it: nothing is cast, nothing out of range

def _small(bits=8, in_features=5):
    """A converted int8-static two-layer model; its first layer has an odd K (a pad nibble at <= 4 bits)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, 6), nn.ReLU(), nn.Linear(6, 3))
    config = QuantConfig(QuantSpec(bits=bits), QuantConfig.preset("int8-static").activation)
    return tq.quantize_model(model, config, calibration=[torch.randn(4, in_features) for _ in range(2)])


def _skeleton(in_features=5):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(in_features, 6), nn.ReLU(), nn.Linear(6, 3))


def _set(key, value, dtype=None):
    def edit(tensors):
        t = tensors[key].to(dtype) if dtype is not None else tensors[key].clone()
        t.view(-1)[0] = value
        tensors[key] = t
    return edit


TAMPERED = {
    # name: (weight bits, edit, the tensor the message names, what else it says)
    "qweight int32 300": (8, _set("0.qweight", 300, torch.int32), "0.qweight", "int32"),
    "qweight uint8 200": (8, _set("0.qweight", 200, torch.uint8), "0.qweight", "uint8"),
    "qweight bool": (8, lambda t: t.update({"0.qweight": t["0.qweight"] != 0}), "0.qweight", "bool"),
    "qweight out of 6 bits": (6, _set("0.qweight", 40), "0.qweight", "[-32, 31] for 6-bit"),
    "qweight out of 3 bits": (3, _set("0.qweight", 0x77), "0.qweight", "[-4, 3] for 3-bit"),
    "qweight 1 bit zero": (1, _set("0.qweight", 0), "0.qweight", "-1 or +1"),
    "qweight pad nibble": (4, lambda t: t["0.qweight"][:, -1].bitwise_or_(0x10), "0.qweight", "pad nibble"),
    "qweight shape": (8, lambda t: t.update({"0.qweight": t["0.qweight"].t().contiguous()}), "0.qweight",
                      "[5, 6], the model expects int8 [6, 5]"),
    "scale zero": (8, _set("0.weight_scale", 0.0), "0.weight_scale", "finite and positive"),
    "scale negative": (8, _set("2.weight_scale", -1.0), "2.weight_scale", "finite and positive"),
    "scale nan": (8, _set("0.weight_scale", float("nan")), "0.weight_scale", "nan"),
    "scale inf": (4, _set("0.weight_scale", float("inf")), "0.weight_scale", "inf"),
    "scale subnormal": (8, _set("0.weight_scale", 1e-45), "0.weight_scale", "finite and positive"),
    "scale float64": (8, _set("0.weight_scale", 0.1, torch.float64), "0.weight_scale", "float64"),
    "bias bfloat16": (8, _set("0.bias", 0.5, torch.bfloat16), "0.bias", "bfloat16"),
    "bias int": (8, _set("0.bias", 1, torch.int32), "0.bias", "int32"),
    "input scale zero": (8, _set("0.input_quantizer.scale", 0.0), "0.input_quantizer.scale", "positive"),
    "zero point out of uint8": (8, _set("0.input_quantizer.zero_point", 300), "0.input_quantizer.zero_point",
                                "[0, 255]"),
    "zero point int64": (8, _set("0.input_quantizer.zero_point", 3, torch.int64), "0.input_quantizer.zero_point",
                         "int64"),
    "observer lo above hi": (8, _set("0.input_quantizer.observer.lo", 1e9), "0.input_quantizer.observer.hi",
                             "below"),
    "observer nan": (8, _set("0.input_quantizer.observer.hi", float("nan")), "0.input_quantizer.observer.hi",
                     "finite"),
    "observer batches negative": (8, _set("0.input_quantizer.observer.batches", -1),
                                  "0.input_quantizer.observer.batches", "[0,"),
}


def _small_state(model):
    return ([(name, type(m)) for name, m in model.named_modules()],
            [(k, v.dtype, v.tolist()) for k, v in model.state_dict().items()])


@pytest.mark.parametrize("case", list(TAMPERED))
def test_load_rejects_a_tampered_tensor_naming_it(tmp_path, case):
    bits, edit, key, fragment = TAMPERED[case]
    good = tmp_path / "good.safetensors"
    tq.save(_small(bits), good)
    bad = _rewrite(good, tmp_path / "bad.safetensors", tensors=edit)
    for model in (_skeleton(), tq.load(good, _skeleton())):  # a float skeleton, and the converted model
        before = _small_state(model)
        with pytest.raises(ValueError) as info:
            tq.load(bad, model)
        message = str(info.value)
        assert f"'{key}'" in message and fragment in message and "bad.safetensors" in message, message
        assert _small_state(model) == before


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("in_features", [5, 8])
def test_round_trip_every_bit_width(tmp_path, bits, in_features):
    model = _small(bits, in_features)
    tq.save(model, tmp_path / "m.safetensors")
    loaded = tq.load(tmp_path / "m.safetensors", _skeleton(in_features))
    x = torch.randn(3, in_features)
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))


# ------------------------------------------------------------------------------------------------------------
# writing: atomic, no temporary file left by a failure or a signal, read-only files kept unless forced

def test_save_refuses_a_read_only_file_unless_forced(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"keep me")
    path.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only; pass force=True"):
        tq.save(_small(), path)
    assert path.read_bytes() == b"keep me" and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    tq.save(_small(), path, force=True)
    assert tq.load(path, _skeleton())[0].converted
    tq.save(_small(), path)  # a writable file is replaced, as before
    with pytest.raises(IsADirectoryError, match="is a directory"):
        tq.save(_small(), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tq.save(_small(), tmp_path / "no" / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_refuses_a_path_that_names_no_file(tmp_path, monkeypatch):
    # "" resolved to the current directory (the rename failed with a bare IsADirectoryError) and "out/" wrote a
    # file called out
    monkeypatch.chdir(tmp_path)
    for path in ("", "out/", str(tmp_path / "out") + "/"):
        with pytest.raises(IsADirectoryError, match="is not a file name"):
            tq.save(_small(), path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_save_into_a_directory_that_refuses_files_names_it():
    # access() allows root to write /proc, but no file can be created there: the error names the destination,
    # not the temporary file
    with pytest.raises(OSError, match=r"^save: cannot (create files in /proc)") as info:
        tq.save(_small(), "/proc/m.safetensors")
    assert ".tmp" not in str(info.value)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def partial(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr("torchquant.io.save_file", partial)
    with pytest.raises(OSError, match="disk full"):
        tq.save(_small(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# a save that signals its own thread halfway through writing. SIGINT gets Python's usual handler first: a process
# started in the background by a shell inherits SIGINT ignored, and then the signal did nothing and the "partial"
# write below completed.
SIGNALLED_SAVE = """
import os, signal, sys, time
import torch.nn as nn
import torchquant, torchquant.io
signal.signal(signal.SIGINT, signal.default_int_handler)
def partial(tensors, path, metadata=None):
    open(path, "wb").write(b"partial")
    signal.raise_signal(getattr(signal, sys.argv[2]))
    time.sleep(30)
torchquant.io.save_file = partial
if sys.argv[3] == "handler":  # a handler of the user's that does not end the process: save raises instead
    signal.signal(signal.SIGTERM, lambda *args: print("handler ran"))
try:
    torchquant.save(nn.Sequential(nn.Linear(2, 2)), os.path.join(sys.argv[1], "m.safetensors"))
except InterruptedError as e:
    print("InterruptedError:", e)
"""


@pytest.mark.parametrize("sig, handler", [("SIGTERM", "default"), ("SIGINT", "default"), ("SIGTERM", "handler")])
def test_interrupted_save_leaves_nothing(tmp_path, sig, handler):
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", SIGNALLED_SAVE, str(out), sig, handler], capture_output=True,
                            text=True, timeout=120)
    assert list(out.iterdir()) == [], result.stderr
    if handler == "handler":
        assert result.returncode == 0 and "handler ran" in result.stdout, result.stderr
        assert "InterruptedError: interrupted by SIGTERM; nothing was written" in result.stdout
    else:
        assert result.returncode == -getattr(signal, sig), (result.returncode, result.stderr)


def test_failed_load_of_a_folded_batchnorm_leaves_the_skeleton_as_it_was(tmp_path):
    def skeleton(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    model = skeleton(0).eval()
    model[1].running_mean.uniform_(-1, 1)
    tq.save(tq.quantize_model(model, "int8-dynamic"), tmp_path / "good.safetensors")
    with safe_open(str(tmp_path / "good.safetensors"), framework="pt") as f:
        assert '"folded_bn": "1"' in f.metadata()["torchquant"]
    for edit in (lambda t: t["0.weight_scale"].fill_(float("nan")), lambda t: t.pop("4.bias")):
        _rewrite(tmp_path / "good.safetensors", tmp_path / "bad.safetensors", tensors=edit)
        target = skeleton(1)
        before = _snapshot_folded(target)
        with pytest.raises(ValueError, match="bad.safetensors"):
            tq.load(tmp_path / "bad.safetensors", target)
        assert _snapshot_folded(target) == before and type(target[1]) is nn.BatchNorm2d
    loaded = tq.load(tmp_path / "good.safetensors", skeleton(1))
    x = torch.randn(2, 3, 4, 4)
    assert type(loaded[1]) is nn.Identity and torch.equal(_outputs(loaded, x), _outputs(model, x))


def test_prepared_checkpoint_with_the_folded_batchnorm_inside_its_layer_loads():
    # a prepared (fake-quant) DigitsBNCNN(channels=4, hidden=8) written by a torchquant that stored a folded
    # BatchNorm inside its layer (conv1.bn.weight) instead of under its own name (bn1.weight), see
    # scripts/write_old_checkpoints.py: it failed with "missing ['bn1.weight', ...]"; it loads into the float model
    # and computes what it computed then, converted too
    from torchquant.examples import DigitsBNCNN
    folder = os.path.join(os.path.dirname(__file__), "data", "checkpoints")
    path = os.path.join(folder, "prepared-bn-inside-layer.prepared.safetensors")
    with safe_open(path, "pt") as f:
        assert "conv1.bn.weight" in f.keys() and "bn1.weight" not in f.keys()
    loaded = tq.load(path, DigitsBNCNN(4, 8).eval())
    assert loaded.conv1.folded_bn == "bn1" and "bn1.weight" in loaded.state_dict()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with safe_open(os.path.join(folder, "expected_outputs.safetensors"), "pt") as f:
        expected = {kind: f.get_tensor(f"prepared-bn-inside-layer.{kind}") for kind in ("prepared", "converted")}
    with torch.no_grad():
        assert torch.equal(loaded(x), expected["prepared"])
        assert torch.equal(tq.convert(loaded)(x), expected["converted"])


def _snapshot_folded(model):
    return [(n, id(m), type(m)) for n, m in model.named_modules()], \
        [(k, v.tolist()) for k, v in model.state_dict().items()]


# ------------------------------------------------------------------------------------------------------------
# a layer's fused activation clamp is part of its function: stored, restored, checked

@pytest.mark.parametrize("state", ["prepared", "converted"])
@pytest.mark.parametrize("clamp", [(0.0, None), (-1.0, 0.25), (None, 0.0)])
def test_activation_clamp_round_trips(tmp_path, state, clamp):
    model = _small() if state == "converted" else tq.prepare(_skeleton(), "int8-static")
    model[0].set_activation_clamp(*clamp)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "clamped.safetensors"
    tq.save(model, path)
    for target in (_skeleton(), tq.prepare(_skeleton(), "int8-static")):
        if state == "converted" and isinstance(target[0], QuantLinear):
            continue  # a converted file does not load into a fake-quant model
        loaded = tq.load(path, target)
        assert (loaded[0].clamp_min, loaded[0].clamp_max) == clamp
        assert (loaded[2].clamp_min, loaded[2].clamp_max) == (None, None)
        assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    # a file without a clamp removes one the model's layer has (fake-quant, loaded in place)
    plain = tq.prepare(_skeleton(), "int8-static")
    tq.save(plain, tmp_path / "plain.safetensors")
    model = tq.prepare(_skeleton(), "int8-static")
    model[0].set_activation_clamp(0.0, 6.0)
    assert tq.load(tmp_path / "plain.safetensors", model)[0].clamp_min is None


@pytest.mark.parametrize("clamp", [[1.0], [None, "6"], [True, None], [2.0, 1.0], "relu", [-1e300, 1e300],
                                   [None, 3.5e38]])
def test_malformed_clamp_is_refused(tmp_path, clamp):
    good = tmp_path / "good.safetensors"
    tq.save(_small(), good)
    bad = _rewrite(good, tmp_path / "bad.safetensors", layout=lambda m: m["layers"]["0"].update(clamp=clamp))
    model = _skeleton()
    with pytest.raises(ValueError, match=r"layer '0': 'clamp' must be \[clamp_min, clamp_max\]"):
        tq.load(bad, model)
    assert _types(model) == _types(_skeleton())


def test_clamp_nan_in_json_is_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    tq.save(_small(), good)
    bad = _rewrite(good, tmp_path / "bad.safetensors",
                   layout=lambda m: m["layers"]["0"].update(clamp=[float("nan"), None]))
    with pytest.raises(ValueError, match="'clamp' must be"):
        tq.load(bad, _skeleton())


# ------------------------------------------------------------------------------------------------------------
# where quantization-aware training stands with a folded BatchNorm travels with a prepared checkpoint

def _conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


@pytest.mark.parametrize("preset", ["int8-static", "int8-pipeline"])
@pytest.mark.parametrize("how", ["freeze_bn_stats", "freeze_bn_after"])
def test_prepared_checkpoint_keeps_the_batchnorm_freeze(tmp_path, preset, how):
    config = QuantConfig.preset(preset)
    if how == "freeze_bn_after":
        config = QuantConfig.from_dict({**config.to_dict(), "freeze_bn_after": 2})
    model = tq.prepare(_conv_bn_net(), config).train()
    for seed in range(3):
        model(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)))
    if how == "freeze_bn_stats":
        tq.freeze_bn_stats(model)
    path = tmp_path / "qat.safetensors"
    tq.save(model, path)
    loaded = tq.load(path, _conv_bn_net()).train()
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want, got = model(x), loaded(x)
    assert torch.equal(got, want)  # frozen: the running statistics, not this batch's
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items() if "running" in k)
    # the state is stored, not compared: a checkpoint saved at another step loads into this model in place
    fresh = tq.prepare(_conv_bn_net(), config)
    tq.save(fresh, tmp_path / "fresh.safetensors")
    assert tq.load(tmp_path / "fresh.safetensors", loaded) is not None


def test_prepared_checkpoint_without_the_batchnorm_state_loads(tmp_path):
    # files of earlier versions do not record it
    model = tq.prepare(_conv_bn_net(), "int8-static")
    path = tmp_path / "qat.safetensors"
    tq.save(model, path)
    old = _rewrite(path, tmp_path / "old.safetensors",
                   layout=lambda meta: [entry.pop("bn_training") for entry in meta["layers"].values()])
    loaded = tq.load(old, _conv_bn_net())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("state", [{"frozen": 1, "steps": 0, "freeze_after": None},
                                   {"frozen": True, "steps": -1, "freeze_after": None},
                                   {"frozen": True, "steps": 0}, "frozen"])
def test_malformed_batchnorm_state_is_refused(tmp_path, state):
    path = tmp_path / "qat.safetensors"
    tq.save(tq.prepare(_conv_bn_net(), "int8-static"), path)
    bad = _rewrite(path, tmp_path / "bad.safetensors",
                   layout=lambda meta: meta["layers"]["0"].update(bn_training=state))
    model = _conv_bn_net()
    with pytest.raises(ValueError, match="layer '0': 'bn_training' must be"):
        tq.load(bad, model)
    assert _types(model) == _types(_conv_bn_net())
