import copy

import pytest
import torch
import torch.nn as nn

import torchquant as tq
from torchquant import QuantConfig, QuantSpec
from torchquant.nn import QuantConv1d, QuantConv2d, QuantLinear
from torchquant.nn.base import pack_int4, unpack_int4
from torchquant.nn.quantizers import _LSQFakeQuantize

@pytest.fixture(autouse=True)
def exact_float_reference():
    """The fake-quant side of a parity check must not run cuDNN convolutions in TF32 (10-bit mantissa)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


DYN8 = QuantSpec(granularity="per_token", dynamic=True)
CONFIGS = {
    "int8-dynamic": "int8-dynamic",
    "int8-static": "int8-static",
    "w4a8-dynamic": "w4a8-dynamic",
    "w7a8-dynamic": "w7a8-dynamic",
    "w2-per-tensor-a6-token": QuantConfig(QuantSpec(bits=2, granularity="per_tensor"),
                                          QuantSpec(bits=6, granularity="per_token", dynamic=True)),
    "w1-binary": QuantConfig(QuantSpec(bits=1, observer="mse"), DYN8),
    "w5-truncate-a8-truncate": QuantConfig(QuantSpec(bits=5, rounding="truncate"),
                                           QuantSpec(granularity="per_token", dynamic=True, rounding="truncate")),
    "w8-static-symmetric-a7": QuantConfig(QuantSpec(observer="percentile", percentile=99.9),
                                          QuantSpec(bits=7, granularity="per_tensor", observer="moving_average")),
    "w8-a-dynamic-tensor": QuantConfig(QuantSpec(), QuantSpec(granularity="per_tensor", dynamic=True)),
    "weight-only-w4": QuantConfig(QuantSpec(bits=4), None),
    "w3-a1-binary-static": QuantConfig(QuantSpec(bits=3), QuantSpec(bits=1, granularity="per_tensor")),
    "w8-a1-unsigned-static": QuantConfig(QuantSpec(), QuantSpec(bits=1, signed=False, symmetric=False,
                                                                granularity="per_tensor")),
}


def _calibrated(layer, shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(3)]
    tq.calibrate(layer, batches, progress=False)
    return layer, batches[0]


def _assert_same_function(layer, x, dtype=torch.float32):
    layer.eval()
    with torch.no_grad():
        fake = layer(x)
        layer.convert()
        real = layer(x)
    assert real.dtype == x.dtype == fake.dtype and real.shape == fake.shape and real.device == x.device
    scale = fake.float().abs().amax().item() + 1e-6
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(real.float(), fake.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_converted_equals_fake_quant(device, name):
    torch.manual_seed(0)
    layer = QuantLinear(37, 19, config=CONFIGS[name]).to(device)
    layer, x = _calibrated(layer, (2, 5, 37), device)
    _assert_same_function(layer, x)
    assert not hasattr(layer, "weight") or not isinstance(getattr(layer, "weight", None), nn.Parameter)
    bits = layer.config.weight.bits
    assert layer.qweight.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (19,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static"])
def test_linear_half_dtypes(device, dtype, name):
    torch.manual_seed(0)
    layer = QuantLinear(64, 24, config=name).to(device, dtype)
    layer, x = _calibrated(layer, (9, 64), device, dtype)
    _assert_same_function(layer, x, dtype)
    assert layer.weight_scale.dtype == torch.float32


CONV_SHAPES = [  # in, out, kernel, stride, padding, dilation, groups, bias
    (3, 8, 3, 1, 1, 1, 1, True),
    (4, 6, (3, 2), (2, 1), (1, 0), 1, 2, False),
    (6, 6, 3, 1, 2, 2, 6, True),
    (5, 7, (1, 4), 2, (0, 3), (1, 2), 1, True),
]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "w4a8-dynamic", "w7a8-dynamic",
                                  "w5-truncate-a8-truncate", "w3-a1-binary-static"])
def test_conv_converted_equals_fake_quant(device, shape, name):
    torch.manual_seed(0)
    cin, cout, k, s, p, d, g, b = shape
    layer = QuantConv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=b,
                        config=CONFIGS[name]).to(device)
    layer, x = _calibrated(layer, (2, cin, 9, 11), device)
    _assert_same_function(layer, x)


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
def test_odd_inputs_empty_strided_channels_last(device, name):
    torch.manual_seed(0)
    lin = QuantLinear(8, 4, config=name).to(device)
    conv = QuantConv2d(3, 4, 3, config=name).to(device)
    _calibrated(lin, (3, 8), device)
    _calibrated(conv, (2, 3, 5, 5), device)
    inputs = [(lin, torch.randn(0, 8, device=device)), (lin, torch.randn(2, 0, 8, device=device)),
              (lin, torch.randn(3, 16, device=device)[:, ::2]), (conv, torch.randn(0, 3, 5, 5, device=device)),
              (conv, torch.randn(2, 3, 5, 5, device=device).to(memory_format=torch.channels_last)),
              (conv, torch.randn(2, 6, 5, 3, device=device).permute(0, 3, 2, 1)[:, :, :, 1:])]
    with torch.no_grad():
        fakes = [layer.eval()(x) for layer, x in inputs]
        lin.convert()
        conv.convert()
        for (layer, x), fake in zip(inputs, fakes):
            torch.testing.assert_close(layer(x), fake, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static", "w4a8-dynamic", "weight-only-w4",
                                  "w3-a1-binary-static"])
def test_conv_output_memory_format_follows_the_input(device, name):
    """A model that views a conv's output runs converted; a conv layer's output has, by default, nn.Conv2d's memory
    format: contiguous for a contiguous input, channels-last for a channels-last input."""
    torch.manual_seed(0)

    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 5)
            self.fc = nn.Linear(6 * 6 * 6, 10)

        def forward(self, x):
            y = nn.functional.max_pool2d(nn.functional.relu(self.conv(x)), 2)
            return self.fc(y.view(y.size(0), -1))

    model = LeNet().to(device).eval()
    x = torch.randn(4, 3, 16, 16, device=device)
    quantized = tq.quantize_model(model, CONFIGS[name], calibration=[x], inplace=False)
    with torch.no_grad():
        assert quantized(x).shape == (4, 10)
        expanded = torch.randn(4, 16, 16, 1, device=device).expand(4, 16, 16, 3).permute(0, 3, 1, 2)
        cases = [(quantized.conv, model.conv, batch) for batch in (
            x, x.to(memory_format=torch.channels_last), x[:, :, ::2, :13], x.permute(0, 1, 3, 2), expanded)]
        # one input channel: both layouts are contiguous and channels-last, told apart by the strides
        one = nn.Sequential(nn.Conv2d(1, 4, 3)).to(device)
        one_quantized = tq.quantize_model(one, CONFIGS[name], calibration=[x[:, :1]], inplace=False)
        cases += [(one_quantized, one, batch) for batch in (x[:, :1], x[:, :1].to(memory_format=torch.channels_last))]
        for layer in (quantized.conv, one_quantized[0]):  # convert() chose contiguous (a view, the output): the default
            assert layer.output_memory_format == torch.contiguous_format
            layer.set_output_memory_format(None)
        for layer, float_layer, batch in cases:
            y, ref = layer(batch), float_layer(batch)
            assert y.is_contiguous() == ref.is_contiguous()
            assert y.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(
                memory_format=torch.channels_last)


def test_convert_keeps_channels_last_where_no_view_reads(tmp_path):
    """convert() lets a conv keep the kernels' channels-last output when nothing after it can view it (the next conv,
    a flatten or a reshape comes first), and makes it contiguous where a view, or the model's output, is reachable;
    save/load rebuilds the same choice."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.d, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(8 * 6 * 6, 5)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = torch.relu(self.b(y) + y)  # a's output reaches the next conv and this add
            head = self.fc(nn.functional.max_pool2d(self.c(y), 1).flatten(1))
            side = self.d(y)
            return head, side.view(side.shape[0], -1)  # d's output is viewed; y's other readers are convs

    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    quantized = tq.quantize_model(model, "int8-static", calibration=[x], inplace=False)
    cl, contiguous = torch.channels_last, torch.contiguous_format
    assert [quantized.get_submodule(n).output_memory_format for n in "abcd"] == [cl, cl, cl, contiguous]
    with torch.no_grad():
        for out, ref in zip(quantized(x), model(x)):
            torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
        assert quantized.b(x.new_ones(2, 8, 6, 6)).is_contiguous(memory_format=torch.channels_last)
        assert quantized.d(x.new_ones(2, 8, 6, 6).to(memory_format=cl)).is_contiguous()
        path = tmp_path / "net.safetensors"
        tq.save(quantized, path)
        loaded = tq.load(path, Net())
        assert [loaded.get_submodule(n).output_memory_format for n in "abcd"] == [cl, cl, cl, contiguous]
        compiled = torch.compile(loaded, fullgraph=True)
        for out, ref in zip(compiled(x), quantized(x)):
            assert torch.equal(out, ref)


