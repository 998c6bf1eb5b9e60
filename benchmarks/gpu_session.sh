#!/usr/bin/env bash
# One lease of a GPU machine, in one call: the kernel tests on a real GPU (Triton compiled,
# bf16 for real, the CUDA extension), the fused cross-entropy against Liger-Kernel, Cut
# Cross-Entropy, torch eager and torch.compile at Llama-3.1-8B / Qwen3-8B head shapes, and
# compute-sanitizer memcheck on the CUDA kernels. Every phase has its own time limit so that
# one slow phase cannot eat the others; each writes its log under $OUT (default /tmp/gpu_out;
# at most 8 files, what a device call brings back).
#
#   bash benchmarks/gpu_session.sh            # ~9 minutes on an H200 (2026-12-04: 6 min with
#                                             # phases cut short; results in benchmarks/results/gpu_checks_h200_20261204.md)
#
# Missing packages travel as wheels in .whl/ (liger-kernel, cut-cross-entropy, gguf).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=/tmp/fastmem_torch_extensions MAX_JOBS=$(nproc)
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

step "device and versions" | tee "$OUT/versions.txt"
{ nvidia-smi -L; nvcc --version | tail -1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|peft|liger|cut|gguf) "; } 2>&1 | tee -a "$OUT/versions.txt"

# The JIT build of the CUDA extension takes minutes: start it while the Triton tests run.
step "JIT build of the CUDA extension (background)"
( FASTMEM_CUDA_VERBOSE=1 timeout 240 "$PY" -c "
import time; t0 = time.perf_counter()
from fastmem._cuda_build import load_cuda_extension
e = load_cuda_extension(); assert e.module is not None, e.reason
print('built', e.module.__file__, f'in {time.perf_counter() - t0:.0f} s')" > "$OUT/cuda_build.log" 2>&1; echo "rc=$?" >> "$OUT/cuda_build.log" ) &
BUILD=$!

# First the GPU failures of 2026-12-04 whose cause that lease did not capture (the runs were cut
# before pytest's summary), each with its traceback; the binding test crashed its process there.
step "open GPU failures of 2026-12-04, with tracebacks"
timeout 60 "$PY" -m pytest -q --tb=short -p no:cacheprovider -p no:xdist \
  "tests/ops/test_cross_entropy_options.py::test_label_smoothing_is_f_cross_entropy[triton]" \
  "tests/ops/test_cross_entropy_options.py::test_softcap_and_zloss_definitions[triton]" \
  "tests/ops/test_lora_linear.py::test_matches_float64_oracle[fp32-r16-trainable-bias-triton-dropout]" \
  2>&1 | tail -80 | tee "$OUT/open_failures.log"
wait $BUILD; tail -5 "$OUT/cuda_build.log"
timeout 30 "$PY" -X faulthandler -m pytest -q --tb=short -p no:cacheprovider \
  tests/ops/test_cross_entropy_cuda.py::test_binding_rejects_bad_tensors_clearly 2>&1 | tail -30 | tee -a "$OUT/open_failures.log"

step "kernel tests on the GPU: Triton and torch backends (tests/ops, tests/nn; CUDA-extension files later)"
timeout 240 "$PY" -m pytest -q -rfE -p no:cacheprovider -n 14 --timeout 120 --durations=10 tests/ops tests/nn \
  --ignore tests/ops/test_cross_entropy_cuda.py --ignore tests/ops/test_lora_linear_cuda.py --ignore tests/ops/test_cross_entropy_table.py \
  2>&1 | tail -60 | tee "$OUT/tests_triton.log"
echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/tests_triton.log"

step "CUDA backend tests"
timeout 120 "$PY" -m pytest -q -rfE -p no:cacheprovider -n 4 --timeout 60 tests/csrc tests/ops/test_cross_entropy_cuda.py \
  tests/ops/test_lora_linear_cuda.py tests/ops/test_cross_entropy_table.py -k "not rejects_bad_tensors" 2>&1 | tail -40 | tee "$OUT/tests_cuda.log"
echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/tests_cuda.log"

# Liger was ahead at 32k rows on 2026-12-04: fastmem at larger chunks tests whether its
# default chunking (docs/design.md) is what costs it.
step "fused linear cross-entropy vs the anchors, N=32768 (bf16), fastmem at 1-4k rows per chunk too"
timeout 170 "$PY" benchmarks/bench_cross_entropy.py --n 32768 --reps 5 --chunk-sizes 1024 2048 4096 --tag n32768 2>&1 | tail -40
cp "$(ls -t benchmarks/results/cross_entropy_cuda_*_n32768.md | head -1)" "$OUT/" 2>/dev/null

step "compute-sanitizer memcheck on the CUDA kernels"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
  "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_cross_entropy_cuda.py tests/ops/test_lora_linear_cuda.py \
  -k "(chunk_kernels or binding or masked_gemms or keep_mask) and not rejects_bad_tensors" 2>&1 | tail -20 | tee "$OUT/memcheck.log"
echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/memcheck.log"

step "fused linear cross-entropy vs the anchors, N=8192 (bf16), if time is left"
timeout 90 "$PY" benchmarks/bench_cross_entropy.py --n 8192 --reps 5 --tag n8192 2>&1 | tail -40
cp "$(ls -t benchmarks/results/cross_entropy_cuda_*_n8192.md | head -1)" "$OUT/" 2>/dev/null
step "done"
