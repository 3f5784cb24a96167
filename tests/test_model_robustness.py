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
from torchquant.nn.base import _HOOK_DICTS

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


class ResidualBlock(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv1 = conv(3, 8, 3, padding=1)
        self.conv2 = conv(8, 8, 3, padding=1)
        self.conv3 = conv(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        return self.conv3(torch.relu(self.conv2(y) + y))


@pytest.mark.parametrize("conv, shape", [(nn.Conv2d, (3, 8, 8)), (nn.Conv1d, (3, 8)), (nn.Conv2d, (3, 11, 13))],
                         ids=["conv2d", "conv1d", "conv2d-not-square"])
def test_unbatched_input_to_a_pipeline_conv_with_its_residual_add(conv, shape):
    """The integer pipeline's conv that adds the residual in its epilogue takes an unbatched input as the other
    convs do: the add's shape check read its [channels, height, width] as [batch, channels, height] (an add it
    took for a broadcasting one ran in float; where the sizes agreed by chance, int8_conv2d.residual raised 'x_q
    must be 4-d [B, C, H, W], got 3-d')."""
    torch.manual_seed(3)
    x = torch.randn(*shape)
    prepared, converted = quantized(ResidualBlock(conv).eval(), "int8-pipeline", torch.randn(4, *shape))
    assert "integer_conv_add" in converted.code
    for m in (prepared, converted):
        got = m(x)
        assert got.shape == m(x[None]).shape[1:] and torch.equal(got, m(x[None])[0])


def test_unbatched_input_with_a_folded_batchnorm_in_training_is_refused():
    """The folded BatchNorm's batch statistics need a batch (the float BatchNorm2d refuses a 3-D input too)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    prepared = torchquant.prepare(model, "int8-dynamic", inplace=False).train()
    with pytest.raises(ValueError, match=r"folded BatchNorm2d needs 4-D input \[batch, channels, height, width\], "
                                         r"got \[3, 6, 6\]"):
        prepared(torch.randn(3, 6, 6))


# ---------------------------------------------------------------------------------------------------------------
# load_state_dict into a converted model: assign=True, and into a submodule

def two_block_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))


@pytest.mark.parametrize("key, dtype", [("0.weight_scale", torch.float64), ("2.2.qweight", torch.int16),
                                        ("0.input_quantizer.scale", torch.float64),
                                        ("2.0.input_quantizer.zero_point", torch.int64), ("2.2.bias", torch.float64)])
def test_load_with_assign_refuses_other_dtypes(key, dtype):
    """load_state_dict(assign=True) stores the state dict's tensors themselves, uncast: a converted layer's tensor
    of another dtype (the kernels refused a float64 weight scale at every forward; an int16 weight failed half way
    through the load) is refused before anything is assigned."""
    x = torch.randn(3, 8)
    _, converted = quantized(two_block_model(), "int8-static", x)
    want = converted(x)
    state = {k: v.clone() for k, v in converted.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    state[key] = state[key].to(dtype)
    with pytest.raises(ValueError, match=rf"tensor '{key}' is {str(dtype)[6:]}, the model expects .*assign=True"):
        converted.load_state_dict(state, assign=True)
    assert all(torch.equal(v, before[k]) for k, v in converted.state_dict().items())
    assert torch.equal(converted(x), want)
    state[key] = before[key]
    converted.load_state_dict(state, assign=True)  # the model's own dtypes: assigned
    assert converted.state_dict()[key].data_ptr() == state[key].data_ptr() and torch.equal(converted(x), want)


@pytest.mark.parametrize("target", ["2", "2.0"])
def test_load_into_a_submodule_is_checked_before_anything_is_copied(target):
    """A submodule of a converted model (a block, or a layer itself) checks a state dict loaded into it as the whole
    model does: a bad weight scale of its last layer leaves it as it was (it loaded, and every forward raised)."""
    x = torch.randn(3, 8)
    _, converted = quantized(two_block_model(), "int8-static", x)
    want = converted(x)
    sub = converted.get_submodule(target)
    state = {k: v.clone() for k, v in sub.state_dict().items()}
    state[[k for k in state if k.endswith("weight_scale")][-1]][0] = -1.0
    with pytest.raises(ValueError, match=r"weight_scale' must be finite and positive .* got -1.0 at index \[0\]; "
                                         r"nothing was loaded"):
        sub.load_state_dict(state)
    assert torch.equal(converted(x), want)
    # a wrapper around the converted model: its own check covers it
    wrapper = nn.Sequential(converted)
    state = {f"0.{k}": v.clone() for k, v in converted.state_dict().items()}
    state["0.2.0.weight_scale"][1] = float("nan")
    with pytest.raises(ValueError, match=r"'0.2.0.weight_scale' must be finite"):
        wrapper.load_state_dict(state)
    assert torch.equal(converted(x), want)


def test_pipeline_quantizers_load_only_with_the_pipeline():
    """A converted pipeline's layers cache their input quantizers' scales and zero points: loading the quantizers
    alone computed with the new scales beside the old zero points. Refused; the pipeline's own load refreshes them,
    and a layer of the pipeline loads on its own, checked."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    x = torch.randn(2, 3, 8, 8)
    _, converted = quantized(model, "int8-pipeline", x)
    want = converted(x)
    quantizers = converted.act_quant
    state = {k: v * 2 for k, v in quantizers.state_dict().items()}
    for module in (quantizers, next(iter(quantizers.values()))):
        with pytest.raises(ValueError, match="activation quantizers of a converted integer pipeline load only with "
                                             "the pipeline"):
            module.load_state_dict(state if module is quantizers else {k.partition(".")[2]: v for k, v in
                                                                          state.items() if k.startswith("input_1.")})
    assert torch.equal(converted(x), want)
    layer = next(m for m in converted.modules() if isinstance(m, QuantConv2d))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight_scale"][0] = 0.0
    with pytest.raises(ValueError, match="'weight_scale' must be finite and positive"):
        layer.load_state_dict(state)
    assert torch.equal(converted(x), want)


# ---------------------------------------------------------------------------------------------------------------
# copies: deepcopy, pickle, torch.save

@pytest.mark.parametrize("preset", ["int8-static", "int8-dynamic", "int8-pipeline"])
def test_converted_models_copy_pickle_and_torch_save(preset, tmp_path):
    """torch.save(model) of a converted conv model raised 'cannot pickle module object' (the convs' output memory
    format, a torch.memory_format, which torch.save cannot pickle). Every copy computes the same outputs and keeps
    the load checks."""
    import copy
    import pickle
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten()),
                          nn.Linear(64, 5))
    x = torch.randn(2, 3, 8, 8)
    _, converted = quantized(model, preset, x)
    want = converted(x)
    torch.save(converted, tmp_path / "model.pt")
    copies = [copy.deepcopy(converted), pickle.loads(pickle.dumps(converted)),
              torch.load(tmp_path / "model.pt", weights_only=False)]
    for copied in copies:
        assert torch.equal(copied(x), want)
        state = {k: v.clone() for k, v in copied.state_dict().items()}
        key = [k for k in state if k.endswith("weight_scale")][-1]
        state[key][0] = float("inf")
        with pytest.raises(ValueError, match="must be finite and positive"):
            copied.load_state_dict(state)
        owner = copied.get_submodule(key.rpartition(".")[0].rpartition(".")[0]) if key.count(".") > 1 else None
        if owner is not None:  # a block of it
            prefix = key.rpartition(".")[0].rpartition(".")[0] + "."
            with pytest.raises(ValueError, match="must be finite and positive"):
                owner.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        assert torch.equal(copied(x), want)


