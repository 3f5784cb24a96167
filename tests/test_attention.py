"""QuantMultiheadAttention: nn.MultiheadAttention with its projections as QuantLinear layers.

Oracles: its float form (from_float) against nn.MultiheadAttention itself over every argument and mask form, values
and gradients; the converted model against the prepared (fake-quant) one; checkpoints, reports, ONNX and compile
against the eager converted model."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn

import torchquant as tq
from torchquant import QuantConfig
from torchquant.nn import QuantLinear, QuantMultiheadAttention
from torchquant.nn.attention import PROJECTIONS

from test_nn import exact_float_reference  # noqa: F401  (autouse fixture)


def _attention(seed=0, embed_dim=12, num_heads=3, **kwargs):
    torch.manual_seed(seed)
    attention = nn.MultiheadAttention(embed_dim, num_heads, **kwargs)
    with torch.no_grad():  # (zero-initialised by default: make them count)
        if attention.in_proj_bias is not None:
            attention.in_proj_bias.normal_()
            attention.out_proj.bias.normal_()
        if attention.bias_k is not None:
            attention.bias_k.normal_()
            attention.bias_v.normal_()
    return attention


def _inputs(attention, n=3, length=5, source=7, seed=1):
    g = torch.Generator().manual_seed(seed)

    def sequence(batch, steps, features):
        shape = (batch, steps, features) if attention.batch_first else (steps, batch, features)
        return torch.randn(shape, generator=g)

    return (sequence(n, length, attention.embed_dim), sequence(n, source, attention.kdim),
            sequence(n, source, attention.vdim))


def _masks(attention, n=3, length=5, source=7, seed=2):
    """(key_padding_mask, attn_mask) pairs of every form nn.MultiheadAttention takes (mask types alike)."""
    g = torch.Generator().manual_seed(seed)
    padding = torch.rand(n, source, generator=g) < 0.3
    padding[:, 0] = False  # (a fully masked row is NaN in both)
    allowed = torch.rand(length, source, generator=g) < 0.3
    allowed[:, 0] = False
    per_head = torch.randn(n * attention.num_heads, length, source, generator=g)
    return [(None, None), (padding, None), (None, allowed), (padding, allowed),
            (padding.float() * -3.0, None), (None, per_head), (padding.float() * -3.0, per_head),
            (None, allowed.float() * -1e4)]


SETTINGS = [dict(), dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
            dict(kdim=5, vdim=4), dict(kdim=5, vdim=4, batch_first=True, add_bias_kv=True, add_zero_attn=True),
            dict(num_heads=1), dict(num_heads=12)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_float_form_computes_nn_multihead_attention(settings):
    attention = _attention(**settings).eval()
    layers = QuantMultiheadAttention.from_float(attention)
    assert all(type(getattr(layers, name)) is nn.Linear for name in PROJECTIONS)
    query, key, value = _inputs(attention)
    for (padding, mask), need_weights, average in itertools.product(_masks(attention), (True, False), (True, False)):
        kwargs = dict(key_padding_mask=padding, attn_mask=mask, need_weights=need_weights,
                      average_attn_weights=average)
        want, got = attention(query, key, value, **kwargs), layers(query, key, value, **kwargs)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert (got[1] is None) == (want[1] is None) == (not need_weights)
        if need_weights:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_float_form_unbatched_causal_and_cross_attention():
    attention = _attention(embed_dim=16, num_heads=4).eval()
    layers = QuantMultiheadAttention.from_float(attention)
    x = torch.randn(6, 16)
    for got, want in zip(layers(x, x, x), attention(x, x, x)):  # unbatched: [length, features]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    x, memory = torch.randn(6, 2, 16), torch.randn(9, 2, 16)
    torch.testing.assert_close(layers(x, memory, memory)[0], attention(x, memory, memory)[0], rtol=1e-5, atol=1e-5)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    for need_weights, key_padding_mask in itertools.product((True, False), (None, padding)):
        kwargs = dict(attn_mask=causal, is_causal=True, need_weights=need_weights, key_padding_mask=key_padding_mask)
        torch.testing.assert_close(layers(x, x, x, **kwargs)[0], attention(x, x, x, **kwargs)[0],
                                   rtol=1e-5, atol=1e-5)


def test_float_form_trains_like_nn_multihead_attention():
    # gradients of the inputs, and of the projections against the packed weight they were split from
    attention = _attention(add_bias_kv=True, dropout=0.0).train()
    layers = QuantMultiheadAttention.from_float(attention)
    for need_weights in (True, False):
        query, key, value = (t.requires_grad_() for t in _inputs(attention))
        out, _ = attention(query, key, value, need_weights=need_weights)
        grads = torch.autograd.grad(out.square().sum(), (query, key, value, attention.in_proj_weight,
                                                         attention.bias_k, attention.out_proj.weight))
        out, _ = layers(query, key, value, need_weights=need_weights)
        got = torch.autograd.grad(out.square().sum(), (query, key, value, layers.q_proj.weight, layers.k_proj.weight,
                                                       layers.v_proj.weight, layers.bias_k, layers.out_proj.weight))
        for g, want in zip(got[:3], grads[:3]):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.cat(got[3:6]), grads[3], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[6], grads[4], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[7], grads[5], rtol=1e-4, atol=1e-5)


def test_dropout_in_training_draws_as_nn_multihead_attention():
    attention = _attention(dropout=0.5).train()
    layers = QuantMultiheadAttention.from_float(attention)
    query, key, value = _inputs(attention)
    for need_weights in (True, False):
        torch.manual_seed(5)
        want = attention(query, key, value, need_weights=need_weights)
        torch.manual_seed(5)
        got = layers(query, key, value, need_weights=need_weights)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        if need_weights:  # (the weights returned are those the values were summed with, dropped out)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    layers.eval()
    assert torch.equal(layers(query, key, value)[0], layers(query, key, value)[0])


def test_constructed_layer_is_initialised_like_nn_multihead_attention():
    torch.manual_seed(3)
    want = nn.MultiheadAttention(16, 4, kdim=8, batch_first=True)
    torch.manual_seed(3)
    layer = QuantMultiheadAttention(16, 4, kdim=8, batch_first=True, config="int8-static")
    assert all(type(getattr(layer, name)) is QuantLinear for name in PROJECTIONS)
    assert layer.q_proj.config == QuantConfig.preset("int8-static")
    for name, weight in zip(PROJECTIONS[:3], (want.q_proj_weight, want.k_proj_weight, want.v_proj_weight)):
        assert torch.equal(getattr(layer, name).weight, weight)
    assert torch.equal(layer.out_proj.weight, want.out_proj.weight)
    assert layer.k_proj.in_features == 8 and layer.batch_first and layer.head_dim == 4
    with pytest.raises(AssertionError, match="divisible"):  # (nn.MultiheadAttention's own check)
        QuantMultiheadAttention(10, 3)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x, padding=None):
        y, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        return self.head(self.norm(x + y))


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static", "w4a8-dynamic"])
def test_converted_attention_computes_the_prepared_one(preset):
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(4, 6, 16)
    prepared = tq.calibrate(tq.prepare(copy.deepcopy(model), preset), [x], progress=False)
    assert type(prepared.attn) is QuantMultiheadAttention
    assert all(type(getattr(prepared.attn, name)) is QuantLinear for name in PROJECTIONS)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[2, 3:] = True
    with torch.no_grad():
        fake = [prepared(x), prepared(x, padding)]
        converted = tq.convert(prepared)
        assert all(getattr(converted.attn, name).converted for name in PROJECTIONS)
        for got, want in zip([converted(x), converted(x, padding)], fake):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        error = tq.functional.quantization_error(model(x), converted(x))
    assert error["sqnr_db"] > (20 if preset.startswith("w4") else 30)


class CrossAttention(nn.Module):
    """Cross-attention of other key / value sizes with every extra (bias_k / bias_v, a zero key, masks) that returns
    the attention weights too."""

    def __init__(self):
        super().__init__()
        self.attn = _attention(kdim=5, vdim=4, batch_first=True, add_bias_kv=True, add_zero_attn=True)

    def forward(self, query, key, value, padding, allowed):
        return self.attn(query, key, value, key_padding_mask=padding, attn_mask=allowed)


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
def test_on_every_device(device, preset):
    """Self- and cross-attention quantized on the device of their inputs: the converted model computes the prepared
    one there, on the inputs' device, and the CPU's values up to float rounding."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[2, 3:] = True
    attention = CrossAttention().eval()
    cross = [*_inputs(attention.attn, n=4, length=6, source=7)]
    cross += [_masks(attention.attn, n=4, length=6, source=7)[3][0], _masks(attention.attn, n=4, length=6,
                                                                            source=7)[3][1]]
    results = {}
    for where in ("cpu", device):
        for name, model, args in (("self", Encoder().eval(), (x, padding)), ("cross", attention, cross)):
            torch.manual_seed(0)
            model = copy.deepcopy(model).to(where)
            args = [a.to(where) for a in args]
            prepared = tq.calibrate(tq.prepare(model, preset), [tuple(args)], progress=False)
            with torch.no_grad():
                fake = prepared(*args)
                converted = tq.convert(prepared)
                got = converted(*args)
            for g, f in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, fake))):
                assert g.device.type == torch.device(where).type
                torch.testing.assert_close(g, f, rtol=1e-4, atol=1e-4)
            results[where, name] = got
    for name in ("self", "cross"):  # (float steps round otherwise there: a dynamic scale may move a value a step)
        for g, c in zip(*(t if isinstance(t, tuple) else (t,) for t in (results[device, name], results["cpu", name]))):
            assert tq.functional.quantization_error(c, g.cpu())["sqnr_db"] > 35


