"""The `torchquant` command end to end: each subcommand in a subprocess (`python -m torchquant`) on the digits CNN
under a temporary directory, and every kind of bad input (exit status 2, one line on stderr, no traceback, no
output file, input files untouched)."""
import hashlib
import importlib.util
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import torchquant
from torchquant._cli_io import UsageError, atomic_output
from torchquant.cli import build_parser, config_from_args, main
from torchquant.config import PRESETS, Preset, QuantConfig, QuantSpec
from torchquant.observers import OBSERVERS, Observer, ObserverKind
from torchquant.timing import num_threads
from torchquant.examples import DigitsBNCNN, DigitsCNN, load_digits_data, train
from torchquant.nn import QuantConv2d, QuantLinear

from conftest import integer_tensors

pytest.importorskip("sklearn")

ROOT = Path(torchquant.__file__).resolve().parent.parent  # the checkout under test, not an installed copy
FACTORY = "torchquant.examples:DigitsCNN"


def run_cli(*args, cwd, check_rc=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "torchquant", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert result.returncode == check_rc, f"rc {result.returncode}\nstdout:\n{result.stdout}\n" \
                                              f"stderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory with a briefly trained digits CNN saved every way the CLI reads, data files and bad files."""
    path = tmp_path_factory.mktemp("cli")
    with num_threads(1):
        data = load_digits_data()
        torch.manual_seed(0)
        model = train(DigitsCNN(), data, epochs=3)
    save_file(model.state_dict(), path / "digits.safetensors")
    torch.save(model.state_dict(), path / "digits_state.pt")
    torch.save(model, path / "digits_model.pt")
    torch.manual_seed(1)
    save_file(DigitsCNN(channels=8).state_dict(), path / "other.safetensors")
    torch.save(data.train_x[:96].clone(), path / "calib.pt")
    save_file({"inputs": data.train_x[:96].contiguous()}, path / "calib.safetensors")
    torch.save({"inputs": data.test_x[:128].clone(), "labels": data.test_y[:128].clone()}, path / "eval.pt")
    save_file({"inputs": data.test_x[:128].contiguous(), "labels": data.test_y[:128].contiguous()},
              path / "eval.safetensors")
    torch.save(torch.randn(8, 3, 8, 8), path / "calib_wrong_shape.pt")
    torch.save(data.train_x[:16].double(), path / "calib_float64.pt")
    torch.save(data.train_x[:16, 0].clone(), path / "calib_rank3.pt")  # [16, 8, 8]: the channel dim left out
    torch.save((data.train_x[:16] * 16).to(torch.uint8), path / "calib_uint8.pt")
    torch.save({"inputs": data.test_x[:10].clone(), "labels": data.test_y[:9].clone()}, path / "eval_bad_labels.pt")
    torch.save((data.test_x[:4].clone(), torch.tensor([0, 1, 2, 12])), path / "eval_label_range.pt")
    torch.save(data.train_x[:8].to_sparse(), path / "calib_sparse.pt")
    torch.save(torch.empty(8, 1, 8, 8, device="meta"), path / "calib_meta.pt")
    torch.save({"inputs": data.test_x[:4].clone(), "labels": torch.zeros(4, dtype=torch.complex64)},
               path / "eval_complex_labels.pt")
    (path / "text.pt").write_text("not a tensor file\n")
    whole = (path / "digits.safetensors").read_bytes()
    (path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    whole = (path / "digits_state.pt").read_bytes()
    (path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (path / "mymodels.py").write_text(MYMODELS)
    with open(path / "plain.pkl", "wb") as f:  # a plain pickle (not a torch.save archive) of an input tensor
        pickle.dump({"inputs": data.train_x[:8].clone()}, f)
    _save_mlp(path / "mymodels.py", path / "mlp_model.pt")
    _save_script_model(path / "script_model.pt")
    return path


MYMODELS = """
import torch.nn as nn

def not_a_model():
    return 42

def broken():
    raise RuntimeError('factory exploded')

class NoQuant(nn.Module):
    def forward(self, x):
        return x.relu()

class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

class WithGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])

class TiedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(64, 64)
        self.decode = nn.Linear(64, 64, bias=False)
        self.decode.weight = self.encode.weight  # tied, as a language model's embedding and output layer
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.decode(self.encode(x.flatten(1)).relu()))

class GRUStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.grus = nn.ModuleList(nn.GRU(8, 8, batch_first=True) for _ in range(4))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for gru in self.grus:
            x = gru(x)[0]
        return self.head(x[:, -1])
"""


def _save_mlp(module_path: Path, out: Path) -> None:
    """torch.save(MLP()) of module_path's class, pickled (as a user's script would) under the module's name."""
    spec = importlib.util.spec_from_file_location(module_path.stem, module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_path.stem] = module
    try:
        spec.loader.exec_module(module)
        torch.save(module.MLP(), out)
    finally:
        del sys.modules[module_path.stem]


def _save_script_model(out: Path) -> None:
    """A model whose class was defined in the script that saved it: pickled as __main__.ScriptNet."""
    class ScriptNet(torch.nn.Sequential):
        pass
    ScriptNet.__module__, ScriptNet.__qualname__ = "__main__", "ScriptNet"
    main_module = sys.modules["__main__"]
    main_module.ScriptNet = ScriptNet
    try:
        torch.save(ScriptNet(torch.nn.Linear(2, 2)), out)
    finally:
        del main_module.ScriptNet


def digests(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, f"rc {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("torchquant ")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def quant_layers(model):
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]


# ------------------------------------------------------------------------------------------------------------
# working runs

def test_help_of_every_subcommand(work, capsys):
    result = run_cli("--help", cwd=work, check_rc=0)
    for command in ("convert", "report", "bench", "demo"):
        assert command in result.stdout
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: torchquant " + command in capsys.readouterr().out
    main_help = run_cli("convert", "--help", cwd=work, check_rc=0).stdout
    assert "--min-sqnr" in main_help and "--calib" in main_help


def test_convert_static_writes_a_checkpoint_that_load_reads(work, tmp_path):
    before = digests(work)
    out, report = tmp_path / "digits-int8.safetensors", tmp_path / "report.json"
    result = run_cli("convert", FACTORY, "--weights", work / "digits.safetensors", "--config", "int8-static",
                     "--calib", work / "calib.pt", "--eval", work / "eval.pt", "-o", out, "--report", report,
                     "--threads", "1", cwd=work, check_rc=0)
    assert "wrote" in result.stderr and "4 layers quantized, 0 kept float; model" in result.stderr
    assert "accuracy on 128 samples" in result.stdout
    assert digests(work) == before, "input files must never be modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-int8.safetensors", "report.json"]

    loaded = torchquant.load(out, DigitsCNN())
    layers = quant_layers(loaded)
    assert len(layers) == 4 and all(layer.converted for layer in layers)
    assert all(layer.config.activation.dynamic is False for layer in layers)
    float_model = DigitsCNN()
    float_model.load_state_dict(torch.load(work / "digits_state.pt", weights_only=True))
    x = torch.load(work / "eval.pt", weights_only=True)["inputs"]
    with torch.no_grad():
        agreement = (loaded(x).argmax(1) == float_model(x).argmax(1)).float().mean().item()
    assert agreement >= 0.97

    data = json.loads(report.read_text())
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    for layer in data["layers"]:
        assert layer["quantized"] and layer["weight_bits"] == 8 and layer["activation"] == "uint8 static"
        assert layer["weight_sqnr_db"] > 30 and layer["output_sqnr_db"] > 20
        assert layer["bytes_quantized"] < layer["bytes_float"]
        assert layer["latency_float_s"] > 0 and layer["latency_quantized_s"] > 0
    assert data["bytes_quantized"] < data["bytes_float"] / 3
    assert data["eval_metric"] == "accuracy" and data["eval_samples"] == 128
    assert abs(data["eval_float"] - data["eval_quantized"]) <= 3.0


def test_convert_folds_batchnorm_and_reports_it(work, tmp_path):
    out, report = tmp_path / "bn.safetensors", tmp_path / "bn.json"
    result = run_cli("convert", "torchquant.examples:DigitsBNCNN", "--config", "int8-static", "--calib",
                     work / "calib.pt", "-o", out, "--report", report, "--threads", "1", cwd=work, check_rc=0)
    assert "bn folded (bn1)" in result.stdout and "bn folded (bn2)" in result.stdout
    notes = {layer["name"]: layer["note"] for layer in json.loads(report.read_text())["layers"]}
    assert notes == {"conv1": "bn folded (bn1)", "conv2": "bn folded (bn2)", "fc1": "", "fc2": ""}
    loaded = torchquant.load(out, DigitsBNCNN())
    assert type(loaded.bn1) is type(loaded.bn2) is torch.nn.Identity
    assert loaded.conv1.converted and loaded.conv1.folded_bn == "bn1"
    result = run_cli("report", "torchquant.examples:DigitsBNCNN", "--config", "int8-static", "--calib",
                     work / "calib.pt", "--json", "-", "--quiet", "--repeats", "1", "--threads", "1", cwd=work,
                     check_rc=0)
    assert {layer["name"]: layer["note"] for layer in json.loads(result.stdout)["layers"]} == notes


def test_convert_integer_pipeline_with_7bit_activations(work, tmp_path):
    """--config int8-pipeline --act-bits 7: a pipeline whose every integer tensor is below 128 (what the AVX2
    kernels multiply as bytes), reported as such, saved and loaded."""
    out, report = tmp_path / "p7.safetensors", tmp_path / "p7.json"
    result = run_cli("convert", "torchquant.examples:DigitsBNCNN", "--config", "int8-pipeline", "--act-bits", "7",
                     "--calib", work / "calib.pt", "-o", out, "--report", report, "--threads", "1", cwd=work,
                     check_rc=0)
    assert "4 layers quantized, 0 kept float" in result.stderr
    layers = json.loads(report.read_text())["layers"]
    assert [layer["activation"] for layer in layers] == ["uint7 static"] * 4
    loaded = torchquant.load(out, DigitsBNCNN())
    quantizers = [m for m in loaded.modules() if isinstance(m, torchquant.graph.ActivationQuantizer)]
    assert quantizers and all(q.spec.bits == 7 and not q.spec.signed for q in quantizers)
    x = torch.load(work / "eval.pt", weights_only=True)["inputs"]
    tensors = integer_tensors(loaded, x)
    assert tensors and all(int(t.max()) <= 127 for _, t in tensors)


def test_convert_pickled_model_with_trust_pickle_and_options(work, tmp_path):
    out = tmp_path / "w4.safetensors"
    run_cli("convert", work / "digits_model.pt", "--trust-pickle", "--bits", "4", "--rounding", "truncate",
            "--granularity", "per_tensor", "--skip", "fc2", "-o", out, "--quiet", "--threads", "1", cwd=work,
            check_rc=0)
    loaded = torchquant.load(out, DigitsCNN())
    assert isinstance(loaded.fc2, torch.nn.Linear) and not isinstance(loaded.fc2, QuantLinear)
    for layer in (loaded.conv1, loaded.conv2, loaded.fc1):
        assert layer.converted and layer.config.weight.bits == 4
        assert layer.config.weight.rounding == "truncate" and layer.config.weight.granularity == "per_tensor"


def test_convert_budget_moves_4bit_layers_to_8_bits(work, tmp_path):
    """4-bit weights leave every layer's output SQNR below 40 dB and 8-bit weights above it here: with
    --min-sqnr 40 each layer falls back to 8 bits, and the report says why."""
    out, report = tmp_path / "budget.safetensors", tmp_path / "budget.json"
    run_cli("convert", FACTORY, "--weights", work / "digits.safetensors", "--config", "w4a8-dynamic",
            "--calib", work / "calib.safetensors", "--min-sqnr", "40", "-o", out, "--report", report, "--quiet",
            "--threads", "1", cwd=work, check_rc=0)
    data = json.loads(report.read_text())
    assert data["min_sqnr"] == 40 and set(data["decisions"]) == {"conv1", "conv2", "fc1", "fc2"}
    for layer in data["layers"]:
        assert layer["weight_bits"] == 8, layer
        assert layer["note"].startswith("8-bit weights: output SQNR") and "at 4 bits" in layer["note"]
        assert layer["output_sqnr_db"] >= 40
    loaded = torchquant.load(out, DigitsCNN())
    assert [layer.config.weight.bits for layer in quant_layers(loaded)] == [8, 8, 8, 8]


def test_convert_weights_saved_with_tied_names_dropped(work, tmp_path):
    """safetensors.torch.save_model stores tied weights under one of their names: --weights takes such a file, the
    converted layers holding the file's weights under every name."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sys.path.insert(0, str(work))
    try:
        from mymodels import TiedMLP
    finally:
        sys.path.remove(str(work))
    torch.manual_seed(5)
    trained = TiedMLP()
    weights = tmp_path / "tied.safetensors"
    safetensors_torch.save_model(trained, str(weights))
    assert len(safetensors_torch.load_file(str(weights))) == 4  # one of encode.weight / decode.weight dropped
    out = tmp_path / "tied-int8.safetensors"
    run_cli("convert", "mymodels:TiedMLP", "--weights", weights, "--config", "int8-dynamic", "-o", out, "--quiet",
            "--threads", "1", cwd=work, check_rc=0)
    loaded = torchquant.load(out, TiedMLP())
    x = torch.randn(16, 64)
    with torch.no_grad():
        sqnr = torchquant.functional.quantization_error(trained(x), loaded(x))["sqnr_db"]
    assert sqnr > 25  # the file's weights (a fresh TiedMLP's would be unrelated)
    assert torch.equal(loaded.decode.qweight, loaded.encode.qweight)


def test_report_budget_keeps_layers_float(work, tmp_path):
    result = run_cli("report", FACTORY, "--weights", work / "digits_state.pt", "--calib", work / "calib.pt",
                     "--config", "int8-static", "--min-sqnr", "200", "--json", "-", "--quiet", "--threads", "1",
                     cwd=work, check_rc=0)
    data = json.loads(result.stdout)
    assert all(not layer["quantized"] for layer in data["layers"])
    assert all(layer["note"].startswith("kept float: output SQNR") for layer in data["layers"])
    assert data["bytes_quantized"] == data["bytes_float"]


def test_report_warns_when_the_output_is_mostly_error(work, tmp_path):
    # 1-bit activations keep too little of the digits CNN's signal to be of use: the report says so, names the layer
    # adding the most error, and says what helps
    def report(*options):
        result = run_cli("report", FACTORY, "--weights", work / "digits.safetensors", "--config", "int8-static",
                         *options, "--calib", work / "calib.pt", "--repeats", "1", "--threads", "1", cwd=work,
                         check_rc=0)
        return result.stdout

    table = report("--act-bits", "1")
    sqnr = float(re.search(r"end-to-end output SQNR: (-?[\d.]+) dB", table).group(1))
    assert sqnr < 6
    worst = re.search(r"most error added by (\w+) \((-?[\d.]+) dB\)", table)
    layers = {line.split()[0]: float(line.split()[7]) for line in table.splitlines()[2:6]}
    assert worst and layers[worst.group(1)] == min(layers.values()) == float(worst.group(2))
    assert f"warning: the quantized model's output is mostly error (end-to-end SQNR {sqnr:.1f} dB < 6 dB" in table
    assert "clipping observer" in table and "--min-sqnr" in table
    assert "mostly error" not in report()
    # where the table is not shown (convert --quiet, report --json -) the warning goes to stderr
    result = run_cli("convert", FACTORY, "--weights", work / "digits.safetensors", "--config", "int8-static",
                     "--act-bits", "1", "--calib", work / "calib.pt", "--report", tmp_path / "r1.json", "-q",
                     "-o", tmp_path / "a1.safetensors", "--threads", "1", cwd=work, check_rc=0)
    assert result.stdout == "" and result.stderr.startswith("torchquant convert: warning: the quantized model's "
                                                            "output is mostly error")
    assert json.loads((tmp_path / "r1.json").read_text())["notes"][-1].startswith("warning: the quantized model's")


def test_report_writes_table_json_and_markdown(work, tmp_path):
    json_path, markdown_path = tmp_path / "r.json", tmp_path / "r.md"
    result = run_cli("report", FACTORY, "--weights", work / "digits.safetensors", "--calib", work / "calib.pt",
                     "--eval", work / "eval.safetensors", "--json", json_path, "--markdown", markdown_path,
                     "--repeats", "3", "--threads", "1", cwd=work, check_rc=0)
    header = result.stdout.splitlines()[0].split()
    assert header[:3] == ["layer", "type", "weight"] and "speed-up" in header
    assert "model size:" in result.stdout and "accuracy on 128 samples" in result.stdout
    data = json.loads(json_path.read_text())
    assert data["config"]["activation"]["dynamic"] is True  # the default preset is int8-dynamic
    markdown = markdown_path.read_text()
    assert markdown.startswith("# torchquant quantization report")
    assert "| conv1 | Conv2d | 16x1x3x3 | 8 |" in markdown
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped: matplotlib is not installed" in markdown
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]
    else:
        assert "![per-layer output SQNR and speed-up](r.png)" in markdown
        assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_runs(work):
    result = run_cli("demo", "--epochs", "2", "--qat-epochs", "1", cwd=work, check_rc=0)
    # latency on one thread (its CPU time) unless --threads says otherwise, and the line says so and names the
    # CPU kernels
    assert (f"(thread CPU time) on the CPU with 1 thread(s) (CPU kernels: {torchquant.cpu_kernel_path()})"
            in result.stdout)
    for label in ("float32", "int8-static", "int8-pipeline", "int8-dynamic", "w4a8-dynamic",
                  "int8-static, truncate rounding", "w4a8 QAT (1 epochs)"):
        assert f"| {label} |" in result.stdout
    assert "accuracy %" in result.stdout and "size KiB" in result.stdout


def test_demo_refuses_a_seed_torch_cannot_take(capsys):
    # was "error: ValueError: Overflow when unpacking long long", naming no option
    status, err = run_main(["demo", "--seed", str(2 ** 64), "--epochs", "1"], capsys)
    assert status == 2 and err == [f"torchquant demo: error: --seed: expected an integer in [-2**63, 2**64), got "
                                   f"{2 ** 64}"]


def test_bench_quick(work):
    result = run_cli("bench", "--quick", "--only", "quantize", "--threads", "1", cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"CPU kernels: {torchquant.cpu_kernel_path()} ")
    assert "## quantize (cpu)" in result.stdout and "|---|" in result.stdout


# ------------------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, nothing written, inputs untouched

GOOD = ["--weights", "digits.safetensors"]
ERROR_CASES = {
    "missing weights": (["convert", FACTORY, "--weights", "nope.safetensors"], ["--weights: no such file"]),
    "truncated safetensors": (["convert", FACTORY, "--weights", "truncated.safetensors"],
                              ["--weights", "truncated"]),
    "truncated torch file": (["convert", FACTORY, "--weights", "truncated.pt"], ["--weights", "truncated.pt"]),
    "text as weights": (["convert", FACTORY, "--weights", "text.pt"], ["--weights", "text.pt"]),
    "pickled model as weights": (["convert", FACTORY, "--weights", "digits_model.pt"],
                                 ["--weights", "--trust-pickle"]),
    "tensor as weights": (["convert", FACTORY, "--weights", "calib.pt"], ["not a state dict"]),
    "weights of another model": (["convert", FACTORY, "--weights", "other.safetensors"],
                                 ["does not fit the model", "conv1.weight"]),
    "spec without factory": (["convert", "torchquant.examples"] + GOOD, ["package.module:factory"]),
    "unknown module": (["convert", "no_such_package.models:net"] + GOOD, ["no module named 'no_such_package'"]),
    "unknown factory": (["convert", "torchquant.examples:NoSuchNet"] + GOOD, ["has no attribute 'NoSuchNet'"]),
    "factory returns no module": (["convert", "mymodels:not_a_model"], ["returned int", "nn.Module"]),
    "factory raises": (["convert", "mymodels:broken"], ["factory exploded"]),
    "pickle without trust": (["convert", "digits_model.pt"], ["--trust-pickle"]),
    "python file as model": (["convert", "mymodels.py"], ["MODEL: mymodels.py is Python source", "mymodels:"]),
    "python file as calibration": (["convert", FACTORY, "--calib", "mymodels.py"] + GOOD,
                                   ["--calib: mymodels.py is Python source"]),
    "plain pickle as model": (["convert", "plain.pkl"], ["MODEL: cannot read plain.pkl", "a plain pickle"]),
    "plain pickle as calibration": (["convert", FACTORY, "--calib", "plain.pkl"] + GOOD,
                                    ["--calib: cannot read plain.pkl", "a plain pickle"]),
    "plain pickle as weights": (["convert", FACTORY, "--weights", "plain.pkl"], ["--weights", "a plain pickle"]),
    "pickled model of a class from a script": (["convert", "script_model.pt", "--trust-pickle"],
                                               ["class ScriptNet was defined in the script", "module:factory"]),
    "nothing to quantize, strict": (["convert", "mymodels:NoQuant", "--strict"],
                                    ["nothing was quantized: MODEL has no nn.Linear, nn.Conv2d or nn.Conv1d layer"]),
    "no weights, strict": (["convert", "mymodels:MLP", "--strict"], ["no --weights", "random initialisation"]),
    "state dict as model": (["convert", "digits_state.pt"], ["holds weights", "--weights"]),
    "missing model file": (["convert", "nope.pt"], ["MODEL: no such file"]),
    "bits out of range": (["convert", FACTORY, "--bits", "9"] + GOOD, ["--bits", "[1, 8]"]),
    "static without calibration": (["convert", FACTORY, "--config", "int8-static"] + GOOD, ["--calib"]),
    "calibration of the wrong shape": (["convert", FACTORY, "--calib", "calib_wrong_shape.pt"] + GOOD,
                                       ["--calib", "a batch of shape [8, 3, 8, 8]", "does not fit the model"]),
    "calibration in float64": (["convert", FACTORY, "--calib", "calib_float64.pt"] + GOOD,
                               ["(float64) from calib_float64.pt", "the model's parameters are float32: save the inputs "
                                "as float32"]),
    "calibration without the channel dim": (["convert", FACTORY, "--calib", "calib_rank3.pt"] + GOOD,
                                            ["a batch of shape [16, 8, 8]", "the model's first conv, Conv2d, takes 4-D "
                                             "batches; this one is 3-D"]),
    "calibration in uint8": (["convert", FACTORY, "--calib", "calib_uint8.pt"] + GOOD,
                             ["(uint8) from calib_uint8.pt", "the model computes in float32: save the inputs as "
                              "float32, e.g. images as x.float() / 255"]),
    "pipeline with 1-bit activations": (["convert", FACTORY, "--config", "int8-pipeline", "--act-bits", "1",
                                         "--calib", "calib.pt"] + GOOD,
                                        ["integer_pipeline=True needs static activations of 2 to 8 bits rounded to "
                                         "nearest, got 1-bit static activations rounded by 'nearest'"]),
    "missing calibration": (["convert", FACTORY, "--calib", "nope.pt"] + GOOD, ["--calib: no such file"]),
    "truncated calibration": (["convert", FACTORY, "--calib", "truncated.safetensors"] + GOOD, ["--calib"]),
    "labels of the wrong length": (["report", FACTORY, "--eval", "eval_bad_labels.pt"] + GOOD,
                                   ["10 inputs but 9 labels"]),
    "labels out of range": (["report", FACTORY, "--eval", "eval_label_range.pt"] + GOOD,
                            ["labels must be in [0, 9]", "got [0, 12]"]),
    "sparse calibration": (["convert", FACTORY, "--calib", "calib_sparse.pt"] + GOOD,
                           ["--calib: the inputs in calib_sparse.pt must be a dense tensor", "sparse_coo"]),
    "meta calibration": (["convert", FACTORY, "--calib", "calib_meta.pt"] + GOOD,
                         ["--calib: the inputs in calib_meta.pt must be a dense tensor", "meta"]),
    "complex labels": (["report", FACTORY, "--eval", "eval_complex_labels.pt"] + GOOD,
                       ["--eval: the labels in eval_complex_labels.pt must be a 1-D integer tensor"]),
    "budget without calibration": (["convert", FACTORY, "--min-sqnr", "30"] + GOOD, ["--calib"]),
    "output overwrites an input": (["convert", FACTORY, "--calib", "calib.pt", "-o", "calib.pt"] + GOOD,
                                   ["input files are never overwritten"]),
    "output overwrites the model's source": (["convert", "mymodels:MLP", "-o", "mymodels.py"],
                                             ["-o: mymodels.py is the MODEL's source file", "never overwritten"]),
    "report overwrites the model's source": (["convert", "mymodels:MLP", "--report", "mymodels.py"],
                                             ["--report: mymodels.py is the MODEL's source file"]),
    "report and checkpoint in one file": (["convert", FACTORY, "-o", "same.json", "--report", "same.json"] + GOOD,
                                          ["--report: same.json is also the checkpoint"]),
    "output directory missing": (["convert", FACTORY, "-o", "no/such/dir/out.safetensors"] + GOOD,
                                 ["does not exist"]),
    "no cuda": (["convert", FACTORY, "--device", "cuda"] + GOOD, ["--device"]),
}


def _prepare_case(case, tmp_path):
    args, fragments = ERROR_CASES[case]
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    if args[0] == "convert" and "-o" not in args:
        args = args + ["-o", str(tmp_path / "out.safetensors")]
    return args + ["--threads", "1"], fragments


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_line_and_exit_status_2(work, tmp_path, case, capsys, monkeypatch):
    """Every case through main(), the function `python -m torchquant` runs (in this process: fast)."""
    args, fragments = _prepare_case(case, tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))  # MODEL lookup may add the working directory
    before = digests(work)
    status = main(args)
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(args, status, captured.out, captured.err), *fragments)
    assert digests(work) == before, "input files must never be modified"
    assert list(tmp_path.iterdir()) == [], "a failed run must leave no output"


# every case again through a real `python -m torchquant` process, as a user meets it
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_in_a_subprocess(work, tmp_path, case):
    args, fragments = _prepare_case(case, tmp_path)
    before = digests(work)
    assert_one_line_error(run_cli(*args, cwd=work), *fragments)
    assert digests(work) == before
    assert list(tmp_path.iterdir()) == []


def test_failed_run_keeps_an_existing_output(work, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous result")
    result = run_cli("convert", FACTORY, "--weights", "digits.safetensors", "--calib", "calib_wrong_shape.pt",
                     "-o", out, cwd=work)
    assert_one_line_error(result, "--calib")
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_debug_shows_the_traceback(work, tmp_path):
    result = run_cli("convert", FACTORY, "--weights", "nope.safetensors", "-o", tmp_path / "o.safetensors",
                     "--debug", cwd=work)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "UsageError" in result.stderr


def test_usage_errors_from_argparse_exit_2(capsys):
    for argv in (["convert", FACTORY], [], ["frobnicate"]):  # -o missing; no command; unknown command
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "-o/--output" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --skip before MODEL takes it as a pattern: the error says so
        main(["convert", "--skip", "fc2", FACTORY, "-o", "out.safetensors"])
    assert capsys.readouterr().err.endswith("error: the following arguments are required: MODEL (--skip takes every "
                                            "word after it as a pattern, MODEL too: give MODEL before --skip)\n")
    with pytest.raises(SystemExit):
        main(["convert", FACTORY])
    assert "--skip takes" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, option, bad", [
    (["convert", FACTORY, "-o", "out.safetensors", "--config", "int3"], "--config", "int3"),
    (["report", FACTORY, "--observer", "median"], "--observer", "median"),
    (["bench", "--only", "quantize", "gemm"], "--only", "gemm"),
    (["convert", FACTORY, "-o", "out.safetensors", "--granularity", "per_token"], "--granularity", "per_token"),
    (["report", FACTORY, "--rounding", "floor"], "--rounding", "floor"),
])
def test_bad_choice_is_the_usage_and_one_line(tmp_path, argv, option, bad):
    """A name outside an option's table, as a user meets it: the usage, then one error line naming the valid
    choices, exit status 2, no traceback."""
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    *usage, error = result.stderr.rstrip("\n").splitlines()
    assert usage and usage[0].startswith(f"usage: torchquant {argv[0]} ")
    assert all(line.startswith(" ") for line in usage[1:]), result.stderr
    assert error.startswith(f"torchquant {argv[0]}: error: argument {option}")
    assert f"invalid choice: '{bad}' (choose from " in error
    assert list(tmp_path.iterdir()) == []


def test_presets_and_observers_come_from_their_tables(work, tmp_path, monkeypatch, capsys):
    """Adding a preset or an observer is one table entry: QuantConfig.preset, QuantSpec, the command line's
    choices, help and errors all read the tables."""
    monkeypatch.setitem(PRESETS, "w6_weight_only", Preset(
        lambda: QuantConfig(weight=QuantSpec(bits=6), activation=None), "6-bit weights, float activations"))
    monkeypatch.setitem(OBSERVERS, "half_minmax", ObserverKind(
        lambda rows, spec: (rows.amin(dim=1) / 2, rows.amax(dim=1) / 2), OBSERVERS["minmax"].fold, True,
        "half the min/max range"))

    assert QuantConfig.preset("w6_weight_only") == QuantConfig(weight=QuantSpec(bits=6), activation=None)
    observer = Observer(QuantSpec(observer="half_minmax", granularity="per_tensor"))
    observer(torch.tensor([-4.0, 1.0]))
    observer(torch.tensor([2.0]))
    assert observer.lo.item() == -2.0 and observer.hi.item() == 1.0
    with pytest.raises(ValueError, match="w6_weight_only"):
        QuantConfig.preset("int3")
    with pytest.raises(ValueError, match="half_minmax"):
        QuantSpec(observer="median")

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "w6_weight_only: 6-bit weights, float activations" in help_text
    assert "half_minmax: half the min/max range" in help_text
    for option, name, bad in (("--config", "--config/--preset", "int3"), ("--preset", "--config/--preset", "int3"),
                              ("--observer", "--observer", "median")):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", FACTORY, "-o", str(tmp_path / "out.safetensors"), option, bad])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"argument {name}: invalid choice: '{bad}'" in error
        assert ("'half_minmax'" if option == "--observer" else "'w6_weight_only'") in error

    args = build_parser().parse_args(["convert", FACTORY, "-o", "out.safetensors", "--config", "w6_weight_only",
                                      "--observer", "half_minmax"])
    config = config_from_args(args)
    assert config.weight.bits == 6 and config.weight.observer == "half_minmax" and config.activation is None
    # --preset, the README's word for the configurations, is the same option
    assert config_from_args(build_parser().parse_args(["convert", FACTORY, "-o", "out.safetensors", "--preset",
                                                       "w6_weight_only", "--observer", "half_minmax"])) == config
    out = tmp_path / "w6.safetensors"
    monkeypatch.chdir(work)
    assert main(["convert", FACTORY, "--weights", "digits.safetensors", "--config", "w6_weight_only",
                 "--observer", "half_minmax", "-o", str(out), "--quiet", "--threads", "1"]) == 0
    loaded = torchquant.load(str(out), DigitsCNN())
    assert [layer.config.weight.bits for layer in quant_layers(loaded)] == [6, 6, 6, 6]


def test_docs_list_every_preset_and_observer():
    """docs/cli.md lists each entry of the preset and observer tables with its description."""
    text = (ROOT / "docs" / "cli.md").read_text()
    for name, entry in [*PRESETS.items(), *OBSERVERS.items()]:
        assert f"| `{name}` | {entry.description} |" in text, name


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(str(target), "-o") as temp:
            Path(temp).write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(str(target), "-o") as temp:
        Path(temp).write_bytes(b"complete")
    assert target.read_bytes() == b"complete" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(UsageError, match="does not exist"):
        with atomic_output(str(tmp_path / "missing" / "x"), "-o"):
            pass


# ------------------------------------------------------------------------------------------------------------
# warnings, modules from the working directory, read-only and interrupted outputs

def run_main(args, capsys):
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.err.splitlines()


@pytest.fixture
def in_work(work, monkeypatch):
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return work


def test_nothing_quantized_is_one_warning(in_work, tmp_path, capsys):
    out = tmp_path / "nq.safetensors"
    status, err = run_main(["convert", "mymodels:NoQuant", "-o", out, "-q"], capsys)
    assert status == 0 and out.exists()
    assert err == [f"torchquant convert: warning: nothing was quantized: MODEL has no nn.Linear, nn.Conv2d or "
                   f"nn.Conv1d layer; {out} holds the float model"]
    status, err = run_main(["convert", FACTORY, "--weights", "digits.safetensors", "--skip", "*", "-o", out, "-q"],
                           capsys)
    assert status == 0 and len(err) == 1 and "every nn.Linear, nn.Conv2d and nn.Conv1d layer stayed float (--skip" in err[0]


def test_factory_without_weights_warns(in_work, tmp_path, capsys):
    out = tmp_path / "mlp.safetensors"
    status, err = run_main(["convert", "mymodels:MLP", "-o", out, "-q"], capsys)
    assert status == 0 and out.exists()
    assert len(err) == 1 and err[0].startswith("torchquant convert: warning: no --weights: quantizing the weights "
                                               "mymodels:MLP creates (its random initialisation")
    status, err = run_main(["convert", FACTORY, "--weights", "digits.safetensors", "-o", out, "-q"], capsys)
    assert status == 0 and err == []


def test_convert_counts_layers_with_no_quantized_type(in_work, tmp_path, capsys):
    # the GRU stays float in every preset: the closing line says so beside the quantized and skipped counts
    out = tmp_path / "gru.safetensors"
    status, err = run_main(["convert", "mymodels:WithGRU", "-o", out], capsys)  # (warns: no --weights)
    assert status == 0 and out.exists()
    assert err[-1].startswith(f"wrote {out}: 1 layer quantized, 0 kept float, 1 with no quantized type "
                              f"(gru (GRU)); model ")
    # (the first three named)
    status, err = run_main(["convert", "mymodels:GRUStack", "-o", out, "--force"], capsys)
    assert status == 0 and err[-1].startswith(f"wrote {out}: 1 layer quantized, 0 kept float, 4 with no quantized "
                                              f"type (grus.0 (GRU), grus.1 (GRU), grus.2 (GRU), ...); model ")


def test_pickled_model_finds_its_class_in_the_working_directory(work, tmp_path, in_work, capsys):
    out = tmp_path / "mlp.safetensors"
    status, err = run_main(["convert", "mlp_model.pt", "--trust-pickle", "-o", out, "-q"], capsys)
    assert (status, err) == (0, [])
    assert "mymodels" not in sys.modules or os.path.dirname(sys.modules["mymodels"].__file__) == str(work)
    # the same as a user runs it: `python -m` no longer puts the directory on the path, the lookup does
    out.unlink()
    run_cli("convert", "mlp_model.pt", "--trust-pickle", "-o", out, "-q", cwd=work, check_rc=0)
    assert out.exists()
    # from elsewhere the module is missing, and the error says which and where it was looked for
    result = run_cli("convert", work / "mlp_model.pt", "--trust-pickle", "-o", out, cwd=tmp_path)
    assert_one_line_error(result, "mlp_model.pt is a pickled model whose class cannot be found",
                          "no module named 'mymodels'", "current directory")


def test_working_directory_never_shadows_a_package(work, tmp_path):
    """A matplotlib.py beside the user's models is not imported in place of the package (the report imports
    matplotlib for its plot); the user's own module there is still found."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "mymodels.py").write_text(MYMODELS)
    (folder / "matplotlib.py").write_text("open('SHADOWED', 'w').write('ran')\nraise SystemExit(3)\n")
    run_cli("report", "mymodels:MLP", "--markdown", "r.md", "--quiet", "--threads", "1", cwd=folder, check_rc=0)
    assert not (folder / "SHADOWED").exists()
    assert (folder / "r.md").exists()


def test_read_only_output_needs_force(in_work, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    out.chmod(0o444)
    args = ["convert", FACTORY, "--weights", "digits.safetensors", "-o", out, "-q", "--threads", "1"]
    status, err = run_main(args, capsys)
    assert status == 2 and err == [f"torchquant convert: error: -o: {out} exists and is read-only; pass --force "
                                   f"to replace it"]
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert_one_line_error(run_cli(*args, cwd=in_work), "read-only", "--force")
    status, err = run_main(args + ["--force"], capsys)
    assert (status, err) == (0, [])
    assert len(quant_layers(torchquant.load(out, DigitsCNN()))) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_weights_are_read_by_their_content(in_work, tmp_path, capsys):
    """--weights: a float model torchquant.save wrote is float weights (for export too), a safetensors file is read
    as one under any name, and a quantized checkpoint is refused by the commands that quantize, saying what it is."""
    model = DigitsCNN()
    model.load_state_dict(load_file("digits.safetensors"))
    torchquant.save(model, tmp_path / "float.safetensors")
    (tmp_path / "digits.bin").write_bytes(Path("digits.safetensors").read_bytes())
    converted = tmp_path / "int8.safetensors"
    for weights in (tmp_path / "float.safetensors", tmp_path / "digits.bin"):
        status, err = run_main(["convert", FACTORY, "--weights", weights, "-o", converted, "-q", "--force",
                                "--config", "int8-dynamic"], capsys)
        assert (status, err) == (0, [])
    (tmp_path / "cut.bin").write_bytes(Path("digits.safetensors").read_bytes()[:40])  # inside its header
    status, err = run_main(["convert", FACTORY, "--weights", tmp_path / "cut.bin", "-o", converted, "-q", "--force"],
                           capsys)
    cut = tmp_path / "cut.bin"
    assert status == 2 and err[0].startswith(f"torchquant convert: error: --weights: cannot read {cut} as "
                                             f"safetensors (truncated or not a safetensors file)")
    pytest.importorskip("onnxscript")
    status, err = run_main(["export", FACTORY, "--weights", tmp_path / "float.safetensors", "--config",
                            "int8-dynamic", "--input-shape", "1,1,8,8", "-o", tmp_path / "m.onnx", "-q"], capsys)
    assert (status, err) == (0, []) and (tmp_path / "m.onnx").exists()
    for command in ("convert", "report"):
        status, err = run_main([command, FACTORY, "--weights", converted, "-q"]
                               + (["-o", tmp_path / "again.safetensors"] if command == "convert" else []), capsys)
        assert status == 2 and err == [f"torchquant {command}: error: --weights: {converted} holds a quantized model "
                                       f"(a torchquant checkpoint), expected the float model's weights (`torchquant "
                                       f"export` exports such a checkpoint as it is)"]


def test_weights_file_is_opened_once(in_work, tmp_path, capsys, monkeypatch):
    """--weights reads a safetensors header once (its metadata and tensors from one open), and refuses a quantized
    checkpoint before reading any tensor."""
    import safetensors
    import safetensors.torch
    opened, tensors_read = [], []
    real_open = safetensors.safe_open

    class CountingOpen:
        def __init__(self, path, *args, **kwargs):
            opened.append(os.path.basename(path))
            self.file = real_open(path, *args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, name):
            tensors_read.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    model = DigitsCNN()
    model.load_state_dict(load_file("digits.safetensors"))
    torchquant.save(model, tmp_path / "float.safetensors")
    converted = tmp_path / "int8.safetensors"
    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    monkeypatch.setattr(safetensors.torch, "safe_open", CountingOpen)  # (load_file's)
    status, err = run_main(["convert", FACTORY, "--weights", tmp_path / "float.safetensors", "-o", converted, "-q",
                            "--config", "int8-dynamic"], capsys)
    assert (status, err) == (0, []) and opened == ["float.safetensors"] and tensors_read
    opened.clear(), tensors_read.clear()
    status, err = run_main(["report", FACTORY, "--weights", converted, "-q"], capsys)
    assert status == 2 and "holds a quantized model" in err[0]
    assert opened == ["int8.safetensors"] and tensors_read == []


def test_export_force_replaces_a_read_only_output(in_work, tmp_path, capsys):
    # --force passed the command line's check, but export_onnx, not given it, refused the file ("pass --force")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    out.chmod(0o444)
    args = ["export", FACTORY, "--weights", "digits.safetensors", "--input-shape", "1,1,8,8", "-o", out, "-q",
            "--threads", "1"]
    status, err = run_main(args, capsys)
    assert status == 2 and "read-only; pass --force" in err[0] and out.read_bytes() == b"previous"
    status, err = run_main(args + ["--force"], capsys)
    assert (status, err) == (0, []) and out.read_bytes() != b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# (SIGINT gets Python's usual handler first: a process started in the background by a shell inherits SIGINT
# ignored, and then the signal did nothing and the "partial" write below completed)
INTERRUPTED_CONVERT = """
import os, signal, sys, time
import torchquant.io
from torchquant.cli import main
signal.signal(signal.SIGINT, signal.default_int_handler)
def partial(tensors, path, metadata=None):  # the checkpoint is half written when the signal comes
    open(path, "wb").write(b"partial")
    signal.raise_signal(getattr(signal, sys.argv[1]))
    time.sleep(30)
torchquant.io.save_file = partial
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_interrupted_convert_leaves_no_file(work, tmp_path, sig):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_CONVERT, sig, "convert", FACTORY, "--weights",
                             "digits.safetensors", "-o", str(tmp_path / "out.safetensors"), "-q", "--threads", "1"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert list(tmp_path.iterdir()) == [], result.stderr
    if sig == "SIGTERM":
        assert result.returncode == -signal.SIGTERM, result.stderr
    else:
        assert result.returncode == 130 and result.stderr == "torchquant convert: interrupted\n"


def test_load_inputs_takes_a_list_of_batches(tmp_path):
    """A .pt file holding a list of input batches (as a calibration loop takes them) is read as their samples in
    order; a pair (inputs, integer labels) stays a pair, and batches of different sample shapes are refused."""
    from torchquant._cli_io import load_inputs
    batches = [torch.randn(3, 1, 8, 8), torch.randn(5, 1, 8, 8), torch.randn(1, 1, 8, 8)]
    torch.save(batches, tmp_path / "batches.pt")
    inputs, labels = load_inputs(str(tmp_path / "batches.pt"), "--calib")
    assert labels is None and torch.equal(inputs, torch.cat(batches))
    torch.save((batches[0], torch.tensor([0, 1, 2])), tmp_path / "pair.pt")
    inputs, labels = load_inputs(str(tmp_path / "pair.pt"), "--eval", want_labels=True)
    assert torch.equal(inputs, batches[0]) and labels.tolist() == [0, 1, 2]
    torch.save([torch.randn(2, 4), torch.randn(2, 5), torch.randn(2, 4)], tmp_path / "mixed.pt")
    with pytest.raises(UsageError, match=r"--calib: the batches in .*mixed.pt differ in sample shape \(batch 0: "
                                         r"\[4\], batch 1: \[5\]\); they are joined into one tensor"):
        load_inputs(str(tmp_path / "mixed.pt"), "--calib")
    # two batches of variable-length sequences were read as an (inputs, labels) pair: "the labels in ... must be a
    # 1-D integer tensor"
    torch.save([torch.randn(8, 4, 40), torch.randn(8, 4, 32)], tmp_path / "lengths.pt")
    with pytest.raises(UsageError, match=r"--calib: the batches in .*lengths.pt differ in sample shape \(batch 0: "
                                         r"\[4, 40\], batch 1: \[4, 32\]\)"):
        load_inputs(str(tmp_path / "lengths.pt"), "--calib")
    torch.save((torch.randn(3, 4), torch.randn(3, 4).half()), tmp_path / "dtypes.pt")
    with pytest.raises(UsageError, match=r"differ in dtype \(batch 0: float32, batch 1: float16\)"):
        load_inputs(str(tmp_path / "dtypes.pt"), "--calib")
    torch.save((batches[0], torch.tensor([0.0, 1.0, 2.0])), tmp_path / "float_labels.pt")  # still a pair
    with pytest.raises(UsageError, match="the labels in .*float_labels.pt must be a 1-D integer tensor"):
        load_inputs(str(tmp_path / "float_labels.pt"), "--eval", want_labels=True)


def test_special_files_are_refused_without_opening_them(tmp_path):
    # a pipe was reported as empty and /dev/zero as empty; neither is opened (reading a pipe could wait forever)
    from torchquant._cli_io import load_inputs
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(UsageError, match=f"--calib: {path} is not a regular file"):
            load_inputs(path, "--calib")
    # nor replaced as an output (-o /dev/null as root replaced the device with the checkpoint)
    from torchquant._cli_io import check_output
    with pytest.raises(UsageError, match=f"-o: {fifo} is not a regular file"):
        check_output(str(fifo), "-o")


def test_a_missing_model_file_runs_no_python_file_of_that_name(tmp_path, monkeypatch, capsys):
    """`model.pt` that does not exist names a file: no `model` module is looked up (which imported ./model.py)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "model.py").write_text("open('imported', 'w').close()\n")
    status, err = run_main(["convert", "model.pt", "-o", "out.safetensors"], capsys)
    assert status == 2 and err == ["torchquant convert: error: MODEL: no such file: model.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]


def test_the_parent_packages_of_a_factory_are_its_source_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "netpkg").mkdir()
    (tmp_path / "netpkg" / "__init__.py").write_text("# the package\n")
    (tmp_path / "netpkg" / "nets.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 4)\n")
    status, err = run_main(["convert", "netpkg.nets:make", "-o", "netpkg/__init__.py"], capsys)
    assert status == 2 and "-o: netpkg/__init__.py is the MODEL's source file" in err[-1]
    assert (tmp_path / "netpkg" / "__init__.py").read_text() == "# the package\n"
