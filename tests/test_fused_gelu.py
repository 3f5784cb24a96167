"""The GELU that int8_linear_dynamic computes in its epilogue (activation="gelu" / "gelu_tanh") and convert()'s fusion
of a GELU module that follows a converted int8-dynamic Linear (Hugging Face's BertIntermediate: dense, then
intermediate_act_fn): values against torch.nn.functional.gelu on every CPU path, the same bits on every path, the
converted model against the fake-quant one, save and load."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import torchquant
from conftest import SUPPORTED_ISAS, assert_same, bit_patterns
from torchquant import functional as F
from torchquant._ops import ops

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FORMS = {"gelu": "none", "gelu_tanh": "tanh"}  # the op's activation -> F.gelu's approximate


def quantized_weight(n, k, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int16).to(torch.int8)
    w_scale = torch.rand(n, generator=g) * 0.01 + 0.001
    w = w.to(device)
    return F.pack_int8_weight(w), w.sum(1, dtype=torch.int32), w_scale.to(device)


def gelu_inputs() -> torch.Tensor:
    """float32 values where GELU is hard: both tails (cancellation of 1 + erf, underflow), around 0, subnormals,
    the largest floats, +-inf and NaN, and a random spread."""
    g = torch.Generator().manual_seed(5)
    special = [0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-20, -1e-20, 1e-7, -1e-7, 0.5, -0.5, 1.0, -1.0, 3.0,
               -3.0, 5.0, -5.0, 9.0, -9.0, 13.0, -13.0, 20.0, -20.0, 100.0, -100.0, 1e10, -1e10, 3.4e38, -3.4e38,
               math.inf, -math.inf, math.nan]
    spread = torch.cat([torch.randn(1000, generator=g) * 4, torch.linspace(-12, 12, 2001),
                        torch.logspace(-30, 30, 301) * torch.tensor([1.0, -1.0]).repeat(151)[:301]])
    return torch.cat([torch.tensor(special), spread]).float()


def assert_gelu_close(got: torch.Tensor, y: torch.Tensor, form: str) -> None:
    """got within 4 float32 ulps, or 4e-7 |y| (3.4 ulps of y) where GELU cancels, of torch's gelu of y and of the
    float64 GELU. torch's own erf form is off by up to 3.3e-7 |y| in its vectorized kernel (A&S 7.1.26 in float32,
    1 + erf(z) cancelling for negative z) and exact in its scalar one. Where those two kernels disagree (+inf: NaN
    or inf; a product overflowing before the halving near the largest floats), the formula's value: gelu(+inf) =
    +inf, gelu(-inf) = NaN (-inf * 0), gelu(NaN) = NaN."""
    infinite = y.isinf() | y.isnan()
    assert torch.equal(got[y.isnan()].isnan(), torch.ones_like(got[y.isnan()], dtype=torch.bool))
    assert bool((got[y == math.inf] == math.inf).all()) and bool(got[y == -math.inf].isnan().all())
    y, got = y[~infinite], got[~infinite]
    assert not bool(got.isnan().any())
    torch_range = y.abs() < 1e38
    want = torch.nn.functional.gelu(y[torch_range], approximate=FORMS[form]).double()
    y64 = y.double()
    if form == "gelu":
        exact = y64 * 0.5 * torch.special.erfc(-y64 / math.sqrt(2))
    else:
        exact = y64 / (1 + torch.exp(-2 * math.sqrt(2 / math.pi) * (y64 + 0.044715 * y64 ** 3)))
    got = got.double()

    def check(reference, got, y64, slack):
        ulp = 2.0 ** -23 * reference.abs().clamp_min(2.0 ** -126)
        ok = ((got - reference).abs() <= 4 * ulp + y64.abs() * slack) | (got == reference)
        assert bool(ok.all()), list(zip(y64[~ok].tolist(), got[~ok].tolist(), reference[~ok].tolist()))
    check(want, got[torch_range], y64[torch_range], 4e-7)
    check(exact, got, y64, 4e-7)


@pytest.mark.parametrize("form", list(FORMS))
def test_epilogue_gelu_values(isa, form):
    """y = bias exactly (x all zeros: every acc is 0), so each output column is the GELU of a chosen float32 value:
    the tails, subnormals, the largest floats, +-inf and NaN, on full 64-column panels and a partial one, with 7
    rows (the 6-row kernel and a remainder)."""
    values = gelu_inputs()
    n = values.numel()
    w_packed, w_sum, w_scale = quantized_weight(n, 40)
    x = torch.zeros(7, 40)
    got = ops.int8_linear_dynamic.activation(x, w_packed, w_sum, w_scale, values, n, form)
    assert got.shape == (7, n) and got.dtype == torch.float32
    for row in got:
        assert_same(row, got[0])
        assert_gelu_close(row, values, form)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("shape", [(1, 64), (7, 33, 72), (130, 96), (2, 1030)])
def test_epilogue_gelu_random_and_same_bits_on_every_path(monkeypatch, form, shape):
    """The GELU of the layer's float32 output, as int8_linear_dynamic without the activation gives it; bit for bit
    the same on every CPU path (the scalar and AVX-512 formulas run the same operations)."""
    g = torch.Generator().manual_seed(sum(shape))
    k, n = shape[-1], 200
    x = torch.randn(shape, generator=g) * 2
    w_packed, w_sum, w_scale = quantized_weight(n, k)
    bias = torch.randn(n, generator=g)
    results = {}
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", isa)
        y = ops.int8_linear_dynamic(x, w_packed, w_sum, w_scale, bias, n)
        got = ops.int8_linear_dynamic.activation(x, w_packed, w_sum, w_scale, bias, n, form)
        assert_gelu_close(got.flatten(), y.flatten(), form)
        results[isa] = got
    for isa, got in results.items():
        assert torch.equal(bit_patterns(got), bit_patterns(results["scalar"])), isa


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", list(FORMS))
def test_epilogue_gelu_half_outputs(isa, dtype, form):
    """fp16 / bf16 layers: the GELU of the float32 y, then one rounding to the output type."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 128, generator=g) * 2).to(dtype)
    w_packed, w_sum, w_scale = quantized_weight(130, 128)
    bias = torch.randn(130, generator=g)
    got = ops.int8_linear_dynamic.activation(x, w_packed, w_sum, w_scale, bias, 130, form)
    x_q, x_scale = ops.quantize_per_token(x, 8)
    y = ops.int8_linear(x_q, x_scale, 0, w_packed, w_sum, w_scale, bias, 130, torch.float32)
    want = torch.nn.functional.gelu(y, approximate=FORMS[form]).to(dtype)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=1e-6)