def test_skip_rules_and_shared_attention():
    torch.manual_seed(0)
    model = Encoder()
    config = QuantConfig.preset("int8-dynamic")
    tq.prepare(model, config.with_skip(["attn.out_proj"]))
    assert type(model.attn) is QuantMultiheadAttention and type(model.attn.out_proj) is nn.Linear
    assert type(model.attn.q_proj) is QuantLinear
    kept = Encoder()
    tq.prepare(kept, config.with_skip([nn.MultiheadAttention]))
    assert type(kept.attn) is nn.MultiheadAttention
    # an attention none of whose projections is quantized stays as it is (torch's fused path and all)
    kept = Encoder()
    tq.prepare(kept, config.with_skip([f"attn.{name}" for name in PROJECTIONS]))
    assert type(kept.attn) is nn.MultiheadAttention
    shared = nn.MultiheadAttention(8, 2)
    pair = nn.ModuleDict({"a": shared, "b": shared})
    with pytest.warns(UserWarning, match="skip rules match b.q_proj, but b is the same attention as a, whose "
                                         "projections are quantized as that name's rules say"):
        tq.prepare(pair, config.with_skip(["b.q_proj"]))
    assert pair["a"] is pair["b"] and type(pair["a"]) is QuantMultiheadAttention
    assert type(pair["b"].q_proj) is QuantLinear
    with pytest.raises(TypeError, match="model is itself a MultiheadAttention; wrap it in a container .* or use "
                                        "QuantMultiheadAttention.from_float"):
        tq.prepare(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="model is itself a MultiheadAttention"):
        tq.quantize_model(nn.MultiheadAttention(8, 2), "int8-pipeline", calibration=[torch.randn(2, 3, 8)])


