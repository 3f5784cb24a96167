"""torch.compile(converted_model, fullgraph=True) runs and matches eager (one small model: compiling is slow), and
AOTInductor packages (torchquant.export_aoti) compute the eager numbers."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import torchquant as tq
from torchquant.nn import QuantConv2d, QuantLinear

from conftest import requires_aoti
from test_nn import exact_float_reference  # noqa: F401  (autouse fixture)


def test_compiled_converted_model_matches_eager(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantConv2d(3, 4, 3, padding=1, config="int8-static"), nn.ReLU(),
        QuantConv2d(4, 4, (1, 3), groups=2, config="int8-dynamic"), nn.Flatten(),
        QuantLinear(4 * 5 * 3, 8, config="int8-dynamic"), nn.ReLU(),
        QuantLinear(8, 3, config="w4a8-dynamic"),
    ).to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    tq.calibrate(model, [x], progress=False)
    tq.convert(model.eval())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_dynamic_shapes_compile_once():
    # torch.compile(dynamic=True) of a converted model: one graph for every batch size and sequence length (sizes
    # 0 and 1 aside, which torch specializes in any model), one op per int8-dynamic Linear, no recompiles
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(16, 32, config="int8-dynamic"), nn.GELU(),
                          QuantLinear(32, 16, config="int8-static"), nn.ReLU(),
                          QuantLinear(16, 8, config="w4a8-dynamic"))
    tq.calibrate(model, [torch.randn(4, 6, 16)], progress=False)
    tq.convert(model.eval())
    torch._dynamo.reset()
    graphs = []  # the graphs after AOTAutograd, as a compiler backend gets them

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(model, dynamic=True, backend=aot_autograd(fw_compiler=keep_graph))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for shape in [(2, 3, 16), (5, 7, 16), (3, 2, 16), (8, 33, 16), (2, 128, 16)]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("int8_linear_dynamic" in t for t in targets) == 2, targets
    assert not any("quantize_per_token" in t for t in targets), targets


def test_compiled_dynamic_conv_reads_a_channels_last_input_in_place():
    # an int8-dynamic conv's per-tensor scale of a channels-last input: its values as one row in memory order, a view
    # (reshaped as they are, a copy of the activation per conv, which made the compiled CNN slower than eager)
    torch.manual_seed(0)
    model = tq.quantize_model(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                            nn.Conv2d(16, 16, 3, padding=1)).eval(), "int8-dynamic")
    torch._dynamo.reset()
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep_graph))
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    scales = [n for n in graphs[0].graph.nodes if n.target == torch.ops.torchquant.quantize_per_token.default]
    assert len(scales) == 2
    for node in scales:
        row = node.args[0]
        assert row.target == torch.ops.aten.view.default and row.args[0].target == torch.ops.aten.permute.default


def test_compiled_qat_with_a_folded_batchnorm_compiles_once():
    # a training step of a prepared model whose BatchNorm folds into the conv: the layer counts its steps in a
    # tensor (a Python int was a value dynamo guards on: the step compiled again each time, past the recompile
    # limit); the compiled steps train the same parameters as eager ones
    def model():
        torch.manual_seed(0)
        return tq.prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(8 * 6 * 6, 4)), "int8-dynamic").train()

    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))) for _ in range(5)]
    torch._dynamo.reset()
    eager, compiled = model(), model()
    step = torch.compile(compiled, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for module, forward in ((eager, eager), (compiled, step)):
            optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
            for x, y in batches:
                optimizer.zero_grad()
                nn.functional.cross_entropy(forward(x), y).backward()
                optimizer.step()
    assert eager[0].bn_steps == compiled[0].bn_steps == 5
    for want, got in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[0].bn.running_var, eager[0].bn.running_var)


_STATIC = tq.QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor")


@pytest.mark.parametrize("config", [
    "int8-static",
    tq.QuantConfig(activation=dataclasses.replace(_STATIC, observer="mse")),
    tq.QuantConfig(weight=tq.QuantSpec(bits=4, learn_scale=True),
                   activation=dataclasses.replace(_STATIC, learn_scale=True)),
], ids=["minmax", "mse", "learned-scales"])
def test_compiled_static_qat_is_one_graph_and_trains_as_eager(config):
    # static activation observers and learned scales choose between their first and later batches by a count or a
    # flag read as a tensor (a branch on .item() broke the graph at every quantizer): a compiled training step, and
    # a compiled evaluation before and after calibration, are one graph each, and compute what eager ones do
    def model():
        torch.manual_seed(0)
        return tq.prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(8 * 6 * 6, 4)), config)

    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))) for _ in range(4)]
    x_eval = torch.randn(3, 3, 6, 6)
    torch._dynamo.reset()
    eager, compiled = model(), model()
    with torch.no_grad():  # an uncalibrated quantizer passes its input through, compiled too
        torch.testing.assert_close(torch.compile(compiled.eval(), backend="aot_eager", fullgraph=True)(x_eval),
                                   eager.eval()(x_eval), rtol=0, atol=0)
    torch._dynamo.reset()
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for module, forward in ((eager, eager), (compiled, step)):
            module.train()
            optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
            for x, y in batches:
                optimizer.zero_grad()
                nn.functional.cross_entropy(forward(x), y).backward()
                optimizer.step()
    for want, got in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert compiled[0].input_quantizer.observer.batches == len(batches)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(compiled.eval(), backend="aot_eager", fullgraph=True)(x_eval),
                                   eager.eval()(x_eval), rtol=1e-4, atol=1e-5)


def test_compiled_converted_model_follows_autocast():
    # under torch.autocast (entered around the compiled model or inside the compiled function) the converted layers'
    # float outputs take autocast's dtype in the traced graph as in eager
    torch.manual_seed(0)
    model = nn.Sequential(QuantConv2d(3, 4, 3, padding=1, config="int8-static"), nn.ReLU(), nn.Flatten(),
                          QuantLinear(4 * 5 * 5, 8, config="int8-dynamic"), nn.ReLU(),
                          QuantLinear(8, 3, config="int8-static"))
    x = torch.randn(2, 3, 5, 5)
    tq.calibrate(model, [x], progress=False)
    tq.convert(model.eval())

    def under_autocast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    with torch.no_grad():
        want = under_autocast(x)
        assert want.dtype == torch.bfloat16
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(compiled(x), want)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(under_autocast, fullgraph=True, backend="aot_eager")(x), want)


@requires_aoti
def test_aoti_package_of_converted_layers(tmp_path, device):
    """export_aoti compiles converted layers into an AOTInductor package that computes the eager model's numbers for
    every batch size of the free batch dimension: the program holds the whole packed-weight buffers (AOTInductor
    copies a buffer over the bytes its view spans, and the kernels read the zero padding past the weight's view),
    and calls torchquant's ops, which are registered where torchquant is imported."""
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantConv2d(3, 5, 3, padding=1, config="int8-static"), nn.ReLU(),
        QuantConv2d(5, 6, (1, 3), stride=2, config="int8-dynamic"), nn.Flatten(),
        QuantLinear(6 * 2 * 2, 10, config="int8-dynamic"), nn.GELU(),
        QuantLinear(10, 7, config="int8-static"), nn.ReLU(),
        QuantLinear(7, 3, config="w4a8-dynamic")).to(device)
    tq.calibrate(model, [torch.randn(4, 3, 3, 5, device=device)], progress=False)
    tq.convert(model.eval())
    assert model[4].fused_activation == "gelu"
    path = tq.export_aoti(model, torch.randn(1, 3, 3, 5, device=device), tmp_path / "model.pt2")  # batch 1: still free
    assert path == str(tmp_path / "model.pt2") and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]
    package = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for batch in (2, 1, 5):
            x = torch.randn(batch, 3, 3, 5, device=device)
            torch.testing.assert_close(package(x), model(x), rtol=1e-6, atol=1e-6)


