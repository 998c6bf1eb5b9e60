"""One call of the fused linear cross-entropy: its plan, and the chunk loop + reduction that
both entry points (the eager autograd Function and the torch.compile custom op) run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmem.backends import implementation, register_op
from fastmem.ops.cross_entropy_chunked import run_chunks
from fastmem.ops.cross_entropy_options import LogitOptions
from fastmem.ops.memft_weights import ChunkWeigher, MemFTConfig

OP_NAME = "linear_cross_entropy"
# Fastest first: `auto` takes the first one that runs on the tensors' device. Each module
# provides `process_chunk` (the contract is in cross_entropy_torch).
register_op(OP_NAME, {"cuda": "fastmem.ops.cross_entropy_cuda", "triton": "fastmem.ops.cross_entropy_triton",
                      "torch": "fastmem.ops.cross_entropy_torch"})


@dataclass(frozen=True)
class CallPlan:
    config: MemFTConfig
    options: LogitOptions
    reduction: str
    ignore_index: int
    seq_len: int
    num_samples: int
    chunk_rows: int
    backend: str
    weighted: bool  # the normaliser is sum(w) + eps (MemFT or token weights), not the token count


def _chunk_kernel(backend: str):
    return implementation(OP_NAME, backend).process_chunk


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    if rows is None:
        return values
    out = torch.zeros(n_rows, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The call's one host sync outside the chunks: which rows carry a label."""
    valid = labels != ignore_index
    rows = valid.nonzero().squeeze(1)
    return valid, (None if rows.numel() == labels.numel() else rows)


def forward_pass(hidden, weight, bias, labels, token_weights, window, plan: CallPlan,
                  want_grad_hidden: bool, want_grad_weight: bool, want_grad_bias: bool):
    """The chunk loop and the reduction. Returns (loss, stats tuple in STAT_FIELDS order,
    norm, grad_hidden, grad_weight, grad_bias), the gradients not yet divided by norm."""
    config = plan.config
    n_rows = hidden.shape[0]
    valid, rows = _valid_rows(labels, plan.ignore_index)
    n_valid = n_rows if rows is None else rows.numel()
    weigher = ChunkWeigher(config, plan.num_samples, plan.seq_len, window, hidden.device)

    def weigh(c0, c1, rows_c, nll, correct):
        chunk_tw = None if token_weights is None else token_weights.index_select(0, rows_c)
        return weigher(rows_c, nll, correct, chunk_tw)

    result = run_chunks(hidden, weight, bias, labels, rows, weigh, _chunk_kernel(plan.backend),
                        want_grad_hidden=want_grad_hidden, want_grad_weight=want_grad_weight,
                        want_grad_bias=want_grad_bias, chunk_rows=plan.chunk_rows, options=plan.options,
                        dense_weights=not plan.weighted)

    # A NaN / Inf token loss reaches the sum even when its weight is 0 (0 * NaN = NaN): bad
    # hidden states give a NaN loss, never a finite wrong one.
    weighted_rows = result.weight * result.loss
    weighted_sum = weighted_rows.sum()
    if plan.reduction == "none":
        loss = _scatter_rows(weighted_rows, rows, n_rows)
        norm = torch.ones_like(weighted_sum)
    elif plan.reduction == "sum":
        loss, norm = weighted_sum, torch.ones_like(weighted_sum)
    elif plan.weighted:
        norm = result.weight.sum() + config.eps
        loss = weighted_sum / norm
    else:
        # Plain SFT mean is exactly F.cross_entropy's mean; an all-ignored batch gives 0.
        norm = torch.full_like(weighted_sum, float(max(n_valid, 1)))
        loss = weighted_sum / norm

    stats = (_scatter_rows(result.nll, rows, n_rows), _scatter_rows(torch.exp(-result.nll), rows, n_rows),
             _scatter_rows(result.correct, rows, n_rows), _scatter_rows(result.lse, rows, n_rows),
             _scatter_rows(result.weight, rows, n_rows), valid,
             _scatter_rows(result.target - result.best_other, rows, n_rows), weigher.first_error())
    return loss, stats, norm, result.grad_hidden, result.grad_weight, result.grad_bias


def recompute_grads(hidden, weight, bias, labels, row_scale, plan: CallPlan, want_hidden, want_weight, want_bias):
    """reduction="none": rerun the chunk loop with fixed row scales g_t * w_t ([N], 0 on ignored rows)."""
    _, rows = _valid_rows(labels, plan.ignore_index)
    row_scale = row_scale if rows is None else row_scale.index_select(0, rows)
    result = run_chunks(hidden, weight, bias, labels, rows,
                        lambda c0, c1, rows_c, nll, correct: row_scale[c0:c1], _chunk_kernel(plan.backend),
                        want_grad_hidden=want_hidden, want_grad_weight=want_weight, want_grad_bias=want_bias,
                        chunk_rows=plan.chunk_rows, options=plan.options)
    return result.grad_hidden, result.grad_weight, result.grad_bias
