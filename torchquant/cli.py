"""The `torchquant` command (also `python -m torchquant`): convert, report, export, bench, demo.

Problems with the user's input (files, specs, options, data that does not fit the model) are printed as one line
on stderr with exit status 2; --debug prints the traceback as well.
"""
import argparse
import collections.abc
import dataclasses
import os
import sys
import traceback
import warnings
from typing import List, Optional

import torch

from torchquant._cli_io import (UsageError, atomic_output, batches_of, check_output, checkpoint_meta,
                                factory_sources, holds_quantized_model, load_inputs, load_model, same_file, _one_line)
from torchquant._ops import ROUNDINGS
from torchquant.config import DEFAULT_PRESET, PRESETS, WEIGHT_GRANULARITIES
from torchquant.io import dtype_name
from torchquant.observers import OBSERVERS
from torchquant.timing import num_threads

__all__ = ["main", "build_parser"]


# ----------------------------------------------------------------------------------------------------------
# options shared by subcommands

class _BenchmarkNames(collections.abc.Sequence):
    """torchquant.bench.BENCHMARKS as bench's --only choices, imported only when argparse reads them (bench's
    --help, or --only given): the library never loads its benchmarks otherwise."""

    def _names(self):
        from torchquant.bench import BENCHMARKS
        return BENCHMARKS

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")
    common.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    common.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: torch's choice; 1 is fastest for small models on a "
                             "busy machine)")
    return common


def _model_options() -> argparse.ArgumentParser:
    opts = argparse.ArgumentParser(add_help=False)
    group = opts.add_argument_group("model")
    group.add_argument("model", metavar="MODEL",
                       help="package.module:factory (a callable returning an nn.Module), or a file saved with "
                            "torch.save(model) (read only with --trust-pickle)")
    group.add_argument("--weights", metavar="FILE",
                       help="weights for a factory MODEL: safetensors (any name), a float model's "
                            "torchquant.save checkpoint, or a torch.save'd state dict")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow unpickling a torch.save'd MODEL file (unpickling runs code from the file)")
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")

    group = opts.add_argument_group("quantization (a preset, optionally adjusted)")
    group.add_argument("--config", "--preset", metavar="PRESET", choices=list(PRESETS),
                       help="; ".join(f"{name}{' (default)' if name == DEFAULT_PRESET else ''}: {preset.description}"
                                      for name, preset in PRESETS.items()))
    group.add_argument("--bits", type=int, metavar="N", help="weight bits, 1-8")
    group.add_argument("--act-bits", type=int, metavar="N",
                       help="activation bits, 1-8 (2-8 for per-token dynamic activations and integer pipelines; "
                            "7 on CPUs without AVX-512 VNNI: uint8 activations below 128, multiplied as bytes)")
    group.add_argument("--rounding", metavar="R", choices=ROUNDINGS,
                       help="nearest (default) or truncate, for weights and activations")
    group.add_argument("--granularity", metavar="G", choices=WEIGHT_GRANULARITIES,
                       help="weight scales: per_channel (default) or per_tensor")
    group.add_argument("--observer", metavar="O", choices=list(OBSERVERS),
                       help="range observer of the weights and of static activations: "
                            + "; ".join(f"{name}: {kind.description}" for name, kind in OBSERVERS.items()))
    group.add_argument("--skip", nargs="+", default=[], metavar="PATTERN",
                       help="module names (globs) to keep in float")
    group.add_argument("--min-sqnr", type=float, metavar="DB",
                       help="keep a layer float (or 8-bit instead of fewer bits) when its output SQNR on the "
                            "calibration data would fall below DB decibels")
    group.add_argument("--min-speedup", type=float, metavar="X",
                       help="keep a layer float (or 8-bit) unless quantizing it makes it at least X times faster")

    group = opts.add_argument_group("data")
    group.add_argument("--calib", metavar="FILE",
                       help="calibration inputs: .pt or .safetensors holding a tensor [N, ...] (or "
                            "{'inputs': tensor}); split into batches for you")
    group.add_argument("--eval", metavar="FILE",
                       help="evaluation inputs and labels ({'inputs': ..., 'labels': ...} or (inputs, labels)); "
                            "without labels the quantized model's agreement with float is reported")
    group.add_argument("--batch-size", type=int, default=32, metavar="N", help="batch size (default: 32)")
    opts.add_argument("--force", action="store_true",
                      help="replace output files even where they are read-only (like cp -f)")
    return opts


