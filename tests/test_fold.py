"""BatchNorm folding: the folding arithmetic against layer + BatchNorm, finding the pairs (torch.fx graph, nn.Sequential
fallback), post-training conversion, quantization-aware training with batch / frozen statistics, save/load and the
report's note."""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchquant as tq
from torchquant import QuantConfig, QuantSpec
from torchquant.fold import FoldedBatchNorm1d, FoldedBatchNorm2d, find_bn_pairs, fold_running
from torchquant.nn import QuantConv2d, QuantLinear
from torchquant.nn.base import QuantLayerBase

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

W8_FLOAT_ACT = QuantConfig(weight=QuantSpec(bits=8), activation=None)


def _random_stats(bn: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))
    return bn.eval()


def _conv_bn(bias=True, affine=True, groups=1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias)
    return conv, _random_stats(nn.BatchNorm2d(6, affine=affine), seed)


class ConvBnNet(nn.Module):
    """Calls its layers from forward (not an nn.Sequential): folding needs the traced graph."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.bn1d = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn1d(self.fc(torch.flatten(x, 1))))
        return self.head(x)


def _inputs(n=8, seed=1, shape=(3, 6, 6)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# ---- the arithmetic --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_folded_conv_equals_conv_then_bn(bias, affine, groups):
    conv, bn = _conv_bn(bias, affine, groups, seed=groups + 2 * bias + 4 * affine)
    x = torch.randn(3, 4, 7, 5)
    weight, folded_bias = fold_running(conv.weight, conv.bias, bn)
    with torch.no_grad():
        expected = bn(conv(x))
        got = F.conv2d(x, weight, folded_bias, padding=1, groups=groups)
        reference = bn.double()(conv.double()(x.double()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # both float32 results are as close to the float64 truth as float32 rounding allows
    assert (got.double() - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("affine", [True, False])
def test_folded_linear_equals_linear_then_bn1d(affine):
    torch.manual_seed(0)
    linear, bn = nn.Linear(12, 9), _random_stats(nn.BatchNorm1d(9, affine=affine), 3)
    x = torch.randn(5, 12)
    weight, bias = fold_running(linear.weight, linear.bias, bn)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, weight, bias), bn(linear(x)), rtol=1e-5, atol=1e-5)


def test_prepared_layer_folds_the_running_statistics():
    conv, bn = _conv_bn(bias=True, affine=True, groups=2)
    model = tq.prepare(nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).eval(), W8_FLOAT_ACT)
    assert isinstance(model[0], QuantConv2d) and model[0].bn is model[1] and model[0].folded_bn == "1"
    assert type(model[1]) is FoldedBatchNorm2d
    weight, bias = model[0].float_weight_bias()
    expected_weight, expected_bias = fold_running(conv.weight, conv.bias, bn)
    assert torch.equal(weight, expected_weight) and torch.equal(bias, expected_bias)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        # 8-bit weights: the prepared model stays close to conv + bn + relu
        torch.testing.assert_close(model(x), F.relu(bn(conv(x))), rtol=0, atol=0.05)


def test_fold_bn_false_keeps_the_batchnorm():
    conv, bn = _conv_bn()
    model = tq.prepare(nn.Sequential(conv, bn), dataclasses.replace(W8_FLOAT_ACT, fold_bn=False))
    assert model[1] is bn and model[0].bn is None and model[0].folded_bn is None


def _float_checkpoint_model(seed=0):
    model = ConvBnNet(seed).eval()
    for i, bn in enumerate((model.bn, model.bn1d)):
        _random_stats(bn, seed + i)
    return model


def test_prepared_model_keeps_the_batchnorm_names_and_parameters():
    model = _float_checkpoint_model()
    float_keys = list(model.state_dict())
    bn_tensors = {**dict(model.bn.named_parameters()), **dict(model.bn.named_buffers())}
    prepared = tq.prepare(model, W8_FLOAT_ACT)
    state = prepared.state_dict()
    assert set(float_keys) <= set(state) and not any(".bn." in key for key in state)
    # the same tensors (an optimizer built on the float model keeps working), each listed once
    for key, tensor in bn_tensors.items():
        assert getattr(prepared.bn, key) is tensor and getattr(prepared.conv.bn, key) is tensor, key
    params = list(prepared.parameters())
    assert len(params) == len({id(p) for p in params})
    assert sum(p is prepared.bn.weight for p in params) == 1 and sum(p is prepared.bn.bias for p in params) == 1
    assert "bn" not in prepared.conv._modules  # referenced by the layer, owned by the model


def test_float_checkpoint_loads_strictly_into_a_prepared_folded_model():
    trained = _float_checkpoint_model(seed=3)
    x = _inputs(8)
    prepared = tq.prepare(_float_checkpoint_model(seed=0), "int8-dynamic")
    prepared.load_state_dict(trained.state_dict())  # strict
    expected = tq.prepare(copy.deepcopy(trained), "int8-dynamic")
    with torch.no_grad():
        assert torch.equal(prepared(x), expected(x))
    # and the layer folds the loaded statistics
    weight, bias = prepared.conv.float_weight_bias()
    expected_weight, expected_bias = fold_running(trained.conv.weight, trained.conv.bias, trained.bn)
    assert torch.equal(weight, expected_weight) and torch.equal(bias, expected_bias)


def test_moving_a_prepared_model_moves_the_folded_batchnorm_once_and_the_layer_sees_it():
    prepared = tq.prepare(_float_checkpoint_model(), W8_FLOAT_ACT)
    x = _inputs(4)
    with torch.no_grad():
        expected = prepared(x)
    prepared.to(torch.bfloat16)
    layer_view = [*prepared.conv.bn.named_parameters(), *prepared.conv.bn.named_buffers()]
    assert len(layer_view) == 5
    for key, tensor in layer_view:  # the layer reads the moved tensors
        assert tensor is getattr(prepared.bn, key), key
    assert prepared.conv.bn.running_var.dtype == torch.bfloat16 and prepared.conv.bn.weight.dtype == torch.bfloat16
    copied = copy.deepcopy(prepared)
    assert copied.conv.bn is copied.bn and copied.bn is not prepared.bn
    with torch.no_grad():
        out = prepared(x.to(torch.bfloat16)).float()
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()


def test_compiled_and_exported_folded_models_match_eager():
    prepared = tq.prepare(_float_checkpoint_model(), "int8-dynamic")
    x = _inputs(4)
    for model in (prepared, tq.convert(copy.deepcopy(prepared))):
        with torch.no_grad():
            expected = model(x)
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected, rtol=1e-5, atol=1e-5)
            exported = torch.export.export(model, (x,))
            torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_config_validates_and_serializes_the_options():
    config = QuantConfig(fold_bn=False, freeze_bn_after=10)
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_dict({"weight": QuantSpec().to_dict()}).fold_bn is True
    with pytest.raises(TypeError, match="fold_bn must be a bool"):
        QuantConfig(fold_bn=1)
    with pytest.raises(ValueError, match="freeze_bn_after must be a non-negative int"):
        QuantConfig(freeze_bn_after=-1)


# ---- finding the pairs -----------------------------------------------------------------------------------------

def test_traced_model_folds_layers_called_in_forward():
    model = tq.prepare(ConvBnNet().eval(), W8_FLOAT_ACT)
    assert model.conv.folded_bn == "bn" and model.fc.folded_bn == "bn1d" and model.head.folded_bn is None
    assert type(model.bn) is FoldedBatchNorm2d and type(model.bn1d) is FoldedBatchNorm1d
    assert model.conv.bn is model.bn and model.fc.bn is model.bn1d


class NotFoldable(nn.Module):
    """conv_a's output has a second user; pool is not a foldable layer; shared runs twice; bn_c has the wrong
    width for conv_c (it follows a slice)."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(1)
        self.bn_pool = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.conv_c = nn.Conv2d(4, 4, 1)
        self.bn_c = nn.BatchNorm2d(2)

    def forward(self, x):
        a = self.conv_a(x)
        y = self.bn_a(a) + a
        y = self.bn_pool(self.pool(y))
        y = self.bn_shared(self.shared(self.shared(y)))
        return self.bn_c(self.conv_c(y)[:, :2])


