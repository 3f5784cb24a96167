import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

import torchquant as tq
from torchquant import QuantConfig
from torchquant.nn import QuantConv2d, QuantLinear

from test_nn import exact_float_reference  # noqa: F401  (autouse fixture)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 5), "b": nn.Linear(4, 5)})
        self.extra = nn.ModuleList([nn.Linear(5, 5), nn.ReLU()])

    def forward(self, x, scale=1.0):
        h = self.drop(self.conv(x)).mean(dim=(2, 3)) * scale
        y = self.heads["a"](h) + self.heads["b"](h)
        for m in self.extra:
            y = m(y)
        return y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.shared = nn.Linear(5, 5)
        self.seq = nn.Sequential(self.shared, nn.Tanh(), self.shared)
        self.head = nn.Linear(5, 2)

    def forward(self, x, scale=1.0):
        return self.head(self.seq(self.block(x, scale)))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 6, 6, generator=g) for _ in range(n)]


def _types(model):
    return [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("skip", ["shared", "seq.0", "seq.2", "seq"])
def test_a_shared_module_follows_the_skip_rules_of_its_first_name(skip, tmp_path):
    """One module cannot be float under one name and quantized under another (the checkpoint could not describe
    it): the skip rules for its first name decide, and a warning names a name whose rules say otherwise."""
    model = _net().eval()
    first_skipped = skip == "shared"
    other = {"shared": "seq.0", "seq.0": "seq.0", "seq.2": "seq.2", "seq": "seq.0"}[skip]
    with pytest.warns(UserWarning, match=rf"prepare: {other} is the same module as shared, which skip rules "
                                         rf"{'keep float' if first_skipped else 'do not match'}; it is "
                                         rf"{'kept float' if first_skipped else 'quantized'} under both names"):
        converted = tq.quantize_model(model, QuantConfig.preset("int8-dynamic").with_skip([skip]))
    assert converted.seq[0] is converted.seq[2] is converted.shared
    assert isinstance(converted.shared, QuantLinear) != first_skipped
    tq.save(converted, tmp_path / "m.safetensors")
    loaded = tq.load(tmp_path / "m.safetensors", _net(seed=3).eval())
    x = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)


