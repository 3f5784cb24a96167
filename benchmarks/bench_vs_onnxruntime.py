"""torchquant's dynamic presets in PyTorch (eager and torch.compile) against onnxruntime's int8 (CPU, 1-2 threads).

The baseline is what an onnxruntime user gets: the float model exported to ONNX, quantized with
onnxruntime.quantization.quantize_dynamic (QInt8 weights), run by the CPU execution provider with --threads intra-op
threads (default 1). torchquant runs the converted model in PyTorch with as many (torch.set_num_threads), eagerly and
compiled (torch.compile, default backend, shapes of the measured input; also with inductor's C++ wrapper, and with its
freezing, which makes the weights constants of the compiled graph), and as an AOTInductor package
(torchquant.export_aoti with free batch and sequence dims, loaded with torch._inductor.aoti_load_package). Models:
all-MiniLM-L6-v2 (the sentence encoder, batch 1 and batch 32 of the evaluation sentences padded to the longest), a
BERT-base-shaped encoder with random weights (batch 1 x 128 tokens) and ViT-B/16's encoder built from torch's
nn.TransformerEncoderLayer (nn.MultiheadAttention; random weights, batch 1 x 197 tokens). All variants of one input run
in one process, interleaved (ABC CBA ...), so the noise of a shared machine falls on all alike; with one thread each
sample also records the thread's CPU time, which excludes the time this process waited for a core. --presets picks
torchquant's configurations (int8-dynamic by default; w7a8-dynamic runs the AVX2 byte kernel on CPUs without AVX-512
VNNI).

    python -m benchmarks.bench_vs_onnxruntime [--repeats 200] [--models minilm bert-base vit-base]
        [--presets int8-dynamic w7a8-dynamic] [--threads 1] [--output FILE.md]
"""
import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings

import torch

import torchquant
from benchmarks import minilm as minilm_lib
from benchmarks.bench_onnx import emit, ort_feeds, ort_session, parse_minilm_bench_args
from torchquant.config import PRESETS
from torchquant.timing import markdown_table

BERT_BASE_TOKENS = 128
VIT_TOKENS = 197  # 14 x 14 patches of 16 x 16 and the class token


def _ort_int8_session(encoder: torch.nn.Module, inputs, directory: str, tag: str):
    """onnxruntime's dynamic int8 quantization of encoder's float ONNX export (one thread) and its input feeds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    float_path = os.path.join(directory, f"float_{tag}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, inputs, float_path, dynamo=True, verbose=False)
    int8_path = os.path.join(directory, f"ort_int8_{tag}.onnx")
    quantize_dynamic(float_path, int8_path, weight_type=QuantType.QInt8)
    session = ort_session(int8_path)
    feeds = ort_feeds(session, inputs)
    return lambda: session.run(None, feeds)


def _interleaved(fns: dict, repeats: int) -> dict:
    """{name: (wall seconds list, thread CPU seconds list)} of single calls, run interleaved after a warm-up."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples = {name: ([], []) for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            wall, cpu = time.perf_counter(), time.thread_time()
            fns[name]()
            samples[name][1].append(time.thread_time() - cpu)
            samples[name][0].append(time.perf_counter() - wall)
    return samples


def _aoti_package(model: torch.nn.Module, inputs, path: str):
    """model exported with free batch and sequence dims and compiled ahead of time by AOTInductor into a package at
    path, loaded back: the deployment counterpart of an onnxruntime session (no guards to check, no Python per op)."""
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", max=minilm_lib.MAX_LENGTH)
    # a free dim is traced at a size other than 1
    example = tuple(t.repeat(2, *[1] * (t.dim() - 1)) for t in inputs)
    return torch._inductor.aoti_load_package(torchquant.export_aoti(
        model, example, path, dynamic_shapes=tuple({0: batch, 1: tokens} for _ in inputs)))


def _torchquant_variants(encoder: torch.nn.Module, inputs, preset: str, directory: str, tag: str) -> dict:
    """encoder converted with `preset`, run eagerly, compiled and as an AOTInductor package, by variant name."""
    quantized = torchquant.quantize_model(copy.deepcopy(encoder), preset).eval()
    compiled = torch.compile(quantized)
    # the C++ wrapper calls the compiled kernels and ops without a Python line per call
    compiled_cpp = torch.compile(quantized, options={"cpp_wrapper": True})
    # freezing: the weights become constants of the compiled graph instead of inputs checked on every call
    compiled_frozen = torch.compile(quantized, options={"freezing": True})
    package = _aoti_package(quantized, inputs, os.path.join(directory, f"aoti_{preset}_{tag}.pt2"))
    return {f"torchquant {preset} eager": lambda: quantized(*inputs),
            f"torchquant {preset} torch.compile": lambda: compiled(*inputs),
            f"torchquant {preset} torch.compile (cpp_wrapper)": lambda: compiled_cpp(*inputs),
            f"torchquant {preset} torch.compile (freezing)": lambda: compiled_frozen(*inputs),
            f"torchquant {preset} AOTInductor": lambda: package(*inputs)}