def test_hooks_and_training_mode_carry_over():
    attention = _attention().eval()
    calls = []
    handle = attention.register_forward_hook(lambda module, args, out: calls.append(type(module)))
    model = nn.ModuleDict({"attn": attention})
    tq.prepare(model)
    query, key, value = _inputs(attention)
    model["attn"](query, key, value)
    assert calls == [QuantMultiheadAttention] and not model["attn"].training
    handle.remove()
    model["attn"](query, key, value)
    assert len(calls) == 1


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_layers_quantize_their_attention(norm_first):
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                                               norm_first=norm_first), 2).eval()
    decoder = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, norm_first=norm_first).eval()
    x, padding = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    target, memory = torch.randn(4, 2, 16), torch.randn(6, 2, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with torch.no_grad():
        want = [encoder(x), encoder(x, src_key_padding_mask=padding), decoder(target, memory, tgt_mask=causal,
                                                                               tgt_is_causal=True)]
        q_encoder = tq.quantize_model(copy.deepcopy(encoder), "int8-dynamic")
        q_decoder = tq.quantize_model(copy.deepcopy(decoder), "int8-dynamic")
        assert type(q_encoder.layers[1].self_attn) is QuantMultiheadAttention
        assert type(q_decoder.self_attn) is type(q_decoder.multihead_attn) is QuantMultiheadAttention
        got = [q_encoder(x), q_encoder(x, src_key_padding_mask=padding),
               q_decoder(target, memory, tgt_mask=causal, tgt_is_causal=True)]
    got[1], want[1] = got[1][~padding], want[1][~padding]  # (padded positions' outputs: no meaning)
    for g, w in zip(got, want):
        assert tq.functional.quantization_error(w, g)["sqnr_db"] > 30


@pytest.mark.parametrize("preset", ["int8-dynamic", "int8-static"])
def test_checkpoints_round_trip(tmp_path, preset):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 16)
    converted = tq.quantize_model(Encoder().eval(), preset, calibration=[x])
    path = tmp_path / "attention.safetensors"
    tq.save(converted, path)
    torch.manual_seed(1)  # another float model of the architecture
    loaded = tq.load(path, Encoder().eval())
    assert type(loaded.attn) is QuantMultiheadAttention and loaded.attn.q_proj.converted
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    prepared = tq.calibrate(tq.prepare(Encoder(), preset), [x], progress=False)
    tq.save(prepared, path)
    loaded = tq.load(path, Encoder())
    with torch.no_grad():
        assert torch.equal(loaded(x), prepared(x))
    # skipped projections stay nn.Linear in the loaded model too
    kept_float = tq.quantize_model(Encoder().eval(), QuantConfig.preset(preset).with_skip(["attn.v_proj"]),
                                   calibration=[x])
    tq.save(kept_float, path)
    loaded = tq.load(path, Encoder().eval())
    assert type(loaded.attn.v_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(x), kept_float(x))


