"""QuantConv1d: the nn.Conv1d drop-in. Converted it runs the 2-D integer conv on [batch, channels, 1, length]; the
oracles are its own fake-quant forward (F.conv1d on fake-quantized tensors), the float model, and QuantConv2d on
the same weights viewed with a kernel height of 1."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchquant as tq
from torchquant.fold import FoldedBatchNorm1d
from torchquant.nn import QuantConv1d, QuantConv2d

from test_nn import CONFIGS, _assert_same_function, _calibrated

SHAPES = [  # in, out, kernel, stride, padding, dilation, groups, bias
    (3, 8, 3, 1, 1, 1, 1, True),
    (4, 6, 2, 2, 0, 1, 2, False),
    (6, 6, 3, 1, "same", 2, 6, True),
    (5, 7, 4, 3, "valid", 2, 1, True),
    (1, 1, 1, 1, 0, 1, 1, True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "w4a8-dynamic", "w5-truncate-a8-truncate",
                                  "w3-a1-binary-static", "w8-a-dynamic-tensor", "weight-only-w4"])
def test_converted_equals_fake_quant(device, shape, name):
    torch.manual_seed(0)
    cin, cout, k, s, p, d, g, b = shape
    layer = QuantConv1d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=b,
                        config=CONFIGS[name]).to(device)
    layer, x = _calibrated(layer, (2, cin, 23), device)
    _assert_same_function(layer, x)
    assert layer.qweight.shape[0] == cout and layer.weight_scale.shape == (cout,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(device, dtype):
    torch.manual_seed(0)
    layer = QuantConv1d(8, 16, 5, padding=2, config="int8-static").to(device, dtype)
    layer, x = _calibrated(layer, (3, 8, 17), device, dtype)
    _assert_same_function(layer, x, dtype)


@pytest.mark.parametrize("name", ["int8-static", "int8-dynamic", "w4a8-dynamic"])
def test_same_integers_as_the_2d_layer(name):
    """The 1-D layer on x equals the 2-D layer with the weight [out, in, 1, k] on x.unsqueeze(2), bit for bit."""
    torch.manual_seed(0)
    one = QuantConv1d(6, 10, 3, stride=2, padding=1, dilation=1, groups=2, config=name)
    two = QuantConv2d(6, 10, (1, 3), stride=(1, 2), padding=(0, 1), groups=2, config=name)
    with torch.no_grad():
        two.weight.copy_(one.weight.unsqueeze(2))
        two.bias.copy_(one.bias)
    x = torch.randn(4, 6, 31)
    for layer, batch in ((one, x), (two, x.unsqueeze(2))):
        tq.calibrate(layer, [batch], progress=False)
        layer.eval().convert()
    with torch.no_grad():
        assert torch.equal(one(x), two(x.unsqueeze(2)).squeeze(2))
        assert torch.equal(one._weight_int8(), two._weight_int8().squeeze(2))


def test_fast_path_equals_python_path():
    torch.manual_seed(0)
    layer, x = _calibrated(QuantConv1d(16, 24, 3, padding=1, config="int8-static"), (2, 16, 40), "cpu")
    layer.eval().convert()
    layer.set_activation_clamp(0.0, 1.5)
    assert layer._quantized_call_args is not None
    inputs = [x, x[:, :, ::2], torch.randn(2, 40, 16).transpose(1, 2), torch.randn(0, 16, 40), x.to(torch.bfloat16)]
    with torch.no_grad():
        for batch in inputs:
            fast, slow = layer(batch), layer._converted_forward(batch)
            assert fast.shape == slow.shape and torch.equal(fast, slow)
            assert fast.is_contiguous() and slow.is_contiguous()  # as nn.Conv1d's, whatever the input's strides
    x_q = torch.randint(0, 256, (2, 16, 40), dtype=torch.uint8)
    for out in ((torch.float32,), (torch.uint8, 0.05, 3), (torch.int8, 0.02, -1)):
        fast = layer.pipeline_op(x_q, *out)
        slow = layer._int_op(x_q, layer._static_scale, layer.input_zero_point, *out)
        assert fast.dtype == out[0] and torch.equal(fast, slow)


def test_model_swap_folds_batchnorm_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Conv1d(16, 4, 1))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 8, 20)
    trained = tq.prepare(model, "int8-static", inplace=False)
    trained.train()  # a QAT step normalizes with the batch's statistics, folded into the weight
    trained(x).square().mean().backward()
    assert trained[0].weight.grad is not None and int(trained[1].num_batches_tracked) == 1
    prepared = tq.prepare(model, "int8-static", inplace=False).eval()
    assert isinstance(prepared[0], QuantConv1d) and isinstance(prepared[1], FoldedBatchNorm1d)
    assert isinstance(prepared[3], QuantConv1d)
    tq.calibrate(prepared, [x], progress=False)
    with torch.no_grad():
        fake = prepared(x)
        tq.convert(prepared)
        real = prepared(x)
        ref = model.eval()(x)
    assert isinstance(prepared[1], nn.Identity)
    torch.testing.assert_close(real, fake, rtol=2e-5, atol=2e-5 * fake.abs().max().item())
    error = tq.functional.quantization_error(ref, real)
    assert error["sqnr_db"] > 25, error


class _AudioNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(12, 32, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.c2 = nn.Conv1d(32, 32, 3, padding=1, groups=4)
        self.c3 = nn.Conv1d(32, 16, 3, stride=2, dilation=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        y = F.relu(self.c2(y) + y)
        return self.fc(self.c3(y).mean(-1))


def _audio_net():
    torch.manual_seed(0)
    model = _AudioNet().eval()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(8, 12, 30)


@pytest.mark.filterwarnings("ignore:prepare. kept float")
@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "int8-pipeline", "w4a8-dynamic"])
def test_model_presets_save_load_compile(tmp_path, name):
    model, x = _audio_net()
    quantized = tq.prepare(model, name, inplace=False)
    tq.calibrate(quantized, [x], progress=False)
    with torch.no_grad():
        fake = quantized(x)
        tq.convert(quantized)
        real = quantized(x)
        compiled = torch.compile(quantized, fullgraph=True)(x)
    torch.testing.assert_close(real, fake, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, real, rtol=1e-6, atol=1e-6)
    assert sum(isinstance(m, QuantConv1d) for m in quantized.modules()) == 3
    path = os.path.join(tmp_path, "audio.safetensors")
    tq.save(quantized, path)
    loaded = tq.load(path, _audio_net()[0])
    with torch.no_grad():
        assert torch.equal(loaded(x), real)


@pytest.mark.filterwarnings("ignore:prepare. kept float")
@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "int8-pipeline"])
def test_onnx_export(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = _audio_net()
    quantized = tq.quantize_model(model, name, calibration=[x], inplace=False)
    path = tq.export_onnx(quantized, x, os.path.join(tmp_path, "audio.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = quantized(x)
    # static integers are exact; the dynamic graph's float steps differ in the last bits
    tol = 1e-4 if name == "int8-dynamic" else 1e-6
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_bad_input():
    conv = QuantConv1d(3, 4, 3).eval().convert()
    with pytest.raises(ValueError, match=r"QuantConv1d: input must have shape \[batch, 3, length\] or \[3, length\], "
                                         r"got \[2, 5\]"):
        conv(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, 3, length\] or \[3, length\], got \[1, 3, 1, 5\]"):
        conv(torch.randn(1, 3, 1, 5))
    with pytest.raises(TypeError, match="got torch.int64"):
        conv(torch.ones(1, 3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"QuantConv1d: padding='same' needs an even"):
        QuantConv1d(3, 4, 2, padding="same")
    with pytest.raises(TypeError, match="QuantConv1d.from_float: module must be a Conv1d, got Conv2d"):
        QuantConv1d.from_float(nn.Conv2d(3, 4, 3))


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 8, 4, padding="same"),
                                  nn.Conv2d(4, 8, (3, 2), padding="same", padding_mode="reflect")], ids=str)
def test_a_conv_with_no_quantized_form_stays_float(conv):
    """The rest of the model is quantized; the conv stays float with a warning and a report note saying why."""
    from torchquant.report import build_report
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(2, 4, 10) if isinstance(conv, nn.Conv1d) else torch.randn(2, 4, 6, 6)
    model(x)  # materializes the lazy Linear
    with pytest.warns(UserWarning, match=r"prepare: 0 \((Conv1d|Conv2d)\) stays float: padding='same'"):
        quantized = tq.quantize_model(model, "int8-dynamic", inplace=False)
    assert type(quantized[0]) is type(conv) and isinstance(quantized[3], tq.nn.QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), model(x), rtol=0.05, atol=0.05)
    report = build_report(model, quantized, time_layers=False)
    assert report.layers[0].note.startswith("kept float: ") and not report.layers[0].quantized