def test_conv_half(device):
    torch.manual_seed(0)
    layer = QuantConv2d(4, 8, 3, padding=1, config="int8-static").to(device, torch.bfloat16)
    layer, x = _calibrated(layer, (2, 4, 6, 6), device, torch.bfloat16)
    _assert_same_function(layer, x, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bias_is_converted_once_for_the_kernels(device, dtype):
    """A converted layer of a half model hands the kernels its bias in float32, made when the layer is prepared (not
    converted by every call), with the same outputs; the bias it stores keeps the model's dtype, and a reload or a
    move makes the float32 copy again."""
    torch.manual_seed(0)
    layers = [QuantConv2d(4, 8, 3, padding=1, config="int8-static").to(device, dtype),
              QuantLinear(16, 8, config="int8-static").to(device, dtype)]
    for layer, shape in zip(layers, [(2, 4, 6, 6), (3, 16)]):
        layer, x = _calibrated(layer, shape, device, dtype)
        layer.eval().convert()
        bias = layer._kernel_args[3]
        assert layer.bias.dtype == dtype and bias.dtype == torch.float32 and torch.equal(bias, layer.bias.float())
        with torch.no_grad():
            y = layer(x)
            layer.load_state_dict({**layer.state_dict(), "bias": 2 * layer.bias})
            assert torch.equal(layer._kernel_args[3], 2 * bias)
            assert not torch.equal(layer(x), y)
            layer.to(torch.float32)
            assert layer._kernel_args[3] is layer.bias  # float32 already: the bias itself


def test_construction_is_float_equivalent():
    torch.manual_seed(0)
    ref = nn.Linear(10, 4)
    torch.manual_seed(0)
    layer = QuantLinear(10, 4)
    torch.testing.assert_close(layer.weight, ref.weight, rtol=0, atol=0)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    layer.load_state_dict(ref.state_dict())  # a float checkpoint loads into the layer (strict)
    torch.manual_seed(0)
    conv = QuantConv2d(3, 5, (2, 3), padding="same", dilation=(2, 1))
    assert conv.padding == (1, 1)
    with pytest.raises(ValueError, match="padding='same' needs an even"):
        QuantConv2d(3, 5, 2, padding="same")


def test_from_float_shares_parameters():
    lin = nn.Linear(6, 3)
    q = QuantLinear.from_float(lin, "int8-static")
    assert q.weight is lin.weight and q.bias is lin.bias
    conv = nn.Conv2d(2, 4, 3, bias=False)
    qc = QuantConv2d.from_float(conv)
    assert qc.weight is conv.weight and qc.bias is None
    with pytest.raises(TypeError, match="module must be a Linear"):
        QuantLinear.from_float(conv)
    with pytest.raises(ValueError, match="padding_mode must be one of"):  # nn.Conv2d's own check
        QuantConv2d(2, 4, 3, padding_mode="mirror")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [2, 1], ids=["conv2d", "conv1d"])
