#!/usr/bin/env bash
# GPU check of the CUDA backend (csrc/: fused cross-entropy chunk kernels, LoRA dropout GEMMs):
# build the extension, run its tests, and run them under compute-sanitizer. Needs a CUDA GPU, a CUDA build of torch, nvcc and ninja.
#
#   bash benchmarks/gpu_check_cuda.sh            # JIT build + tests + memcheck/racecheck/synccheck
#   FASTMEM_CHECK_SETUP=1 bash benchmarks/gpu_check_cuda.sh   # also the setup.py (prebuilt) build
#
# Every step prints a header; the script stops at the first failure (exit code != 0).
# Roughly: JIT build 1-3 min, tests ~1 min, sanitizers a few minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fastmem_torch_extensions}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "device and versions"
nvidia-smi -L
nvcc --version | tail -1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "JIT build of the extension (fastmem/_cuda_build.py)"
FASTMEM_CUDA_VERBOSE=1 "$PY" - <<'EOF'
import time
t0 = time.perf_counter()
from fastmem._cuda_build import load_cuda_extension
extension = load_cuda_extension()
assert extension.module is not None, extension.reason
import torch
print("built/loaded", extension.module.__file__, f"in {time.perf_counter() - t0:.1f} s;",
      "ops:", torch.ops.fastmem_cuda.ce_row_stats, torch.ops.fastmem_cuda.ce_softmax_grad_)
EOF

if [ "${FASTMEM_CHECK_SETUP:-0}" = "1" ]; then
  step "setup.py build of fastmem._cuda_ext (FASTMEM_CUDA=1)"
  FASTMEM_CUDA=1 "$PY" setup.py build_ext --inplace
  "$PY" -c "import fastmem._cuda_ext as m; print('prebuilt', m.__file__)"
fi

step "nvcc compile check and host-side tests (tests/csrc)"
"$PY" -m pytest -q -rs tests/csrc

step "CUDA backend tests (cross-entropy and LoRA), slow ones included"
"$PY" -m pytest -q -rs tests/ops/test_cross_entropy_cuda.py tests/ops/test_cross_entropy_table.py \
  tests/ops/test_lora_linear_cuda.py

# The sanitizers slow every launch down by orders of magnitude: run them on the tests that
# exercise the kernels at small shapes (the chunk checks cover misaligned, padded and odd V).
# Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an
# access past a tensor's end instead of landing in the pool's next block.
SANITIZED=(tests/ops/test_cross_entropy_cuda.py tests/ops/test_cross_entropy_table.py tests/ops/test_lora_linear_cuda.py
           -p no:cacheprovider
           -k "chunk_kernels or ties or binding or (matches_float64_oracle and cuda-bfloat16) or masked_gemms or keep_mask")
for tool in memcheck racecheck synccheck; do
  step "compute-sanitizer --tool $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
    "$PY" -m pytest -q -x "${SANITIZED[@]}"
done

step "all CUDA backend checks passed"
