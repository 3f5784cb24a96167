"""all-MiniLM-L6-v2 in onnxruntime (CPU execution provider): torchquant's exported int8-dynamic model against
onnxruntime's own dynamic quantization (onnxruntime.quantization.quantize_dynamic, QInt8 weights) of the float ONNX
export, and the float ONNX model itself.

Quality: the sentence embeddings of the 86 evaluation sentences against PyTorch's float model (mean and worst
cosine). Latency: batch 1 (one sentence) and batch 32 (32 sentences padded to the longest), each model exported for
that input shape, one thread (--threads: torch's and onnxruntime's intra-op count), all models in one process, runs interleaved (ABCCBA...) so the noise of a
shared machine falls on all alike; median and minimum of the runs.

    python -m benchmarks.bench_onnx [--repeats-1 300] [--repeats-32 30] [--threads 1]
        [--output benchmarks/results/onnx-cpu.md]
"""
import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

import torchquant
from benchmarks import minilm as minilm_lib
from torchquant.export import export_onnx
from torchquant.timing import markdown_table

VARIANTS = ("float", "onnxruntime int8", "torchquant int8")


def ort_session(path: str):
    """An onnxruntime CPU session of the model at path with as many intra-op threads as torch uses
    (torch.get_num_threads(): the benchmarks' --threads) and one inter-op thread."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_feeds(session, inputs) -> dict:
    """The input feeds of session for a tuple of tensors, in order."""
    return {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}


def _models(minilm, quantized, inputs, directory: str, tag: str, dynamic_batch: bool) -> dict:
    """{variant: onnx path} for inputs' shape: the float export, onnxruntime's quantize_dynamic of it, ours."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    float_path = os.path.join(directory, f"float_{tag}.onnx")
    dynamic_shapes = ({0: torch.export.Dim("batch")},) * len(inputs) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(minilm.encoder, inputs, float_path, dynamo=True, dynamic_shapes=dynamic_shapes,
                          verbose=False)
    ort_path = os.path.join(directory, f"ort_int8_{tag}.onnx")
    quantize_dynamic(float_path, ort_path, weight_type=QuantType.QInt8)
    ours = export_onnx(quantized, inputs, os.path.join(directory, f"torchquant_{tag}.onnx"),
                       dynamic_batch=dynamic_batch)
    return {"float": float_path, "onnxruntime int8": ort_path, "torchquant int8": ours}


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def quality(minilm, quantized, directory: str) -> list:
    sentences = minilm_lib.evaluation_sentences()
    inputs = minilm.tokenize(sentences)
    with torch.no_grad():
        reference = minilm.encoder(*inputs)
        own = quantized(*inputs)
    example = tuple(t[:2] for t in inputs)  # exported with a free batch, run on all sentences at once
    paths = _models(minilm, quantized, example, directory, "quality", dynamic_batch=True)
    rows = []
    for variant, path in paths.items():
        session = ort_session(path)
        embeddings = torch.from_numpy(session.run(None, ort_feeds(session, inputs))[0])
        to_float = _cosines(embeddings, reference)
        row = {"variant": variant, "cos_mean": to_float.mean().item(), "cos_min": to_float.min().item()}
        if variant == "torchquant int8":
            to_own = _cosines(embeddings, own)
            row["cos to torchquant (PyTorch) mean / min"] = f"{to_own.mean().item():.5f} / {to_own.min().item():.5f}"
        rows.append(row)
    own_to_float = _cosines(own, reference)
    rows.append({"variant": "torchquant int8 in PyTorch", "cos_mean": own_to_float.mean().item(),
                 "cos_min": own_to_float.min().item()})
    return rows


