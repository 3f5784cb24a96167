#!/usr/bin/env bash
# Builds the C++ kernels with AddressSanitizer + UndefinedBehaviorSanitizer into build-sanitize/ (apart from the
# normal in-place build, which stays as it is) and runs the CPU op, layer, I/O, fuzz, robustness, integer-pipeline
# op and fast-path tests against that build.
# Any sanitizer report aborts the run with a non-zero exit. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
OUT=$ROOT/build-sanitize
rm -rf "$OUT/lib"
TORCHQUANT_SANITIZE=1 TORCHQUANT_CUDA=0 "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"
# the package's Python files next to the sanitized library: run from $OUT/lib, `import torchquant` finds that copy
tar --exclude='*.so' --exclude=__pycache__ -cf - torchquant | tar -xf - -C "$OUT/lib"

# ASan's runtime must be loaded before everything else in the (unsanitized) Python process, and libstdc++ with it:
# ASan looks up the real __cxa_throw when it starts, and without libstdc++ loaded by then every C++ exception (a
# TORCH_CHECK) aborts. Python keeps memory alive until exit by design, so leak checking is off;
# allocator_may_return_null lets an oversized allocation fail as std::bad_alloc (a MemoryError), as the tests
# expect, instead of aborting. --capture=sys lets a report reach the terminal when it ends the process.
PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)"
cd "$OUT/lib"
export PYTHONPATH=$OUT/lib${PYTHONPATH:+:$PYTHONPATH}  # child processes of the tests import this copy too
export TORCHQUANT_SANITIZED=1 ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# the tests must exercise this build, with the sanitizers live
LD_PRELOAD=$PRELOAD "$PY" -c "
import ctypes, torchquant
assert torchquant.__file__.startswith('$OUT/lib/'), torchquant.__file__
ctypes.CDLL(None).__asan_report_load1  # AttributeError unless ASan is loaded
"
LD_PRELOAD=$PRELOAD "$PY" -m pytest -q -p no:cacheprovider --capture=sys \
  "$ROOT/tests/test_gemm.py" "$ROOT/tests/test_quantize.py" "$ROOT/tests/test_bad_input.py" \
  "$ROOT/tests/test_fuzz_ops.py" "$ROOT/tests/test_nn.py" "$ROOT/tests/test_io.py" \
  "$ROOT/tests/test_robustness.py" "$ROOT/tests/test_int_pipeline_ops.py" "$ROOT/tests/test_fast_path.py" "$@"