# ---------------------------------------------------------------------------------------------------------------
# tied weights

class TiedLM(nn.Module):
    """A language model's head tied to its embedding, and two layers sharing one weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Embedding(20, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.b(torch.relu(self.a(self.embed(ids))))))


def assert_tied(model: nn.Module) -> None:
    assert model.get_submodule("lm_head").weight is model.get_submodule("embed").weight
    assert model.get_submodule("a").weight is model.get_submodule("b").weight


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "int8-pipeline"])
def test_tied_weights_stay_tied_through_prepare_save_and_load(preset, tmp_path):
    """prepare keeps the ties (the layers share the float parameters); save stores a tied tensor once, and load
    into the float model ties the fake-quant layers it builds to the model's parameters again (each held a copy,
    which training then moved apart from the embedding). Converted, the head holds its own integer weight and the
    embedding stays float: outputs survive save and load exactly."""
    ids = torch.randint(0, 20, (3, 5))
    prepared, converted = quantized(TiedLM(), preset, ids)
    assert_tied(prepared)
    torchquant.save(prepared, tmp_path / "prepared.safetensors")
    loaded = torchquant.load(tmp_path / "prepared.safetensors", TiedLM())
    assert_tied(loaded)
    assert torch.equal(loaded(ids), prepared(ids))
    # a training step moves each tied parameter once, and the embedding with the head
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded.train()
    loaded(ids).square().mean().backward()
    optimizer.step()
    assert_tied(loaded)
    assert not torch.equal(loaded.get_submodule("embed").weight, prepared.get_submodule("embed").weight)

    assert torch.equal(converted.get_submodule("embed").weight, TiedLM().embed.weight)
    torchquant.save(converted, tmp_path / "converted.safetensors")
    reloaded = torchquant.load(tmp_path / "converted.safetensors", TiedLM())
    assert torch.equal(reloaded(ids), converted(ids))


# ---------------------------------------------------------------------------------------------------------------
# hooks, weight_norm, parametrize

@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "int8-pipeline"])
def test_forward_hooks_of_quantized_layers_keep_running(preset):
    """A forward pre-hook that changes a layer's input and a forward hook that records its output run around the
    quantized layer, prepared and converted (prepare dropped them: other outputs, and the recording hook never
    ran). The integer pipeline, which calls no module's hooks, gives way to the module swap with a warning; a
    hooked layer's BatchNorm is not folded into it (its hook would see the BatchNorm's output)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 3)).eval()
    seen = []
    model[0].register_forward_hook(lambda module, args, y: seen.append(y.detach()))
    model[4].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    with pytest.warns(UserWarning, match="has forward hooks") if preset == "int8-pipeline" else warnings.catch_warnings():
        prepared = torchquant.prepare(model, preset, inplace=False)
    if preset != "int8-dynamic":
        torchquant.calibrate(prepared, [x], progress=False)
    converted = torchquant.convert(prepared, inplace=False)
    for m in (prepared, converted):
        seen.clear()
        y = m(x)
        assert len(seen) == 1 and seen[0].shape == (2, 8, 6, 6)
        torch.testing.assert_close(y, want, atol=0.05, rtol=0.05)
        assert isinstance(m[1], nn.BatchNorm2d)  # not folded


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
def test_hook_handles_taken_before_prepare_remove_the_hooks_from_the_quantized_layer(preset):
    """The quantized layer takes over the float layer's hooks themselves (the same dicts, not copies): a handle that
    register_forward_hook & co. returned before prepare removes its hook from the prepared and the converted layer
    (it removed it from the float layer only, which the model no longer calls, and the hook kept running)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 8)
    want = model(x)
    seen = []
    handles = [model[0].register_forward_pre_hook(lambda module, args: (-args[0],)),
               model[2].register_forward_hook(lambda module, args, kwargs, y: seen.append(y), with_kwargs=True),
               model[2].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args), with_kwargs=True)]
    torchquant.prepare(model, preset)
    if preset != "int8-dynamic":
        torchquant.calibrate(model, [x], progress=False)
    handles[1].remove()
    seen.clear()
    model(x)
    assert len(seen) == 1  # the pre-hook with kwargs only
    torchquant.convert(model)
    for handle in handles:
        handle.remove()
    seen.clear()
    y = model(x)
    assert not seen and not any(getattr(model[i], d) for i in (0, 2) for d in _HOOK_DICTS)
    torch.testing.assert_close(y, want, atol=0.05, rtol=0.05)
    # hooks registered on the quantized layer come and go with their own handles
    handle = model[2].register_forward_hook(lambda module, args, y: seen.append(y))
    model(x)
    handle.remove()
    model(x)
    assert len(seen) == 1


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_old_style_weight_norm_layers_stay_float(norm):
    """torch.nn.utils.weight_norm / spectral_norm compute the weight in a forward pre-hook: prepare raised
    TypeError ('cannot assign torch.FloatTensor as parameter weight'); such a layer stays float with a warning."""
    torch.manual_seed(7)
    model = nn.Sequential(getattr(nn.utils, norm)(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 8)
    want = model(x)
    with pytest.warns(UserWarning, match=r"0 \(Linear\) stays float: its weight is not a parameter"):
        quantized = torchquant.quantize_model(model, "int8-dynamic")  # (torch cannot deepcopy it after a call)
    assert type(quantized[0]) is nn.Linear and quantized[2].converted
    torch.testing.assert_close(quantized(x), want, atol=0.05, rtol=0.05)


def test_parametrized_layers_stay_float_with_a_warning():
    torch.manual_seed(8)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"0 \(ParametrizedLinear\) stays float: it is parametrized"):
        torchquant.prepare(model, "int8-dynamic")


def test_load_into_a_hooked_float_model_keeps_the_hooks(tmp_path):
    """load() builds the quantized layers of a float skeleton: they take the float layers' hooks as prepare's do."""
    torch.manual_seed(9)
    x = torch.randn(4, 8)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    torchquant.save(torchquant.quantize_model(model, "int8-static", [x], inplace=False), tmp_path / "m.safetensors")
    seen = []
    skeleton = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    skeleton[2].register_forward_hook(lambda module, args, y: seen.append(y))
    loaded = torchquant.load(tmp_path / "m.safetensors", skeleton)
    y = loaded(x)
    assert len(seen) == 1 and seen[0] is y


def test_prepare_with_another_config_says_the_quantized_layers_keep_theirs():
    """A second prepare with another config left the layers the first one quantized as they were, silently."""
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    torchquant.prepare(model, "int8-dynamic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchquant.prepare(model, "int8-dynamic")  # the same config: nothing to say
    with pytest.warns(UserWarning, match=r"prepare: 0, 2 quantized already with another config keep theirs"):
        torchquant.prepare(model, "int8-static")
    assert model[0].config.activation.dynamic


# ---------------------------------------------------------------------------------------------------------------
# torch.jit.trace

def small_cnn() -> nn.Module:
    torch.manual_seed(10)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("preset", ["int8-pipeline", "int8-static", "int8-dynamic"])
def test_jit_trace_of_quantized_models(preset):
    """torch.jit.trace records what the eager model computes, and its check (two runs record the same graph)
    passes: the integer pipeline's Python-number zero points were cached tensors made on the first call only (an
    aten::full in one trace, a constant in the other: 'Graphs differed across invocations')."""
    x = torch.randn(2, 3, 8, 8)
    prepared, converted = quantized(small_cnn(), preset, x)
    for m in (prepared, converted):
        traced = torch.jit.trace(m, x)
        for batch in (x, torch.randn(3, 3, 8, 8)):
            assert torch.equal(traced(batch), m(batch))


@pytest.mark.parametrize("preset", ["int8-pipeline", "int8-static"])
def test_jit_script_says_to_trace_export_or_compile(preset):
    # torch.jit.script failed on TorchScript's typing of a QuantSpec / torch.memory_format
    prepared, converted = quantized(small_cnn(), preset, torch.randn(2, 3, 8, 8))
    for m in (prepared, converted):
        with pytest.raises(RuntimeError, match=r"QuantConv2d: torchquant's layers are not TorchScript-scriptable; "
                                               r"trace the model instead \(torch.jit.trace\), or export it"):
            torch.jit.script(m)


@pytest.mark.parametrize("conv, shape, expected", [
    (nn.Conv2d, (1, 4, 6, 6), r"QuantConv2d: input must have shape \[batch, 3, height, width\] or \[3, height, "
                              r"width\], got \[1, 4, 6, 6\]"),
    (nn.Conv1d, (1, 4, 6), r"QuantConv1d: input must have shape \[batch, 3, length\] or \[3, length\], got "
                           r"\[1, 4, 6\]")], ids=["conv2d", "conv1d"])
def test_pipeline_input_of_the_wrong_channel_count_is_named(conv, shape, expected):
    # the pipeline's conv reported the packed weight's layout (int8_conv2d: w_packed holds ...)
    model = nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), conv(8, 4, 1))
    _, converted = quantized(model, "int8-pipeline", torch.randn(2, 3, *shape[2:]))
    with pytest.raises(ValueError, match=expected):
        converted(torch.randn(shape))


# ---------------------------------------------------------------------------------------------------------------
# torch.autocast

AUTOCAST_LAYERS = [(lambda: nn.Linear(6, 5), (4, 6)), (lambda: nn.Conv2d(3, 5, 3), (2, 3, 6, 6)),
                   (lambda: nn.Conv1d(3, 5, 3), (2, 3, 7))]
WEIGHT_ONLY = torchquant.QuantConfig(weight=torchquant.QuantSpec(), activation=None)


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic", "int8-pipeline", "weight-only"])
@pytest.mark.parametrize("make, shape", AUTOCAST_LAYERS, ids=["linear", "conv2d", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_layers_follow_autocast(device, make, shape, preset, dtype):
    """Under torch.autocast a prepared and a converted layer return autocast's dtype, as nn.Linear / nn.Conv2d do
    (converted layers returned float32). The converted layer's integers are those outside autocast (its input is
    not cast): the output is the one outside autocast rounded to that dtype."""
    torch.manual_seed(11)
    model = nn.Sequential(make()).to(device)
    x = torch.randn(*shape, device=device)
    prepared, converted = quantized(model, WEIGHT_ONLY if preset == "weight-only" else preset, x)
    outside = converted(x)
    with torch.autocast(device, dtype=dtype):
        assert model(x).dtype == prepared(x).dtype == converted(x).dtype == dtype
        if preset != "weight-only":  # (float compute: F.linear / F.conv2d in dtype)
            assert torch.equal(converted(x), outside.to(dtype))
    assert converted(x).dtype == torch.float32  # (nothing cached)


def test_integer_pipeline_under_autocast_keeps_integers_between_layers(device):
    """Only a layer's float output follows autocast: the requantized int8/uint8 outputs between a pipeline's layers
    stay integer, so the whole pipeline's output is the one outside autocast, rounded."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    x = torch.randn(5, 8, device=device)
    _, converted = quantized(model, "int8-pipeline", x)
    want = converted(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert torch.equal(converted(x), want.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# a forward that reads a layer's weight, in a model torch.fx cannot trace


class _CastsToWeightDtype(nn.Module):
    """Hugging Face T5's feed-forward: the input cast to the output layer's weight dtype before it; a branch on a
    value (torch.fx cannot trace it), so prepare cannot see the read and quantizes `wo`."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = torch.relu(self.wi(x))
        if h.sum() < 0:  # (never: a relu's sum)
            h = -h
        if isinstance(self.wo.weight, torch.Tensor) and h.dtype != self.wo.weight.dtype:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
def test_converted_weight_reads_as_its_dequantized_weight(preset):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    model = _CastsToWeightDtype().eval()
    prepared, converted = quantized(model, preset, x)
    assert prepared.wo.weight is dict(prepared.wo.named_parameters())["weight"]  # (fake-quant: the float parameter)
    layer = converted.wo
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()
    w = layer.weight
    assert w.dtype == torch.float32 and not w.requires_grad and torch.equal(w, layer.dequantized_weight())
    assert layer.weight is w  # made once
    with torch.no_grad():
        y = converted(x)
        assert torch.equal(y, converted.wo(torch.relu(converted.wi(x))))
        assert torchquant.functional.quantization_error(model(x), y)["sqnr_db"] > 20
    # a new integer weight (a checkpoint loaded), the model moved to another dtype: made again
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight_scale"] = state["weight_scale"] * 2
    layer.load_state_dict(state)
    assert torch.equal(layer.weight, 2 * w)
    assert converted.half().wo.weight.dtype == torch.float16


def test_cached_weight_is_left_out_of_copies_and_pickles():
    import copy
    import pickle
    torch.manual_seed(0)
    _, converted = quantized(_CastsToWeightDtype().eval(), "int8-dynamic", torch.randn(4, 16))
    converted.wo.weight
    assert "_dequantized_weight" in converted.wo.__dict__
    for clone in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert "_dequantized_weight" not in clone.wo.__dict__
        assert torch.equal(clone.wo.weight, converted.wo.weight)


def test_hugging_face_t5_runs_converted():
    # T5's feed-forward reads self.wo.weight.dtype in its forward (AttributeError once wo was converted)
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model(input_ids=ids).last_hidden_state
        converted = torchquant.quantize_model(model, "int8-dynamic", inplace=False)
        y = converted(input_ids=ids).last_hidden_state
    assert torchquant.functional.quantization_error(ref, y)["sqnr_db"] > 25