class _Parser(argparse.ArgumentParser):
    """argparse's parser (the subcommands' too), whose errors say when --skip took MODEL as one of its patterns."""

    def parse_known_args(self, args=None, namespace=None):
        self._words = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        if "required: MODEL" in message and "--skip" in getattr(self, "_words", ()):
            message += " (--skip takes every word after it as a pattern, MODEL too: give MODEL before --skip)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="torchquant",
        description="Integer quantization for PyTorch models: convert, report, export, benchmark, demo.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common, model_opts = _common_options(), _model_options()

    convert = commands.add_parser(
        "convert", parents=[model_opts, common], help="quantize a model and write a checkpoint",
        description="Quantize MODEL and write a pickle-free checkpoint that torchquant.load(OUT, model) reads.")
    convert.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint to write")
    convert.add_argument("--report", metavar="FILE.json", help="also write the per-layer report as JSON")
    convert.add_argument("--strict", action="store_true",
                         help="fail instead of warning when no layer would be quantized or a factory MODEL has "
                              "no --weights")
    convert.set_defaults(handler=_cmd_convert)

    report = commands.add_parser(
        "report", parents=[model_opts, common], help="per-layer error, size and speed of quantizing a model",
        description="Quantize MODEL in memory and report per layer what it costs (error), saves (bytes) and "
                    "gains (speed), with totals and accuracy (or agreement with float) on --eval.")
    report.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
    report.add_argument("--markdown", metavar="FILE", help="write the report as Markdown, with a PNG plot "
                                                           "beside it when matplotlib is installed")
    report.add_argument("--repeats", type=int, default=7, metavar="N",
                        help="timing samples per layer (median; default: 7)")
    report.set_defaults(handler=_cmd_report)

    bench = commands.add_parser(
        "bench", parents=[common], help="kernel benchmarks as ratio tables",
        description="Run the kernel benchmarks of torchquant.bench on this machine and print ratio tables.")
    bench.add_argument("--device", default="cpu",
                       help="cpu (quantize, gemm_cpu, layers, elementwise) or cuda (gpu); default: cpu")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    bench.add_argument("--only", nargs="+", metavar="NAME", choices=_BenchmarkNames(),
                       help="run only these benchmarks (%(choices)s; default: all that fit --device)")
    bench.set_defaults(handler=_cmd_bench)

    export = commands.add_parser(
        "export", parents=[model_opts, common],
        help="write a quantized model as ONNX (QDQ) or as an AOTInductor package",
        description="Write MODEL as standard ONNX that onnxruntime runs with torchquant's integers (QDQ around "
                    "static layers; MatMulInteger/ConvInteger with a float epilogue for dynamic Linears and integer "
                    "pipelines), or, for an OUT ending in .pt2, as an AOTInductor package that calls torchquant's "
                    "kernels (run it with torch._inductor.aoti_load_package where torchquant is imported): a float "
                    "MODEL is quantized first (as convert does); a MODEL that is already quantized, or --weights "
                    "holding a checkpoint written by convert, is exported as it is. The example input that fixes the "
                    "input shape is the first --calib batch or --input-shape.")
    export.add_argument("-o", "--output", required=True, metavar="OUT.onnx|OUT.pt2",
                        help="ONNX file, or AOTInductor package (.pt2), to write")
    export.add_argument("--input-shape", metavar="N,C,...",
                        help="shape of the example input (float32) when --calib is not given, e.g. 1,1,8,8")
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: 21)")
    export.add_argument("--fixed-batch", action="store_true",
                        help="keep the example input's batch size (default: the batch dimension is free)")
    export.set_defaults(handler=_cmd_export)

    demo = commands.add_parser(
        "demo", parents=[common], help="train, quantize and compare a CNN on the digits data set",
        description="Train a small CNN on scikit-learn's 8x8 digits (seconds), quantize it several ways and "
                    "compare accuracy, size and CPU latency with float. Latency is measured on one thread unless "
                    "--threads says otherwise.")
    demo.add_argument("--epochs", type=int, default=10, metavar="N", help="training epochs (default: 10)")
    demo.add_argument("--qat-epochs", type=int, default=3, metavar="N",
                      help="quantization-aware training epochs of the 4-bit model (default: 3)")
    demo.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _version() -> str:
    from torchquant import __version__
    return __version__


