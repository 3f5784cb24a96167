"""torchquant.report and torchquant.budget from Python: per-layer measurements, the sensitivity budget and the
output formats, on small random models (the CLI tests cover the same code end to end on the digits CNN)."""
import json
import math

import pytest
import torch
from torch import nn

import torchquant
from torchquant import functional as F_q
from torchquant.nn import QuantConv2d, QuantLinear
from torchquant.budget import quantize_with_budget
from torchquant.report import build_report, state_bytes, to_markdown, write_json, write_markdown


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SmallNet().eval()


@pytest.fixture
def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 6, 6, generator=generator) for _ in range(3)]


def test_report_without_budget_matches_quantize_model(model, batches):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, decisions = quantize_with_budget(model, "int8-static", batches)
    assert decisions == {}
    expected = torchquant.quantize_model(model, "int8-static", calibration=batches, inplace=False)
    with torch.no_grad():
        torch.testing.assert_close(quantized(batches[0]), expected(batches[0]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model must be unchanged"
    assert type(model.conv) is nn.Conv2d

    report = build_report(model, quantized, "int8-static", calibration=batches, repeats=2)
    assert [layer.name for layer in report.layers] == ["conv", "head.1", "head.3"]
    for layer, float_layer, quant_layer in zip(report.layers, (model.conv, model.head[1], model.head[3]),
                                               (quantized.conv, quantized.head[1], quantized.head[3])):
        assert layer.quantized and layer.weight_bits == 8 and layer.activation == "uint8 static"
        dequantized = F_q.dequantize(quant_layer.qweight, quant_layer.weight_scale, 0, axis=0)  # 8-bit: unpacked
        error = F_q.quantization_error(float_layer.weight.detach(), dequantized)
        assert layer.weight_sqnr_db == pytest.approx(error["sqnr_db"])
        assert layer.weight_mse == pytest.approx(error["mse"]) and layer.weight_max_abs == error["max_abs"]
        assert 20 < layer.output_sqnr_db < 80
        assert layer.bytes_float == state_bytes(float_layer) and layer.bytes_quantized < layer.bytes_float
        assert layer.latency_float_s > 0 and layer.latency_quantized_s > 0 and layer.speedup > 0
    assert report.bytes_quantized < report.bytes_float and report.batch_shape == [4, 3, 6, 6]


def test_layer_output_sqnr_is_the_isolated_error(model, batches):
    """The head.3 figure compares head.3 quantized against head.3 float on the same (float) input."""
    quantized, _ = quantize_with_budget(model, "int8-dynamic", batches)
    captured = []
    handle = model.head[2].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    x = torch.cat(captured)
    with torch.no_grad():
        expected = F_q.quantization_error(model.head[3](x), quantized.head[3](x))["sqnr_db"]
    report = build_report(model, quantized, "int8-dynamic", calibration=batches, time_layers=False)
    assert report.layers[2].output_sqnr_db == pytest.approx(expected, rel=1e-6)
    assert report.layers[2].latency_float_s is None and report.latency_float_s is None


def test_layer_with_an_input_changing_pre_hook_is_measured_on_the_input_it_computes(model, batches):
    """A forward pre-hook that changes a layer's input runs once around the float layer and once around the quantized
    one (it moved with the layer): the measurement feeds both the input before the hook (it fed the quantized layer
    the float layer's hooked input, which the hook changed again), so the figure is the isolated error as without
    the hook."""
    expected = build_report(model, quantize_with_budget(model, "int8-dynamic", batches)[0], "int8-dynamic",
                            calibration=batches, time_layers=False).layers[2].output_sqnr_db
    model.head[3].register_forward_pre_hook(lambda m, args: (args[0] * 4 + 3,))
    quantized, _ = quantize_with_budget(model, "int8-dynamic", batches)
    captured = []
    handle = model.head[3].register_forward_pre_hook(lambda m, args: captured.append(args[0]), prepend=True)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    x = torch.cat(captured)  # the input before the hook
    with torch.no_grad():
        want = F_q.quantization_error(model.head[3](x), quantized.head[3](x))["sqnr_db"]
    report = build_report(model, quantized, "int8-dynamic", calibration=batches, repeats=1)
    assert report.layers[2].output_sqnr_db == pytest.approx(want, rel=1e-6)
    assert abs(want - expected) < 6 and report.layers[2].latency_quantized_s > 0


def test_budget_falls_back_to_8_bits_then_float(model, batches):
    # 4-bit weights cannot reach 40 dB, 8-bit ones can: every layer moves to 8 bits
    quantized, decisions = quantize_with_budget(model, "w4a8-dynamic", batches, min_sqnr=40)
    assert set(decisions) == {"conv", "head.1", "head.3"}
    assert all(why.startswith("8-bit weights: output SQNR") for why in decisions.values())
    assert all(m.config.weight.bits == 8 for m in quantized.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    # nothing reaches 200 dB: every layer stays float, and says why at both widths
    quantized, decisions = quantize_with_budget(model, "w4a8-dynamic", batches, min_sqnr=200)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in (quantized.conv, quantized.head[1], quantized.head[3]))
    assert all("at 4 bits" in why and "at 8 bits" in why for why in decisions.values())
    report = build_report(model, quantized, "w4a8-dynamic", calibration=batches, decisions=decisions,
                          min_sqnr=200, time_layers=False)
    assert report.bytes_quantized == report.bytes_float
    assert all(not layer.quantized and layer.note == decisions[layer.name] for layer in report.layers)
    assert "3 layer(s) changed" in report.format_table()
    markdown = to_markdown(report)  # each layer's reason an item of a nested list
    assert "- budget (output SQNR >= 200 dB): 3 layer(s) changed\n  - conv: " in markdown
    assert "\n  - head.1: " in markdown and "\n  - head.3: " in markdown


def test_speedup_budget_keeps_slow_layers_float(model, batches):
    quantized, decisions = quantize_with_budget(model, "int8-dynamic", batches, min_speedup=1e6, repeats=1)
    assert set(decisions) == {"conv", "head.1", "head.3"}
    assert all(why.startswith("kept float: speed-up") for why in decisions.values())
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in quantized.modules())


def test_skipped_layers_and_evaluation(model, batches):
    config = torchquant.QuantConfig.preset("int8-dynamic").with_skip(["head.3"])
    quantized, _ = quantize_with_budget(model, config, batches)
    labels = [torch.arange(4) % 5 for _ in batches]
    report = build_report(model, quantized, config, evaluation=(batches, labels), time_layers=False)
    assert report.layers[2].note == "kept float (skip rule)" and not report.layers[2].quantized
    assert report.eval_metric == "accuracy" and report.eval_samples == 12
    assert report.output_sqnr_db is not None  # measured on the evaluation inputs when no calibration is given
    agreement = build_report(model, quantized, config, evaluation=(batches, None), time_layers=False)
    assert agreement.eval_metric == "agreement" and 0 <= agreement.eval_quantized <= 100


def test_agreement_of_dense_predictions_counts_classes_along_dim_1():
    # a segmentation-style model: [N, classes, H, W] outputs, one prediction per pixel
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()
    batches = [torch.randn(2, 3, 6, 7) for _ in range(2)]
    quantized, _ = quantize_with_budget(model, "int8-static", batches)
    report = build_report(model, quantized, "int8-static", calibration=batches, evaluation=(batches, None),
                          time_layers=False)
    assert report.eval_class_dim == 1 and report.eval_samples == 2 * 2 * 6 * 7
    want = sum((model(b).argmax(1) == quantized(b).argmax(1)).sum().item() for b in batches) / (2 * 2 * 6 * 7)
    assert report.eval_quantized == pytest.approx(100 * want)
    assert "top-1 agreement with float (classes along dim 1) on 168 predictions" in report.format_table()
    with pytest.raises(ValueError, match=r"evaluation labels of shape \[2\] do not match the predictions of "
                                         r"outputs of shape \[2, 5, 6, 7\] \(classes along dim 1: predictions of "
                                         r"shape \[2, 6, 7\]\)"):
        build_report(model, quantized, "int8-static", evaluation=(batches, [torch.zeros(2, dtype=torch.long)] * 2),
                     time_layers=False)


def test_models_of_several_inputs_are_measured_on_tuple_batches():
    # calibration unpacks a tuple batch into positional inputs; the budget's and the report's measurements passed
    # the tuple as the one input
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(6, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    torch.manual_seed(0)
    model = TwoInputs().eval()
    batches = [(torch.randn(3, 8), torch.randn(3, 6)) for _ in range(2)]
    quantized, decisions = quantize_with_budget(model, "int8-static", batches, min_sqnr=10, min_speedup=1e-6,
                                                repeats=1)
    assert decisions == {} and isinstance(quantized.a, QuantLinear) and isinstance(quantized.b, QuantLinear)
    report = build_report(model, quantized, "int8-static", calibration=batches, evaluation=(batches, None),
                          repeats=1)
    want = F_q.quantization_error(torch.cat([model(*b) for b in batches]),
                                  torch.cat([quantized(*b) for b in batches]))["sqnr_db"]
    assert report.output_sqnr_db == pytest.approx(want, rel=1e-6) and report.batch_shape == [3, 8]
    assert report.latency_quantized_s > 0 and report.eval_samples == 6


def test_outputs(model, batches, tmp_path):
    quantized, _ = quantize_with_budget(model, "int8-dynamic")
    report = build_report(model, quantized, "int8-dynamic")  # no data: weights and sizes only
    assert report.layers[0].output_sqnr_db is None and "not measured" in report.format_table()
    write_json(report, str(tmp_path / "r.json"))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["layers"][0]["speedup"] is None and data["config"]["weight"]["bits"] == 8
    report.layers[0].output_sqnr_db = math.inf  # an exact layer: JSON has no infinity, so it becomes null
    assert report.to_dict()["layers"][0]["output_sqnr_db"] is None
    markdown = to_markdown(report)
    assert "| conv | Conv2d | 8x3x3x3 | 8 |" in markdown
    note = write_markdown(report, str(tmp_path / "r.md"))
    assert (tmp_path / "r.md").read_text().startswith("# torchquant quantization report")
    assert note == "" or "matplotlib" in note


def test_bad_arguments(model, batches):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_with_budget("model", "int8-dynamic", batches)
    with pytest.raises(ValueError, match="min_speedup must be positive"):
        quantize_with_budget(model, "int8-dynamic", batches, min_speedup=0)
    with pytest.raises(TypeError, match="min_sqnr must be a number"):
        quantize_with_budget(model, "int8-dynamic", batches, min_sqnr="30")
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize_with_budget(model, "int8-dynamic", None, min_sqnr=30)
    with pytest.raises(ValueError, match="fallback_bits"):
        quantize_with_budget(model, "w4a8-dynamic", batches, min_sqnr=30, fallback_bits=9)
    for repeats in (0, -1, 2.5):  # (0 failed inside the timing's median, 2.5 in range())
        with pytest.raises(ValueError, match=rf"quantize_with_budget: repeats must be a positive int, got {repeats}"):
            quantize_with_budget(model, "int8-dynamic", batches, min_speedup=0.5, repeats=repeats)
    with pytest.raises(ValueError, match="unknown preset"):
        quantize_with_budget(model, "int3", batches)
    with pytest.raises(TypeError, match="must be nn.Modules"):
        build_report(model, None)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        build_report(model, model, repeats=0)


def test_layers_without_a_quantized_type_are_named():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.gru = nn.GRU(8, 8, batch_first=True)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.up = nn.ConvTranspose1d(8, 8, 2)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            x, _ = self.gru(self.emb(tokens))
            x = self.attn(x, x, x, need_weights=False)[0]
            x = self.up(x.transpose(1, 2)).transpose(1, 2)
            return self.head(self.norm(x))

    model = Mixed().eval()
    tokens = torch.randint(0, 10, (2, 5))
    quantized = torchquant.quantize_model(model, "int8-dynamic", inplace=False)
    report = build_report(model, quantized, calibration=[tokens], time_layers=False)
    # the attention's projections are layers of their own, quantized
    names = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"]
    assert [layer.name for layer in report.layers] == names and all(layer.quantized for layer in report.layers)
    assert type(model.attn) is nn.MultiheadAttention  # (the float model as it was)
    line = "kept float, no quantized layer type for them: gru (GRU), up (ConvTranspose1d)"
    model.class_token = nn.Parameter(torch.zeros(1, 1, 8))  # not a weight matrix: not named
    report = build_report(model, quantized, calibration=[tokens], time_layers=False)
    assert line in report.notes and line in report.format_table()


@pytest.mark.parametrize("threads, load, warned", [(2, 5.0, True), (2, 0.5, False), (1, 5.0, False)])
def test_busy_machine_is_named_beside_multithreaded_wall_times(model, batches, monkeypatch, threads, load, warned):
    """Wall times of several torch threads on a machine whose load average exceeds its cores are mostly waits for a
    core (a small model read 80x slower): the report says so and names --threads 1; one thread's CPU time needs no
    warning."""
    import os
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    quantized, _ = quantize_with_budget(model, "int8-dynamic", batches)
    with torchquant.timing.num_threads(threads):
        report = build_report(model, quantized, "int8-dynamic", calibration=batches, repeats=1)
    note = f"the machine was busy while timing (load average {load:.1f} on 2 cores, 2 torch threads): wall times "
    assert any(line.startswith(note) and line.endswith("--threads 1 measures the thread's CPU time instead")
               for line in report.summary_lines()) == warned
    assert (note in json.dumps(report.to_dict())) == warned


@pytest.mark.parametrize("threads, clock", [(1, "thread CPU time"), (2, "wall time")])
def test_latencies_are_thread_cpu_time_on_one_thread(model, batches, monkeypatch, threads, clock):
    """On one CPU thread the latencies leave out the time spent waiting for a core (a loaded machine made a
    0.3 ms layer read 24 ms); the summary and the JSON say which clock measured them."""
    import time
    calls = []
    thread_time = time.thread_time
    monkeypatch.setattr(time, "thread_time", lambda: calls.append(1) or thread_time())
    quantized, _ = quantize_with_budget(model, "int8-dynamic", batches)
    with torchquant.timing.num_threads(threads):
        report = build_report(model, quantized, "int8-dynamic", calibration=batches, repeats=1)
    assert report.latency_clock == clock and bool(calls) == (threads == 1)
    assert any(line.startswith("latency (batch 4x3x6x6, " + clock + "): ") for line in report.summary_lines())
    assert report.to_dict()["latency_clock"] == clock
    assert all(layer.latency_quantized_s > 0 for layer in report.layers)
