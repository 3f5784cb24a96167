"""File fuzzing of torchquant.load and the command line's readers.

Damaged files (every single-byte flip of a small checkpoint's header, every truncation) must give a ValueError
naming the file (a UsageError in the CLI), or load; never another exception or a crash, and a failed load leaves
the model as it was. Those sweeps run in a child process, so a crash fails the test instead of killing pytest.
Tampered tensors (dtype, shape, value) and metadata of the wrong JSON types are rejected naming what is wrong, and
pickles are never unpickled by the CLI without --trust-pickle (a malicious one would leave a marker file).
"""
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import torchquant as tq
from torchquant.cli import main

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROOT = Path(tq.__file__).resolve().parent.parent


def _model():
    """Small, with every kind of quantization state: a conv, a linear, static input quantizers and observers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))


def _converted():
    torch.manual_seed(1)
    return tq.quantize_model(_model(), "int8-static", calibration=[torch.randn(2, 1, 4, 4)])


# ------------------------------------------------------------------------------------------------------------
# damaged files, in a child process

SWEEP = r"""
import copy, json, os, struct, sys
import torch, torch.nn as nn
import torchquant as tq
from torchquant._cli_io import UsageError, load_inputs

torch.set_num_threads(1)
folder = sys.argv[1]
torch.manual_seed(0)
template = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))


def fingerprint(model):
    return [(n, type(m)) for n, m in model.named_modules()] + [(k, v.tolist()) for k, v in model.state_dict().items()]


def variants(kind, raw):
    if kind == "truncate":
        for n in range(len(raw)):
            yield f"first {n} bytes", raw[:n]
        return
    end = 8 + struct.unpack("<Q", raw[:8])[0] if kind.endswith(("header", "safetensors-inputs")) else len(raw)
    for i in range(end):
        for mask in ((0x01, 0x20) if kind == "checkpoint-header" else (0x01,)):
            yield f"byte {i} ^ {mask:#x}", raw[:i] + bytes([raw[i] ^ mask]) + raw[i + 1:]


def sweep(kind):
    source = os.path.join(folder, {"pt-inputs": "inputs.pt", "safetensors-inputs": "inputs.safetensors"}.get(
        kind, "good.safetensors"))
    raw = open(source, "rb").read()
    target = os.path.join(folder, "damaged" + os.path.splitext(source)[1])
    expected, model = fingerprint(template), copy.deepcopy(template)
    counts, failures = {"ok": 0, "rejected": 0}, []
    for name, data in variants(kind, raw):
        if os.path.exists(target):
            os.remove(target)  # (a new file: much faster than truncating one here)
        with open(target, "wb") as f:
            f.write(data)
        try:
            if kind.endswith("inputs"):
                load_inputs(target, "--calib", want_labels=True)
            else:
                tq.load(target, model)
                with torch.no_grad():
                    model.eval()(torch.randn(2, 1, 4, 4))
                model = copy.deepcopy(template)
            counts["ok"] += 1
        except (ValueError, UsageError) as e:
            counts["rejected"] += 1
            if not kind.endswith("inputs") and (target not in str(e) or fingerprint(model) != expected):
                failures.append(f"{name}: {'model changed' if target in str(e) else 'path not named'}: {e}")
                model = copy.deepcopy(template)
        except BaseException as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
    return {"counts": counts, "failures": failures[:20], "total_failures": len(failures)}


print(json.dumps({kind: sweep(kind) for kind in sys.argv[2:]}))
"""
KINDS = ("checkpoint-header", "truncate", "pt-inputs", "safetensors-inputs")


def test_damaged_files_are_rejected_cleanly(tmp_path):
    """One child process sweeps checkpoint-header: every byte of a small checkpoint's safetensors header
    (length, JSON, layout) xor 0x01 and xor 0x20; truncate: every prefix of that checkpoint; pt-inputs: every
    byte of a torch.save'd input file xor 0x01, read as --calib; safetensors-inputs: every header byte of a
    safetensors input file xor 0x01, read as --calib."""
    tq.save(_converted(), tmp_path / "good.safetensors")
    inputs = {"inputs": torch.randn(3, 1, 4, 4), "labels": torch.tensor([0, 1, 2])}
    torch.save(inputs, tmp_path / "inputs.pt")
    save_file(inputs, tmp_path / "inputs.safetensors")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", SWEEP, str(tmp_path), *KINDS], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, f"the child process died ({result.returncode}):\n{result.stderr[-3000:]}"
    reports = json.loads(result.stdout.splitlines()[-1])
    for kind in KINDS:
        assert reports[kind]["total_failures"] == 0, f"{kind}:\n" + "\n".join(reports[kind]["failures"])
        assert reports[kind]["counts"]["rejected"] > 50, reports[kind]["counts"]


# ------------------------------------------------------------------------------------------------------------
# tampered tensors and metadata, in process (nothing tampered gets past the checks to a kernel)

def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(converted checkpoint, fake-quant static checkpoint)."""
    folder = tmp_path_factory.mktemp("fuzz")
    tq.save(_converted(), folder / "converted.safetensors")
    torch.manual_seed(2)
    prepared = tq.calibrate(tq.prepare(_model(), "int8-static"), [torch.randn(2, 1, 4, 4)], progress=False)
    tq.save(prepared, folder / "fake_quant.safetensors")
    return folder / "converted.safetensors", folder / "fake_quant.safetensors"


DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64]


def _rejects(path, key, *fragments):
    model = _model()
    before = [(k, v.clone()) for k, v in model.state_dict().items()]
    with pytest.raises(ValueError) as info:
        tq.load(path, model)
    message = str(info.value)
    assert f"'{key}'" in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before) and type(model[0]) is nn.Conv2d


def test_every_tensor_in_every_other_dtype_and_shape_is_rejected(saved, tmp_path):
    bad = tmp_path / "bad.safetensors"
    cases = 0
    for source in saved:
        tensors, metadata = _read(source)
        for key, t in tensors.items():
            for dtype in DTYPES:
                if dtype != t.dtype:
                    save_file({**tensors, key: t.to(dtype)}, bad, metadata=metadata)
                    _rejects(bad, key, str(dtype).removeprefix("torch."))
                    cases += 1
            for shape in ([*t.shape, 1], [t.numel() + 1], [0]):
                if list(t.shape) != shape:
                    save_file({**tensors, key: torch.zeros(shape, dtype=t.dtype)}, bad, metadata=metadata)
                    _rejects(bad, key, str(shape))
                    cases += 1
    assert cases > 200


# values outside the format of the tensor named; the float weights and biases carry no bound
BAD_VALUES = {
    "weight_scale": [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-45],
    "input_quantizer.scale": [float("nan"), float("inf"), 0.0, -1.0, 1e-45],
    "input_quantizer.zero_point": [-1, 256, 2**31 - 1, -2**31],
    "input_quantizer.observer.hi": [float("nan"), float("inf"), -1e30],
    "input_quantizer.observer.lo": [float("nan"), -float("inf"), 1e30],
    "input_quantizer.observer.batches": [-1, -2**63],
}


def test_values_out_of_the_format_are_rejected(saved, tmp_path):
    bad = tmp_path / "bad.safetensors"
    for source in saved:
        tensors, metadata = _read(source)
        for key, t in tensors.items():
            values = next((v for suffix, v in BAD_VALUES.items() if key.endswith("." + suffix)), None)
            if values is None:
                continue
            for value in values:
                edited = t.clone()
                edited.view(-1)[0] = value
                save_file({**tensors, key: edited}, bad, metadata=metadata)
                _rejects(bad, key.replace(".lo", ".hi"))
        # float weights may hold anything a float does
        for key in ("2.weight", "2.bias"):
            if key in tensors:
                save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, bad, metadata=metadata)
                assert tq.load(bad, _model()) is not None


def _layout(source):
    return json.loads(_read(source)[1]["torchquant"])


def _edited(layout, edit):
    layout = json.loads(json.dumps(layout))
    edit(layout)
    return json.dumps(layout)


METADATA = {
    "list": "[]", "string": '"torchquant"', "number": "3", "null": "null", "true": "true", "not JSON": "{",
    "empty": "", "deeply nested": "[" * 100000 + "]" * 100000, "NaN": "NaN",
}
LAYOUT_EDITS = {
    "no version": lambda m: m.pop("version"),
    "version as string": lambda m: m.update(version="1"),
    "version true": lambda m: m.update(version=True),
    "version 2": lambda m: m.update(version=2),
    "format other": lambda m: m.update(format="other"),
    "extra key": lambda m: m.update(extra=1),
    "layers a list": lambda m: m.update(layers=[]),
    "layers a string": lambda m: m.update(layers="0"),
    "layer a list": lambda m: m["layers"].update({"0": []}),
    "layer without type": lambda m: m["layers"]["0"].pop("type"),
    "layer type a number": lambda m: m["layers"]["0"].update(type=5),
    "layer type unknown": lambda m: m["layers"]["0"].update(type="QuantLSTM"),
    "layer type unhashable": lambda m: m["layers"]["0"].update(type=["QuantLinear"]),
    "converted a string": lambda m: m["layers"]["0"].update(converted="yes"),
    "converted 1": lambda m: m["layers"]["0"].update(converted=1),
    "weight a list": lambda m: m["layers"]["0"].update(weight=[]),
    "weight bits a string": lambda m: m["layers"]["0"]["weight"].update(bits="8"),
    "weight bits 9": lambda m: m["layers"]["0"]["weight"].update(bits=9),
    "weight unknown field": lambda m: m["layers"]["0"]["weight"].update(colour="red"),
    "weight rounding a list": lambda m: m["layers"]["0"]["weight"].update(rounding=["nearest"]),
    "activation a number": lambda m: m["layers"]["0"].update(activation=5),
    "activation empty": lambda m: m["layers"]["0"].update(activation={}),
    "entry extra key": lambda m: m["layers"]["0"].update(extra=True),
    "aliases a list": lambda m: m.update(aliases=[]),
    "alias to a number": lambda m: m.update(aliases={"x": 5}),
    "alias to nothing": lambda m: m.update(aliases={"x": "missing"}),
    "alias over a tensor": lambda m: m.update(aliases={"0.qweight": "2.qweight"}),
    "layer the model lacks": lambda m: m["layers"].update({"9": m["layers"]["0"]}),
    "layer at the root": lambda m: m["layers"].update({"": m["layers"]["0"]}),
    "layer on a quantizer": lambda m: m["layers"].update({"0.input_quantizer": m["layers"]["0"]}),
    "layer through an attribute": lambda m: m["layers"].update({"0.weight": m["layers"]["0"]}),
    "layer on a ReLU-like module": lambda m: m["layers"].update({"1": m["layers"]["2"]}),
    "conv as linear": lambda m: m["layers"]["0"].update(type="QuantLinear"),
    "odd names": lambda m: m["layers"].update({"..": m["layers"]["0"], "0.": m["layers"]["0"]}),
    "fake-quant in the file": lambda m: m["layers"]["0"].update(converted=False),
    "other bits": lambda m: m["layers"]["0"]["weight"].update(bits=4),
}