# ----------------------------------------------------------------------------------------------------------
# building the job shared by convert and report

def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda was asked for but torch sees no CUDA device")
    return device


def config_from_args(args):
    """The QuantConfig that --config (a preset) and the adjusting options describe."""
    from torchquant.config import QuantConfig
    config = QuantConfig.preset(args.config or DEFAULT_PRESET)  # argparse checked the name
    weight, activation = config.weight, config.activation

    def adjusted(spec, option, **change):
        try:
            return dataclasses.replace(spec, **change)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{option}: {str(exc).removeprefix('QuantSpec: ')}") from exc

    if args.bits is not None:
        weight = adjusted(weight, "--bits", bits=args.bits)
    if args.granularity is not None:
        weight = adjusted(weight, "--granularity", granularity=args.granularity)
    if args.rounding is not None:
        weight = adjusted(weight, "--rounding", rounding=args.rounding)
        if activation is not None:
            activation = adjusted(activation, "--rounding", rounding=args.rounding)
    if args.observer is not None:
        weight = adjusted(weight, "--observer", observer=args.observer)
        if activation is not None and not activation.dynamic:
            activation = adjusted(activation, "--observer", observer=args.observer)
    if args.act_bits is not None:
        if activation is None:
            raise UsageError("--act-bits: the chosen preset keeps activations in float")
        activation = adjusted(activation, "--act-bits", bits=args.act_bits)
    try:
        return dataclasses.replace(config, weight=weight, activation=activation, skip=tuple(args.skip))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"configuration: {str(exc).removeprefix('QuantConfig: ')}") from exc


# the dims of a batch for a conv (one more than its unbatched input, which torch also takes and misreads a batch as)
_BATCH_DIMS = {torch.nn.Conv1d: 3, torch.nn.Conv2d: 4, torch.nn.Conv3d: 5}