def test_gelu_on_every_device(device):
    """The GELU of the layer's float32 output on every device (elsewhere than the CPU the composite applies torch's
    gelu after the GEMM)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 64, generator=g).to(device)
    w_packed, w_sum, w_scale = quantized_weight(64, 64, device)
    for form, approximate in FORMS.items():
        got = ops.int8_linear_dynamic.activation(x, w_packed, w_sum, w_scale, None, 64, form)
        y = ops.int8_linear_dynamic(x, w_packed, w_sum, w_scale, None, 64)
        assert_gelu_close(got.cpu().flatten(), y.cpu().flatten(), form)


def test_composite_kernel_equals_the_cpu_kernel():
    """int8_linear_dynamic's composite implementation (quantize_per_token, int8_linear, torch's gelu: what every
    device but the CPU runs), called on the CPU through the dispatcher: the CPU's fused kernel's values, bit for bit
    without an activation (the same integers and epilogue), and up to gelu's rounding with one."""
    g = torch.Generator().manual_seed(9)
    w_packed, w_sum, w_scale = quantized_weight(64, 40)
    bias = torch.randn(64, generator=g)
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for x in (torch.randn(3, 5, 40, generator=g), torch.randn(7, 40, generator=g).bfloat16()):
        args = (x, w_packed, w_sum, w_scale, bias, 64)
        assert_same(ops.int8_linear_dynamic.default.redispatch(composite, *args), ops.int8_linear_dynamic(*args))
        for form in FORMS:
            got = ops.int8_linear_dynamic.activation.redispatch(composite, *args, form)
            torch.testing.assert_close(got, ops.int8_linear_dynamic.activation(*args, form), rtol=1e-5, atol=1e-5)


def test_activation_argument_checks():
    w_packed, w_sum, w_scale = quantized_weight(8, 16)
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="int8_linear_dynamic: activation must be 'gelu' or 'gelu_tanh', got 'relu'"):
        ops.int8_linear_dynamic.activation(x, w_packed, w_sum, w_scale, None, 8, "relu")
    with pytest.raises(ValueError, match="dynamic_int8_linear: activation must be None, 'gelu' or 'gelu_tanh'"):
        F.dynamic_int8_linear(x, w_packed, w_sum, w_scale, out_features=8, activation="tanh")
    got = F.dynamic_int8_linear(x, w_packed, w_sum, w_scale, out_features=8, activation="gelu")
    assert_same(got, ops.int8_linear_dynamic.activation(x, w_packed, w_sum, w_scale, None, 8, "gelu"))