@pytest.mark.parametrize("name", ["int8-static", "int8-dynamic", "w4a8-dynamic", "w3-a1-binary-static"])
def test_conv_padding_modes(device, mode, dims, name):
    """A padding_mode other than 'zeros': the fake-quant layer is nn.Conv2d / nn.Conv1d with that mode on the
    fake-quantized input and weight; converted (which pads the integers), the same function, batched or not."""
    torch.manual_seed(0)
    float_type = nn.Conv2d if dims == 2 else nn.Conv1d
    conv = float_type(4, 6, 3, stride=2, padding=(1, 2)[:dims], dilation=(2, 1)[:dims], padding_mode=mode)
    layer = (QuantConv2d if dims == 2 else QuantConv1d).from_float(conv, CONFIGS[name]).to(device)
    assert layer.padding_mode == mode and f"padding_mode='{mode}'" in repr(layer)
    layer, x = _calibrated(layer, (2, 4, 9, 7)[:2 + dims], device)
    layer.eval()
    with torch.no_grad():
        reference = float_type(4, 6, 3, stride=2, padding=(1, 2)[:dims], dilation=(2, 1)[:dims],
                               padding_mode=mode).to(device)
        reference.weight.copy_(layer.dequantized_weight())
        reference.bias.copy_(layer.bias)
        x_fq = x if layer.input_quantizer is None else layer.input_quantizer(x)
        torch.testing.assert_close(layer(x), reference(x_fq), rtol=1e-5, atol=1e-5)
        fake_unbatched = layer(x[0])
    _assert_same_function(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[0]), fake_unbatched, rtol=2e-5, atol=2e-5)
        if dims == 2:  # nn.Conv2d's output memory format (circular padding makes a contiguous input)
            x_cl = x.to(memory_format=torch.channels_last)
            expected = reference(x_fq.to(memory_format=torch.channels_last))
            assert layer(x_cl).is_contiguous() == expected.is_contiguous()
            assert layer(x_cl).is_contiguous(memory_format=torch.channels_last) == \
                expected.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_mode_without_padding_is_a_plain_conv(mode):
    """A mode with nothing to pad changes nothing: the C++ entry runs the converted layer, no F.pad."""
    conv = QuantConv2d.from_float(nn.Conv2d(4, 6, 1, padding_mode=mode), "int8-dynamic").eval().convert()
    assert not conv.pads_input and conv.kernel_padding == (0, 0) and conv._quantized_call_args is not None


