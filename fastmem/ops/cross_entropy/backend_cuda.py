"""CUDA C++ chunk kernel of the fused cross-entropy (csrc/cross_entropy.cu): same contract as
backend_torch.process_chunk.

The logits come from the cuBLAS GEMM of the chunk loop (chunk_loop.run_chunks); two custom
ops then read the chunk once for the stats and once more to overwrite it with `w dloss/dz`
(formed in fp32, rounded once; a row of weight 0 is written as zeros without being read):

    torch.ops.fastmem_cuda.ce_row_stats(logits [C, V], labels [C] int64, softcap)
        -> (row_max, log_sum, target, best_other, sum_z, entropy)  [C] fp32 (fp64 for fp64 logits)
    torch.ops.fastmem_cuda.ce_softmax_grad_(logits [C, V] (mutated), labels, row_max, log_sum,
                                            weight [C], softcap, label_smoothing, lse_square_scale) -> ()

softcap (0: off) replaces z by softcap tanh(z / softcap) on load; the options' gradient terms
are those of fastmem.ops.cross_entropy.row_math.

The log-sum-exp is row_max + log_sum; the gradient kernel takes the two apart (and the
target column through expm1) because an fp32 lse of magnitude ~20 is off by up to 1e-6, 1% of
a confident target's p_y - 1 at p_y = 1 - 1e-4; kept apart, p_y - 1 keeps fp32 precision.
`logits` may be fp16 / bf16 / fp32 / fp64 with column stride 1 and any row stride or storage
offset. The schemas are registered by csrc/bindings.cpp; this module holds the fake
(shape-only) impls that torch.compile traces with.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastmem._cuda_build import OPS_NAMESPACE, cuda_ops_with_fakes
from fastmem.ops.cross_entropy.backend_torch import Weigh
from fastmem.ops.cross_entropy.row_math import NO_OPTIONS, ChunkStats, row_losses
from fastmem.ops.cross_entropy.spec import LossSpec

# Exactly the strings csrc/bindings.cpp passes to m.def (tests/csrc checks they agree).
SCHEMAS = {
    "ce_row_stats": "ce_row_stats(Tensor logits, Tensor labels, float softcap) -> (Tensor, Tensor, Tensor, Tensor, "
                    "Tensor, Tensor)",
    "ce_softmax_grad_": "ce_softmax_grad_(Tensor(a!) logits, Tensor labels, Tensor row_max, Tensor log_sum, "
                        "Tensor weight, float softcap, float label_smoothing, float lse_square_scale) -> ()",
}


def _accum_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _fake_row_stats(logits: torch.Tensor, labels: torch.Tensor, softcap: float):
    rows = logits.shape[0]
    return tuple(logits.new_empty(rows, dtype=_accum_dtype(logits)) for _ in range(6))


def _fake_softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor,
                        weight: torch.Tensor, softcap: float, label_smoothing: float, lse_square_scale: float) -> None:
    return None


def register_fake_impls(namespace: str = OPS_NAMESPACE) -> None:
    """Register the shape-only impls of the ops in `namespace` (once per process)."""
    torch.library.register_fake(f"{namespace}::ce_row_stats", _fake_row_stats)
    torch.library.register_fake(f"{namespace}::ce_softmax_grad_", _fake_softmax_grad_)


def cuda_ops():
    """`torch.ops.fastmem_cuda`, loading (or JIT-building) the extension on first use."""
    return cuda_ops_with_fakes(register_fake_impls)


def run_chunk_kernels(row_stats: Callable, softmax_grad_: Callable, logits: torch.Tensor, labels: torch.Tensor,
                      weigh: Weigh, want_grad: bool, options: LossSpec = NO_OPTIONS) -> ChunkStats:
    """The chunk contract over a pair of row kernels (the CUDA ops, or their host build in tests)."""
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"logits must be a [C, V] chunk with column stride 1, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    labels = labels.contiguous()
    cap = float(options.softcap)
    row_max, log_sum, target, best_other, sum_z, entropy = row_stats(logits, labels, cap)
    correct = target > best_other
    lse, nll, loss = row_losses(row_max, log_sum, target, sum_z, logits.shape[1], options)
    weight = weigh(nll, correct)
    grad = None
    if want_grad:
        softmax_grad_(logits, labels, row_max, log_sum, weight.to(lse.dtype).contiguous(), cap,
                      float(options.label_smoothing), float(options.lse_square_scale))
        grad = logits
    return ChunkStats(lse, nll, loss, target, best_other, correct, weight, entropy, grad)


def process_chunk(logits: torch.Tensor, labels: torch.Tensor, weigh: Weigh, want_grad: bool,
                  options: LossSpec = NO_OPTIONS, raw_rows=None) -> ChunkStats:
    """See backend_torch.process_chunk; the gradient overwrites `logits`.

    Args:
        logits: `[C, V]` CUDA tensor, fp16 / bf16 / fp32 / fp64, column stride 1.
        labels: `[C]` int64, every entry in [0, V).
        weigh: `(nll [C], correct [C]) -> weight [C]`.
        want_grad: overwrite the rows by `w dloss/dz` (rows of weight 0 by zeros).
        options: softcap, label smoothing, z-loss.

    Returns:
        ChunkStats (fp32, fp64 for fp64 logits); the gradient is the `logits` buffer itself.
    """
    if not logits.is_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, got logits on {logits.device}")
    ops = cuda_ops()
    return run_chunk_kernels(ops.ce_row_stats, ops.ce_softmax_grad_, logits, labels, weigh, want_grad, options)