class _SharedBlock(nn.Module):
    """One block under two names (enc, again), each calling it."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.again = self.enc
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.again(self.enc(x)))


@pytest.mark.parametrize("skip, warned, first_layer_float", [
    (["enc", "enc.0"], "again is the same module as enc, which skip rules keep float; it is kept float", True),
    (["again.0"], "again.0 is the same module as enc.0, which skip rules do not match; it is quantized", False),
    (["enc.0"], "again.0 is the same module as enc.0, which skip rules keep float; it is kept float", True)])
def test_rules_inside_a_skipped_or_shared_container_are_met(skip, warned, first_layer_float):
    # a rule naming a module inside a skipped container, or inside a container's second name, said it matched no
    # module: it matches, and the module follows its first name's rules with the warning of a module under two names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = tq.quantize_model(_SharedBlock().eval(), QuantConfig.preset("int8-dynamic").with_skip(skip))
    messages = [str(w.message) for w in caught]
    assert messages == [f"prepare: {warned} under both names"]
    assert isinstance(converted.enc[0], QuantLinear) != first_layer_float
    assert converted.again is converted.enc


def test_prepare_swaps_everywhere_and_once():
    model = _net()
    params = list(model.parameters())
    float_keys = set(model.state_dict())
    tq.prepare(model)
    assert isinstance(model.block.conv, QuantConv2d)
    assert isinstance(model.block.heads["a"], QuantLinear) and isinstance(model.block.extra[0], QuantLinear)
    assert isinstance(model.head, QuantLinear)
    assert model.seq[0] is model.seq[2] is model.shared and isinstance(model.shared, QuantLinear)
    assert list(model.parameters())[: len(params)] == params  # the optimizer's parameters are the same objects
    assert float_keys <= set(model.state_dict())  # a float checkpoint's keys are all still there
    model.load_state_dict(_net(seed=5).state_dict())  # strict: quantizer state is optional
    again = _types(model)
    tq.prepare(model)
    assert _types(model) == again  # preparing twice changes nothing


def test_prepare_not_inplace_and_exact_types():
    model = _net()
    before = _types(model)
    prepared = tq.prepare(model, "int8-static", inplace=False)
    assert _types(model) == before and isinstance(prepared.head, QuantLinear)
    subclass = nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8))
    tq.prepare(subclass)
    assert type(subclass[0]) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(TypeError, match="model is itself a Linear"):
        tq.prepare(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tq.prepare("model")


def test_skip_rules():
    config = QuantConfig.preset("int8-dynamic").with_skip(
        ["block.heads.*", nn.Conv2d, lambda name, module: name == "head"])
    model = tq.prepare(_net(), config)
    assert type(model.block.heads["a"]) is nn.Linear and type(model.block.conv) is nn.Conv2d
    assert type(model.head) is nn.Linear and isinstance(model.block.extra[0], QuantLinear)
    model = tq.prepare(_net(), QuantConfig(skip=("block",)))  # a skipped container keeps its subtree float
    assert type(model.block.extra[0]) is nn.Linear and isinstance(model.head, QuantLinear)


def test_skip_matching_nothing_warns():
    with pytest.warns(UserWarning, match="skip rule 'decoder.*' matched no module"):
        tq.prepare(_net(), QuantConfig(skip=("decoder.*",)))
    with pytest.warns(UserWarning, match="matched no module"):
        tq.prepare(_net(), QuantConfig(skip=(nn.LSTM,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tq.prepare(_net(), QuantConfig(skip=("head",)))


def test_calibrate_restores_modes_and_takes_batch_forms():
    model = tq.prepare(_net(), "int8-static")
    model.train()
    model.block.drop.eval()
    batches = _batches()
    tq.calibrate(model, [batches[0], (batches[1], 2.0), {"x": batches[2], "scale": 0.5}])
    assert model.training and not model.block.drop.training and model.block.conv.training
    assert all(p.grad is None for p in model.parameters())
    assert int(model.head.input_quantizer.observer.batches) == 3
    with pytest.raises(TypeError, match="each batch must be a tensor"):
        tq.calibrate(model, [3])
    with pytest.raises(TypeError, match="iterable of batches"):
        tq.calibrate(model, batches[0])
    with pytest.raises(ValueError, match="batches is empty"):
        tq.calibrate(model, [])
    with pytest.raises(ValueError, match="no quantized layers"):
        tq.calibrate(_net(), batches)


def test_calibrate_says_how_a_batch_that_does_not_fit_the_forward_is_read():
    # a DataLoader of (input, target) pairs raised forward()'s bare "takes 2 positional arguments but 3 were given"
    from torch.utils.data import DataLoader, TensorDataset
    model = tq.prepare(nn.Sequential(nn.Linear(8, 4)), "int8-static")
    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 4, (16,))), batch_size=4)
    with pytest.raises(TypeError, match=r"calibrate: batch 0 is a list of 2, passed as 2 positional inputs, which "
                                        r"Sequential.forward\(input\) does not take \(too many positional arguments\); "
                                        r"for a DataLoader of \(input, target\) pairs pass the inputs alone"):
        tq.calibrate(model, loader, progress=False)
    with pytest.raises(TypeError, match=r"batch 1 is a dict, passed as keyword inputs, which Sequential.forward"):
        tq.calibrate(model, [torch.randn(2, 8), {"x": torch.randn(2, 8)}], progress=False)
    tq.calibrate(model, (x for x, _ in loader), progress=False)
    # a TypeError raised inside a forward that takes the batch is the model's own
    with pytest.raises(TypeError, match="unsupported operand"):
        tq.calibrate(tq.prepare(_BadForward(), "int8-static"), [torch.randn(2, 8)], progress=False)


class _BadForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) + "a"


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
def test_model_converted_equals_fake_quant(device, preset):
    model = tq.prepare(_net(), preset).to(device)
    batches = [b.to(device) for b in _batches()]
    tq.calibrate(model, batches)
    model.eval()
    with torch.no_grad():
        fake = model(batches[0])
        tq.convert(model)
        real = model(batches[0])
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4 * fake.abs().max().item())
    assert all(m.converted for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)))


def test_quantize_model_and_convert_idempotent():
    model = _net()
    x = _batches()[0]
    with torch.no_grad():
        want = model.eval()(x)
    tq.quantize_model(model, "int8-static", calibration=_batches())
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    state = _state(model)
    tq.convert(model)
    assert _same_state(state, _state(model))
    copy = tq.quantize_model(_net(), inplace=False)
    assert copy.head.converted


def test_partially_converted_model():
    model = tq.prepare(_net())
    model.head.convert()
    tq.convert(model)
    assert model.head.converted and model.shared.converted
    with pytest.warns(UserWarning, match="no quantized layers"):
        tq.convert(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("preset", ["int8-static", "int8-pipeline"])
def test_calibration_on_nothing_but_nan_warns(preset):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with pytest.warns(UserWarning, match=r"calibrate: .*input_quantizer|calibrate: act_quant\..* observed only zeros, "
                                         r"NaN or inf: their scale stays 1") as caught:
        tq.quantize_model(model, preset, calibration=[torch.full((8, 16), math.nan)], inplace=False)
    assert [w.filename for w in caught if "observed only" in str(w.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tq.quantize_model(model, preset, calibration=[torch.randn(8, 16)], inplace=False)


@pytest.mark.parametrize("preset", ["int8-static", "int8-pipeline", "int8-dynamic"])
@pytest.mark.parametrize("case", ["unsupported", "skipped", "no layers"])
def test_quantize_model_with_nothing_to_quantize_says_so(preset, case):
    # every layer stayed float (a conv with asymmetric padding="same", which prepare names; skip rules) or there is
    # none: with calibration batches quantize_model raised "calibrate: model has no quantized layers (call
    # torchquant.prepare first)", without them convert warned the same, though quantize_model had called prepare
    conv = nn.Conv1d(3, 4, 2, padding="same") if case == "unsupported" else nn.Conv1d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU()) if case != "no layers" else nn.Sequential(nn.ReLU(), nn.Tanh())
    model.eval()
    config = QuantConfig.preset(preset).with_skip(["0"]) if case == "skipped" else preset
    x = torch.randn(2, 3, 8)
    for calibration in ([x], None) if preset == "int8-dynamic" else ([x],):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = tq.quantize_model(model, config, calibration=calibration, inplace=False)
        messages = [str(w.message) for w in caught]
        assert not any("call torchquant.prepare first" in m for m in messages), messages
        why = "the model has no nn.Linear, nn.Conv2d or nn.Conv1d layer" if case == "no layers" else \
            "every nn.Linear, nn.Conv2d and nn.Conv1d layer stayed float"
        assert any(m.startswith(f"quantize_model: nothing was quantized: {why}") for m in messages), messages
        if case == "unsupported":
            assert any("padding='same' with an odd total padding" in m for m in messages), messages
        assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in result.modules())
        torch.testing.assert_close(result(x), model(x), rtol=0, atol=0)
    assert type(model[0]) in (nn.Conv1d, nn.ReLU)
    # calibrate after such a prepare says why too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(model, config, inplace=False)
    first = (r"model has no quantized layers \(call torchquant.prepare first, and go on with the model it returns: an "
             rf"integer pipeline is a new module; if it was called on this model, {why}")
    with pytest.raises(ValueError, match="calibrate: " + first):
        tq.calibrate(prepared, [x], progress=False)
    if preset != "int8-pipeline":  # (a pipeline's graph is converted as it is)
        with pytest.warns(UserWarning, match="convert: " + first):
            tq.convert(prepared)


def test_static_needs_calibration():
    model = _net()
    before = _types(model)
    with pytest.raises(ValueError, match="needs calibration batches"):
        tq.quantize_model(model, "int8-static")
    assert _types(model) == before


def test_failed_conversion_leaves_model_unchanged():
    model = _net()
    model.train()
    before_types, before_state = _types(model), _state(model)
    bad = _batches(2) + [torch.randn(4, 7, 6, 6)]  # wrong channel count in the last batch
    with pytest.raises(RuntimeError):
        tq.quantize_model(model, "int8-static", calibration=bad)
    assert _types(model) == before_types and _same_state(before_state, _state(model)) and model.training


def test_failed_convert_converts_nothing():
    model = tq.prepare(_net(), "int8-static")
    tq.calibrate(model.block, [(b,) for b in _batches()])  # the layers after block never see data
    state = _state(model)
    # the message names the first layer that saw no data
    with pytest.raises(RuntimeError, match="convert: layer 'shared': QuantLinear: static activation quantization "
                                           "needs calibration .* leave it float with QuantConfig.skip"):
        tq.convert(model)
    assert not any(m.converted for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    assert _same_state(state, _state(model))


def test_calibrate_failure_restores_observers():
    model = tq.prepare(_net(), "int8-static")
    tq.calibrate(model, _batches(1))
    state = _state(model)
    with pytest.raises(RuntimeError):
        tq.calibrate(model, _batches(2) + [torch.randn(4, 7, 6, 6)])
    assert _same_state(state, _state(model))


def _encoder_layer(seed=0):
    torch.manual_seed(seed)  # an even head count and batch_first: the layer's fused inference path applies
    return nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
def test_transformer_encoder_layer_runs_its_quantized_layers(preset):
    # in eval mode the layer's fused path computed with linear1/linear2's float weights instead of calling them: the
    # prepared model was not quantized, calibration saw nothing, and the converted one raised AttributeError
    x = torch.randn(2, 5, 16)
    prepared = tq.calibrate(tq.prepare(_encoder_layer(), preset), [x])
    fake = prepared(x)  # (a hook on linear1 to see it called would itself turn the fused path off)
    assert not torch.equal(fake, _encoder_layer()(x))
    converted = tq.convert(prepared)
    torch.testing.assert_close(converted(x), fake, rtol=1e-5, atol=1e-5)


def test_convert_of_layers_put_in_a_transformer_by_hand():
    layer = _encoder_layer()
    x = torch.randn(2, 5, 16)
    want = tq.quantize_model(_encoder_layer(), QuantConfig.preset("int8-dynamic").with_skip(["self_attn"]))(x)
    layer.linear1 = QuantLinear.from_float(layer.linear1, "int8-dynamic")
    layer.linear2 = QuantLinear.from_float(layer.linear2, "int8-dynamic")
    tq.convert(layer)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


def test_transformer_encoder_with_padding_mask_round_trips(tmp_path):
    # nn.TransformerEncoder's nested-tensor path, taken with a padding mask, also read the float weights
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(_encoder_layer(), 2, enable_nested_tensor=True).eval()
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    converted = tq.quantize_model(copy.deepcopy(encoder), "int8-dynamic")
    y = converted(x, src_key_padding_mask=mask)
    assert tq.functional.quantization_error(encoder(x, src_key_padding_mask=mask)[~mask], y[~mask])["sqnr_db"] > 30
    tq.save(converted, tmp_path / "encoder.safetensors")
    loaded = tq.load(tmp_path / "encoder.safetensors", copy.deepcopy(encoder))
    assert torch.equal(loaded(x, src_key_padding_mask=mask), y)


def test_failed_conversion_leaves_a_transformer_fused():
    layer = _encoder_layer()
    with pytest.raises(ValueError, match="query must have 16 features"):
        tq.quantize_model(layer, "int8-static", calibration=[torch.randn(2, 5, 7)])
    assert isinstance(layer.linear1, nn.Linear) and not layer._forward_pre_hooks
    assert type(layer.self_attn) is nn.MultiheadAttention


def test_subclasses_and_unmaterialized_lazy_layers_stay_float_with_a_reason():
    # they stayed float without a word, and quantize_model then said the model had no nn.Linear layer
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(ScaledLinear(4, 4), nn.ReLU(), nn.LazyLinear(3))
    with pytest.warns(UserWarning) as caught:
        result = tq.quantize_model(model, "int8-dynamic", inplace=False)
    messages = [str(w.message) for w in caught]
    assert any("prepare: 0 (ScaledLinear) stays float: a subclass of nn.Linear, which prepare does not swap" in m
               for m in messages), messages
    assert any("prepare: 2 (LazyLinear) stays float: a lazy layer whose shape is not known yet: run one forward "
               "before prepare" in m for m in messages), messages
    assert any(m.startswith("quantize_model: nothing was quantized: every nn.Linear, nn.Conv2d and nn.Conv1d layer "
                            "stayed float") for m in messages), messages
    assert type(result[0]) is ScaledLinear


@pytest.mark.parametrize("preset", ["int8-static", "int8-pipeline"])
def test_calibrate_refuses_a_converted_model(preset):
    # it ran every batch and returned without a word, the scales unchanged
    x = torch.randn(4, 6)
    model = tq.quantize_model(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), preset, [x])
    with pytest.raises(ValueError, match="calibrate: the model is converted: its layers keep the scales they were "
                                         "converted with; calibrate the prepared model, then convert it"):
        tq.calibrate(model, [x * 10], progress=False)
