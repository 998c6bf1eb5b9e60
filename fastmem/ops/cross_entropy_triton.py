"""Triton chunk kernel of the fused cross-entropy: same contract as cross_entropy_torch."""

from __future__ import annotations

import torch
import triton

from fastmem.kernels.triton.cross_entropy import row_stats_kernel, softmax_grad_kernel
from fastmem.ops.cross_entropy_torch import Weigh


def _block_v(n_cols: int) -> int:
    return min(4096, triton.next_power_of_2(n_cols))


def process_chunk(logits: torch.Tensor, labels: torch.Tensor, weigh: Weigh, want_grad: bool):
    """See fastmem.ops.cross_entropy_torch.process_chunk; the gradient overwrites `logits`."""
    rows, n_cols = logits.shape
    assert logits.stride(1) == 1, "the chunk buffer is made contiguous by the driver"
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target = torch.empty_like(lse)
    best_other = torch.empty_like(lse)
    block_v = _block_v(n_cols)
    num_warps = 16 if block_v >= 4096 else 4
    row_stats_kernel[(rows,)](logits, logits.stride(0), labels, lse, target, best_other, n_cols,
                              BLOCK_V=block_v, num_warps=num_warps)
    correct = target > best_other
    weight = weigh(lse - target, correct)
    grad = None
    if want_grad:
        softmax_grad_kernel[(rows,)](logits, logits.stride(0), labels, lse, weight.contiguous(),
                                     n_cols, BLOCK_V=block_v, num_warps=num_warps)
        grad = logits
    return lse, target, correct, weight, grad, best_other