@pytest.mark.parametrize("case", list(METADATA) + list(LAYOUT_EDITS))
def test_malformed_metadata_is_a_value_error_naming_the_file(saved, tmp_path, case):
    tensors, metadata = _read(saved[0])
    text = METADATA[case] if case in METADATA else _edited(_layout(saved[0]), LAYOUT_EDITS[case])
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={**metadata, "torchquant": text})
    model = _model()
    with pytest.raises(ValueError, match="bad.safetensors"):
        tq.load(bad, model)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear


# ------------------------------------------------------------------------------------------------------------
# pickles and the CLI: nothing is unpickled without --trust-pickle

class Evil:
    """Unpickling it creates the marker file (as a real attack would run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _pickles(folder: Path, marker: Path) -> dict:
    files = {}
    with open(folder / "plain.pkl", "wb") as f:
        pickle.dump(Evil(marker), f)
    files["plain pickle"] = folder / "plain.pkl"
    torch.save(Evil(marker), folder / "evil.pt")
    files["torch.save of an object"] = folder / "evil.pt"
    torch.save({"inputs": Evil(marker), "labels": torch.zeros(2)}, folder / "evil_dict.pt")
    files["object in a dict"] = folder / "evil_dict.pt"
    torch.save((Evil(marker), Evil(marker)), folder / "evil_pair.pt")
    files["objects in a tuple"] = folder / "evil_pair.pt"
    torch.save(Evil(marker), folder / "legacy.pt", _use_new_zipfile_serialization=False)
    files["legacy torch.save"] = folder / "legacy.pt"
    (folder / "evil.safetensors").write_bytes((folder / "evil.pt").read_bytes())
    files["pickle named .safetensors"] = folder / "evil.safetensors"
    return files


READERS = {
    "MODEL": lambda path: ["convert", path],
    "--weights": lambda path: ["convert", "torchquant.examples:DigitsCNN", "--weights", path],
    "--calib": lambda path: ["convert", "torchquant.examples:DigitsCNN", "--calib", path],
    "--eval": lambda path: ["report", "torchquant.examples:DigitsCNN", "--eval", path],
}


def test_malicious_pickles_never_run_without_trust(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    files = _pickles(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    for name, path in files.items():
        for option, args in READERS.items():
            status = main([*map(str, args(path)), "-o", str(tmp_path / "out.safetensors"), "--threads", "1"]
                          if args(path)[0] == "convert" else [*map(str, args(path)), "--threads", "1"])
            err = capsys.readouterr().err
            assert status == 2 and len(err.splitlines()) == 1 and option in err, (name, option, err)
            assert not marker.exists(), f"{name} as {option} was unpickled"
    # the marker does tell: with --trust-pickle the object is built (and then refused as no model)
    assert main(["convert", str(files["torch.save of an object"]), "--trust-pickle", "-o",
                 str(tmp_path / "out.safetensors")]) == 2
    assert marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name", ["plain pickle", "legacy torch.save", "torch.save of an object"])
def test_pickles_in_a_subprocess_give_one_line(tmp_path, name):
    marker = tmp_path / "MARKER"
    path = _pickles(tmp_path, marker)[name]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "torchquant", "convert", "torchquant.examples:DigitsCNN",
                             "--calib", str(path), "-o", str(tmp_path / "out.safetensors")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("torchquant convert: error: --calib: ") and not marker.exists()