def test_padding_modes_compile_and_export():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=(1, 2), padding_mode="circular")).eval()
    x = torch.randn(2, 3, 9, 11)
    converted = tq.quantize_model(model, "int8-static", calibration=[x])
    with torch.no_grad():
        expected = converted(x)
        assert torch.equal(torch.compile(converted, fullgraph=True, dynamic=True)(x), expected)
        assert torch.equal(torch.export.export(converted, (x,)).module()(x), expected)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_qat_with_folded_batchnorm(mode):
    """QAT of a conv that pads its input, with the BatchNorm after it folded (batch statistics in training), then
    convert: the converted model computes the trained fake-quant function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=2, dilation=2, padding_mode=mode))
    prepared = tq.prepare(model.train(), "int8-static")
    assert prepared[0].folded_bn is not None and prepared[0].pads_input
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(4):
        loss = prepared(torch.randn(8, 3, 10, 10)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prepared.eval()
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        fake = prepared(x)
        converted = tq.convert(prepared)(x)
    torch.testing.assert_close(converted, fake, rtol=1e-5, atol=1e-5 * fake.abs().max().item())


def test_training_drop_in():
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(8, 16, config="w4a8-dynamic"), nn.ReLU(), QuantLinear(16, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert model[0].weight.grad is not None and model[0].bias.grad is not None


def test_static_layer_called_twice_before_backward_keeps_each_calls_qparams():
    """A shared layer, gradient accumulation over two batches: each call observes and updates the input qparams;
    the backward of the first call uses the qparams that call quantized with."""
    torch.manual_seed(0)
    layer = QuantLinear(8, 4, config="int8-static").train()
    quantizer, spec = layer.input_quantizer, layer.input_quantizer.spec
    qmin, qmax = (-(1 << spec.bits - 1), (1 << spec.bits - 1) - 1) if spec.signed else (0, (1 << spec.bits) - 1)
    xs = [(torch.randn(5, 8) * s).requires_grad_() for s in (3.0, 0.5)]
    loss, expected = 0, 0
    for x in xs:
        y = layer(x)
        x_fq = torch.fake_quantize_per_tensor_affine(x, quantizer.scale.clone(), quantizer.zero_point.clone(), qmin,
                                                     qmax)
        expected = expected + (x_fq @ layer.weight_quantizer(layer.weight).T + layer.bias).square().sum()
        loss = loss + y.square().sum()
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, xs)
    for got, want in zip(grads, torch.autograd.grad(expected, xs)):
        torch.testing.assert_close(got, want)


def test_straight_through_gradient():
    torch.manual_seed(0)
    layer = QuantLinear(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    layer(x).sum().backward()
    # every value lies inside its own range, so the straight-through gradient is that of the float op
    w_fq = layer.weight_quantizer(layer.weight).detach()
    torch.testing.assert_close(x.grad, torch.ones(4, 3) @ w_fq)
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 4) @ layer.input_quantizer(x).detach())


def _lsq_reference(x, scale, zero_point, qmin, qmax, axis):
    """LSQ in plain autograd: round with a straight-through estimator, gradient scaling by s*g + (s - s*g).detach()."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    g = 1.0 / (x.numel() / scale.numel() * qmax) ** 0.5
    s = (scale * g + (scale - scale * g).detach()).reshape(shape)
    z = zero_point.float().reshape(shape)
    v = x / s
    r = v + (torch.round(v) - v).detach()
    return (torch.clamp(r + z, qmin, qmax) - z) * s


