"""`torchquant demo`: train the digits CNN, quantize it several ways, and compare accuracy, size and CPU latency
with float."""
import copy
import dataclasses
import sys
import time
from typing import List

import torch

from torchquant.timing import compare, latency_clock, markdown_table, num_threads

__all__ = ["run_demo", "demo_variants", "qat_config"]


def demo_variants():
    """(label, config) of the post-training conversions the demo compares."""
    from torchquant.config import QuantConfig
    static = QuantConfig.preset("int8-static")
    truncate = QuantConfig(weight=dataclasses.replace(static.weight, rounding="truncate"),
                           activation=dataclasses.replace(static.activation, rounding="truncate"))
    return [("int8-static", static), ("int8-pipeline", QuantConfig.preset("int8-pipeline")),
            ("int8-dynamic", QuantConfig.preset("int8-dynamic")),
            ("w4a8-dynamic", QuantConfig.preset("w4a8-dynamic")), ("int8-static, truncate rounding", truncate)]


def qat_config():
    """w4a8-dynamic with min/max weight ranges: under training the weights settle onto the 4-bit grid, so the
    preset's MSE range search (41 trial quantizations per layer and step) buys little and costs much."""
    from torchquant.config import QuantConfig
    preset = QuantConfig.preset("w4a8-dynamic")
    return QuantConfig(weight=dataclasses.replace(preset.weight, observer="minmax"), activation=preset.activation)


# Latency threads by default: this CNN's layers are too small to split across cores, and on a busy machine extra
# OpenMP threads wait on each other and make the timings many times slower and erratic.
DEFAULT_THREADS = 1


def run_demo(*, epochs: int = 10, qat_epochs: int = 3, seed: int = 0, threads: int = DEFAULT_THREADS,
             quiet: bool = False, out=None) -> List[dict]:
    """Prints the comparison table to `out` (stdout) and returns its rows. Training runs on one thread (this
    38k-parameter CNN on batches of 32 tiny images gains nothing from more), latency on `threads`."""
    import torchquant
    from torchquant.examples import DigitsCNN, calibration_batches, evaluate, load_digits_data, train
    from torchquant.report import state_bytes
    out = sys.stdout if out is None else out
    for name, value in (("epochs", epochs), ("qat_epochs", qat_epochs)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"run_demo: {name} must be a non-negative int, got {value!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"run_demo: threads must be a positive int, got {threads!r}")

    def say(text=""):
        if not quiet:
            print(text, file=out, flush=True)

    data = load_digits_data()
    say(f"digits (scikit-learn, 8x8 grey images, 10 classes): {len(data.train_y)} training / "
        f"{len(data.test_y)} test images")
    torch.manual_seed(seed)
    model = DigitsCNN()
    parameters = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with num_threads(1):
        train(model, data, epochs=epochs, seed=seed)
    say(f"DigitsCNN ({parameters / 1000:.1f}k parameters: 2 conv + 2 linear) trained in "
        f"{time.perf_counter() - start:.1f} s on one thread ({epochs} epochs, seed {seed})")
    calibration = list(calibration_batches(data))

    models = {"float32": model}
    for label, config in demo_variants():
        models[label] = torchquant.quantize_model(model, config, calibration=calibration, inplace=False)
    # Quantization-aware training: fine-tune the fake-quant 4-bit model, then convert it.
    qat = torchquant.prepare(copy.deepcopy(model), qat_config())
    with num_threads(1):
        train(qat, data, epochs=qat_epochs, lr=1e-3, seed=seed)
    models[f"w4a8 QAT ({qat_epochs} epochs)"] = torchquant.convert(qat)

    say(f"measuring accuracy and CPU latency on {threads} thread(s) ...")
    accuracy = {label: evaluate(m, data) for label, m in models.items()}
    batch_all, batch_one = data.test_x, data.test_x[:1]
    with torch.no_grad(), num_threads(threads):
        clock, clock_name = latency_clock()
        latency_all = compare({label: (lambda m=m: m(batch_all)) for label, m in models.items()}, repeats=9,
                              clock=clock)
        latency_one = compare({label: (lambda m=m: m(batch_one)) for label, m in models.items()}, repeats=9,
                              clock=clock)
    size_float = state_bytes(model)
    rows = []
    for label, m in models.items():
        size = state_bytes(m)
        rows.append({
            "model": label, "accuracy %": f"{accuracy[label]:.2f}",
            "vs float (points)": f"{accuracy[label] - accuracy['float32']:+.2f}",
            "size KiB": f"{size / 1024:.1f}", "smaller": f"{size_float / size:.2f}x",
            f"ms / batch of {len(batch_all)}": latency_all[label] * 1e3,
            "speed-up": f"{latency_all['float32'] / latency_all[label]:.2f}x",
            "us / image (batch 1)": latency_one[label] * 1e6,
            "speed-up (batch 1)": f"{latency_one['float32'] / latency_one[label]:.2f}x",
        })
    print(markdown_table(rows, list(rows[0])), file=out)
    say(f"\nLatency: median of interleaved runs ({clock_name}) on the CPU with {threads} thread(s) (CPU kernels: "
        f"{torchquant.cpu_kernel_path()}), torch {torch.__version__}. Size: every tensor of the state dict (weights, "
        f"scales, biases).")
    return rows
