"""The fused linear cross-entropy with MemFT weighting, as one package.

    api.py          linear_cross_entropy: the public entry (checks, LossSpec, backend, op call)
    spec.py         LossSpec: every loss option, frozen, validated once
    checks.py       tensor checks; check_label_range for callers on a GPU
    custom_op.py    torch.ops.fastmem.linear_cross_entropy + fake impl + the one autograd
    forward.py      one call: rows to run, chunk loop, reduction, stats
    chunk_loop.py   chunk sizing and the loop of GEMMs around a backend's chunk kernel
    row_math.py     per-row losses and target gradient shared by every backend
    backend_*.py    the chunk kernel on torch / Triton / CUDA
    syncs.py        where a host sync is free (the CPU) and the budget elsewhere (none)
"""

from fastmem.ops.cross_entropy.api import linear_cross_entropy
from fastmem.ops.cross_entropy.checks import check_label_range
from fastmem.ops.cross_entropy.spec import LossSpec

__all__ = ["linear_cross_entropy", "LossSpec", "check_label_range"]