def latency(minilm, quantized, directory: str, batch: int, repeats: int) -> list:
    inputs = minilm.tokenize(minilm_lib.evaluation_sentences()[:batch])
    paths = _models(minilm, quantized, inputs, directory, f"b{batch}", dynamic_batch=False)
    sessions = {variant: ort_session(path) for variant, path in paths.items()}
    feeds = {variant: ort_feeds(session, inputs) for variant, session in sessions.items()}
    # wall time, and the CPU time of this thread (onnxruntime with one intra-op thread runs a model on the calling
    # thread): on a shared machine the second counts less of the time other jobs hold the cores; with more threads
    # the calling thread's CPU time is only part of the work, and the rows leave it out
    samples = {variant: [] for variant in sessions}
    cpu_samples = {variant: [] for variant in sessions}
    order = list(sessions)
    for variant in order:  # warm-up
        sessions[variant].run(None, feeds[variant])
    for r in range(repeats):
        for variant in (order if r % 2 == 0 else order[::-1]):
            start, cpu_start = time.perf_counter(), time.thread_time()
            sessions[variant].run(None, feeds[variant])
            samples[variant].append(time.perf_counter() - start)
            cpu_samples[variant].append(time.thread_time() - cpu_start)
    ort_median = statistics.median(samples["onnxruntime int8"])
    ort_cpu_median = statistics.median(cpu_samples["onnxruntime int8"])
    rows = []
    for variant in order:
        median, cpu_median = statistics.median(samples[variant]), statistics.median(cpu_samples[variant])
        row = {"input": f"batch {batch} x {inputs[0].shape[1]} tokens", "variant": variant,
               "median ms": median * 1e3, "min ms": min(samples[variant]) * 1e3,
               "speed vs onnxruntime int8 (median)": ort_median / median}
        if torch.get_num_threads() == 1:
            row.update({"CPU-time median ms": cpu_median * 1e3,
                        "speed vs onnxruntime int8 (CPU time)": ort_cpu_median / cpu_median})
        rows.append(row)
    return rows


def machine() -> str:
    import onnx
    import onnxruntime
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical CPUs (load average {load:.1f} when the run started: other jobs share "
            f"the machine, so compare the rows of one run, not runs); torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, onnx {onnx.__version__}; torch and onnxruntime (intra-op) with "
            f"{torch.get_num_threads()} thread(s)")


def parse_minilm_bench_args(parser: argparse.ArgumentParser, argv, name: str):
    """The MiniLM benchmarks' command line: parser's arguments, --threads and --output; exits when MiniLM is not
    installed, then sets torch's thread count (onnxruntime's sessions take the same). Returns (args, the machine
    line of the report)."""
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of torch and of onnxruntime's intra-op pool (default 1)")
    parser.add_argument("--output", help="also write the report to this Markdown file")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    reason = minilm_lib.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"{name}: {reason}")
    torch.set_num_threads(args.threads)
    return args, machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats-1", type=int, default=300, help="interleaved runs at batch 1 (default 300)")
    parser.add_argument("--repeats-32", type=int, default=30, help="interleaved runs at batch 32 (default 30)")
    args, header = parse_minilm_bench_args(parser, argv, "bench_onnx")
    minilm = minilm_lib.load_minilm()
    quantized = torchquant.quantize_model(copy.deepcopy(minilm.encoder), "int8-dynamic")
    with tempfile.TemporaryDirectory() as directory:
        quality_rows = quality(minilm, quantized, directory)
        latency_rows = latency(minilm, quantized, directory, 1, args.repeats_1)
        latency_rows += latency(minilm, quantized, directory, 32, args.repeats_32)
    text = "\n".join([
        "# all-MiniLM-L6-v2 in onnxruntime (CPU)", "",
        f"Machine: {header}.", "",
        "## Embeddings against the float PyTorch model (86 sentences)", "",
        markdown_table(quality_rows, ["variant", "cos_mean", "cos_min", "cos to torchquant (PyTorch) mean / min"]),
        "", f"## Latency (median and minimum of interleaved runs: {args.repeats_1} at batch 1, "
            f"{args.repeats_32} at batch 32)", "",
        markdown_table(latency_rows, list(latency_rows[0])), ""])
    emit(text, args.output)


def emit(text: str, output=None) -> None:
    """Prints a report and, with output given, also writes it to that file."""
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
