"""`torchquant demo`: train the digits CNN, quantize it several ways, and compare accuracy, size and CPU latency
with float (what the seed document asks of a quantized model)."""
import copy
import dataclasses
import sys
import time
from contextlib import contextmanager
from typing import List

import torch

from torchquant.bench.timing import compare, markdown_table

__all__ = ["run_demo", "demo_variants", "qat_config"]


def demo_variants():
    """(label, config) of the post-training conversions the demo compares."""
    from torchquant.config import QuantConfig
    static = QuantConfig.preset("int8-static")
    truncate = QuantConfig(weight=dataclasses.replace(static.weight, rounding="truncate"),
                           activation=dataclasses.replace(static.activation, rounding="truncate"))
    return [("int8-static", static), ("int8-dynamic", QuantConfig.preset("int8-dynamic")),
            ("w4a8-dynamic", QuantConfig.preset("w4a8-dynamic")), ("int8-static, truncate rounding", truncate)]


def qat_config():
    """w4a8-dynamic with min/max weight ranges: under training the weights settle onto the 4-bit grid, so the
    preset's MSE range search (41 trial quantizations per layer and step) buys little and costs much."""
    from torchquant.config import QuantConfig
    preset = QuantConfig.preset("w4a8-dynamic")
    return QuantConfig(weight=dataclasses.replace(preset.weight, observer="minmax"), activation=preset.activation)


@contextmanager
def _one_thread():
    """Training this 38k-parameter CNN on batches of 32 tiny images gains nothing from more threads, and on a busy
    machine extra OpenMP threads make it many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_demo(*, epochs: int = 10, qat_epochs: int = 3, seed: int = 0, quiet: bool = False, out=None
             ) -> List[dict]:
    """Prints the comparison table to `out` (stdout) and returns its rows."""
    import torchquant
    from torchquant.examples import DigitsCNN, calibration_batches, evaluate, load_digits_data, train
    from torchquant.report import state_bytes
    out = sys.stdout if out is None else out
    for name, value in (("epochs", epochs), ("qat_epochs", qat_epochs)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"run_demo: {name} must be a non-negative int, got {value!r}")

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
    with _one_thread():
        train(model, data, epochs=epochs, seed=seed)
    say(f"DigitsCNN ({parameters / 1000:.1f}k parameters: 2 conv + 2 linear) trained in "
        f"{time.perf_counter() - start:.1f} s on one thread ({epochs} epochs, seed {seed})")
    calibration = list(calibration_batches(data))

    models = {"float32": model}
    for label, config in demo_variants():
        models[label] = torchquant.quantize_model(model, config, calibration=calibration, inplace=False)
    # Quantization-aware training: fine-tune the fake-quant 4-bit model, then convert it.
    qat = torchquant.prepare(copy.deepcopy(model), qat_config())
    with _one_thread():
        train(qat, data, epochs=qat_epochs, lr=1e-3, seed=seed)
    models[f"w4a8 QAT ({qat_epochs} epochs)"] = torchquant.convert(qat)

    say("measuring accuracy and CPU latency ...")
    accuracy = {label: evaluate(m, data) for label, m in models.items()}
    batch_all, batch_one = data.test_x, data.test_x[:1]
    with torch.no_grad():
        latency_all = compare({label: (lambda m=m: m(batch_all)) for label, m in models.items()}, repeats=9)
        latency_one = compare({label: (lambda m=m: m(batch_one)) for label, m in models.items()}, repeats=9)
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
    say(f"\nLatency: median of interleaved runs on the CPU with {torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__}. Size: every tensor of the state dict (weights, scales, biases).")
    return rows
