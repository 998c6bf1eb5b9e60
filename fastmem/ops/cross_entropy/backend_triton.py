"""Triton chunk kernels of the fused cross-entropy: same contract as backend_torch.process_chunk."""

from __future__ import annotations

import torch
import triton

from fastmem.kernels.triton.cross_entropy import row_stats_kernel, softmax_grad_kernel
from fastmem.ops.cross_entropy.backend_torch import Weigh
from fastmem.ops.cross_entropy.row_math import NO_OPTIONS, ChunkStats, row_losses, target_grad
from fastmem.ops.cross_entropy.spec import LossSpec


def _block_v(n_cols: int) -> int:
    return min(4096, triton.next_power_of_2(n_cols))


def process_chunk(logits: torch.Tensor, labels: torch.Tensor, weigh: Weigh, want_grad: bool,
                  options: LossSpec = NO_OPTIONS, raw_rows=None) -> ChunkStats:
    """See backend_torch.process_chunk; the gradient overwrites `logits` (rows of weight 0 with 0)."""
    rows, n_cols = logits.shape
    assert logits.stride(1) == 1, "the chunk buffer is made contiguous by the driver"
    row_max, log_sum, target, best_other, sum_z, entropy = (
        torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(6))
    block_v = _block_v(n_cols)
    num_warps = 16 if block_v >= 4096 else 4
    cap = float(options.softcap)
    row_stats_kernel[(rows,)](logits, logits.stride(0), labels, row_max, log_sum, target, best_other, sum_z,
                              entropy, n_cols, cap or 1.0, SOFTCAP=bool(cap), BLOCK_V=block_v, num_warps=num_warps)
    correct = target > best_other
    lse, nll, loss = row_losses(row_max, log_sum, target, sum_z, n_cols, options)
    weight = weigh(nll, correct)
    grad = None
    if want_grad:
        weight = weight.contiguous()
        tgrad = target_grad(weight, row_max, log_sum, target, n_cols, options).contiguous()
        softmax_grad_kernel[(rows,)](logits, logits.stride(0), labels, row_max, log_sum, weight, tgrad, n_cols,
                                     float(options.lse_square_scale), float(options.label_smoothing) / n_cols,
                                     cap or 1.0, SOFTCAP=bool(cap), BLOCK_V=block_v, num_warps=num_warps)
        grad = logits
    return ChunkStats(lse, nll, loss, target, best_other, correct, weight, entropy, grad)