def _check_fits(model, batch: torch.Tensor, option: str, path: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            return model(batch)
    except Exception as exc:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        conv, dims = next(((m, d) for m in model.modules() for t, d in _BATCH_DIMS.items() if isinstance(m, t)),
                          (None, None))
        hint = ""
        if conv is not None and batch.dim() != dims:
            hint = f" (the model's first conv, {type(conv).__name__}, takes {dims}-D batches; this one is " \
                   f"{batch.dim()}-D)"
        elif not batch.is_floating_point() and dtype is not None:
            hint = (f" (the model computes in {dtype_name(dtype)}: save the inputs as {dtype_name(dtype)}, "
                    f"e.g. images as x.float() / 255)")
        elif batch.is_floating_point() and dtype is not None and batch.dtype != dtype:
            hint = f" (the model's parameters are {dtype_name(dtype)}: save the inputs as {dtype_name(dtype)})"
        raise UsageError(f"{option}: a batch of shape {list(batch.shape)} ({dtype_name(batch.dtype)}) from {path} "
                         f"does not fit the model: {_one_line(exc)}{hint}") from exc


class _Job:
    """What convert and report share: the float model on its device, the config, calibration batches and the
    evaluation set, all checked against the model before any quantization starts."""

    def __init__(self, args):
        self.device = _device(args.device)
        if args.min_sqnr is not None and args.min_sqnr != args.min_sqnr:
            raise UsageError("--min-sqnr: expected a number of decibels, got nan")
        if args.min_speedup is not None and not args.min_speedup > 0:
            raise UsageError(f"--min-speedup: expected a positive ratio, got {args.min_speedup}")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size: expected a positive integer, got {args.batch_size}")
        self.config = config_from_args(args)
        self.model = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle).to(self.device)
        self.calib: Optional[List[torch.Tensor]] = None
        if args.calib is not None:
            inputs, _ = load_inputs(args.calib, "--calib")
            self.calib = [b.to(self.device) for b in batches_of(inputs, args.batch_size)]
            _check_fits(self.model, self.calib[0], "--calib", args.calib)
        self.eval = None
        if args.eval is not None:
            inputs, labels = load_inputs(args.eval, "--eval", want_labels=True)
            batches = [b.to(self.device) for b in batches_of(inputs, args.batch_size)]
            output = _check_fits(self.model, batches[0], "--eval", args.eval)
            if labels is not None:
                if not isinstance(output, torch.Tensor) or output.dim() != 2:
                    raise UsageError(f"--eval: labels need a model that returns [batch, classes] logits; it "
                                     f"returned {_describe(output)}")
                low, high = labels.min().item(), labels.max().item()
                if low < 0 or high >= output.shape[1]:
                    raise UsageError(f"--eval: labels must be in [0, {output.shape[1] - 1}] (the model has "
                                     f"{output.shape[1]} outputs), got [{low}, {high}]")
                labels = list(labels.split(args.batch_size))
            self.eval = (batches, labels)
        activation = self.config.activation
        needs_calibration = activation is not None and not activation.dynamic
        if needs_calibration and self.calib is None:
            raise UsageError("--calib: the config quantizes activations statically; calibration inputs are "
                             "required")
        self.min_sqnr, self.min_speedup = args.min_sqnr, args.min_speedup
        if (self.min_sqnr is not None or self.min_speedup is not None) and self.calib is None:
            raise UsageError("--calib: --min-sqnr and --min-speedup measure layers on calibration inputs; "
                             "give them with --calib")

    def quantize(self, progress: bool):
        """(quantized copy of the model, per-layer decisions of the sensitivity budget)."""
        from torchquant.budget import quantize_with_budget
        return quantize_with_budget(self.model, self.config, self.calib, min_sqnr=self.min_sqnr,
                                    min_speedup=self.min_speedup, progress=progress)

    def report(self, quantized, decisions, *, repeats: int, progress: bool):
        from torchquant.report import build_report
        return build_report(self.model, quantized, self.config, calibration=self.calib, evaluation=self.eval,
                            decisions=decisions, repeats=repeats, progress=progress, min_sqnr=self.min_sqnr,
                            min_speedup=self.min_speedup)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__


def _check_output_path(out: str, option: str, args) -> None:
    """Before any work: the output can be written (see check_output) and is none of the input files."""
    check_output(out, option, force=args.force)
    sources = [("MODEL's source", path) for path in factory_sources(args.model)]
    for option_in, path in (("MODEL", args.model), *sources, ("--weights", args.weights), ("--calib", args.calib),
                            ("--eval", args.eval)):
        if path is not None and same_file(out, path):
            raise UsageError(f"{option}: {out} is the {option_in} file; input files are never overwritten")