def compare_input(label: str, encoder: torch.nn.Module, inputs, directory: str, tag: str, repeats: int,
                  presets=("int8-dynamic",)) -> list:
    """Rows for one model input: onnxruntime int8, torchquant's presets eager and compiled."""
    torch._dynamo.reset()
    with torch.inference_mode():
        fns = {"onnxruntime int8": _ort_int8_session(encoder, inputs, directory, tag)}
        for preset in presets:
            fns.update(_torchquant_variants(encoder, inputs, preset, directory, tag))
        samples = _interleaved(fns, repeats)
    base_wall, base_cpu = (statistics.median(s) for s in samples["onnxruntime int8"])
    base_min = min(samples["onnxruntime int8"][0])
    rows = []
    for name, (wall, cpu) in samples.items():
        row = {"input": label, "variant": name, "median ms": statistics.median(wall) * 1e3, "min ms": min(wall) * 1e3,
               "vs onnxruntime (median)": base_wall / statistics.median(wall),
               "vs onnxruntime (min)": base_min / min(wall)}
        if torch.get_num_threads() == 1:  # with more, the calling thread's CPU time is only part of the work
            row.update({"CPU ms (median)": statistics.median(cpu) * 1e3,
                        "vs onnxruntime (CPU time)": base_cpu / statistics.median(cpu)})
        rows.append(row)
    return rows


def minilm_rows(directory: str, repeats: int, presets) -> list:
    minilm = minilm_lib.load_minilm()
    sentences = minilm_lib.evaluation_sentences()
    rows = []
    for batch, runs in ((1, repeats), (32, max(repeats // 10, 10))):
        inputs = minilm.tokenize(sentences[:batch])
        label = f"all-MiniLM-L6-v2, batch {batch} x {inputs[0].shape[1]} tokens"
        rows += compare_input(label, minilm.encoder, inputs, directory, f"minilm_b{batch}", runs, presets)
    return rows


def bert_base_rows(directory: str, repeats: int, presets) -> list:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig()  # bert-base-uncased's shape: 12 layers, hidden 768, 12 heads, FFN 3072
    encoder = minilm_lib.SentenceEncoder(BertModel(config, add_pooling_layer=False)).eval()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, config.vocab_size, (1, BERT_BASE_TOKENS), generator=g)
    inputs = (input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids))
    label = f"BERT-base shape (random weights), batch 1 x {BERT_BASE_TOKENS} tokens"
    return compare_input(label, encoder, inputs, directory, "bert_base", max(repeats // 10, 10), presets)


def vit_base_rows(directory: str, repeats: int, presets) -> list:
    """ViT-B/16's encoder (torchvision's layout: pre-norm nn.TransformerEncoderLayer with nn.MultiheadAttention, GELU;
    12 layers, hidden 768, 12 heads, MLP 3072) on the 197 tokens of a 224x224 image, random weights."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False).eval()
    inputs = (torch.randn(1, VIT_TOKENS, 768),)
    label = f"ViT-B/16 encoder shape (nn.MultiheadAttention, random weights), batch 1 x {VIT_TOKENS} tokens"
    return compare_input(label, encoder, inputs, directory, "vit_base", max(repeats // 10, 10), presets)


MODELS = {"minilm": minilm_rows, "bert-base": bert_base_rows, "vit-base": vit_base_rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200,
                        help="interleaved runs at batch 1 of MiniLM (a tenth, at least 10, for the larger inputs)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--presets", nargs="+", choices=[p for p in PRESETS if "dynamic" in p],
                        default=["int8-dynamic"], help="torchquant's configurations (dynamic ones: no calibration)")
    args, header = parse_minilm_bench_args(parser, argv, "bench_vs_onnxruntime")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            rows += MODELS[name](directory, args.repeats, args.presets)
    text = "\n".join([f"# torchquant in PyTorch against onnxruntime int8 (CPU, {args.threads} thread(s))", "",
                      f"Machine: {header}.", "", markdown_table(rows, list(rows[0])), ""])
    emit(text, args.output)


if __name__ == "__main__":
    main()
