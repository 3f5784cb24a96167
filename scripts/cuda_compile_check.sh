#!/usr/bin/env bash
# Compiles the extension with its CUDA kernels (nvcc; TORCH_CUDA_ARCH_LIST 9.0 by default, which setup.py builds as
# sm_90a, with the CUTLASS GEMMs and convolution of csrc/cuda/sm90 and the wgmma GEMM of csrc/cuda/gemm_sm90.cu)
# against torch 2.14.1, the CUDA 13.0 build on local disk, in its own venv (CUDA_VENV, default .venv-cuda; the
# CUTLASS headers come from the nvidia-cutlass wheel installed there), and checks that the built library registers
# CUDA kernels for every op (and holds the CUTLASS GEMM and conv kernels and the wgmma kernel when the arch list has
# 9.0). Needs no GPU. MAX_JOBS (default 2) sets the parallel compiles: each CUTLASS translation unit (a GEMM type
# pair, or a conv output type with its two kernels) takes one to one and a half minutes of one core and up to 5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.venv-cuda}
PY=$VENV/bin/python
if ! "$PY" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip wheel "setuptools>=77"
  "$PY" -m pip install -q ninja torch==2.14.1
fi
CUTLASS_REQUIREMENT=$(sed -n 's/^CUTLASS_REQUIREMENT = "\(.*\)"$/\1/p' setup.py)  # the pinned nvidia-cutlass
CUTLASS_VERSION=${CUTLASS_REQUIREMENT#*==}
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('nvidia-cutlass') != '$CUTLASS_VERSION')" \
    2>/dev/null; then
  "$PY" -m pip install -q "$CUTLASS_REQUIREMENT"
fi
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"  # cuBLAS/cuSPARSE headers come from the pip packages
export MAX_JOBS=${MAX_JOBS:-2}
rm -rf build-cuda
start=$SECONDS
TORCHQUANT_CUDA=1 "$PY" setup.py -q build_ext --build-lib build-cuda/lib --build-temp build-cuda/tmp
echo "compiled in $((SECONDS - start)) s with MAX_JOBS=$MAX_JOBS"
"$PY" - <<'PYEOF'
import glob, os, torch
lib = glob.glob("build-cuda/lib/torchquant/_C*.so")[0]
torch.ops.load_library(lib)
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("torchquant::")]
# an op composed of other ops in C++ (CompositeExplicitAutograd) runs on CUDA through their CUDA kernels
composite = [op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")]
missing = [op for op in ops if op not in composite and not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print(f"built {lib}: {len(ops)} ops, CUDA kernels for {len(ops) - len(missing) - len(composite)}, "
      f"composites of them: {composite}")
if missing:
    raise SystemExit(f"ops without a CUDA kernel: {missing}")
archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
if any(a.split("+")[0] in ("9.0", "9.0a") for a in archs):
    with open(lib, "rb") as f:
        data = f.read()
    if b"gemm_wgmma_kernel" not in data:
        raise SystemExit("the arch list has 9.0 but the library holds no gemm_wgmma_kernel (csrc/cuda/gemm_sm90.cu)")
    # the mangled names of the CUTLASS kernels: TMA warp-specialized main loop, int8 x int8 and uint8 x int8 wgmma;
    # the implicit-GEMM conv (ConvUniversal) with its TMA im2col main loop and 64x128 wgmma tiles
    for needle in (b"MainloopSm90TmaGmmaWarpSpecialized", b"MMA_64x256x32_S32S8S8_SS_TN",
                   b"MMA_64x256x32_S32U8S8_SS_TN", b"StreamKScheduler", b"ConvUniversal",
                   b"MainloopSm90TmaGmmaWarpSpecializedImplicitGemm", b"SM90_TMA_LOAD_IM2COL",
                   b"MMA_64x128x32_S32S8S8_SS_TN", b"MMA_64x128x32_S32U8S8_SS_TN"):
        if needle not in data:
            raise SystemExit(f"the arch list has 9.0 but the library holds no {needle.decode()} kernel "
                             "(csrc/cuda/sm90)")
    print("the sm_90a CUTLASS GEMM and conv kernels and the wgmma GEMM kernel are built in")
PYEOF
