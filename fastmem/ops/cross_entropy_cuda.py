"""CUDA C++ chunk kernel of the fused cross-entropy (csrc/cross_entropy.cu): same contract as
cross_entropy_torch.process_chunk.

The logits come from the cuBLAS GEMM of the chunk loop (cross_entropy_chunked.run_chunks);
two custom ops then read the chunk once for the stats and once more, only for rows with a
non-zero weight, to overwrite it with `w (softmax - onehot)` (formed in fp32, rounded once):

    torch.ops.fastmem_cuda.ce_row_stats(logits [C, V], labels [C] int64)
        -> (row_max, log_sum, target, best_other)  [C] fp32 (fp64 for fp64 logits)
    torch.ops.fastmem_cuda.ce_softmax_grad_(logits [C, V] (mutated), labels, row_max, log_sum,
                                            weight [C]) -> ()

The log-sum-exp is row_max + log_sum; the gradient kernel takes the two apart (and the
target column through expm1) because an fp32 lse of magnitude ~20 is off by up to 1e-6, 1% of
a confident target's p_y - 1 at p_y = 1 - 1e-4; kept apart, p_y - 1 keeps fp32 precision.
`logits` may be fp16 / bf16 / fp32 / fp64 with column stride 1 and any row stride or storage
offset. The schemas are registered by csrc/bindings.cpp; this module holds the fake
(shape-only) impls that torch.compile traces with.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from fastmem._cuda_build import OPS_NAMESPACE, cuda_ops_namespace
from fastmem.ops.cross_entropy_torch import Weigh

# Exactly the strings csrc/bindings.cpp passes to m.def (tests/csrc checks they agree).
SCHEMAS = {
    "ce_row_stats": "ce_row_stats(Tensor logits, Tensor labels) -> (Tensor, Tensor, Tensor, Tensor)",
    "ce_softmax_grad_": "ce_softmax_grad_(Tensor(a!) logits, Tensor labels, Tensor row_max, Tensor log_sum, "
                        "Tensor weight) -> ()",
}


def _accum_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _fake_row_stats(logits: torch.Tensor, labels: torch.Tensor):
    rows = logits.shape[0]
    return tuple(logits.new_empty(rows, dtype=_accum_dtype(logits)) for _ in range(4))


def _fake_softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor,
                        weight: torch.Tensor) -> None:
    return None


def register_fake_impls(namespace: str = OPS_NAMESPACE) -> None:
    """Register the shape-only impls of the ops in `namespace` (once per process)."""
    torch.library.register_fake(f"{namespace}::ce_row_stats", _fake_row_stats)
    torch.library.register_fake(f"{namespace}::ce_softmax_grad_", _fake_softmax_grad_)


@functools.cache
def cuda_ops():
    """`torch.ops.fastmem_cuda`, loading (or JIT-building) the extension on first use."""
    ops = cuda_ops_namespace()
    register_fake_impls()
    return ops


def run_chunk_kernels(row_stats: Callable, softmax_grad_: Callable, logits: torch.Tensor, labels: torch.Tensor,
                      weigh: Weigh, want_grad: bool):
    """The chunk contract over a pair of row kernels (the CUDA ops, or their host build in tests)."""
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"logits must be a [C, V] chunk with column stride 1, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    labels = labels.contiguous()
    row_max, log_sum, target, best_other = row_stats(logits, labels)
    lse = row_max + log_sum
    correct = target > best_other
    weight = weigh(lse - target, correct)
    grad = None
    if want_grad:
        softmax_grad_(logits, labels, row_max, log_sum, weight.to(lse.dtype).contiguous())
        grad = logits
    return lse, target, correct, weight, grad, best_other


def process_chunk(logits: torch.Tensor, labels: torch.Tensor, weigh: Weigh, want_grad: bool):
    """See fastmem.ops.cross_entropy_torch.process_chunk; the gradient overwrites `logits`.

    Args:
        logits: `[C, V]` CUDA tensor, fp16 / bf16 / fp32 / fp64, column stride 1.
        labels: `[C]` int64, every entry in [0, V).
        weigh: `(loss [C], correct [C]) -> weight [C]`.
        want_grad: overwrite the rows with non-zero weight by `w (softmax - onehot)`.

    Returns:
        lse, target_logit, correct, weight (`[C]`; fp32, fp64 for fp64 logits) and the
        gradient (the `logits` buffer itself; rows with w = 0 are left unchanged) or None, and
        the best logit other than the target (`[C]`).
    """
    if not logits.is_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, got logits on {logits.device}")
    ops = cuda_ops()
    return run_chunk_kernels(ops.ce_row_stats, ops.ce_softmax_grad_, logits, labels, weigh, want_grad)