def test_opcheck_with_activation(device):
    w_packed, w_sum, w_scale = quantized_weight(64, 64, device)
    bias = torch.randn(64, device=device)
    for form in FORMS:
        op = ops.int8_linear_dynamic.activation
        torch.library.opcheck(op, (torch.randn(3, 5, 64, device=device), w_packed, w_sum, w_scale, bias, 64, form))
        torch.library.opcheck(op, (torch.randn(4, 64, device=device, dtype=torch.bfloat16), w_packed, w_sum, w_scale,
                                   None, 64, form))


# ---------------------------------------------------------------------------------------------------------------
# convert() fuses the GELU module into the layer


class Intermediate(nn.Module):
    """Hugging Face's BertIntermediate: dense, then the activation module."""

    def __init__(self, hidden, inner, act):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.intermediate_act_fn = act

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class Block(nn.Module):
    def __init__(self, hidden=48, inner=96, act=None):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.intermediate = Intermediate(hidden, inner, act if act is not None else nn.GELU())
        self.output = nn.Linear(inner, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.gelu_read_twice = nn.GELU()  # its input is read by another op too: not fused
        self.side = nn.Linear(hidden, hidden)

    def forward(self, x):
        x = self.norm(x)
        h = self.output(self.intermediate(x))
        s = self.side(x)
        return h + self.mlp(x) + self.gelu_read_twice(s) + s


def test_convert_fuses_gelu_modules_and_computes_the_same_function():
    torch.manual_seed(0)
    model = Block().eval()
    prepared = torchquant.prepare(copy.deepcopy(model), "int8-dynamic")
    converted = torchquant.convert(copy.deepcopy(prepared))
    assert converted.intermediate.dense.fused_activation == "gelu"
    assert converted.intermediate.dense.fused_activation_module == "intermediate.intermediate_act_fn"
    assert type(converted.intermediate.intermediate_act_fn) is nn.Identity
    assert converted.mlp[0].fused_activation == "gelu_tanh" and type(converted.mlp[1]) is nn.Identity
    assert converted.side.fused_activation is None and type(converted.gelu_read_twice) is nn.GELU
    assert converted.output.fused_activation is None
    assert "fused gelu (was intermediate.intermediate_act_fn)" in repr(converted.intermediate.dense)
    assert "fused" not in repr(converted.output)
    x = torch.randn(3, 11, 48)
    with torch.no_grad():
        fake = prepared(x)
        got = converted(x)
    # the fused model against the fake-quant one: the same quantized function, float rounding apart
    torch.testing.assert_close(got, fake, rtol=1e-4, atol=1e-4)
    # and against the same converted layers with the GELU modules run by torch
    with torch.no_grad():
        plain = copy.deepcopy(converted)
        plain.intermediate.dense.fused_activation = None
        plain.intermediate.intermediate_act_fn = nn.GELU()
        plain.mlp[0].fused_activation = None
        plain.mlp[1] = nn.GELU(approximate="tanh")
        torch.testing.assert_close(got, plain(x), rtol=1e-6, atol=1e-6)
    # convert is idempotent
    assert torchquant.convert(converted) is converted and converted.intermediate.dense.fused_activation == "gelu"


def test_only_int8_dynamic_layers_fuse():
    """Layers whose converted forward is not the int8-dynamic kernel keep their GELU module."""
    torch.manual_seed(0)
    model = torchquant.quantize_model(Block().eval(), "int8-static", [torch.randn(2, 5, 48) for _ in range(2)])
    assert all(getattr(m, "fused_activation", None) is None for m in model.modules())
    assert type(model.intermediate.intermediate_act_fn) is nn.GELU


@pytest.mark.parametrize("options", [{}, {"cpp_wrapper": True}], ids=["python_wrapper", "cpp_wrapper"])
def test_fused_gelu_under_torch_compile(options):
    """Fused and plain layers in one compiled graph; inductor's C++ wrapper passes the arguments its graph holds (an
    argument at its default would be left out: the activation is an overload's argument, not a defaulted one)."""
    torch.manual_seed(0)
    model = torchquant.quantize_model(Block().eval(), "int8-dynamic")
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        want = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, options=options)(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_save_and_load_fused_gelu(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    converted = torchquant.quantize_model(copy.deepcopy(model), "int8-dynamic")
    path = tmp_path / "block.safetensors"
    torchquant.save(converted, path)
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        want = converted(x)
        for target in (copy.deepcopy(model), Block().eval(), converted):  # float skeletons, the model itself
            loaded = torchquant.load(path, target)
            assert loaded.intermediate.dense.fused_activation == "gelu"
            assert type(loaded.intermediate.intermediate_act_fn) is nn.Identity
            assert type(loaded.mlp[1]) is nn.Identity and type(loaded.gelu_read_twice) is nn.GELU
            assert_same(loaded(x), want)
    # a skeleton with another activation there is refused, and left as it was
    other = Block(act=nn.ReLU()).eval()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="has the GELU 'intermediate.intermediate_act_fn' fused into "
                                         "'intermediate.dense', but the model does not pass .* a ReLU there"):
        torchquant.load(path, other)
    assert type(other.intermediate.intermediate_act_fn) is nn.ReLU and type(other.intermediate.dense) is nn.Linear
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("edit", [{"activation": None}, {"clamp": [0.0, None]}])
def test_load_refuses_a_fused_gelu_the_layer_cannot_compute_before_changing_the_model(tmp_path, edit):
    # (the check ran after the layers were installed: the model was left half-loaded, its GELU gone)
    from test_io import _rewrite
    torch.manual_seed(0)
    model = Block().eval()
    path = tmp_path / "block.safetensors"
    torchquant.save(torchquant.quantize_model(copy.deepcopy(model), "int8-dynamic"), path)
    bad = _rewrite(path, tmp_path / "bad.safetensors",
                   layout=lambda meta: meta["layers"]["intermediate.dense"].update(edit))
    with pytest.raises(ValueError, match="malformed torchquant metadata: layer 'intermediate.dense': a "
                                         "'fused_activation' needs 8-bit per-token dynamic activations"):
        torchquant.load(bad, model)
    assert type(model.intermediate.dense) is nn.Linear and type(model.intermediate.intermediate_act_fn) is nn.GELU


def test_hugging_face_bert_intermediate_fuses():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    prepared = torchquant.prepare(copy.deepcopy(model), "int8-dynamic")
    converted = torchquant.convert(copy.deepcopy(prepared))
    for layer in converted.encoder.layer:
        assert layer.intermediate.dense.fused_activation == "gelu"
        assert type(layer.intermediate.intermediate_act_fn) is nn.Identity
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = converted(input_ids=ids).last_hidden_state
        fake = prepared(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, fake, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("entry", [["relu", "intermediate.intermediate_act_fn"], ["gelu"], ["gelu", 3], "gelu"])
def test_malformed_fused_activation_is_refused(tmp_path, entry):
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    torch.manual_seed(0)
    path = tmp_path / "block.safetensors"
    torchquant.save(torchquant.quantize_model(Block().eval(), "int8-dynamic"), path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(metadata["torchquant"])
    assert meta["layers"]["intermediate.dense"]["fused_activation"] == ["gelu", "intermediate.intermediate_act_fn"]
    meta["layers"]["intermediate.dense"]["fused_activation"] = entry
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**metadata, "torchquant": json.dumps(meta)})
    model = Block().eval()
    with pytest.raises(ValueError, match=r"layer 'intermediate.dense': 'fused_activation' must be \[form, module"):
        torchquant.load(tmp_path / "bad.safetensors", model)
    assert type(model.intermediate.intermediate_act_fn) is nn.GELU and type(model.intermediate.dense) is nn.Linear


class _GeluFirst(nn.Module):
    """Intermediate's children, called in the other order: dense(gelu(x))."""

    def __init__(self, hidden=48, inner=96):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x):
        return self.dense(self.intermediate_act_fn(x))