@pytest.mark.parametrize("signed, axis", [(True, 0), (False, None)])
def test_lsq_gradients_match_reference(signed, axis):
    torch.manual_seed(0)
    x = torch.randn(4, 30) * 2
    spec = QuantSpec(bits=4, signed=signed, symmetric=signed, granularity="per_tensor", learn_scale=True)
    scale = torch.full((4,) if axis == 0 else (1,), 0.3, requires_grad=True)
    zero_point = torch.zeros_like(scale, dtype=torch.int32) + (0 if signed else 5)
    qmin, qmax = (-8, 7) if signed else (0, 15)
    xa = x.clone().requires_grad_()
    out = _LSQFakeQuantize.apply(xa, scale, zero_point, spec, axis)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    xb = x.clone().requires_grad_()
    sb = scale.detach().clone().requires_grad_()
    ref = _lsq_reference(xb, sb, zero_point, qmin, qmax, axis)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(scale.grad, sb.grad, rtol=1e-4, atol=1e-6)


def test_learned_scales_train_and_convert(device):
    torch.manual_seed(0)
    config = QuantConfig(QuantSpec(bits=4, learn_scale=True),
                         QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", learn_scale=True))
    layer = QuantLinear(12, 6, config=config).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    x = torch.randn(32, 12, device=device)
    for _ in range(3):
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert layer.weight_quantizer.scale.grad is not None and layer.weight_quantizer.scale.grad.abs().sum() > 0
    assert layer.input_quantizer.scale.grad is not None
    _assert_same_function(layer, x)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_dynamic_per_tensor_scale_is_choose_qparams(device, bits):
    # the one-pass per-tensor scale of a dynamic conv input is bit for bit choose_qparams' symmetric signed scale
    from torchquant.nn.quantizers import InputQuantizer
    quantizer = InputQuantizer(QuantSpec(bits=bits, dynamic=True), per_token_ok=False)
    g = torch.Generator().manual_seed(bits)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -3.5, 1e-40, 0.0])
    for x in (torch.randn(2, 3, 5, 7, generator=g), torch.zeros(1, 2, 3, 3), special.reshape(1, 1, 2, 3),
              torch.full((1, 1, 2, 2), 1e-39), (torch.randn(4, 3, 4, 4, generator=g) * 100).half()):
        x = x.to(device)
        got = quantizer.dynamic_qparams(x)[0]
        want = tq.functional.choose_qparams(x, bits=bits, signed=True, symmetric=True)[0]
        assert got.dtype == torch.float32 and got.shape == (1,)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_learned_scales_driven_to_zero_or_below_are_floored_and_train_on(device):
    # an optimizer step took a learned scale <= 0 and the next forward raised "scale must be positive" from the
    # kernel, naming no layer; the forward floors it (in place, outside autograd's version counting: a graph
    # built before it, as in gradient accumulation, still runs its backward)
    torch.manual_seed(0)
    config = QuantConfig(QuantSpec(bits=4, learn_scale=True),
                         QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", learn_scale=True))
    layer = QuantLinear(12, 6, config=config).to(device)
    x = torch.randn(32, 12).to(device)  # the same data on every device: the loss's pull on each scale too
    layer(x)  # initialises the scales
    with torch.no_grad():
        layer.weight_quantizer.scale[[1, 4]] = torch.tensor([-0.01, 0.0], device=device)
        layer.input_quantizer.scale.fill_(-0.5)
    first = layer(x).square().mean()
    second = layer(x).square().mean()  # floors the scales the first graph saved once more
    (first + second).backward()
    tiny = torch.finfo(torch.float32).tiny
    assert layer.weight_quantizer.scale[1].item() == layer.weight_quantizer.scale[4].item() == tiny
    assert layer.input_quantizer.scale.item() == tiny
    assert torch.isfinite(layer.weight_quantizer.scale.grad).all() and torch.isfinite(layer.input_quantizer.scale.grad).all()
    # training goes on (this loss pulls channel 4 back to the floor, channel 1 off it); the converted layer
    # computes what the fake-quant one does
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    layer(x)
    assert (layer.weight_quantizer.scale >= tiny).all() and (layer.input_quantizer.scale >= tiny).all()
    assert layer.weight_quantizer.scale[1] > 1e-4
    _assert_same_function(layer, x)


def test_convert_floors_a_learned_weight_scale_left_at_zero_or_below_and_rejects_nan():
    # an optimizer step after the last forward left the scale <= 0: convert refused the model, save wrote a file
    # that load refused; both floor it as the next forward would, and the converted model computes that function
    config = QuantConfig(QuantSpec(bits=4, learn_scale=True), QuantSpec(bits=8, granularity="per_tensor"))
    model = tq.prepare(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), config)
    x = torch.randn(2, 4)
    model(x)
    with torch.no_grad():
        model[2].weight_quantizer.scale[1] = -1.0
        fake = copy.deepcopy(model).eval()(x)  # (its forward floors the scale)
    converted = tq.convert(copy.deepcopy(model))
    assert converted[2].weight_scale[1].item() == torch.finfo(torch.float32).tiny
    with torch.no_grad():
        torch.testing.assert_close(converted(x), fake, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model[2].weight_quantizer.scale[1] = float("nan")
    with pytest.raises(ValueError, match=r"layer '2': QuantLinear: the learned weight scale must be positive and "
                                         r"finite \(at least 1.17549e-38\), got nan in channel 1"):
        tq.convert(model)
    assert not model[2].converted and not model[0].converted


def test_save_and_export_floor_learned_scales_left_at_zero_or_below(tmp_path):
    config = QuantConfig(QuantSpec(bits=4, learn_scale=True),
                         QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", learn_scale=True))
    model = tq.prepare(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), config)
    x = torch.randn(2, 4)
    model(x)
    with torch.no_grad():
        model[0].weight_quantizer.scale[0] = -0.5
        model[2].input_quantizer.scale.fill_(0.0)
        expected = copy.deepcopy(model).eval()(x)
    tq.save(model, tmp_path / "qat.safetensors")
    loaded = tq.load(tmp_path / "qat.safetensors", nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [nn.Linear(8, 8), nn.Conv1d(8, 8, 1)], ids=["linear", "conv1d"])
@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "int8-pipeline", "weight-only"])
def test_a_converted_model_warns_where_it_cuts_the_autograd_graph(preset, layer):
    # the integer kernels' output silently left the graph of an input that requires grad (x.grad missed them)
    import warnings
    torch.manual_seed(0)
    config = QuantConfig(QuantSpec(bits=8), None) if preset == "weight-only" else preset
    shape = (4, 8) if isinstance(layer, nn.Linear) else (4, 8, 5)
    model = tq.quantize_model(nn.Sequential(layer), config, [torch.randn(shape)], inplace=False)
    x = torch.randn(shape, requires_grad=True)
    if preset == "weight-only":  # float compute: the gradient goes through
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x).sum().backward()
        assert x.grad.abs().sum() > 0
        return
    with pytest.warns(UserWarning, match=r"integer kernels have no gradient, so their output is cut from the autograd "
                                         r"graph of an input that requires grad: train the prepared"):
        assert not model(x).requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)
        model(x.detach())