def test_failed_loads_leave_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "attention.safetensors"
    tq.save(tq.quantize_model(Encoder().eval(), "int8-dynamic"), path)
    model = Encoder()
    model.attn = nn.MultiheadAttention(16, 2, batch_first=True, kdim=8)  # other projection shapes
    with pytest.raises(ValueError, match="load: "):
        tq.load(path, model)
    assert type(model.attn) is nn.MultiheadAttention

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 3)

    other = Other()
    with pytest.raises(ValueError, match="has an attention 'attn' with its projections as layers, but the model has "
                                         "a Linear there"):
        tq.load(path, other)
    assert type(other.attn) is nn.Linear and type(other.head) is nn.Linear


@pytest.mark.parametrize("batch_first", [True, False])
def test_empty_batches_and_sequences(batch_first):
    attention = _attention(batch_first=batch_first, kdim=5, vdim=4).eval()
    layers = QuantMultiheadAttention.from_float(attention)
    converted = tq.quantize_model(nn.ModuleDict({"attn": copy.deepcopy(attention)}), "int8-dynamic")["attn"]
    for n, length, source in ((0, 5, 7), (3, 0, 7), (3, 5, 0)):
        query, key, value = _inputs(attention, n, length, source)
        for need_weights in (True, False):
            want = attention(query, key, value, need_weights=need_weights)
            got = layers(query, key, value, need_weights=need_weights)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5, equal_nan=True)
            if need_weights:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6, equal_nan=True)
            quantized = converted(query, key, value, need_weights=need_weights)
            assert quantized[0].shape == want[0].shape and (not need_weights or quantized[1].shape == want[1].shape)


