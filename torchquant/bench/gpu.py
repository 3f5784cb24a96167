"""GPU kernel benchmarks against the GPU speed goals, every row timed interleaved with its baselines in this process.

- quantize family at 256M elements: fraction of the device-to-device copy bandwidth (bytes read + written) and the
  ratio to torch's own ops (quantize_per_tensor, dequantize, fake_quantize_per_*_affine, an eager per-token absmax).
- int8_mm against torch._int_mm (cuBLASLt int8; needs M > 16) and bf16 torch.mm: 4096^3, 8192^3, M in
  {1, 16, 128, 1024, 4096} x 4096 x 4096 and the Llama-7B MLP shapes. b is passed column-major ([N, K] storage, the
  layout a weight has), to both int8 kernels.
- dynamic int8 linear (torchquant.functional.dynamic_int8_linear: quantize_per_token + int8_linear against a packed
  weight, bf16 in and out, with its argument checks) against bf16 F.linear on the same shapes.
- int8 conv2d (uint8 channels-last activations, bf16 output) against cuDNN bf16 channels-last on ResNet-50 layers,
  batch 32, and a bottleneck's last conv with its residual add and ReLU (uint8 out) against cuDNN's conv + add + ReLU;
  on a compute capability 9.0 GPU the CUTLASS implicit-GEMM conv, also timed against the im2col + mma.sync path it
  replaces ("[mma]").
Shapes whose weights fit in L2 (M <= 128) rotate over several weight copies, so that the weights come from memory.
`--device cpu` runs the same code on the CPU with every size divided by 32 (and conv batch 1): a check of the
plumbing, whose numbers mean nothing.
"ours" is the automatic kernel choice (on a compute capability 9.0 GPU: CUTLASS for M > 16, the weight-streaming
small-M kernel up to 16). There the int8_mm and linear rows are also timed with the other kernels, forced through
TORCHQUANT_CUDA_GEMM (read by every GEMM call) and interleaved with the automatic choice and the baselines: for
M > 16 the mma.sync kernel ("[mma]") and the hand-written wgmma kernel ("[wgmma]"), for M <= 16 CUTLASS
("[cutlass]").
"""
import argparse
import datetime
import itertools
import json
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import torchquant  # noqa: F401  (registers the ops)
from torchquant._ops.gemm import dynamic_int8_linear, pack_conv_weight
from torchquant.bench.timing import copy_bandwidth
from torchquant.timing import compare, markdown_table