def test_batchnorm_after_an_unfoldable_producer_stays_float():
    model = NotFoldable().eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_bn_pairs(model) == []
        prepared = tq.prepare(model, W8_FLOAT_ACT)
    for name in ("bn_a", "bn_pool", "bn_shared", "bn_c"):
        assert type(getattr(prepared, name)) is nn.BatchNorm2d, name
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), expected, rtol=0, atol=0.05)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it. The Sequential pair folds, the forward pair cannot."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.block(x)
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


@pytest.mark.parametrize("config", [W8_FLOAT_ACT, tq.QuantConfig.preset("int8-pipeline")], ids=["swap", "pipeline"])
def test_untraceable_model_falls_back_to_sequential_pairs_with_one_warning(config):
    # (the integer pipeline's warning says both: it falls back to the module swap, and its folding to containers)
    model = Untraceable().eval()
    for m in (model.block[1], model.bn):
        _random_stats(m, 5)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning) as caught:
        prepared = tq.prepare(model, config, inplace=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "torch.fx cannot trace Untraceable" in messages[0]
    assert "TraceError" in messages[0] and "falls back to consecutive layers of nn.Sequential" in messages[0]
    assert ("module swap" in messages[0]) == config.integer_pipeline and caught[0].filename == __file__
    assert prepared.block[0].folded_bn == "block.1" and type(prepared.block[1]) is FoldedBatchNorm2d
    assert type(prepared.bn) is nn.BatchNorm2d and prepared.conv.bn is None
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), expected, rtol=0, atol=0.1)