@requires_aoti
def test_aoti_package_with_a_free_sequence_length(tmp_path):
    # a transformer's tokens: dynamic_shapes (torch.export's) frees the sequence dim beside the batch
    torch.manual_seed(0)
    model = tq.quantize_model(nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16)).eval(), "int8-dynamic")
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")}
    package = torch._inductor.aoti_load_package(
        tq.export_aoti(model, torch.randn(2, 5, 16), tmp_path / "tokens.pt2", dynamic_shapes=(dims,)))
    with torch.no_grad():
        for shape in ((2, 5, 16), (3, 9, 16), (1, 1, 16)):
            x = torch.randn(shape)
            torch.testing.assert_close(package(x), model(x), rtol=1e-6, atol=1e-6)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = QuantLinear(4, 2, config="int8-dynamic")

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


@requires_aoti
def test_export_aoti_bad_input(tmp_path):
    model = tq.convert(_DataDependent().eval())
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"export_aoti: path must end in \.pt2 \(an AOTInductor package\), got "):
        tq.export_aoti(model, x, tmp_path / "model.onnx")
    with pytest.raises(TypeError, match="export_aoti: example_inputs must be a tensor or a non-empty tuple of "
                                        "tensors, got list"):
        tq.export_aoti(model, [x], tmp_path / "model.pt2")
    with pytest.raises(TypeError, match="export_aoti: dynamic_batch must be a bool, got str"):
        tq.export_aoti(model, x, tmp_path / "model.pt2", dynamic_batch="yes")
    with pytest.raises(TypeError, match="export_aoti: model must be an nn.Module, got function"):
        tq.export_aoti(lambda x: x, x, tmp_path / "model.pt2")
    with pytest.raises(FileNotFoundError, match="export_aoti: path: directory .* does not exist"):
        tq.export_aoti(model, x, tmp_path / "missing" / "model.pt2")
    with pytest.raises(tq.export.ExportError, match=r"export_aoti: the model's forward cannot be traced by "
                                                    r"torch.export \(File .*test_compile.py\", line \d+, in forward\): "
                                                    r"GuardOnDataDependentSymNode"):
        tq.export_aoti(model, x, tmp_path / "model.pt2")
    read_only = tmp_path / "old.pt2"
    read_only.write_bytes(b"previous")
    read_only.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only"):
        tq.export_aoti(tq.convert(nn.Sequential(QuantLinear(4, 2, config="int8-dynamic")).eval()), x, read_only)
    assert read_only.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt2"]


