"""Models as PyTorch users write and call them, through prepare / calibrate / convert / save / load: unbatched
inputs, state dicts loaded with assign=True or into a submodule, tied weights. Each case either computes what the
fake-quant or float model computes or raises an error naming the problem; nothing is silently dropped."""
import warnings

import pytest
import torch
import torch.nn as nn

import torchquant
from torchquant import _C
from torchquant.nn import QuantConv1d, QuantConv2d

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def quantized(model: nn.Module, preset: str, batch: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """(prepared and calibrated, converted) copies of model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = torchquant.prepare(model, preset, inplace=False)
        if preset != "int8-dynamic":
            torchquant.calibrate(prepared, [batch], progress=False)
        return prepared, torchquant.convert(prepared, inplace=False)


# ---------------------------------------------------------------------------------------------------------------
# unbatched inputs: nn.Conv2d takes [C, H, W], nn.Conv1d [C, L]

CONVS = [(nn.Conv2d, (3, 11, 13)), (nn.Conv1d, (3, 13))]


@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic", "int8-pipeline"])
@pytest.mark.parametrize("conv, shape", CONVS, ids=["conv2d", "conv1d"])
def test_unbatched_conv_input(conv, shape, preset):
    """A prepared and a converted conv model take an unbatched input as the float model does, and return the
    unbatched output: the batched model's output for the batch of one, contiguous (as nn.Conv2d's)."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8, 3, padding=1, stride=2, bias=False), nn.ReLU(), conv(8, 4, 3, dilation=2))
    x = torch.randn(*shape)
    assert model(x).shape == model(x[None]).shape[1:]
    prepared, converted = quantized(model, preset, torch.randn(4, *shape))
    for m in (prepared, converted):
        want = m(x[None])[0]
        got = m(x)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        got.view(-1)  # (a channels-last output would refuse)


@pytest.mark.parametrize("conv, shape", CONVS, ids=["conv2d", "conv1d"])
@pytest.mark.parametrize("layout", [None, torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("path", ["c++", "python"])
def test_unbatched_converted_conv_layer(conv, shape, layout, path):
    """The converted layer on its own, on the C++ entry and the Python path, whatever its output memory format:
    the batched output's first image, contiguous."""
    torch.manual_seed(1)
    _, converted = quantized(nn.Sequential(conv(3, 5, 3, groups=1)), "int8-static", torch.randn(2, *shape))
    layer = converted[0]
    if conv is nn.Conv2d:
        layer.set_output_memory_format(layout)
    if path == "python":
        layer._quantized_call_args = None  # (what a device without the C++ entry's cases runs)
    x = torch.randn(*shape)
    got = layer(x)
    assert got.is_contiguous() and torch.equal(got, layer(x[None])[0])
    if path == "c++":  # the entry computes it (the 2-D conv's view of a 1-D conv's input)
        view = x if conv is nn.Conv2d else x.unsqueeze(-2)
        assert _C.quantized_layer_forward(view, layer._quantized_call_args, None, None) is not NotImplemented
    with pytest.raises(ValueError, match=r"input must have shape \[batch, 3, .*\] or \[3, "):
        layer(torch.randn(shape[1:]))


def test_unbatched_input_with_a_folded_batchnorm_in_training_is_refused():
    """The folded BatchNorm's batch statistics need a batch (the float BatchNorm2d refuses a 3-D input too)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    prepared = torchquant.prepare(model, "int8-dynamic", inplace=False).train()
    with pytest.raises(ValueError, match=r"folded BatchNorm2d needs 4-D input \[batch, channels, height, width\], "
                                         r"got \[3, 6, 6\]"):
        prepared(torch.randn(3, 6, 6))