def _status(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# subcommands

def _warn(args, message: str) -> None:
    """One line on stderr (even with --quiet), or with --strict the error that stops the command."""
    if args.strict:
        raise UsageError(f"{message} (an error with --strict)")
    print(f"torchquant {args.command}: warning: {message}", file=sys.stderr)


def _report_warnings(args, report) -> None:
    """The report's warnings (the last lines of its table) on stderr, where the table is not shown."""
    for note in report.notes:
        if note.startswith("warning: "):
            print(f"torchquant {args.command}: {note}", file=sys.stderr)


def _cmd_convert(args) -> int:
    from torchquant.convert import nothing_quantized_reason
    from torchquant.io import write_checkpoint
    from torchquant.nn.base import quant_layers
    from torchquant.report import float_only_layers, write_json
    _check_output_path(args.output, "-o", args)
    if args.report is not None:
        _check_output_path(args.report, "--report", args)
        if os.path.abspath(args.report) == os.path.abspath(args.output):
            raise UsageError(f"--report: {args.report} is also the checkpoint (-o); give two file names")
    job = _Job(args)
    factory = not os.path.exists(args.model)
    if args.weights is None and factory and any(True for _ in job.model.parameters()):
        _warn(args, f"no --weights: quantizing the weights {args.model} creates (its random initialisation, "
                    f"unless it loads trained weights itself)")
    quantized, decisions = job.quantize(progress=not args.quiet)
    if not quant_layers(quantized):
        why = nothing_quantized_reason(job.model, "--skip, --min-sqnr, --min-speedup", "MODEL")
        _warn(args, f"nothing was quantized: {why}; {args.output} holds the float model")
    with atomic_output(args.output, "-o", force=args.force) as temp:
        write_checkpoint(quantized, temp)
    if args.quiet and args.report is None:
        return 0  # the report is only for showing or writing
    report = job.report(quantized, decisions, repeats=5, progress=not args.quiet)
    if args.report is not None:
        with atomic_output(args.report, "--report", force=args.force) as temp:
            write_json(report, temp)
    if not args.quiet:
        print(report.format_table())
    else:
        _report_warnings(args, report)
    kept = [layer.name for layer in report.layers if not layer.quantized]
    # layers no quantized type replaces (an LSTM, a ConvTranspose2d) are not in report.layers: counted apart
    float_only = float_only_layers(job.model)
    named = ", ".join(float_only[:3]) + (", ..." if len(float_only) > 3 else "")
    quantized = len(report.layers) - len(kept)
    _status(args, f"wrote {args.output}: {quantized} layer{'' if quantized == 1 else 's'} quantized, "
                  f"{len(kept)} kept float"
                  + (f", {len(float_only)} with no quantized type ({named})" if float_only else "")
                  + f"; model {report.bytes_float / 1024:.1f} KiB -> {report.bytes_quantized / 1024:.1f} KiB"
                  + (f"; report {args.report}" if args.report else ""))
    return 0


def _cmd_report(args) -> int:
    from torchquant.report import write_json, write_markdown
    for option in ("json", "markdown"):
        path = getattr(args, option)
        if path is not None and path != "-":
            _check_output_path(path, f"--{option}", args)
    if args.json is not None and args.markdown is not None and \
            os.path.abspath(args.json) == os.path.abspath(args.markdown):
        raise UsageError(f"--markdown: {args.markdown} is also the --json file; give two file names")
    if args.repeats < 1:
        raise UsageError(f"--repeats: expected a positive integer, got {args.repeats}")
    job = _Job(args)
    quantized, decisions = job.quantize(progress=not args.quiet)
    report = job.report(quantized, decisions, repeats=args.repeats, progress=not args.quiet)
    if args.json == "-":
        write_json(report, sys.stdout)
        _report_warnings(args, report)
    else:
        print(report.format_table())
        if args.json is not None:
            with atomic_output(args.json, "--json", force=args.force) as temp:
                write_json(report, temp)
            _status(args, f"wrote {args.json}")
    if args.markdown is not None:
        note = write_markdown(report, args.markdown, atomic=lambda path: atomic_output(path, "--markdown",
                                                                                 force=args.force))
        _status(args, f"wrote {args.markdown}" + (f" ({note})" if note else ""))
    return 0


def _input_shape(text: str) -> List[int]:
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        shape = []
    if not shape or any(size < 1 for size in shape):
        raise UsageError(f"--input-shape: expected positive integers separated by commas (e.g. 1,3,224,224), "
                         f"got {text!r}")
    return shape


def _cmd_export(args) -> int:
    import torchquant
    from torchquant.export import ExportError, export_aoti, export_onnx, has_quantized_layers
    _check_output_path(args.output, "-o", args)
    package = args.output.endswith(".pt2")
    if package and args.opset is not None:
        raise UsageError(f"--opset: {args.output} is an AOTInductor package (.pt2), not ONNX")
    if args.input_shape is None and args.calib is None:
        raise UsageError("--input-shape: export needs an example input; give --input-shape or --calib")
    example = None if args.input_shape is None else torch.zeros(_input_shape(args.input_shape))
    options = {"--config": args.config, "--bits": args.bits, "--act-bits": args.act_bits,
               "--rounding": args.rounding, "--granularity": args.granularity, "--observer": args.observer,
               "--skip": args.skip or None, "--min-sqnr": args.min_sqnr, "--min-speedup": args.min_speedup}
    given = [option for option, value in options.items() if value is not None]

    def exported_as_is(what: str) -> None:
        if given:
            raise UsageError(f"{given[0]}: {what} is already quantized and is exported as it is; quantization "
                             f"options apply to a float MODEL")
    meta = checkpoint_meta(args.weights) if args.weights is not None and os.path.isfile(args.weights) else None
    if meta is not None and holds_quantized_model(meta):
        exported_as_is(f"--weights {args.weights}")
        model = torchquant.load(args.weights, load_model(args.model, trust_pickle=args.trust_pickle))
        if example is None:
            example = batches_of(load_inputs(args.calib, "--calib")[0], args.batch_size)[0]
    else:
        job = _Job(args)
        model = job.model
        if has_quantized_layers(model):
            exported_as_is(f"MODEL {args.model}")
        else:
            model, _ = job.quantize(progress=not args.quiet)
        if example is None:
            example = job.calib[0]
    from torchquant.examples import model_device
    option = "--calib" if args.input_shape is None else "--input-shape"
    try:
        _check_fits(model, example.to(model_device(model)), option, args.calib or "the given shape")
    except UsageError as exc:
        if args.input_shape is None or not any(isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                                               for m in model.modules()):
            raise
        raise UsageError(f"{exc} (--input-shape gives float32 zeros; for an nn.Embedding's token ids, give the "
                         f"example input as --calib FILE)") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's and onnxscript's notes about their own internals
            if package:
                export_aoti(model, example, args.output, dynamic_batch=not args.fixed_batch, force=args.force)
            else:
                export_onnx(model, example, args.output, opset=args.opset, dynamic_batch=not args.fixed_batch,
                            force=args.force)
    except (ExportError, ValueError, TypeError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from exc
    except ModuleNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    _status(args, f"wrote {args.output}")
    return 0


def _cmd_bench(args) -> int:
    import torchquant
    from torchquant.bench import BENCHMARKS, run_benchmarks
    device = _device(args.device)
    if device.type == "cpu":
        print(f"CPU kernels: {torchquant.cpu_kernel_path()} (each table's threads column gives its thread count)")
    ran = run_benchmarks(args.only or BENCHMARKS, device.type, quick=args.quick, threads=args.threads,
                         status=lambda message: _status(args, message))
    if ran == 0:
        raise UsageError(f"no benchmark could run on {device.type} (see the lines above)")
    return 0


def _cmd_demo(args) -> int:
    from torchquant.demo import DEFAULT_THREADS, run_demo
    for option, value in (("--epochs", args.epochs), ("--qat-epochs", args.qat_epochs)):
        if value < 1:
            raise UsageError(f"{option}: expected a positive integer, got {value}")
    if not -2 ** 63 <= args.seed < 2 ** 64:  # what torch.manual_seed takes
        raise UsageError(f"--seed: expected an integer in [-2**63, 2**64), got {args.seed}")
    run_demo(epochs=args.epochs, qat_epochs=args.qat_epochs, seed=args.seed,
             threads=args.threads or DEFAULT_THREADS, quiet=args.quiet)
    return 0


# ----------------------------------------------------------------------------------------------------------

def _show_warning_as_one_line(message, category, filename, lineno, file=None, line=None):
    text = str(message).strip().splitlines()
    print(f"torchquant: warning: {text[0] if text else category.__name__}", file=file or sys.stderr)


def _run(args) -> int:
    """The subcommand, with the process-wide settings it changes (torch threads, warning display) restored
    afterwards, so main() can also be called from Python."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: expected a positive integer, got {args.threads}")
    with warnings.catch_warnings(), num_threads(args.threads or torch.get_num_threads()):
        if not args.debug:
            warnings.showwarning = _show_warning_as_one_line
        return args.handler(args)


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command line `argv` (default sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"torchquant {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- the command line reports every failure as one line
        if args.debug:
            traceback.print_exc()
        message = str(exc) if isinstance(exc, UsageError) else _one_line(exc)
        hint = "" if args.debug or isinstance(exc, UsageError) else " (--debug shows the traceback)"
        print(f"torchquant {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2
