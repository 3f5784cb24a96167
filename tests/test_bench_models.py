"""The model-benchmark building blocks (benchmarks/models.py) on small inputs: network shapes, that quantizing
copies leave the float model alone, the torch.ao baselines, table formatting and bad arguments. No timing."""
import warnings

import pytest
import torch

from benchmarks import models


@pytest.mark.parametrize("block, channels", [("basic", 512), ("bottleneck", 2048)])
def test_resnet_stages_go_from_56_to_7(block, channels):
    net = models.resnet_stages(block)
    with torch.no_grad():
        y = net(torch.randn(1, 64, 56, 56))
    assert y.shape == (1, channels, 7, 7)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == (11 if block == "basic" else 16)


def test_resnet_stages_rejects_unknown_block():
    with pytest.raises(ValueError, match="block must be 'basic' or 'bottleneck'"):
        models.resnet_stages("dense")


@pytest.mark.slow  # torch.ao's FX prepare alone takes ~10 s on the shared 2-core machine
def test_quantized_copies_leave_the_float_model_untouched_and_stay_close():
    torch.manual_seed(0)
    net = models.resnet_stages("basic")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calibration = [torch.randn(1, 64, 16, 16).relu()]  # any size works; small keeps it fast
    variants = {models.FLOAT: net,
                "torchquant int8-static": models.torchquant_quantized(net, "int8-static", calibration),
                f"{models.TORCH_AO} static (FX, x86)": models.torch_ao_static(net, calibration)}
    assert not any(type(m).__module__.startswith("torchquant.nn") for m in net.modules())
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    errors = models.relative_errors(variants, calibration[0])
    assert errors[models.FLOAT] == 0.0
    assert all(0.0 < e < 0.1 for name, e in errors.items() if name != models.FLOAT), errors


def test_textcnn_pipeline_runs_every_layer_on_integers():
    """benchmarks/models.py's text CNN (short sentences): its max over time, read from each conv output's shape,
    runs on the integers, and the pipeline stays close to the float model."""
    torch.manual_seed(0)
    net = models.TextCNN(embedding=16, filters=8).eval()
    calibration = [torch.randn(4, 12, 16) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prepare warns of ops kept float between integer layers
        pipeline = models.torchquant_quantized(net, "int8-pipeline", calibration)
    assert [n.target for n in pipeline.graph.nodes].count(torch.amax) == 3
    errors = models.relative_errors({models.FLOAT: net, "pipeline": pipeline}, torch.randn(3, 12, 16))
    assert 0.0 < errors["pipeline"] < 0.05, errors


def test_torch_ao_dynamic_swaps_every_linear():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    quantized = models.torch_ao_dynamic(net)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert all(type(m) is torch.nn.Linear for m in (net[0], net[2]))


def test_vit_encoder_rows_run_every_variant():
    """One ViT-B/16 layer on a few tokens: every variant runs (torch.ao's in eval mode too, where torch's fused
    path would fail on its layers) and stays close to float."""
    rows = models.vit_encoder_latency(layers=1, tokens=5, threads=(1,), repeats=1)
    errors = {row["variant"]: row["rel. error"] for row in rows}
    assert list(errors) == [models.FLOAT, "torchquant int8-dynamic", "torchquant int8-dynamic, attention float",
                            f"{models.TORCH_AO} dynamic"]
    assert errors[models.FLOAT] == 0.0 and all(0.0 < e < 0.05 for e in list(errors.values())[1:]), errors
    assert all(row["ms"] > 0 and row["table"] == "vit-encoder" for row in rows)


def test_gpt2_rows_quantize_the_conv1d_projections():
    """GPT-2 with one layer on a few tokens: torchquant quantizes its Conv1D projections (torch.ao only lm_head),
    and every variant stays close to float."""
    pytest.importorskip("transformers", reason="transformers not installed")
    rows = models.gpt2_latency(layers=1, tokens=6, threads=(1,), repeats=1)
    errors = {row["variant"]: row["rel. error"] for row in rows}
    assert list(errors) == [models.FLOAT, "torchquant int8-dynamic", f"{models.TORCH_AO} dynamic"]
    assert errors[models.FLOAT] == 0.0 and all(0.0 < e < 0.05 for e in list(errors.values())[1:]), errors
    assert all(row["ms"] > 0 and row["table"] == "gpt2" for row in rows)


def test_format_tables_groups_rows_by_part():
    rows = [{"table": "digits", "variant": "float", "accuracy %": 98.25},
            {"table": "note", "text": "MiniLM skipped"}]
    text = models.format_tables(rows)
    assert "_MiniLM skipped_" in text
    assert "| float | 98.2 |" in text
    assert "MiniLM-L6-v2" not in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="parts must be among"):
        models.run(["minilm", "digits"])
    with pytest.raises(ValueError, match="threads must be"):
        models.run(["digits"], threads=(0,))
    for argv in (["--repeats", "0"], ["--threads", "0"], ["--parts", "bogus"]):
        with pytest.raises(SystemExit):
            models.main(argv)