def test_report_of_an_encoder_with_nested_tensors_and_padding():
    # the float model's attention, put in the form of the quantized one for the report, turns torch's fused paths
    # off (nn.TransformerEncoder's nested-tensor path reads a packed in_proj_weight)
    from torchquant.report import build_report

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            padding = torch.zeros(x.shape[:2], dtype=torch.bool)
            padding[:, -1] = True
            return self.head(self.encoder(x, src_key_padding_mask=padding))

    torch.manual_seed(0)
    model = Padded().eval()
    x = torch.randn(2, 5, 16)
    quantized = tq.quantize_model(model, "int8-dynamic", inplace=False)
    report = build_report(model, quantized, calibration=[x], time_layers=False)
    assert len(report.layers) == 2 * 6 + 1 and all(row.quantized for row in report.layers)
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention and model.encoder.use_nested_tensor
    assert not model.encoder.layers[0]._forward_pre_hooks


def test_report_measures_the_projections():
    from torchquant.report import build_report
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 6, 16)
    quantized = tq.quantize_model(model, "int8-static", calibration=[x], inplace=False)
    report = build_report(model, quantized, calibration=[x], time_layers=False)
    rows = {row.name: row for row in report.layers}
    assert list(rows) == [f"attn.{name}" for name in PROJECTIONS] + ["head"]
    assert all(row.quantized and row.output_sqnr_db > 30 and row.weight_sqnr_db > 30 for row in rows.values())
    assert rows["attn.q_proj"].shape == [16, 16] and type(model.attn) is nn.MultiheadAttention


def test_budget_keeps_a_projection_float_by_name():
    from torchquant.budget import quantize_with_budget
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 6, 16)
    names = {f"attn.{name}" for name in PROJECTIONS} | {"head"}
    # 4-bit weights miss 30 dB: each projection measured and moved to 8 bits by its name
    quantized, decisions = quantize_with_budget(model, "w4a8-dynamic", [x], min_sqnr=30.0)
    assert set(decisions) == names and type(model.attn) is nn.MultiheadAttention
    assert all(getattr(quantized.attn, name).config.weight.bits == 8 for name in PROJECTIONS)
    # nothing meets 200 dB: all float, and the attention none of whose projections is quantized stays as it was
    quantized, decisions = quantize_with_budget(model, "w4a8-dynamic", [x], min_sqnr=200.0)
    assert set(decisions) == names and type(quantized.attn) is nn.MultiheadAttention


def test_compiled_with_free_sizes_and_exported():
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func
    torch.manual_seed(0)
    model = tq.quantize_model(Encoder().eval(), "int8-dynamic")
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, backend=aot_autograd(fw_compiler=keep_graph))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for shape in [(2, 3, 16), (5, 7, 16), (3, 2, 16), (2, 33, 16)]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("int8_linear_dynamic" in t for t in targets) == 5, targets
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_integer_pipeline_with_attention(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(),
                          nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), nn.Linear(16, 3))
    model.eval()
    x = torch.randn(3, 5, 16)
    pipeline = tq.quantize_model(model, "int8-pipeline", calibration=[x], inplace=False)
    attention = [m for m in pipeline.modules() if isinstance(m, QuantMultiheadAttention)]
    assert len(attention) == 1 and all(getattr(attention[0], name).converted for name in PROJECTIONS)
    with torch.no_grad():
        assert tq.functional.quantization_error(model(x), pipeline(x))["sqnr_db"] > 25
        tq.save(pipeline, tmp_path / "pipeline.safetensors")
        loaded = tq.load(tmp_path / "pipeline.safetensors", copy.deepcopy(model))
        assert torch.equal(loaded(x), pipeline(x))


