"""The chunk loop of the fused linear cross-entropy, shared by every backend.

Per chunk of valid token rows, in position order:
    logits = h W^T (+ b)                      one GEMM pass, [C, V] buffer only
    lse, L, p, correct, w  = chunk kernel     one read of the logits
    dlogits = w (softmax - onehot)            in place, only if a gradient is wanted
    grad_hidden[active] = dlogits[active] W   second GEMM pass, only rows with w != 0
    grad_W += dlogits[active]^T h[active]     only when the head is trainable
Ignored rows never reach a GEMM, and with MemFT-OT neither do rows already below the line:
a step with a fraction `a` of active rows costs about 1 + a GEMM passes.

The global normaliser Z = sum(w) + eps is known only after the last chunk; the gradients are
stored unnormalised and scaled by grad_output / Z in backward (a per-row scale suffices
because grad_hidden_t = (w_t / Z) (softmax_t W - W[y_t])).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Chunk-size budget for the [C, V] logits buffer: bounded extra memory, and on a CPU a
# working set that stays close to the caches.
GPU_LOGITS_BUDGET_BYTES = 64 * 2**20
CPU_LOGITS_BUDGET_BYTES = 48 * 2**20

ChunkWeigh = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ChunkLoopResult:
    """Per valid row (in `rows` order) stats, and the unnormalised gradients."""

    lse: torch.Tensor
    target: torch.Tensor
    correct: torch.Tensor
    weight: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None
    best_other: torch.Tensor  # the largest logit other than the target's (top-1 margin = target - best_other)


def default_chunk_rows(n_cols: int, device: torch.device) -> int:
    budget = GPU_LOGITS_BUDGET_BYTES if device.type == "cuda" else CPU_LOGITS_BUDGET_BYTES
    rows = budget // (4 * max(n_cols, 1))
    return int(max(16, min(4096, rows // 16 * 16)))


def run_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               labels: torch.Tensor, rows: torch.Tensor | None, weigh: ChunkWeigh,
               process_chunk, *, want_grad_hidden: bool, want_grad_weight: bool,
               want_grad_bias: bool, chunk_rows: int) -> ChunkLoopResult:
    """Run the chunk loop over the valid rows of `hidden [N, H]`.

    Args:
        rows: ascending int64 indices of the valid rows, or None when every row is valid.
        weigh: `(c0, c1, rows_c, loss_c, correct_c) -> weight_c` for valid rows c0:c1.
        process_chunk: the backend's chunk kernel (see cross_entropy_torch.process_chunk).
    Returns:
        stats per valid row; grad_hidden `[N, H]` in hidden's dtype (zero on rows that are
        ignored or weigh 0), grad_weight `[V, H]` and grad_bias `[V]` in fp32 (fp64 for
        fp64 inputs), all scaled by w_t but not by 1/Z.
    """
    n_rows, hidden_size = hidden.shape
    n_valid = n_rows if rows is None else rows.numel()
    device = hidden.device
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    want_grad = want_grad_hidden or want_grad_weight or want_grad_bias

    lse = torch.empty(n_valid, dtype=acc_dtype, device=device)
    target = torch.empty_like(lse)
    weight_rows = torch.empty_like(lse)
    best_other = torch.empty_like(lse)
    correct = torch.empty(n_valid, dtype=torch.bool, device=device)
    grad_hidden = (torch.zeros(n_rows, hidden_size, dtype=hidden.dtype, device=device)
                   if want_grad_hidden else None)
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if want_grad_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=device) if want_grad_bias else None

    # One logits buffer for every chunk: a new one per chunk would briefly hold two.
    logits_buffer = torch.empty(min(chunk_rows, n_valid), weight.shape[0], dtype=hidden.dtype, device=device)
    for c0 in range(0, n_valid, chunk_rows):
        c1 = min(c0 + chunk_rows, n_valid)
        if rows is None:
            rows_c = torch.arange(c0, c1, device=device)
            hidden_c, labels_c = hidden[c0:c1], labels[c0:c1]
        else:
            rows_c = rows[c0:c1]
            hidden_c, labels_c = hidden.index_select(0, rows_c), labels.index_select(0, rows_c)
        logits = logits_buffer[: c1 - c0]
        if bias is not None:
            torch.addmm(bias, hidden_c, weight.t(), out=logits)
        else:
            torch.mm(hidden_c, weight.t(), out=logits)
        lse_c, target_c, correct_c, weight_c, dlogits, best_other[c0:c1] = process_chunk(
            logits, labels_c, lambda loss, ok: weigh(c0, c1, rows_c, loss, ok), want_grad)
        lse[c0:c1], target[c0:c1], correct[c0:c1], weight_rows[c0:c1] = lse_c, target_c, correct_c, weight_c
        if want_grad:
            _accumulate_grads(dlogits, weight_c, hidden_c, rows_c, weight, grad_hidden, grad_weight, grad_bias,
                              out_rows=slice(c0, c1) if rows is None else None)
        del dlogits
    return ChunkLoopResult(lse, target, correct, weight_rows, grad_hidden, grad_weight, grad_bias, best_other)


def _accumulate_grads(dlogits, weight_c, hidden_c, rows_c, weight, grad_hidden, grad_weight, grad_bias, out_rows):
    """The second GEMM pass of a chunk, over its rows with w != 0 only."""
    active = weight_c != 0
    n_active = int(active.sum())
    if n_active == 0:
        return
    if n_active < dlogits.shape[0]:
        keep = active.nonzero().squeeze(1)
        dlogits, hidden_c, rows_c = dlogits.index_select(0, keep), hidden_c.index_select(0, keep), rows_c[keep]
        out_rows = None
    dlogits = dlogits.to(hidden_c.dtype)
    if grad_hidden is not None:
        if out_rows is not None:
            torch.mm(dlogits, weight, out=grad_hidden[out_rows])
        else:
            grad_hidden.index_copy_(0, rows_c, torch.mm(dlogits, weight))
    if grad_weight is not None:
        grad_weight.add_(torch.mm(dlogits.t(), hidden_c))
    if grad_bias is not None:
        grad_bias.add_(dlogits.sum(0, dtype=grad_bias.dtype))