def test_resnext50_is_torchvisions_and_converts_to_one_integer_pipeline():
    """benchmarks/resnet.py's ResNeXt-50 32x4d: torchvision's parameter count, 16 3x3 convs in 32 groups of 4 to 32
    channels, and the int8 pipeline (on a small image) runs every conv on integers, near the float model."""
    import torchquant
    from benchmarks.resnet import resnet
    model = resnet("resnext50_32x4d")
    assert sum(p.numel() for p in model.parameters()) == 25_028_904
    grouped = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 16 and {m.groups for m in grouped} == {32}
    assert {m.in_channels // 32 for m in grouped} == {4, 8, 16, 32}
    calibration = [torch.randn(2, 3, 64, 64)]
    quantized = torchquant.quantize_model(model, "int8-pipeline", calibration=calibration, inplace=False)
    convs = [m for m in quantized.modules() if isinstance(m, torchquant.nn.QuantConv2d)]
    assert len(convs) == 53 and all(m.converted for m in convs)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        sqnr = torchquant.functional.quantization_error(model(x), quantized(x))["sqnr_db"]
    assert sqnr > 6  # random weights, a 64x64 image, 2 calibration images: ~8.4 dB, as layer by layer


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v2_hardswish"])
def test_mobilenet_v2_converts_to_one_integer_pipeline(name):
    """benchmarks/mobilenet.py's MobileNetV2 (on a small image): torchvision's layer counts, 17 depthwise convs, and
    the int8 pipeline runs every layer on integers close to the float model, nothing kept float: ReLU6 fused, or
    with hardswish 35 table lookups between integer layers (the last one read by the global average pool, which
    requantizes its integers for the classifier)."""
    import warnings

    import torchquant
    from benchmarks.mobilenet import mobilenet
    from torchquant import graph
    model = mobilenet(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 52 and sum(c.groups == c.in_channels > 1 for c in convs) == 17
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(2, 3, 64, 64, generator=g)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torchquant.quantize_model(model, "int8-pipeline", calibration=calibration)
    messages = [str(w.message) for w in caught]
    assert messages == []
    layers, notes = graph.pipeline_notes(quantized)
    assert len(layers) == 53 and all("integer input" in note for note in layers.values())
    lookups = [n for n in quantized.graph.nodes if n.target is torchquant.functional.quantized_lookup]
    assert len(lookups) == (35 if name == "mobilenet_v2_hardswish" else 0)
    assert [n.target for n in quantized.graph.nodes].count(graph.integer_mean) == 1
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        want, got = model(x), quantized(x)
    assert got.shape == (2, 1000)
    assert torchquant.functional.quantization_error(want, got)["sqnr_db"] > 10


def test_mobilenet_v3_large_converts_to_one_integer_pipeline():
    """benchmarks/mobilenet.py's MobileNetV3-Large (on a small image): torchvision's parameter count, 15 depthwise
    convs (6 of them 5x5), 8 squeeze-excitation blocks whose products run in float between integer layers, and an
    integer pipeline close to the float model."""
    import warnings

    import torchquant
    from benchmarks.mobilenet import SqueezeExcitation, mobilenet
    from torchquant import graph
    model = mobilenet("mobilenet_v3_large")
    assert sum(p.numel() for p in model.parameters()) == 5483032  # torchvision's mobilenet_v3_large
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [c for c in convs if c.groups == c.in_channels > 1]
    assert len(depthwise) == 15 and sum(c.kernel_size == (5, 5) for c in depthwise) == 6
    assert sum(isinstance(m, SqueezeExcitation) for m in model.modules()) == 8
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torchquant.quantize_model(model, "int8-pipeline",
                                              calibration=[torch.randn(2, 3, 64, 64, generator=g)])
    layers, _ = graph.pipeline_notes(quantized)
    assert len(layers) == len(convs) + 2 and all("integer input" in note for note in layers.values())
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        want, got = model(x), quantized(x)
    assert got.shape == (2, 1000)
    assert torchquant.functional.quantization_error(want, got)["sqnr_db"] > 10


@pytest.mark.parametrize("zero_point", [0, 128])
def test_resnet_convs_compares_the_same_conv(zero_point):
    # benchmarks/resnet_convs.py times torchquant's and torch.ao's kernels on the same integers: their uint8 outputs
    # agree up to a requantization rounding step
    from benchmarks import resnet_convs
    with torch.inference_mode():
        kernels = resnet_convs.conv_kernels(2, 64, 6, zero_point)
        ours, theirs = kernels["torchquant"](), kernels["torch.ao"]().int_repr()
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape == (2, 64, 6, 6)
    assert (ours.int() - theirs.int()).abs().max() <= 1 and ours.float().std() > 1
    row = resnet_convs.conv_row(1, 64, 6, zero_point, 1, 573.0)
    assert row["conv"] == "3x3/1 64->64" and row["input"] == "1x64x6x6" and row["% peak"] > 0


@pytest.mark.parametrize("channels", [128, 256, 512])  # 4, 8, 16 channels a group: passes, passes, the GEMM
def test_resnet_convs_grouped_compares_the_same_conv(channels):
    from benchmarks import resnet_convs
    groups = resnet_convs.RESNEXT_GROUPS
    with torch.inference_mode():
        kernels = resnet_convs.conv_kernels(1, channels, 5, 128, groups)
        ours, theirs, floats = kernels["torchquant"](), kernels["torch.ao"]().int_repr(), kernels["float32"]()
    assert ours.shape == theirs.shape == floats.shape == (1, channels, 5, 5)
    assert (ours.int() - theirs.int()).abs().max() <= 1 and ours.float().std() > 1
    # the float conv of the same values, requantized as the integer kernels do (scale 0.5), within a step
    assert ((floats / 0.5).round().clamp(0, 255) - ours.float()).abs().max() <= 1
    row = resnet_convs.conv_row(1, channels, 5, 128, 1, None, groups)
    assert row["conv"] == f"3x3/1 {channels}->{channels} g32" and row["vs float32"] > 0


@pytest.mark.parametrize("warm", [False, True])
def test_thread_time_rows_interleaved_or_warm(warm):
    from benchmarks import resnet
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    variants = {name: Recorder(name) for name in (models.FLOAT, "torchquant int8-pipeline", models.TORCH_AO)}
    rows = resnet.thread_time_rows("tiny", variants, {"batch 1": (torch.zeros(1),)}, repeats=2, warm=warm)
    names = list(variants)
    # 3 calls of each (one warms up): back to back when warm, else round by round
    assert calls == ([n for n in names for _ in range(3)] if warm else names * 3)
    assert [r["variant"] for r in rows] == names
    assert {r["timer"] for r in rows} == {"thread CPU, warm" if warm else "thread CPU"}
    assert all(r["ms"] >= 0 and r["vs float"] > 0 for r in rows)


def test_layer_rows_time_each_node_alone_and_inside_whole_forwards():
    from benchmarks import resnet
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))
    gm = torch.fx.symbolic_trace(net.eval())
    x = torch.randn(2, 3, 6, 6)
    times = resnet.node_times(gm, x, repeats=2)
    assert {kind for kind, _ in times} == {"conv 3x3/1 3->8", "ReLU", "conv 1x1/1 8->8"}
    for calls, alone, macs, in_forward in times.values():
        assert calls == 1 and alone > 0 and in_forward > 0
    assert times[("conv 3x3/1 3->8", (2, 3, 6, 6))][2] == 2 * 6 * 6 * 8 * 3 * 9
    rows = resnet.layer_rows("tiny", gm, gm, x, 2, None)
    total = rows[-1]
    assert total["op"] == "all nodes" and total["ms in forward"] > 0 and total["vs torch.ao in forward"] > 0
    assert all(r["ms in forward"] > 0 and r["torch.ao ms in forward"] > 0 for r in rows)


def test_layer_rows_count_a_residual_add_with_the_conv_before_it():
    from benchmarks import resnet

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.conv1(x)  # read twice: stays a row of its own
            return torch.relu(self.conv2(h) + h)

    gm = torch.fx.symbolic_trace(Block().eval())
    assert resnet.residual_adds(gm) == {"add": "conv2"}
    times = resnet.node_times(gm, torch.randn(2, 4, 5, 5), repeats=2)
    assert {kind for kind, _ in times} == {"conv 3x3/1 4->4", "conv 1x1/1 4->4 + add", "relu"}
    calls, alone, macs, in_forward = times[("conv 1x1/1 4->4 + add", (2, 4, 5, 5))]
    assert calls == 1 and macs == 2 * 5 * 5 * 4 * 4 and alone > 0 and in_forward > 0
