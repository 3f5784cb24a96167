#!/usr/bin/env bash
# The one GPU run: on a fresh H100/H200 machine (torch with CUDA, nvcc, ninja, pytest; no network), from the repo
# root: build the extension with its CUDA kernels, run the CUDA tests (failing, not skipping, when CUDA is not
# usable), then the GPU benchmarks. Logs, gpu_bench.json and gpu_bench.md go to $OUT (or the folder given as $1).
# A failing test does not stop the benchmarks, and a crashing benchmark row does not stop the others; the table is
# printed last. The GEMM, linear and conv tests run a second time with TORCHQUANT_CUDA_GEMM=wgmma (the opt-in Hopper
# kernel, plus tests/test_wgmma.py); when those fail, the benchmarks time the default kernel only.
# Exit status: non-zero when the build, the tests (either run) or the benchmarks failed.
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
TEST_TIMEOUT=${TEST_TIMEOUT:-200}  # seconds for all test attempts together
WGMMA_TEST_TIMEOUT=${WGMMA_TEST_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}

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

echo "== summary: tests rc=$test_rc, wgmma tests rc=$wgmma_rc, benchmarks rc=$bench_rc"
cat "$OUT/test_summary.txt" "$OUT/test_summary.wgmma.txt"
if [ -f "$OUT/gpu_bench.md" ]; then
  cat "$OUT/gpu_bench.md"
else
  tail -n 30 "$OUT/bench.log"
fi
[ "$test_rc" -eq 0 ] && [ "$wgmma_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