def test_skipped_layer_or_batchnorm_is_not_folded():
    for skip in ("0", "1"):
        conv, bn = _conv_bn()
        model = tq.prepare(nn.Sequential(conv, bn), dataclasses.replace(W8_FLOAT_ACT, skip=(skip,)))
        assert model[1] is bn


def test_failed_conversion_puts_the_batchnorm_back():
    conv, bn = _conv_bn()
    model = nn.Sequential(conv, bn)
    with pytest.raises(TypeError):
        tq.quantize_model(model, "int8-static", calibration=[torch.randn(2, 4, 5, 5), "not a batch"])
    assert model[0] is conv and model[1] is bn


# ---- post-training conversion ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic", "w4a8-dynamic"])
def test_converted_folded_model_matches_fake_quant_and_float(preset, device):
    model = ConvBnNet().eval()
    for bn in (model.bn, model.bn1d):
        _random_stats(bn, 7)
    model.to(device)
    x = _inputs(16).to(device)
    with torch.no_grad():
        expected = model(x)
    prepared = tq.prepare(copy.deepcopy(model), preset)
    tq.calibrate(prepared, [x], progress=False)
    with torch.no_grad():
        fake = prepared(x)
    converted = tq.convert(prepared)
    assert converted.conv.converted and converted.conv.bn is None and converted.conv.folded_bn == "bn"
    assert type(converted.bn) is nn.Identity and type(converted.bn1d) is nn.Identity
    assert not any(key.startswith(("bn.", "bn1d.")) for key in converted.state_dict())
    assert converted.conv.bias is not None and converted.conv.bias.device == x.device  # (the conv had no bias)
    with torch.no_grad():
        out = converted(x)
    torch.testing.assert_close(out, fake, rtol=1e-4, atol=1e-4)
    error = tq.functional.quantization_error(expected, out)
    assert error["sqnr_db"] > (15 if preset == "w4a8-dynamic" else 25), error


# ---- quantization-aware training -------------------------------------------------------------------------------

def _train_steps(model, steps, seed=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g)
        target = torch.randint(0, 5, (8,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    return model.eval()


def test_training_folds_batch_statistics_and_updates_running_ones_like_batchnorm():
    conv, bn = _conv_bn(bias=True)
    bn.momentum = None  # the cumulative average, the less common update rule
    float_model = nn.Sequential(conv, bn).train()
    prepared = tq.prepare(copy.deepcopy(float_model), W8_FLOAT_ACT)
    layer = prepared[0]
    for seed in range(3):
        x = torch.randn(4, 4, 5, 5, generator=torch.Generator().manual_seed(seed))
        expected = float_model(x)  # BatchNorm in training: batch statistics
        got = prepared(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0.05)  # 8-bit weight error only
    torch.testing.assert_close(layer.bn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(layer.bn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    got.sum().backward()
    assert layer.weight.grad is not None and layer.bn.weight.grad is not None


def test_a_batchnorm_set_to_eval_alone_trains_on_its_running_statistics():
    """model.train(); bn.eval(): the usual way to freeze a BatchNorm while fine-tuning the rest."""
    conv, bn = _conv_bn(bias=True)
    float_model = nn.Sequential(conv, bn)
    prepared = tq.prepare(copy.deepcopy(float_model), W8_FLOAT_ACT)
    float_model.train()[1].eval()
    prepared.train()[1].eval()
    running = prepared[0].bn.running_mean.clone()
    x = _inputs(4, shape=(4, 5, 5))
    torch.testing.assert_close(prepared(x), float_model(x), rtol=0, atol=0.05)  # 8-bit weight error only
    assert torch.equal(prepared[0].bn.running_mean, running)
    assert int(prepared[0].bn.num_batches_tracked) == 0


def test_qat_fake_quant_matches_converted_after_training():
    model = tq.prepare(ConvBnNet(), "int8-static")
    _train_steps(model, 5)
    x = _inputs(16, seed=9)
    with torch.no_grad():
        fake = model(x)
    converted = tq.convert(model)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), fake, rtol=1e-4, atol=1e-4)


def test_freeze_bn_stats_by_call_and_after_steps():
    model = tq.prepare(ConvBnNet(), "int8-static")
    _train_steps(model, 2)
    tq.freeze_bn_stats(model)
    frozen = model.conv.bn.running_mean.clone()
    _train_steps(model, 2, seed=1)
    assert torch.equal(model.conv.bn.running_mean, frozen) and int(model.conv.bn.num_batches_tracked) == 2
    assert model.conv.bn_steps == 2

    model = tq.prepare(ConvBnNet(), dataclasses.replace(QuantConfig.preset("int8-static"), freeze_bn_after=3))
    _train_steps(model, 5)
    assert int(model.conv.bn.num_batches_tracked) == 3 and int(model.fc.bn.num_batches_tracked) == 3
    # frozen: training and eval compute the same function
    x = _inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x))