class _GeluLater(nn.Module):
    """dense, an Identity where the checkpoint's GELU was, then a GELU of its own."""

    def __init__(self, hidden=48, inner=96):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.intermediate_act_fn = nn.Identity()
        self.post = nn.GELU()

    def forward(self, x):
        return self.post(self.intermediate_act_fn(self.dense(x)))


@pytest.mark.parametrize("skeleton", [_GeluFirst, _GeluLater])
def test_load_fuses_only_where_the_model_feeds_the_layer_to_its_gelu(tmp_path, skeleton):
    """A checkpoint's fused GELU is refused by a model with the same names whose forward does not pass the layer's
    output, and nothing else, to that GELU (it would compute another function, or the GELU twice)."""
    torch.manual_seed(0)
    converted = torchquant.quantize_model(Intermediate(48, 96, nn.GELU()).eval(), "int8-dynamic")
    assert converted.dense.fused_activation == "gelu"
    path = tmp_path / "intermediate.safetensors"
    torchquant.save(converted, path)
    with pytest.raises(ValueError, match="does not pass that layer's output, and nothing else, to a GELU"):
        torchquant.load(path, skeleton().eval())


def test_a_gelu_with_hooks_is_not_fused():
    torch.manual_seed(0)
    model = Intermediate(48, 96, nn.GELU()).eval()
    model.intermediate_act_fn.register_forward_hook(lambda module, args, out: out * 0)
    converted = torchquant.quantize_model(copy.deepcopy(model), "int8-dynamic")
    assert converted.dense.fused_activation is None and type(converted.intermediate_act_fn) is nn.GELU
    with torch.no_grad():
        assert not converted(torch.randn(2, 48)).any()