def test_convert_floors_a_learned_input_scale_left_at_zero_or_below():
    # the static input scale is checked once at convert (and load), not on every forward; one an optimizer step
    # left <= 0 is floored first, as the next forward would floor it
    config = QuantConfig(QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_tensor", learn_scale=True))
    layer = QuantLinear(4, 3, config=config)
    layer(torch.randn(2, 4))  # observes the input range, initialising the learned scale
    with torch.no_grad():
        layer.input_quantizer.scale.fill_(-1.0)
    copy.deepcopy(layer).convert()
    with torch.no_grad():
        layer.input_quantizer.scale.fill_(float("inf"))
    with pytest.raises(ValueError, match="input scale must be positive and finite"):
        layer.convert()
    assert not layer.converted and layer.weight is not None


def test_converted_forward_follows_loaded_state():
    # the forward's precomputed arguments are rebuilt when a state dict loads: the loaded layer computes what
    # the saved one did
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    for name in ("int8-dynamic", "int8-static"):
        saved = tq.quantize_model(nn.Sequential(nn.Linear(8, 6)), name, [x]).eval()
        loaded = tq.quantize_model(nn.Sequential(nn.Linear(8, 6)), name, [x * 3]).eval()
        loaded.load_state_dict(saved.state_dict())
        torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["int8-static", "int8-dynamic", "w4a8-dynamic"])