def test_state_dict_resumes_the_batchnorm_training_state():
    # a run resumed from a state_dict goes on where it stopped: frozen after 3 steps, not 3 steps after the resume
    config = dataclasses.replace(QuantConfig.preset("int8-static"), freeze_bn_after=3)
    model = tq.prepare(ConvBnNet(), config)
    _train_steps(model, 2)
    tq.freeze_bn_stats(model.fc)
    state = model.state_dict()
    assert state["conv.bn_step_count"].item() == 2 and state["conv.bn_frozen"].item() is False
    assert state["fc.bn_frozen"].item() is True and state["fc.bn_step_count"].dtype == torch.int64
    resumed = tq.prepare(ConvBnNet(seed=4), config)
    resumed.load_state_dict(state)  # strict
    assert (resumed.conv.bn_steps, resumed.conv.bn_frozen, resumed.fc.bn_frozen) == (2, False, True)
    for run in (model, resumed):
        _train_steps(run, 3, seed=2)
    assert int(resumed.conv.bn.num_batches_tracked) == 3 and resumed.conv.bn_steps == 3
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # a state_dict without them (a float model's, or one written before) leaves the layers' state
    older = {k: v for k, v in state.items() if not k.endswith(QuantLayerBase.BN_STATE_KEYS)}
    resumed.load_state_dict(older)
    assert (resumed.conv.bn_steps, resumed.fc.bn_frozen) == (3, True)
    # into a layer without a folded BatchNorm they are unexpected; bad values are refused
    unfolded = tq.prepare(ConvBnNet(), dataclasses.replace(config, fold_bn=False))
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*conv\.bn_step_count"):
        unfolded.load_state_dict(state)
    for key, value, message in (("conv.bn_step_count", torch.tensor(-1), "non-negative integer"),
                                ("conv.bn_step_count", torch.tensor(2.0), "non-negative integer"),
                                ("conv.bn_frozen", torch.tensor(1), "bool tensor")):
        with pytest.raises(RuntimeError, match=message):
            resumed.load_state_dict({**state, key: value})
    # converted: the state goes with the BatchNorm
    assert not any(k.endswith(QuantLayerBase.BN_STATE_KEYS) for k in tq.convert(resumed).state_dict())


def test_batch_statistics_need_more_than_one_value_per_channel():
    model = tq.prepare(ConvBnNet(), W8_FLOAT_ACT).train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        model(_inputs(1))


@pytest.mark.parametrize("preset", [W8_FLOAT_ACT, "int8-dynamic", "int8-static", "int8-pipeline"])
def test_folded_batchnorm1d_needs_2d_input(preset):
    # converted too: a dynamic model folds without seeing an input, and a [batch, 4, 6] input (BatchNorm1d over
    # dim 1, 4 long like the features) converted without a word and computed another function
    model = tq.calibrate(tq.prepare(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), preset).eval(),
                         [torch.randn(3, 6)], progress=False)
    for layer in (model, tq.convert(copy.deepcopy(model))):
        with pytest.raises(ValueError, match=r"folded BatchNorm1d needs 2-D input \[batch, features\], got "
                                             r"\[2, 4, 6\] \(where inputs of that shape are meant, prepare with "
                                             r"QuantConfig\(fold_bn=False\) to keep '1' a BatchNorm\)"):
            layer(torch.randn(2, 4, 6))
        assert layer(torch.randn(3, 6)).shape == (3, 4)