@pytest.mark.parametrize("call, error, match", [
    (lambda a, x: a(x[0], x, x), ValueError, "key and value must be 2-D like query"),
    (lambda a, x: a(x[..., :8], x, x), ValueError, "query must have 16 features"),
    (lambda a, x: a(x, x[:, :2], x), ValueError, "one batch size and key and value one length"),
    (lambda a, x: a(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[3, 5\]"),
    (lambda a, x: a(x, x, x, attn_mask=torch.zeros(4, 5)), ValueError, r"attn_mask must have shape \[5, 5\] or "
                                                                        r"\[12, 5, 5\]"),
    (lambda a, x: a(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64)), TypeError,
     "attn_mask must be a bool or float tensor"),
    (lambda a, x: a(x, x, x, is_causal=True), RuntimeError, "is_causal is a hint that attn_mask is the causal mask"),
    (lambda a, x: a(x.unsqueeze(0), x, x), ValueError, "query must be 3-D"),
    (lambda a, x: a(x, x.tolist(), x), TypeError, "key must be a tensor, got list"),
])
def test_bad_inputs(call, error, match):
    attention = QuantMultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 5, 16)
    with pytest.raises(error, match=match):
        call(attention, x)


def test_from_float_takes_only_nn_multihead_attention():
    class Subclass(nn.MultiheadAttention):
        pass

    with pytest.raises(TypeError, match="must be an nn.MultiheadAttention, got Subclass"):
        QuantMultiheadAttention.from_float(Subclass(8, 2))
    model = nn.Sequential(Subclass(8, 2))  # (exact types only, as for Linear)
    tq.prepare(model)
    assert type(model[0]) is Subclass


@pytest.mark.parametrize("settings", [dict(), dict(kdim=5, vdim=4), dict(bias=False, add_bias_kv=True)],
                         ids=["packed", "separate", "no-bias"])
def test_a_float_checkpoint_loads_into_the_prepared_model(settings):
    attention = _attention(**settings).eval()
    float_state = copy.deepcopy(nn.ModuleDict({"attn": attention}).state_dict())
    prepared = tq.prepare(nn.ModuleDict({"attn": _attention(seed=1, **settings).eval()}), "int8-dynamic")
    assert prepared.load_state_dict(float_state).missing_keys == []
    loaded, want = prepared["attn"], QuantMultiheadAttention.from_float(attention)
    assert loaded.state_dict().keys() == want.state_dict().keys()
    for key, expected in want.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], expected), key
    query, key, value = _inputs(attention)
    with torch.no_grad():
        error = tq.functional.quantization_error(attention(query, key, value)[0], loaded(query, key, value)[0])
    assert error["sqnr_db"] > 30
    if "kdim" not in settings:  # a packed weight of another shape is reported by the load
        with pytest.raises(RuntimeError, match="in_proj_weight"):
            prepared.load_state_dict(dict(float_state, **{"attn.in_proj_weight": torch.zeros(5, 12)}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models(dtype):
    # a half model's attention: float form against nn.MultiheadAttention in that dtype, converted against prepared
    torch.manual_seed(0)
    model = Encoder().eval().to(dtype)
    x = torch.randn(3, 6, 16, dtype=dtype)
    layers = QuantMultiheadAttention.from_float(model.attn)
    with torch.no_grad():
        want, got = model.attn(x, x, x), layers(x, x, x)
        rounding = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got[0], want[0], **rounding)
        torch.testing.assert_close(got[1], want[1], **rounding)
        prepared = tq.prepare(copy.deepcopy(model), "int8-dynamic")
        fake = prepared(x)
        converted = tq.convert(prepared)(x)
    assert converted.dtype == dtype and prepared.attn.q_proj.converted
    # (the fake-quant products round in the half dtype, the kernels sum in int32 and scale in float32)
    torch.testing.assert_close(converted.float(), fake.float(), rtol=2e-2, atol=2e-2)
    assert tq.functional.quantization_error(model(x).float(), converted.float())["sqnr_db"] > 25