@pytest.mark.parametrize("converted", [False, True])
def test_meta_then_to_empty_then_load_state_dict(name, converted):
    # PyTorch's deferred initialisation: the quantization state was moved off "meta" with .to(), which cannot copy
    # a tensor without data (NotImplementedError); it now starts from placeholders until the state dict loads
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = tq.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)), name)
    tq.calibrate(model, [x], progress=False)
    if converted:
        tq.convert(model)
    state, want = model.state_dict(), model(x)
    model.to("meta")
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0.0, float("nan"), -1.0, float("inf"), 1e39])
def test_load_state_dict_with_a_bad_input_scale_leaves_the_model_as_it_was(bad):
    # the loaded state is refused before anything is copied: before, the layer kept the new weights and zero point
    # beside its old packed weight and, its static scale dropped, quietly quantized inputs with dynamic scales; and
    # a bad scale of a later layer left the layers before it loaded (1e39 is inf once copied into float32)
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    model = tq.quantize_model(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), "int8-static", [x]).eval()
    other = tq.quantize_model(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), "int8-static", [x * 3])
    state = other.state_dict()
    state["2.input_quantizer.scale"] = torch.tensor([bad], dtype=torch.float64)
    before, want = {k: v.clone() for k, v in model.state_dict().items()}, model(x)
    with pytest.raises(ValueError, match=r"'2\.input_quantizer\.scale' must be finite and positive.*nothing"):
        model.load_state_dict(state)
    layer_state = {k[2:]: v for k, v in state.items() if k.startswith("2.")}
    with pytest.raises(ValueError, match="input scale must be positive and finite"):  # the layer alone
        model[2].load_state_dict(layer_state)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["int8-static", "w4a8-dynamic"])
def test_dequantized_weight(name):
    torch.manual_seed(0)
    layer = QuantConv2d(4, 6, 3, groups=2, config=name)
    fake = layer.dequantized_weight()
    assert fake.shape == layer.weight.shape and not fake.requires_grad
    if name == "int8-static":
        _calibrated(layer, (1, 4, 5, 5), "cpu")
    layer.convert()
    torch.testing.assert_close(layer.dequantized_weight(), fake, rtol=0, atol=0)
    assert layer.dequantized_weight(torch.bfloat16).dtype == torch.bfloat16


def test_converted_layer_moves_and_casts(device):
    torch.manual_seed(0)
    layer = QuantLinear(16, 8, config="int8-static")
    layer, x = _calibrated(layer, (4, 16), "cpu")
    layer.eval().convert()
    want = layer(x)
    assert "w_packed" not in layer.state_dict() and "weight" not in layer.state_dict()
    layer.to(device)
    torch.testing.assert_close(layer(x.to(device)).cpu(), want, rtol=1e-5, atol=1e-5)
    layer.half()
    assert layer.weight_scale.dtype == torch.float32 and layer.qweight.dtype == torch.int8
    assert layer(x.to(device, torch.float16)).dtype == torch.float16
    layer.convert()  # idempotent


def test_converted_buffers_span_their_storage(device):
    # a program that copies each buffer over the bytes its view spans (AOTInductor does) keeps every byte the
    # kernels read: the packed weight's zero padding and a device's extras past the view are part of the buffer
    torch.manual_seed(0)
    layers = [(QuantLinear(10, 7, config="int8-dynamic"), (3, 10)),
              (QuantLinear(13, 5, config="w4a8-dynamic"), (3, 13)),
              (QuantConv2d(3, 5, 3, padding=1, config="int8-static"), (2, 3, 6, 6)),
              (QuantConv2d(4, 6, (1, 3), groups=2, config="int8-dynamic"), (2, 4, 5, 5)),
              (tq.nn.QuantConv1d(3, 5, 3, config="int8-static"), (2, 3, 9))]
    for layer, shape in layers:
        layer, _ = _calibrated(layer.to(device), shape, device)
        layer.eval().convert()
        for name, buffer in layer.named_buffers():
            if buffer.numel() == 0:
                continue
            spanned = buffer.storage_offset() + sum((size - 1) * stride for size, stride in
                                                     zip(buffer.shape, buffer.stride())) + 1
            assert spanned * buffer.element_size() == buffer.untyped_storage().nbytes(), (type(layer), name)


