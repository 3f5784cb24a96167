"""Hugging Face transformers' Conv1D (GPT-2's attention and MLP projections: x @ weight + bias with the weight
stored [in, out]) is quantized as a QuantLinear that keeps the Conv1D's weight parameter."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import torchquant
from torchquant.nn import QuantLinear
from torchquant.report import build_report, float_only_layers

transformers = pytest.importorskip("transformers", reason="transformers not installed")
from transformers.pytorch_utils import Conv1D  # noqa: E402

PRESETS = ["int8-dynamic", "int8-static", "w4a8-dynamic", "int8-pipeline"]


class _Mlp(nn.Module):
    """GPT-2's MLP shape: Conv1D, GELU, Conv1D (a Linear variant when conv1d=False: the same function)."""

    def __init__(self, conv1d: bool = True, width: int = 24, hidden: int = 40):
        super().__init__()
        layer = (lambda i, o: Conv1D(o, i)) if conv1d else nn.Linear
        self.c_fc = layer(width, hidden)
        self.act = nn.GELU()
        self.c_proj = layer(hidden, width)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A Conv1D MLP with random weights and biases, and the nn.Linear MLP with the same (transposed) weights."""
    torch.manual_seed(seed)
    model = _Mlp()
    with torch.no_grad():
        for layer in (model.c_fc, model.c_proj):
            layer.bias.normal_(0, 0.1)
    linear = _Mlp(conv1d=False)
    with torch.no_grad():
        for name in ("c_fc", "c_proj"):
            getattr(linear, name).weight.copy_(getattr(model, name).weight.t())
            getattr(linear, name).bias.copy_(getattr(model, name).bias)
    return model.eval(), linear.eval()


def _quantized(model, preset, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (int8-pipeline: the traced model's notes)
        return torchquant.quantize_model(model, preset, calibration=[x])


@pytest.mark.parametrize("preset", PRESETS)
def test_conv1d_converts_as_the_linear_with_its_transposed_weight(preset):
    model, linear = _pair()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        assert torch.allclose(model(x), linear(x), atol=1e-5)
        converted = _quantized(model, preset, x)
        want = _quantized(linear, preset, x)
        layers = [m for m in converted.modules() if isinstance(m, QuantLinear)]
        assert len(layers) == 2 and all(m.converted and m.weight_transposed for m in layers)
        assert torch.equal(converted(x), want(x))  # the same integers: the same function


def test_prepare_keeps_the_conv1d_parameters_and_their_layout():
    model, _ = _pair()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prepared = torchquant.prepare(model, "int8-dynamic")
    layer = prepared.c_fc
    assert type(layer) is QuantLinear and (layer.in_features, layer.out_features) == (24, 40)
    assert layer.weight is parameters["c_fc.weight"] and layer.weight.shape == (24, 40)  # [in, out], not copied
    assert layer.weight_shape == (40, 24)
    assert "weight_transposed=True" in repr(layer)
    state = prepared.state_dict()
    assert {k: v.shape for k, v in state.items() if "quantizer" not in k} == {k: v.shape for k, v in
                                                                              float_state.items()}
    # a float Conv1D checkpoint loads into the prepared model
    prepared.load_state_dict(float_state, strict=False)
    # training reaches the Conv1D's parameters (the optimizer made before prepare updates them)
    prepared.train()
    x = torch.randn(6, 24)
    prepared(x).square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (24, 40)
    before = layer.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(layer.weight, before)


def test_fake_quant_training_matches_the_linear_model():
    model, linear = _pair(seed=1)
    x = torch.randn(8, 24)
    prepared = torchquant.prepare(model, "int8-dynamic")
    prepared_linear = torchquant.prepare(linear, "int8-dynamic")
    y, y_linear = prepared(x), prepared_linear(x)
    assert torch.allclose(y, y_linear, atol=1e-5)
    y.square().sum().backward()
    y_linear.square().sum().backward()
    for name in ("c_fc", "c_proj"):
        grad = getattr(prepared, name).weight.grad
        assert torch.allclose(grad, getattr(prepared_linear, name).weight.grad.t(), atol=1e-5), name


@pytest.mark.parametrize("preset", ["int8-dynamic", "w4a8-dynamic"])
def test_converted_weight_reads_in_the_conv1d_layout(preset):
    model, _ = _pair()
    x = torch.randn(4, 24)
    converted = _quantized(model, preset, x)
    layer = converted.c_fc
    assert layer.weight.shape == (24, 40) and torch.equal(layer.weight, layer.dequantized_weight().t())
    assert layer.qweight.shape[0] == 40  # the integer weight is [out, in], as every QuantLinear's


@pytest.mark.parametrize("converted", [False, True], ids=["prepared", "converted"])
def test_save_and_load_into_a_float_conv1d_model(converted, tmp_path):
    model, _ = _pair()
    x = torch.randn(4, 24)
    quantized = _quantized(model, "int8-static", x) if converted else torchquant.prepare(model, "int8-dynamic")
    path = str(tmp_path / "mlp.safetensors")
    torchquant.save(quantized, path)
    loaded = torchquant.load(path, _Mlp().eval())
    assert loaded.c_fc.weight_transposed and loaded.c_fc.converted == converted
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))


def test_report_compares_the_weight_in_its_quantized_layout():
    model, _ = _pair()
    x = torch.randn(4, 24)
    converted = _quantized(copy.deepcopy(model), "int8-static", x)
    report = build_report(model, converted, "int8-static", calibration=[x], time_layers=False)
    rows = {row.name: row for row in report.layers}
    assert set(rows) == {"c_fc", "c_proj"} and rows["c_fc"].shape == [40, 24] and rows["c_fc"].type == "Conv1D"
    assert all(row.quantized and row.weight_sqnr_db > 35 and row.output_sqnr_db > 30 for row in rows.values()), rows
    assert float_only_layers(model) == []


def test_gpt2_quantizes_every_projection():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tiny vocabulary has no room for GPT-2's special tokens)
        model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model(ids).logits
        converted = torchquant.quantize_model(model, "int8-dynamic", inplace=False)
        y = converted(ids).logits
    layers = [name for name, m in converted.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 9, layers  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each block, and lm_head
    assert torchquant.functional.quantization_error(ref, y)["sqnr_db"] > 30


def test_budget_plans_conv1d_layers():
    from torchquant.budget import quantize_with_budget
    model, _ = _pair()
    x = torch.randn(16, 24)
    # c_fc at 4 bits misses a 30 dB budget (23 dB), at 8 bits meets it
    quantized, decisions = quantize_with_budget(model, "w4a8-dynamic", [x], min_sqnr=30)
    assert "8-bit weights" in decisions["c_fc"], decisions
    for name in ("c_fc", "c_proj"):
        layer = quantized.get_submodule(name)
        assert layer.weight_transposed and layer.config.weight.bits == (8 if name in decisions else 4), name


def test_parametrized_conv1d_stays_float_with_a_warning():
    model, _ = _pair()
    torch.nn.utils.parametrizations.weight_norm(model.c_fc)
    with pytest.warns(UserWarning, match=r"c_fc \(ParametrizedConv1D\) stays float: it is parametrized"):
        prepared = torchquant.prepare(model, "int8-dynamic")
    assert type(prepared.c_proj) is QuantLinear and not isinstance(prepared.c_fc, QuantLinear)
