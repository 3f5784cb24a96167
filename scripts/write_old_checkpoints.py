"""Writes tests/data/checkpoints: checkpoints saved by earlier revisions of torchquant, which the tests load to check
that files written by earlier versions still load and compute what they computed then.

Each file is written by the torchquant package of the revision named in CHECKPOINTS (taken with `git archive`, with
the extension built in this tree copied in) from a model of tests/test_graph.py (MODELS or _FIXTURE_MODELS; seeded,
BatchNorms randomized, calibrated on the model's test batches) or DigitsBNCNN; the outputs it computed on the first
batch go to expected_outputs.safetensors beside the files. Run from the repository root after building, with the
names of the files to write (all of them when none is given):

    python scripts/write_old_checkpoints.py [pipeline/before-integer_avg_pools ...]
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "checkpoints")

# file (under OUT, without .prepared/.converted.safetensors) -> (revision that writes it, model)
CHECKPOINTS = {
    # an integer pipeline planned before each rule of torchquant.graph.PIPELINE_RULES (the revision before the one
    # that brought the rule in), on a model whose plan the rule changes
    "pipeline/before-integer_dropout": ("e9a3254^", "dropout"),
    "pipeline/before-integer_lookups": ("5b44807^", "smooth-activations"),
    "pipeline/before-residual_adds_in_convs": ("34466c9^", "basic-blocks"),
    "pipeline/before-integer_max_pool1d": ("a52edb4^", "keyword-spotting"),
    "pipeline/before-integer_views": ("510d853^", "spectrogram-views"),
    "pipeline/before-integer_views-probe": ("510d853^", "views-probe"),
    "pipeline/before-integer_extrema": ("851c88e^", "text-cnn"),
    "pipeline/before-integer_extrema-mT": ("851c88e^", "transposed-features"),
    "pipeline/before-integer_extrema-probe": ("851c88e^", "extrema-probe"),
    "pipeline/before-integer_extrema-attribute": ("851c88e^", "attribute-probe"),  # (prepared only)
    "pipeline/before-integer_indexing": ("1f8c57f^", "shuffle-block"),
    "pipeline/before-integer_indexing-probe": ("1f8c57f^", "indexing-probe"),
    "pipeline/before-integer_padding": ("84b9b08^", "padded"),
    "pipeline/before-integer_means": ("3932873", "basic-blocks"),
    "pipeline/before-integer_avg_pools": ("ad4cf19", "avg-pools"),
    "pipeline/before-integer_adaptive_avg_pools": ("d4d8a62", "adaptive-pools"),
    "pipeline/before-integer_products": ("902f43f", "squeeze-excitation"),
    "pipeline/before-padding_mode_convs": ("6af6ad9^", "padding-modes"),
    # planned with every rule, recording only the residual rule, or the residual and padding rules
    "pipeline/integer_padding-unrecorded": ("84b9b08", "padded"),
    "pipeline/residual-and-padding-recorded": ("099820d", "text-cnn"),
    # a layer-by-layer int8-static DigitsBNCNN(channels=4, hidden=8), prepared, its BatchNorms stored inside the convs
    "prepared-bn-inside-layer": ("e3dddcf", "digits-bn"),
}


def write(out_stem: str, model_name: str) -> None:
    """Run with an earlier torchquant first on sys.path: writes out_stem's checkpoints and outputs."""
    import copy
    import warnings
    import torch
    from safetensors.torch import save_file
    import torchquant as tq
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    if model_name == "digits-bn":  # (that revision has no integer pipeline, which tests/test_graph.py imports)
        from torchquant.examples import DigitsBNCNN
        model = DigitsBNCNN(channels=4, hidden=8).eval()
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        g = torch.Generator().manual_seed(1)
        batches, config = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(3)], "int8-static"
    else:
        import test_graph as T
        factory, shape = {**T.MODELS, **T._FIXTURE_MODELS}[model_name]
        model = T._randomize_bn(factory())
        batches, config = T._batches(shape), "int8-pipeline"
    prepared = tq.calibrate(tq.prepare(copy.deepcopy(model), config), batches, progress=False)
    models = {"prepared": prepared}
    if model_name != "attribute-probe":  # (whose converted model gave its Linear the integers)
        models["converted"] = tq.convert(copy.deepcopy(prepared))
    outputs = {}
    for kind, m in models.items():
        if model_name != "digits-bn" or kind == "prepared":
            tq.save(m, f"{out_stem}.{kind}.safetensors")
        with torch.no_grad():
            outputs[kind] = m(batches[0]).contiguous()
    save_file(outputs, f"{out_stem}.outputs.safetensors")


def main(stems: list) -> None:
    from safetensors.torch import load_file, save_file
    built = glob.glob(os.path.join(ROOT, "torchquant", "_C*.so"))
    if not built:
        sys.exit("build the extension first (python setup.py build_ext --inplace)")
    unknown = [stem for stem in stems if stem not in CHECKPOINTS]
    if unknown:
        sys.exit(f"no such checkpoint: {', '.join(unknown)} (they are: {', '.join(CHECKPOINTS)})")
    chosen = {stem: CHECKPOINTS[stem] for stem in stems or CHECKPOINTS}
    expected_path = os.path.join(OUT, "expected_outputs.safetensors")
    # the outputs of the files not rewritten stay
    expected = {k: v for k, v in load_file(expected_path).items() if k.rsplit(".", 1)[0] not in chosen} \
        if stems else {}
    with tempfile.TemporaryDirectory() as work:
        trees = {}
        for revision in sorted({r for r, _ in chosen.values()}):
            tree = trees[revision] = os.path.join(work, revision.replace("^", "-parent"))
            os.makedirs(tree)
            archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "torchquant"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            shutil.copy(built[0], os.path.join(tree, "torchquant"))
        for stem, (revision, model_name) in chosen.items():
            out_stem = os.path.join(OUT, stem)
            os.makedirs(os.path.dirname(out_stem), exist_ok=True)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([trees[revision], os.path.join(ROOT, "tests")])}
            subprocess.run([sys.executable, __file__, "--write", out_stem, model_name], env=env, check=True, cwd=work)
            for kind, t in load_file(f"{out_stem}.outputs.safetensors").items():
                expected[f"{stem}.{kind}"] = t
            os.remove(f"{out_stem}.outputs.safetensors")
            print(f"{stem}: written by {revision}")
        save_file(expected, expected_path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write(*sys.argv[2:])
    else:
        main(sys.argv[1:])