def test_load_state_dict_into_converted_skeleton():
    torch.manual_seed(0)
    layer = QuantConv2d(3, 4, 3, config="w4a8-dynamic").eval().convert()
    x = torch.randn(1, 3, 5, 5)
    skeleton = QuantConv2d(3, 4, 3, config="w4a8-dynamic")
    skeleton._converted_skeleton()
    skeleton.load_state_dict(layer.state_dict())
    torch.testing.assert_close(skeleton.eval()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2, 7, 64])
def test_int4_packing_round_trip(k):
    q = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    torch.testing.assert_close(unpack_int4(packed, k), q, rtol=0, atol=0)


def test_converted_bad_input():
    lin = QuantLinear(8, 3).eval().convert()
    with pytest.raises(ValueError, match=r"input must have shape \[\.\.\., 8\], got \[2, 5\]"):
        lin(torch.randn(2, 5))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
        lin(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be a tensor"):
        lin([1.0] * 8)
    conv = QuantConv2d(3, 4, 3).eval().convert()
    with pytest.raises(ValueError,
                       match=r"shape \[batch, 3, height, width\] or \[3, height, width\], got \[2, 5, 5\]"):
        conv(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match=r"got \[1, 1, 3, 5, 5\]"):
        conv(torch.randn(1, 1, 3, 5, 5))
    with pytest.raises(TypeError, match="got torch.int64"):
        conv(torch.ones(1, 3, 5, 5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="needs calibration before convert"):
        QuantLinear(4, 4, config="int8-static").convert()
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\], got 12"):
        QuantLinear(4, 4, config=QuantConfig(QuantSpec(bits=12)))


def test_prepare_with_learned_scales():
    """from_float builds the layer on the meta device first: learned-scale parameters must survive that."""
    config = QuantConfig(QuantSpec(bits=4, learn_scale=True),
                         QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor", learn_scale=True))
    model = tq.prepare(nn.Sequential(nn.Linear(6, 5), nn.Conv2d(1, 2, 1)), config)
    for layer in model:
        scale = layer.weight_quantizer.scale
        assert isinstance(scale, nn.Parameter) and scale.device.type == "cpu"
        assert isinstance(layer.input_quantizer.scale, nn.Parameter)
    model[0](torch.randn(3, 6)).sum().backward()
    assert model[0].weight_quantizer.scale.grad is not None


@pytest.mark.parametrize("name", ["int8-dynamic", "w4a8-dynamic"])
def test_fake_quant_per_token_layer_refuses_a_0d_input(name):
    # was IndexError (tuple index out of range) from the per-token scale
    layer = QuantLinear(8, 4, config=name)
    with pytest.raises(ValueError, match="needs an input with a feature dimension"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_converted_layer_computes_with_its_qweight_written_in_place(tmp_path, preset, kind):
    """A write into a converted layer's integer weight (rows of it replaced, as a pruning mask would) reaches the
    forward, which multiplied the weight packed at convert until something repacked it: the model computes what
    its checkpoint holds."""
    torch.manual_seed(0)
    make = {"linear": lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU()),
            "conv2d": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()),
            "conv1d": lambda: nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU())}[kind]
    x = {"linear": torch.randn(3, 16), "conv2d": torch.randn(2, 4, 6, 6), "conv1d": torch.randn(2, 4, 9)}[kind]
    model = tq.quantize_model(make().eval(), preset, [x])
    with torch.no_grad():
        before = model(x)
        model[0].qweight[:3] = model[0].qweight[3:6].clone()
        after = model(x)
    assert not torch.equal(after, before)
    tq.save(model, tmp_path / "m.safetensors")
    loaded = tq.load(tmp_path / "m.safetensors", make().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), after)
