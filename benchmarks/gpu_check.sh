#!/usr/bin/env bash
# The GPU run: builds the extension for the GPU at hand, runs the CUDA tests, the kernel benchmarks and the model
# benchmarks, and writes the results. Meant for a fresh H100/H200 machine without network access.
#
# Needs: python3 with a CUDA build of torch, nvcc, ninja and pytest (16 cores: the build runs with MAX_JOBS=16), and,
# from the repository root, the git-ignored folder .gpu-carry prepared with network access by `make gpu-bundle`:
#   .gpu-carry/wheels/nvidia_cutlass-*.whl  the CUTLASS headers of the sm_90a GEMMs (unpacked here; never
#                                            installed, nothing is downloaded)
#   .gpu-carry/minilm/                       all-MiniLM-L6-v2 as float16 safetensors (~44 MiB), for the MiniLM rows
# (about 51 MiB together). Without the wheel, an installed nvidia-cutlass or CUTLASS_INCLUDE_DIR is used; without the
# MiniLM bundle the MiniLM rows are reported as skipped.
#
# Usage, from the repository root:   bash benchmarks/gpu_check.sh [OUT]
# A shorter run (a check of one change) picks its parts through the environment:
#   TEST_ARGS="tests/test_graph.py ..."             the CUDA suite's files or test ids (default: tests, all)
#   WGMMA_TESTS=0                                   no wgmma test step (the benchmarks then time no wgmma rows)
#   BENCH_SECTIONS="conv ..."                       torchquant.bench.gpu's sections (default: all)
#   MODEL_PARTS="resnet ..."                        benchmarks/models_gpu.py's parts (default: resnet bert minilm convnets)
# Writes into OUT (default $OUT, else out/gpu) exactly these 8 files:
#   build.log        the build, its time, the count of wgmma (IGMMA) instructions and of the CUTLASS GEMM and conv
#                    kernels in the built library
#   tests.log        every pytest run: the CUDA suite with the automatic kernel choice (CUTLASS on Hopper), then the
#                    GEMM, linear and conv cases again under TORCHQUANT_CUDA_GEMM=wgmma (the hand-written kernel)
#   bench.log        the logs of the kernel and model benchmarks
#   gpu_bench.json / gpu_bench.md       kernel rows (torchquant.bench.gpu): quantize family, int8_mm, dynamic linear,
#                    conv, each against its baseline; on Hopper the GEMM rows also time CUTLASS, mma.sync and wgmma
#   models-gpu.json / models-gpu.md     model rows (benchmarks/models_gpu.py): ResNet-18/50 at 224x224 (int8-static
#                    and int8-pipeline, eager and replayed from CUDA graphs, and ResNet-50's top kernels), a
#                    BERT-base-shaped encoder int8-dynamic at batch 32 x 128 against bf16, all-MiniLM-L6-v2 at batch
#                    1/8/64, ResNet stages
#   summary.md       test summaries and all tables (also printed at the end)
# Each step is bounded (seconds: build 200, tests 140, wgmma tests 35, kernel benchmarks 80, models 130: 585 in all,
# 625 when a crashing test makes the suite run again, each rerun getting at least 20); on an H200 it took 7 minutes,
# most of it the build (156 s: the CUTLASS GEMM and conv translation units in parallel), the CUDA suite (92 s) and
# the models (about 100 s). A failing test does not stop the
# benchmarks, a crashing benchmark row does not stop the others. Exit status: non-zero when the build, a test step or a benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-out/gpu}}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # per-step logs and per-part tables, merged into the files of $OUT
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, without an install
# cuBLAS/cuSPARSE headers that ATen's CUDA headers include may live only in the nvidia pip packages; CPATH is
# searched after nvcc's -I folders, so it fills gaps only
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for inc in "$SITE"/nvidia/cu13/include "$SITE"/nvidia/*/include; do
  [ -d "$inc" ] && CPATH="${CPATH:+$CPATH:}$inc"
done
export CPATH=${CPATH:-}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-200}
TEST_TIMEOUT=${TEST_TIMEOUT:-140}  # all attempts together (about 95 s on an H200)
WGMMA_TEST_TIMEOUT=${WGMMA_TEST_TIMEOUT:-35}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-80}  # the conv rows (last) time the CUTLASS conv, the im2col path and cuDNN
MODEL_TIMEOUT=${MODEL_TIMEOUT:-130}  # the four model parts together (a part with under 20 s left does not run)
read -r -a test_args <<<"${TEST_ARGS:-tests}"
read -r -a bench_sections <<<"${BENCH_SECTIONS:-}"
read -r -a parts <<<"${MODEL_PARTS:-resnet bert minilm convnets}"  # the whole ResNets first: the goal rows

{
  echo "== machine"
  nvidia-smi -L
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
  nproc
  date -u
} 2>&1 | tee "$OUT/summary.md"

echo "== build (log: $OUT/build.log)"
# The CUTLASS headers: unpacked from the carried wheel (a zip) unless CUTLASS_INCLUDE_DIR is set
wheel=$(ls .gpu-carry/wheels/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
if [ -z "${CUTLASS_INCLUDE_DIR:-}" ] && [ -n "$wheel" ]; then
  "$PY" -m zipfile -e "$wheel" "$WORK/cutlass" &&
    export CUTLASS_INCLUDE_DIR="$WORK/cutlass/cutlass_library/source/include"
fi
start=$SECONDS
if ! TORCHQUANT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} timeout "$BUILD_TIMEOUT" \
    "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -n 40
  tail -n 20 "$OUT/build.log"
  echo "BUILD FAILED after $((SECONDS - start)) s" | tee -a "$OUT/summary.md"
  exit 1
fi
echo "built in $((SECONDS - start)) s" | tee -a "$OUT/build.log" "$OUT/summary.md"
# wgmma in the machine code: IGMMA (integer) instructions, and the CUTLASS kernels among the functions
lib=$(ls torchquant/_C*.so | head -n 1)
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$lib" >"$WORK/sass.txt" 2>&1
  echo "SASS of $lib: $(grep -c IGMMA "$WORK/sass.txt") IGMMA instructions, $(grep -c 'Function : .*GemmUniversal' \
    "$WORK/sass.txt") CUTLASS GEMM and $(grep -c 'Function : .*ConvUniversal' "$WORK/sass.txt") CUTLASS conv kernels, \
$(grep -c 'Function :' "$WORK/sass.txt") kernels" |
    tee -a "$OUT/build.log" "$OUT/summary.md"
fi

echo "== CUDA tests (log: $OUT/tests.log)"
start=$SECONDS
# every CUDA case of the suite (the `device` fixture's cuda param and the tests/test_cuda*.py modules carry the cuda
# marker); --maxfail rather than -x, so one run shows more than the first failure. A test that kills the process (a
# crash in a kernel) is named from faulthandler's traceback, deselected, and the suite run again (at most twice),
# so that a crash does not hide the tests after it.
crashed=()
deselect=()
: >"$OUT/tests.log"
for attempt in 1 2 3; do
  left=$((TEST_TIMEOUT - (SECONDS - start)))
  [ "$left" -lt 20 ] && left=20
  # tests/test_wgmma.py forces the hand-written kernel: it runs in the wgmma step below
  TORCHQUANT_REQUIRE_CUDA=1 timeout "$left" "$PY" -m pytest -q -rfE -m "cuda and not slow" --maxfail=25 \
      --tb=short -p no:cacheprovider --ignore=tests/test_wgmma.py ${deselect[@]+"${deselect[@]}"} "${test_args[@]}" \
      >"$WORK/pytest.$attempt.log" 2>&1
  test_rc=$?
  { echo "== attempt $attempt (rc=$test_rc)"; cat "$WORK/pytest.$attempt.log"; } >>"$OUT/tests.log"
  # pytest itself exits with 0..5; anything else (139 SIGSEGV, 134 SIGABRT, 124 timeout) ended the process early
  [ "$test_rc" -le 5 ] && break
  victim=$(grep -oE 'tests/[A-Za-z0-9_/]+\.py", line [0-9]+ in test_[A-Za-z0-9_]+' "$WORK/pytest.$attempt.log" |
    head -n 1 | sed -E 's/", line [0-9]+ in /::/')
  if [ -z "$victim" ] || [ "$attempt" -eq 3 ]; then
    tail -n 30 "$WORK/pytest.$attempt.log"
    break
  fi
  echo "tests: the process died (rc=$test_rc) in $victim; running again without it"
  crashed+=("$victim")
  deselect+=(--deselect "$victim")
done
[ "$test_rc" -eq 0 ] && [ "${#crashed[@]}" -gt 0 ] && test_rc=1
echo "tests: rc=$test_rc in $((SECONDS - start)) s"
{
  echo "== test summary"
  grep -E "^=* ?[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran" "$WORK/pytest.$attempt.log" | tail -n 1
  for t in ${crashed[@]+"${crashed[@]}"}; do echo "CRASHED $t"; done
  grep -E "^(FAILED|ERROR) " "$WORK/pytest.$attempt.log"
} | tee -a "$OUT/summary.md"

bench_flags=()
if [ "${WGMMA_TESTS:-1}" = 0 ]; then
  wgmma_rc=0
  bench_flags+=(--no-wgmma)
  echo "== wgmma tests: not run (WGMMA_TESTS=0)" | tee -a "$OUT/summary.md"
else
  echo "== CUDA GEMM tests with TORCHQUANT_CUDA_GEMM=wgmma (log: $OUT/tests.log)"
  start=$SECONDS
  # the hand-written wgmma kernel of csrc/cuda/gemm_sm90.cu, kept only to be timed against CUTLASS: its own tests, and
  # the GEMM, linear and conv cases of the suite again with the variable set (it is read by every GEMM call)
  TORCHQUANT_REQUIRE_CUDA=1 TORCHQUANT_CUDA_GEMM=wgmma timeout "$WGMMA_TEST_TIMEOUT" "$PY" -m pytest -q -rfE \
      -m "cuda and not slow" -k "wgmma or int8_mm or linear or conv" --maxfail=25 --tb=short -p no:cacheprovider \
      tests/test_wgmma.py tests/test_cuda.py tests/test_gemm.py >"$WORK/pytest.wgmma.log" 2>&1
  wgmma_rc=$?
  { echo "== wgmma tests (rc=$wgmma_rc)"; cat "$WORK/pytest.wgmma.log"; } >>"$OUT/tests.log"
  echo "wgmma tests: rc=$wgmma_rc in $((SECONDS - start)) s"
  {
    echo "== wgmma test summary"
    grep -E "^=* ?[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran" "$WORK/pytest.wgmma.log" | tail -n 1
    grep -E "^(FAILED|ERROR) " "$WORK/pytest.wgmma.log"
    [ "$wgmma_rc" -gt 5 ] && tail -n 30 "$WORK/pytest.wgmma.log"  # killed (timeout, crash): show where
  } | tee -a "$OUT/summary.md"
  [ "$wgmma_rc" -ne 0 ] && bench_flags+=(--no-wgmma)
fi
[ "${#bench_sections[@]}" -gt 0 ] && bench_flags+=(--sections "${bench_sections[@]}")

echo "== GPU benchmarks (log: $OUT/bench.log)"
start=$SECONDS
timeout "$BENCH_TIMEOUT" "$PY" -m torchquant.bench.gpu --out "$OUT" ${bench_flags[@]+"${bench_flags[@]}"} \
    >"$OUT/bench.log" 2>&1
bench_rc=$?
grep -E "Error|error|dropped" "$OUT/bench.log" | head -n 15
echo "benchmarks: rc=$bench_rc in $((SECONDS - start)) s"

echo "== model benchmarks (log: $OUT/bench.log)"
# One process per part, so a part that dies (or runs out of time) keeps the others' rows; each part writes its
# models-gpu-<part>.md/json into $WORK when it ends, merged into $OUT/models-gpu.md/json below. Inside a part, a
# variant that fails is a note row, not the end.
MINILM_BUNDLE=${MINILM_BUNDLE:-.gpu-carry/minilm}
MODEL_DEVICE=${MODEL_DEVICE:-cuda}  # cpu: a check of this step's plumbing without a GPU
# MODEL_ARGS: more options of benchmarks/models_gpu.py, e.g. "--repeats 5 --bert-layers 2"
start=$SECONDS
model_args=()
if [ -f "$MINILM_BUNDLE/model.safetensors" ]; then
  model_args=(--minilm-dir "$MINILM_BUNDLE")
else
  echo "no MiniLM bundle at $MINILM_BUNDLE (make gpu-bundle, then bring .gpu-carry): the MiniLM rows are skipped"
fi
model_rc=0
for part in "${parts[@]}"; do
  left=$((MODEL_TIMEOUT - (SECONDS - start)))
  if [ "$left" -lt 20 ]; then  # the budget is spent: the part is reported as not run, and counts as failed
    echo "models $part: not run, ${left} s of the models' ${MODEL_TIMEOUT} s left" | tee "$WORK/models-$part.log"
    model_rc=124
    continue
  fi
  timeout "$left" "$PY" -m benchmarks.models_gpu --parts "$part" --device "$MODEL_DEVICE" --out "$WORK" \
      ${model_args[@]+"${model_args[@]}"} ${MODEL_ARGS:-} >"$WORK/models-$part.log" 2>&1
  part_rc=$?
  { echo "== models $part (rc=$part_rc)"; cat "$WORK/models-$part.log"; } >>"$OUT/bench.log"
  echo "models $part: rc=$part_rc after $((SECONDS - start)) s"
  [ "$part_rc" -ne 0 ] && model_rc=$part_rc
done
grep -E "failed|Error" "$WORK"/models-*.log | head -n 15
: >"$OUT/models-gpu.md"
for part in "${parts[@]}"; do
  if [ -f "$WORK/models-gpu-$part.md" ]; then
    cat "$WORK/models-gpu-$part.md" >>"$OUT/models-gpu.md"
  else
    { echo "models $part: no table; the end of its log:"; tail -n 15 "$WORK/models-$part.log"; } >>"$OUT/models-gpu.md"
  fi
  echo >>"$OUT/models-gpu.md"
done
"$PY" - "$WORK" "$OUT/models-gpu.json" "${parts[@]}" <<'PYEOF'
import json, os, sys
work, out, parts = sys.argv[1], sys.argv[2], sys.argv[3:]
merged = {}
for part in parts:
    path = os.path.join(work, f"models-gpu-{part}.json")
    if os.path.exists(path):
        with open(path) as f:
            merged[part] = json.load(f)
with open(out, "w") as f:
    json.dump(merged, f, indent=1)
PYEOF

echo "== summary: tests rc=$test_rc, wgmma tests rc=$wgmma_rc, benchmarks rc=$bench_rc, models rc=$model_rc" |
  tee -a "$OUT/summary.md"
{
  if [ -f "$OUT/gpu_bench.md" ]; then cat "$OUT/gpu_bench.md"; else tail -n 30 "$OUT/bench.log"; fi
  echo
  cat "$OUT/models-gpu.md"
} >>"$OUT/summary.md"
cat "$OUT/summary.md"
[ "$test_rc" -eq 0 ] && [ "$wgmma_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$model_rc" -eq 0 ]