def test_folded_batchnorm1d_of_a_converted_conv1d_needs_a_batch():
    model = tq.quantize_model(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4).eval()), "int8-dynamic")
    with pytest.raises(ValueError, match=r"folded BatchNorm1d needs 3-D input \[batch, channels, length\]"):
        model(torch.randn(3, 9))
    assert model(torch.randn(2, 3, 9)).shape == (2, 4, 7)


# ---- save / load -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["float", "prepared"])
@pytest.mark.parametrize("convert", [True, False])
def test_save_load_round_trips_a_folded_model(tmp_path, convert, target):
    model = ConvBnNet().eval()
    _random_stats(model.bn, 2)
    x = _inputs(8)
    prepared = tq.prepare(model, "int8-static")
    tq.calibrate(prepared, [x], progress=False)
    if convert:
        tq.convert(prepared)
    tq.save(prepared, tmp_path / "folded.safetensors")
    skeleton = ConvBnNet(seed=5)
    if target == "prepared":
        skeleton = tq.prepare(skeleton, "int8-static")
    loaded = tq.load(tmp_path / "folded.safetensors", skeleton)
    assert type(loaded.bn) is (nn.Identity if convert else FoldedBatchNorm2d)
    assert loaded.conv.folded_bn == "bn" and loaded.conv.converted == convert
    assert loaded.conv.bn is (None if convert else loaded.bn)
    assert loaded.state_dict().keys() == prepared.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), prepared.eval()(x))


def test_float_checkpoint_round_trips_into_a_folded_model(tmp_path):
    model = _float_checkpoint_model(seed=2)
    tq.save(model, tmp_path / "float.safetensors")
    prepared = tq.load(tmp_path / "float.safetensors", tq.prepare(_float_checkpoint_model(), W8_FLOAT_ACT))
    x = _inputs(4)
    with torch.no_grad():
        assert torch.equal(prepared(x), tq.prepare(model, W8_FLOAT_ACT)(x))


def test_load_rejects_a_skeleton_without_the_folded_batchnorm(tmp_path):
    prepared = tq.quantize_model(ConvBnNet().eval(), "int8-dynamic")
    tq.save(prepared, tmp_path / "folded.safetensors")
    skeleton = ConvBnNet()
    skeleton.bn = nn.ReLU()
    with pytest.raises(ValueError, match="'bn' folded into 'conv', but the model has a ReLU there"):
        tq.load(tmp_path / "folded.safetensors", skeleton)
    assert type(skeleton.conv) is nn.Conv2d and type(skeleton.bn) is nn.ReLU


# ---- the report ------------------------------------------------------------------------------------------------

def test_report_notes_the_folded_batchnorm_and_measures_against_it():
    from torchquant.report import build_report
    model = ConvBnNet().eval()
    for bn in (model.bn, model.bn1d):
        _random_stats(bn, 4)
    batches = [_inputs(8, seed=s) for s in range(2)]
    quantized = tq.quantize_model(copy.deepcopy(model), "int8-static", calibration=batches)
    report = build_report(model, quantized, "int8-static", calibration=batches, time_layers=False)
    notes = {layer.name: layer.note for layer in report.layers}
    assert notes == {"conv": "bn folded (bn)", "fc": "bn folded (bn1d)", "head": ""}
    for layer in report.layers:
        # errors against the float layer + BatchNorm: compared with the bare layer they would be far off
        assert layer.weight_sqnr_db > 35 and layer.output_sqnr_db > 30, layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folding_keeps_a_half_precision_model_in_its_dtype(dtype):
    conv, bn = _conv_bn(seed=3)
    model = nn.Sequential(conv, bn).to(dtype)
    x = torch.randn(4, 4, 6, 6).to(dtype)
    with torch.no_grad():
        expected = model(x).float()
    converted = tq.quantize_model(model, "int8-static", calibration=[x], inplace=False)
    trained = tq.prepare(copy.deepcopy(model), "int8-static").train()
    trained(x).float().sum().backward()  # batch statistics in half precision
    assert trained[0].weight.grad.dtype == dtype
    with torch.no_grad():
        out = converted(x)
    assert out.dtype == dtype and converted[0].bias.dtype == dtype
    assert (out.float() - expected).abs().max() <= 0.02 * expected.abs().max()