ops = torch.ops.torchquant
DEVICE = "cuda"  # set by main's --device
SHRINK = 1  # every benchmark size is divided by this (32 for the CPU plumbing check)
QUANT_NUMEL = 256 * 1024 * 1024
GEMM_SHAPES = [  # M, K, N
    (4096, 4096, 4096), (8192, 8192, 8192),
    (1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (1024, 4096, 4096),
    (4096, 4096, 11008), (4096, 11008, 4096), (16, 4096, 11008), (16, 11008, 4096),
]
# name, in_channels, size, out_channels, kernel, stride, padding, activation zero point, residual. Inside a ResNet
# every conv but the stem reads a ReLU's output, whose uint8 zero point is 0; the stem (an image) and one 3x3 row take
# 128, the case where the CUTLASS conv pads the input with the zero point first. A residual row is a bottleneck's last
# conv as an integer pipeline runs it: int8_conv2d.residual (the add of a uint8 residual and the ReLU after the conv,
# uint8 out) against cuDNN's conv, the bf16 add and the ReLU.
CONV_LAYERS = (
    ("7x7 3->64 s2 @224", 3, 224, 64, 7, 2, 3, 128, False),
    ("3x3 64->64 @56", 64, 56, 64, 3, 1, 1, 0, False),
    ("3x3 64->64 @56 zp 128", 64, 56, 64, 3, 1, 1, 128, False),
    ("1x1 64->256 @56", 64, 56, 256, 1, 1, 0, 0, False),
    ("1x1 64->256 @56 + add + ReLU", 64, 56, 256, 1, 1, 0, 0, True),
    ("1x1 256->64 @56", 256, 56, 64, 1, 1, 0, 0, False),
    ("3x3 128->128 @28", 128, 28, 128, 3, 1, 1, 0, False),
    ("1x1 256->1024 @14", 256, 14, 1024, 1, 1, 0, 0, False),
    ("3x3 256->256 @14", 256, 14, 256, 3, 1, 1, 0, False),
    ("3x3 512->512 @7", 512, 7, 512, 3, 1, 1, 0, False),
)
CONV_BATCH = 32
L2_ROTATION = 4  # copies of the weights for shapes whose weights fit in L2
COLUMNS = ["section", "case", "ours_ms", "baseline", "baseline_ms", "speedup", "goal", "met", "achieved"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rotating(fn: Callable, inputs: List) -> Callable[[], object]:
    """fn(*inputs[i]) for i = 0, 1, 2, ... cyclically."""
    order = itertools.cycle(inputs)
    return lambda: fn(*next(order))


def _rows(section: str, case: str, times: Dict[str, float], ours: str, goals: Dict[str, Optional[float]],
          achieved: str) -> List[dict]:
    """One row per baseline: speedup = baseline time / our time, met when speedup >= goal."""
    rows = []
    for name, t in times.items():
        if name == ours:
            continue
        speedup = t / times[ours]
        goal = goals.get(name)
        rows.append({"section": section, "case": case, "ours_ms": times[ours] * 1e3, "baseline": name,
                     "baseline_ms": t * 1e3, "speedup": speedup, "goal": "" if goal is None else f">= {goal}x",
                     "met": "" if goal is None else ("yes" if speedup >= goal else "NO"), "achieved": achieved})
    return rows


def _compare(fns: Dict[str, Callable]) -> Dict[str, float]:
    """compare() over the functions that run: a baseline that raises (an unsupported shape or dtype in this torch)
    is dropped with a note instead of losing the row; ours raising fails the row."""
    working = {}
    for name, fn in fns.items():
        if name != "ours":
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                _log(f"  baseline {name} dropped: {type(e).__name__}: {e}")
                continue
        working[name] = fn
    return compare(working, device=DEVICE)


def _guarded(section: str, case: str, body: Callable[[], List[dict]]) -> List[dict]:
    """Runs one benchmark case; a failure becomes an error row instead of ending the run."""
    _log(f"[{section}] {case}")
    try:
        rows = body()
    except Exception as e:  # noqa: BLE001  (one crashing row must not take the others down)
        traceback.print_exc()
        rows = [{"section": section, "case": case, "baseline": "ERROR", "achieved": f"{type(e).__name__}: {e}"[:200]}]
    torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Quantize family
# ---------------------------------------------------------------------------------------------------------------

def quantize_rows(numel: int, copy_bytes_per_s: float) -> List[dict]:
    rows: List[dict] = []
    scale_f, zp_i = 0.05, 0
    scale = torch.tensor([scale_f], device=DEVICE)
    zp = torch.tensor([zp_i], device=DEVICE, dtype=torch.int32)

    def fraction(bytes_moved: int, seconds: float) -> str:
        return f"{bytes_moved / seconds / 1e9:.0f} GB/s = {bytes_moved / seconds / copy_bytes_per_s:.0%} of copy"

    def case(name: str, fns: Dict[str, Callable], bytes_moved: int):
        def body():
            times = _compare(fns)
            return _rows("quantize", name, times, "ours", {},
                         fraction(bytes_moved, times["ours"]) + " (goal >= 85%)")
        rows.extend(_guarded("quantize", name, body))

    x = torch.randn(numel, device=DEVICE)
    case("quantize fp32->int8 per-tensor",
         {"ours": lambda: ops.quantize(x, scale, zp, None, 8, True, "nearest"),
          "torch.quantize_per_tensor": lambda: torch.quantize_per_tensor(x, scale_f, zp_i, torch.qint8)}, 5 * numel)
    q = ops.quantize(x, scale, zp, None, 8, True, "nearest")
    tq = torch.quantize_per_tensor(x, scale_f, zp_i, torch.qint8)
    case("dequantize int8->fp32 per-tensor",
         {"ours": lambda: ops.dequantize(q, scale, zp, None, torch.float32),
          "torch Tensor.dequantize": lambda: tq.dequantize()}, 5 * numel)
    del tq
    case("fake_quantize fp32 per-tensor",
         {"ours": lambda: ops.fake_quantize(x, scale, zp, None, 8, True, "nearest"),
          "torch.fake_quantize_per_tensor_affine": lambda: torch.fake_quantize_per_tensor_affine(
              x, scale_f, zp_i, -128, 127)}, 8 * numel)
    x2 = x.view(-1, 4096)
    ch_scale = torch.rand(4096, device=DEVICE) * 0.1 + 0.01
    ch_zp = torch.zeros(4096, device=DEVICE, dtype=torch.int32)
    case("fake_quantize fp32 per-channel (axis -1, 4096)",
         {"ours": lambda: ops.fake_quantize(x2, ch_scale, ch_zp, 1, 8, True, "nearest"),
          "torch.fake_quantize_per_channel_affine": lambda: torch.fake_quantize_per_channel_affine(
              x2, ch_scale, ch_zp, 1, -128, 127)}, 8 * numel)
    del q
    xb = x.bfloat16()
    del x, x2
    case("fake_quantize bf16 per-tensor",
         {"ours": lambda: ops.fake_quantize(xb, scale, zp, None, 8, True, "nearest"),
          "torch.fake_quantize_per_tensor_affine": lambda: torch.fake_quantize_per_tensor_affine(
              xb, scale_f, zp_i, -128, 127)}, 4 * numel)
    xt = xb.view(-1, 4096)

    def eager_per_token():
        s = (xt.float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        return torch.round(xt.float() / s).clamp(-127, 127).to(torch.int8), s

    case(f"quantize_per_token bf16 [{xt.shape[0]}, 4096]",
         {"ours": lambda: ops.quantize_per_token(xt, 8), "eager torch (absmax, round, clamp)": eager_per_token},
         3 * numel + 4 * xt.shape[0])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# GEMM and linear
# ---------------------------------------------------------------------------------------------------------------

def _int8(shape) -> torch.Tensor:
    return torch.randint(-128, 128, shape, device=DEVICE, dtype=torch.int8)


GEMM_VARIABLE = "TORCHQUANT_CUDA_GEMM"
SMALL_M = 16  # up to this M the automatic choice is the small-M kernel
# label: (variable value, case suffix); "" is the automatic choice
KERNEL_LABELS = {"ours": ("", ""), "ours [mma]": ("mma", " [mma]"), "ours [wgmma]": ("wgmma", " [wgmma]"),
                 "ours [cutlass]": ("cutlass", " [cutlass]")}


def _under_gemm_kernel(kernel: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        os.environ[GEMM_VARIABLE] = kernel
        return fn()
    return run


def _compare_gemm_kernels(ours: Callable[[], object], baselines: Dict[str, Callable], m: int,
                          wgmma: bool) -> Dict[str, float]:
    """Times ours under the automatic kernel choice and, on a compute capability 9.0 GPU, the alternatives to it
    (for M > SMALL_M mma.sync and, when asked, wgmma; else CUTLASS), interleaved with the baselines; the variable
    is restored afterwards."""
    labels = ["ours"]
    if DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        labels += (["ours [mma]"] + (["ours [wgmma]"] if wgmma else [])) if m > SMALL_M else ["ours [cutlass]"]
    saved = os.environ.get(GEMM_VARIABLE)
    try:
        fns = {label: _under_gemm_kernel(KERNEL_LABELS[label][0], ours) for label in labels}
        return _compare({**fns, **baselines})
    finally:
        if saved is None:
            os.environ.pop(GEMM_VARIABLE, None)
        else:
            os.environ[GEMM_VARIABLE] = saved


def _throughput(m: int, k: int, n: int) -> Callable[[float], str]:
    """The "achieved" text of an M x K x N product taking t seconds: TOPS, and the weight-read bandwidth for small M."""
    def text(t: float) -> str:
        tops = f"{2 * m * k * n / t / 1e12:.0f} TOPS"
        return tops + (f", weight read {k * n / t / 1e9:.0f} GB/s" if m <= SMALL_M else "")
    return text


def _rows_per_kernel(section: str, case: str, times: Dict[str, float], goals: Dict[str, Optional[float]],
                     achieved: Callable[[float], str]) -> List[dict]:
    """_rows for each of our kernels that was timed, against the same baselines."""
    baselines = {name: t for name, t in times.items() if name not in KERNEL_LABELS}
    rows: List[dict] = []
    for label, (_, suffix) in KERNEL_LABELS.items():
        if label in times:
            rows += _rows(section, case + suffix, {"ours": times[label], **baselines}, "ours", goals,
                          achieved(times[label]))
    return rows


def _shrunk(shapes):
    return [tuple(max(1, d // SHRINK) for d in shape) for shape in shapes]


def gemm_rows(wgmma: bool = True) -> List[dict]:
    rows: List[dict] = []
    for m, k, n in _shrunk(GEMM_SHAPES):
        name = f"int8_mm {m}x{k}x{n}"

        def body(m=m, k=k, n=n, name=name):
            copies = L2_ROTATION if m <= 128 else 1
            a = _int8((m, k))
            b_cols = [_int8((n, k)).t() for _ in range(copies)]  # [K, N] column-major
            a16 = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            b16 = [torch.randn(k, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(copies)]
            baselines = {}
            if m > 16:
                baselines["torch._int_mm"] = _rotating(torch._int_mm, [(a, b) for b in b_cols])
            baselines["bf16 torch.mm"] = _rotating(torch.mm, [(a16, b) for b in b16])
            times = _compare_gemm_kernels(_rotating(ops.int8_mm, [(a, b) for b in b_cols]), baselines, m, wgmma)
            return _rows_per_kernel("gemm", name, times, {"torch._int_mm": 1.5, "bf16 torch.mm": 1.5},
                                    _throughput(m, k, n))

        rows.extend(_guarded("gemm", name, body))
    return rows


def linear_rows(wgmma: bool = True) -> List[dict]:
    rows: List[dict] = []
    for m, k, n in _shrunk([shape for shape in GEMM_SHAPES if shape[0] != 8192]):
        name = f"dynamic int8 linear {m}x{k}x{n}"

        def body(m=m, k=k, n=n, name=name):
            copies = L2_ROTATION if m <= 128 else 1
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            layers = []
            for _ in range(copies):
                w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
                bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
                w_scale = (w.float().abs().amax(1) / 127).clamp_min(1e-8)
                w_q = torch.round(w.float() / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
                # a converted layer keeps its bias in float32, the epilogue's type
                layers.append((w, bias, ops.pack_int8_weight(w_q), w_q.sum(1, dtype=torch.int32), w_scale,
                               bias.float()))

            def ours(w, bias, packed, w_sum, w_scale, bias32):  # the public entry point, checks included
                return dynamic_int8_linear(x, packed, w_sum, w_scale, bias32, out_features=n)

            times = _compare_gemm_kernels(
                _rotating(ours, layers), {"bf16 F.linear": _rotating(lambda w, bias, *_: F.linear(x, w, bias), layers)},
                m, wgmma)
            goal = 1.3 if m >= 1024 else (1.2 if m <= 16 else None)
            return _rows_per_kernel("linear", name, times, {"bf16 F.linear": goal}, _throughput(m, k, n))

        rows.extend(_guarded("linear", name, body))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------------------------

def conv_rows() -> List[dict]:
    rows: List[dict] = []
    torch.backends.cudnn.benchmark = True
    batch = max(1, CONV_BATCH // SHRINK)
    for layer, c, size, oc, kernel, stride, padding, x_zp, residual in CONV_LAYERS:
        name = f"conv {layer} b{batch}"

        def body(c=c, size=size, oc=oc, kernel=kernel, stride=stride, padding=padding, x_zp=x_zp,
                 residual=residual):
            cl = torch.channels_last
            x = torch.randn(batch, c, size, size, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=cl)
            w = (torch.randn(oc, c, kernel, kernel, device=DEVICE) * 0.05).to(torch.bfloat16)
            w = w.contiguous(memory_format=cl)
            bias = torch.randn(oc, device=DEVICE, dtype=torch.bfloat16)
            bias32 = bias.float()
            x_q = torch.randint(0, 256, x.shape, device=DEVICE, dtype=torch.uint8).contiguous(memory_format=cl)
            x_scale = torch.tensor([0.02], device=DEVICE)
            w_scale = (w.float().abs().amax((1, 2, 3)) / 127).clamp_min(1e-8)
            w_q = torch.round(w.float() / w_scale.view(-1, 1, 1, 1)).clamp(-127, 127).to(torch.int8)
            packed = pack_conv_weight(w_q)
            w_sum = w_q.sum((1, 2, 3), dtype=torch.int32)
            ks, st, pd = [kernel, kernel], [stride, stride], [padding, padding]
            out_size = (size + 2 * padding - kernel) // stride + 1
            flops = 2 * batch * out_size * out_size * oc * c * kernel * kernel
            conv_args = (x_q, x_scale, x_zp, packed, w_sum, w_scale, bias32, oc, ks, st, pd, [1, 1], 1)
            if residual:
                out_shape = (batch, oc, out_size, out_size)
                r = torch.randn(out_shape, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=cl)
                r_q = torch.randint(0, 256, out_shape, device=DEVICE, dtype=torch.uint8).contiguous(memory_format=cl)
                r_scale = torch.tensor([0.05], device=DEVICE)

                def ours():
                    return ops.int8_conv2d.residual(*conv_args, torch.uint8, 0.1, 0, None, None, r_q, r_scale, 0, True,
                                                    8)

                def baseline():
                    return F.relu(F.conv2d(x, w, bias, stride, padding) + r)
            else:
                def ours():
                    return ops.int8_conv2d(*conv_args, torch.bfloat16)

                def baseline():
                    return F.conv2d(x, w, bias, stride, padding)
            # on Hopper also the im2col + GEMM path ("[mma]"), which the CUTLASS conv replaces
            times = _compare_gemm_kernels(ours, {"cuDNN bf16 channels-last": baseline}, batch * out_size * out_size,
                                          wgmma=False)
            return _rows_per_kernel("conv", name, times, {"cuDNN bf16 channels-last": 1.0},
                                    lambda t: f"{flops / t / 1e12:.0f} TOPS")

        rows.extend(_guarded("conv", name, body))
    return rows


# ---------------------------------------------------------------------------------------------------------------

SECTIONS = ("quantize", "gemm", "linear", "conv")


def run(sections=SECTIONS, quant_numel: int = QUANT_NUMEL,
        progress: Optional[Callable[[List[dict]], None]] = None, wgmma: bool = True) -> List[dict]:
    """All rows of the chosen sections; progress(rows so far) after each section. wgmma: also time the opt-in
    wgmma GEMM kernel where it can run."""
    if DEVICE == "cuda" and (not torch.cuda.is_available() or not torchquant.has_cuda_kernels()):
        raise RuntimeError("the GPU benchmarks need a CUDA device and torchquant built with its CUDA kernels")
    copy_bw = copy_bandwidth((1 << 30) // SHRINK, device=DEVICE)
    _log(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
    rows: List[dict] = [{"section": "limits", "case": f"device-to-device copy, {1024 // SHRINK} MiB",
                         "achieved": f"{copy_bw / 1e9:.0f} GB/s"}]
    section_rows = {"quantize": lambda: quantize_rows(quant_numel, copy_bw), "gemm": lambda: gemm_rows(wgmma),
                    "linear": lambda: linear_rows(wgmma), "conv": conv_rows}
    for section in sections:
        rows += section_rows[section]()
        if progress is not None:
            progress(rows)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for gpu_bench.json and gpu_bench.md (rewritten after "
                                                    "each section, so a run cut short keeps what it measured)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quant-numel", type=int, default=QUANT_NUMEL)
    parser.add_argument("--no-wgmma", action="store_true",
                        help="leave the hand-written wgmma GEMM kernel out (e.g. when its tests failed)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a check of the plumbing on the CPU, every size divided by 32")
    args = parser.parse_args(argv)
    global DEVICE, SHRINK
    DEVICE, SHRINK = args.device, (32 if args.device == "cpu" else 1)
    quant_numel = args.quant_numel // SHRINK
    meta = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (plumbing check)",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    header = (f"GPU benchmarks: {meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), {meta['date']}. "
              "speedup = baseline time / torchquant time (median of interleaved runs).")

    def table(rows: List[dict]) -> str:
        return header + "\n\n" + markdown_table(rows, COLUMNS)

    def save(rows: List[dict]) -> None:
        if not args.out:
            return
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write(table(rows) + "\n")

    rows = run(args.sections, quant_numel, progress=save, wgmma=not args.no_wgmma)
    print(table(rows))


if __name__ == "__main__":
    main()
