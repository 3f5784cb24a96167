"""Builds torchquant._C: the C++ kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

TORCHQUANT_CUDA=auto (default) builds CUDA when it can, 0 never, 1 always (and fails loudly when it cannot).
TORCHQUANT_SANITIZE=1 adds AddressSanitizer and UndefinedBehaviorSanitizer to the C++ kernels (scripts/sanitize_test.sh).
TORCHQUANT_NO_EXTENSION=1 installs the Python package alone: the Makefile uses it for the editable install and then
builds the extension in place, where ninja rebuilds only what changed.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "torchquant needs PyTorch installed before it is built (it is not a build requirement, so pip cannot fetch a "
        "torch that differs from yours). Install it first, e.g. `pip install torch==2.13.0`, then "
        "`pip install -e . --no-build-isolation`."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted() -> bool:
    mode = os.environ.get("TORCHQUANT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TORCHQUANT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        problems.append("nvcc was not found (set CUDA_HOME)")
    if problems and mode == "1":
        sys.exit("TORCHQUANT_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
    return not problems


def with_sm90a(arch_list: str):
    """arch_list with Hopper's 9.0 replaced by 9.0a, or None when it has neither 9.0 nor 9.0a.

    wgmma (csrc/cuda/gemm_sm90.cu) exists only in the arch-specific target sm_90a, whose code runs on compute
    capability 9.0 exactly, as sm_90 code does. torch's builder passes one set of -gencode flags to every .cu file,
    so the whole extension is built for sm_90a instead of sm_90 (-gencode=arch=compute_90a,code=sm_90a): one image
    per device, none compiled twice. "9.0+PTX" keeps its PTX, as compute_90a.
    """
    archs = [a for a in arch_list.replace(" ", ";").split(";") if a]
    if not any(a.split("+")[0] in ("9.0", "9.0a") for a in archs):
        return None
    return ";".join("9.0a" + a[len("9.0"):] if a.split("+")[0] == "9.0" else a for a in archs)


CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"


def cutlass_include_dirs():
    """The CUTLASS/CuTe header folder (holding cutlass/ and cute/) for the sm_90a kernels of csrc/cuda/sm90, and the
    utility headers beside it (tools/util/include: cutlass/util/packed_stride.hpp, which the conv kernels include).

    CUTLASS_INCLUDE_DIR names it explicitly (e.g. a CUTLASS checkout's include/); otherwise it comes from the
    installed nvidia-cutlass wheel (the `cuda` extra), which ships the headers under cutlass_library/source/include
    (and source/tools/util/include), laid out as in a checkout.
    """
    folder = os.environ.get("CUTLASS_INCLUDE_DIR")
    if folder:
        where = f"CUTLASS_INCLUDE_DIR={folder}"
    else:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or spec.origin is None:
            sys.exit(
                "building the sm_90a kernels (TORCH_CUDA_ARCH_LIST has 9.0) needs the CUTLASS headers: "
                f"`pip install {CUTLASS_REQUIREMENT}` (or `pip install torchquant[cuda]`), or point "
                "CUTLASS_INCLUDE_DIR at a CUTLASS include folder; or leave 9.0 out of TORCH_CUDA_ARCH_LIST"
            )
        folder = os.path.join(os.path.dirname(spec.origin), "source", "include")
        where = f"the installed cutlass_library ({spec.origin})"
    if not os.path.isfile(os.path.join(folder, "cutlass", "gemm", "collective", "collective_builder.hpp")):
        sys.exit(f"no CUTLASS 3.x headers (cutlass/gemm/collective/collective_builder.hpp) in {folder}, from {where}")
    util = os.path.normpath(os.path.join(folder, "..", "tools", "util", "include"))
    if not os.path.isfile(os.path.join(util, "cutlass", "util", "packed_stride.hpp")):
        sys.exit(f"no CUTLASS utility headers (cutlass/util/packed_stride.hpp) in {util}, beside {folder} from {where}")
    return [folder, util]


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: no fused multiply-adds the source does not write, so that every CPU path (and the CUDA
    # epilogue, which uses __fmul_rn / __fadd_rn) rounds each float operation the same way
    # -g0: Python's build flags ask for full debug info, which doubles the compile time of the kernel templates;
    # TORCHQUANT_DEBUG_INFO=1 keeps it
    debug_info = [] if os.environ.get("TORCHQUANT_DEBUG_INFO") == "1" else ["-g0"]
    cxx_flags = ["-O3", *debug_info, "-ffp-contract=off", "-fopenmp", "-DTORCHQUANT_OPENMP"]
    link_flags = ["-fopenmp"]
    if os.environ.get("TORCHQUANT_SANITIZE") == "1":
        # -fno-wrapv undoes Python's -fwrapv so that signed overflow is reported; vptr checks need RTTI that
        # torch's own (unsanitized) libraries do not provide. -O1 and line tables (-g1), as the sanitizers'
        # documentation advises: -O3 with full debug info compiles six times slower under instrumentation
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]
        cxx_flags += [*sanitize, "-O1", "-g1", "-fno-wrapv", "-fno-omit-frame-pointer"]
        link_flags += sanitize
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if cuda_wanted():
        # torch's builder fails with no GPU and no list
        arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DTORCHQUANT_CUDA"]
        hopper = with_sm90a(arch_list)
        if hopper is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = hopper
            # the CUTLASS GEMMs of csrc/cuda/sm90 (one translation unit per activation/output type pair, so that
            # MAX_JOBS compiles them in parallel) and the wgmma GEMM of csrc/cuda/gemm_sm90.cu
            sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "sm90", "*.cu")))
            include_dirs += cutlass_include_dirs()
            extra["nvcc"] += ["-DTORCHQUANT_WGMMA", "-DTORCHQUANT_CUTLASS"]
        cxx_flags.append("-DTORCHQUANT_CUDA")
        return cpp_extension.CUDAExtension(
            "torchquant._C", sources, include_dirs=include_dirs, extra_compile_args=extra, extra_link_args=link_flags
        )
    return cpp_extension.CppExtension(
        "torchquant._C", sources, include_dirs=include_dirs, extra_compile_args=extra, extra_link_args=link_flags
    )


setup(
    ext_modules=[] if os.environ.get("TORCHQUANT_NO_EXTENSION") == "1" else [extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