def test_export_aoti_refuses_torch_before_2_13(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    model = tq.convert(nn.Sequential(QuantLinear(4, 2, config="int8-dynamic")).eval())
    with pytest.raises(tq.export.ExportError, match=r"export_aoti: AOTInductor packages of torchquant's ops need "
                                                    r"torch 2\.13 or newer, this is torch 2\.11\.0\+cu130"):
        tq.export_aoti(model, torch.randn(2, 4), tmp_path / "model.pt2")
    assert list(tmp_path.iterdir()) == []


@requires_aoti
def test_cli_export_writes_an_aoti_package(tmp_path, capsys):
    from torchquant.cli import main
    from torchquant.examples import DigitsCNN
    torch.manual_seed(0)
    calib = [torch.rand(8, 1, 8, 8) for _ in range(2)]
    checkpoint, out = tmp_path / "digits.safetensors", tmp_path / "digits.pt2"
    tq.save(tq.quantize_model(DigitsCNN().eval(), "int8-pipeline", calibration=calib), checkpoint)
    args = ["export", "torchquant.examples:DigitsCNN", "--weights", str(checkpoint), "--input-shape", "1,1,8,8",
            "-o", str(out), "--threads", "1"]
    assert main(args + ["--opset", "18"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"torchquant export: error: --opset: {out} is an AOTInductor package (.pt2), not ONNX"]
    assert main(args) == 0 and capsys.readouterr().err.splitlines() == [f"wrote {out}"]
    package = torch._inductor.aoti_load_package(str(out))
    model = tq.load(checkpoint, DigitsCNN())
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(package(x), model(x))