def _transformer(activation, seed=0, decoder=False):
    torch.manual_seed(seed)
    if decoder:
        return nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, activation=activation, batch_first=True).eval()
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=activation, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("activation, form", [("gelu", "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                              ("relu", None)], ids=["function", "module", "relu"])
def test_torch_transformer_layers_fuse_their_gelu(tmp_path, activation, form):
    # their forward calls `activation` (F.gelu for activation="gelu", or the module given) on linear1's output
    model = _transformer(activation)
    x = torch.randn(2, 7, 32)
    prepared = torchquant.prepare(copy.deepcopy(model), "int8-dynamic")
    converted = torchquant.convert(copy.deepcopy(prepared))
    for i, layer in enumerate(converted.layers):
        assert layer.linear1.fused_activation == form
        if form is not None:
            assert layer.linear1.fused_activation_module == f"layers.{i}.activation"
            assert type(layer.activation) is nn.Identity and "activation" not in layer.__dict__
    with torch.no_grad():
        got = converted(x)
        torch.testing.assert_close(got, prepared(x), rtol=1e-4, atol=1e-4)
        path = tmp_path / "encoder.safetensors"
        torchquant.save(converted, path)
        for target in (_transformer(activation, seed=1), converted):  # a float skeleton, the model itself
            loaded = torchquant.load(path, target)
            assert loaded.layers[1].linear1.fused_activation == form
            assert_same(loaded(x), got)
    decoder = torchquant.quantize_model(_transformer(activation, decoder=True), "int8-dynamic")
    assert decoder.linear1.fused_activation == form


def test_failed_load_puts_a_transformer_layers_activation_function_back(tmp_path):
    path = tmp_path / "encoder.safetensors"
    torchquant.save(torchquant.quantize_model(_transformer("gelu"), "int8-dynamic"), path)
    other = _transformer("gelu")
    other.layers[1].linear2 = nn.Linear(64, 16)  # another shape: refused after the plan is installed and checked
    with pytest.raises(ValueError, match="load: "):
        torchquant.load(path, other)
    for layer in other.layers:
        assert layer.activation is torch.nn.functional.gelu and "activation" not in layer._modules
        assert type(layer.linear1) is nn.Linear and type(layer.self_attn) is nn.MultiheadAttention
    # a checkpoint's GELU is refused where the skeleton's activation is another function
    relu = _transformer("relu")
    with pytest.raises(ValueError, match="has the GELU 'layers.0.activation' fused into 'layers.0.linear1', but the "
                                         "model does not pass .* the function relu there"):
        torchquant.load(path, relu)
    assert relu.layers[0].activation is torch.nn.functional.relu
    # or where it is a GELU of the other form (F.gelu, a builtin, named as a function too)
    tanh_path = tmp_path / "tanh.safetensors"
    torchquant.save(torchquant.quantize_model(_transformer(nn.GELU(approximate="tanh")), "int8-dynamic"), tanh_path)
    exact = _transformer("gelu")
    with pytest.raises(ValueError, match=r"\(it has the function gelu there\)"):
        torchquant.load(tanh_path, exact)
    assert exact.layers[0].activation is torch.nn.functional.gelu
