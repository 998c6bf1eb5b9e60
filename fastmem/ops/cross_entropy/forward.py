"""One call of the fused linear cross-entropy: the chunk loop and the reduction.

The custom op (custom_op.py) runs `forward_pass` in its forward and `recompute_grads` in the
backward of reduction="none". Rows are token rows of `hidden [N, H]`; labels come as
`[num_samples, seq_len]` (the sample layout MemFT-SW's first error needs).
"""

from __future__ import annotations

import torch

from fastmem.backends import implementation, register_op
from fastmem.ops.cross_entropy.checks import check_label_range
from fastmem.ops.cross_entropy.chunk_loop import LoopPlan, chunk_rows_for, run_chunks
from fastmem.ops.cross_entropy.spec import LossSpec
from fastmem.ops.cross_entropy.syncs import host_sync_is_free
from fastmem.ops.memft_weights import ChunkWeigher

OP_NAME = "linear_cross_entropy"
# Fastest first: `auto` takes the first one that runs on the tensors' device. Each module
# provides `process_chunk` (the contract is in backend_torch).
register_op(OP_NAME, {"cuda": "fastmem.ops.cross_entropy.backend_cuda",
                      "triton": "fastmem.ops.cross_entropy.backend_triton",
                      "torch": "fastmem.ops.cross_entropy.backend_torch"})


def _chunk_kernel(backend: str):
    return implementation(OP_NAME, backend).process_chunk


class RowPlan:
    """Which rows the chunk loop runs and with which labels.

    Where host syncs are free the loop runs only the valid rows (`rows`, compacted once).
    Elsewhere it runs every row: an ignored (or out-of-range) label is replaced by 0 for the
    kernels and the row weighs 0; an out-of-range label also makes its loss NaN (`bad`).
    """

    def __init__(self, labels: torch.Tensor, vocab: int, ignore_index: int, device: torch.device, *,
                 check_labels: bool = True):
        self.n_rows = labels.numel()
        self.valid = labels != ignore_index
        if host_sync_is_free(device):
            if check_labels:  # in the op, so a compiled call raises the same clear error as an eager one
                check_label_range(labels, vocab, ignore_index)
            rows = self.valid.nonzero().squeeze(1)
            self.rows = None if rows.numel() == self.n_rows else rows
            self.labels = labels
            self.n_valid = torch.tensor(rows.numel(), device=device)
            self.bad = None
        else:
            self.rows = None
            in_range = (labels >= 0) & (labels < vocab)
            self.bad = self.valid & ~in_range
            self.labels = torch.where(self.valid & in_range, labels, torch.zeros_like(labels))
            self.n_valid = self.valid.sum()

    def run_mask(self) -> torch.Tensor | None:
        """Per run row: carries a label (None when every run row does)."""
        return None if self.rows is not None else self.valid

    def scatter(self, values: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """Per-run-row values -> `[N]`, `fill` on rows without a label."""
        if self.rows is not None:
            out = torch.full((self.n_rows,), fill, dtype=values.dtype, device=values.device)
            return out.index_copy_(0, self.rows, values)
        return torch.where(self.valid, values, torch.full_like(values, fill))


def _chunk_rows(hidden, weight, spec: LossSpec, backend: str, n_run: int) -> int:
    return spec.chunk_size or chunk_rows_for(n_run, weight.shape[0], hidden.dtype, hidden.device, backend,
                                             max_chunk_bytes=spec.max_chunk_bytes)


def forward_pass(hidden, weight, bias, labels, token_weights, window, spec: LossSpec, backend: str,
                 wants: tuple[bool, bool, bool]):
    """The chunk loop and the reduction.

    Returns (loss, stats tuple in STAT_FIELDS order, norm, grad_hidden, grad_weight, grad_bias),
    the gradients for grad_output = 1 but not yet divided by norm.
    """
    num_samples, seq_len = labels.shape
    plan = RowPlan(labels.reshape(-1), weight.shape[0], spec.ignore_index, hidden.device)
    weigher = ChunkWeigher(spec.memft, num_samples, max(seq_len, 1), window, hidden.device)
    run_mask = plan.run_mask()

    def weigh(c0, c1, rows_c, nll, correct):
        chunk_tw = None if token_weights is None else token_weights.index_select(0, rows_c)
        valid_c = None if run_mask is None else run_mask[c0:c1]
        if valid_c is not None:  # ignored rows: no error for SW's anchor, weight 0
            correct = correct | ~valid_c
        weight_c = weigher(rows_c, nll, correct, chunk_tw)
        # where, not a product: an ignored row's hidden state is never checked, and SW's
        # sigmoid of its NaN loss would survive * 0 into the normaliser.
        return weight_c if valid_c is None else torch.where(valid_c, weight_c, torch.zeros_like(weight_c))

    n_run = plan.n_rows if plan.rows is None else plan.rows.numel()
    loop = LoopPlan(plan.rows, _chunk_rows(hidden, weight, spec, backend, n_run), wants,
                    sparse=(spec.weighted or token_weights is not None) and host_sync_is_free(hidden.device), spec=spec)
    result = run_chunks(hidden, weight, bias, plan.labels, loop, weigh, _chunk_kernel(backend))

    token_loss = result.loss
    if plan.bad is not None:  # an out-of-range label: NaN on the device, no host sync
        token_loss = torch.where(plan.bad, torch.full_like(token_loss, float("nan")), token_loss)
    # A NaN / Inf token loss reaches the sum even when its weight is 0 (0 * NaN = NaN): bad
    # hidden states on a labelled row give a NaN loss, never a finite wrong one.
    weighted_rows = result.weight * token_loss
    if run_mask is not None:
        weighted_rows = torch.where(run_mask, weighted_rows, torch.zeros_like(weighted_rows))
    weighted_sum = weighted_rows.sum()
    if spec.reduction == "none":
        loss, norm = plan.scatter(weighted_rows), torch.ones_like(weighted_sum)
    elif spec.reduction == "sum":
        loss, norm = weighted_sum, torch.ones_like(weighted_sum)
    else:
        if spec.weighted or token_weights is not None:
            norm = result.weight.sum() + spec.eps
        else:  # plain SFT mean is exactly F.cross_entropy's; an all-ignored batch gives 0
            norm = plan.n_valid.clamp(min=1).to(weighted_sum.dtype)
        loss = weighted_sum / norm

    stats = (plan.scatter(result.nll), plan.scatter(torch.exp(-result.nll)), plan.scatter(result.correct, False),
             plan.scatter(result.lse), plan.scatter(result.weight), plan.valid,
             plan.scatter(result.target - result.best_other), plan.scatter(result.entropy), weigher.first_error())
    return loss, stats, norm, result.grad_hidden, result.grad_weight, result.grad_bias


def recompute_grads(hidden, weight, bias, labels, row_scale, spec: LossSpec, backend: str,
                    wants: tuple[bool, bool, bool]):
    """reduction="none": rerun the chunk loop with fixed row scales g_t * w_t ([N], 0 on ignored rows)."""
    plan = RowPlan(labels.reshape(-1), weight.shape[0], spec.ignore_index, hidden.device, check_labels=False)
    row_scale = row_scale if plan.rows is None else row_scale.index_select(0, plan.rows)
    n_run = plan.n_rows if plan.rows is None else plan.rows.numel()
    loop = LoopPlan(plan.rows, _chunk_rows(hidden, weight, spec, backend, n_run), wants,
                    sparse=host_sync_is_free(hidden.device), spec=spec)
    result = run_chunks(hidden, weight, bias, plan.labels, loop,
                        lambda c0, c1, rows_c, nll, correct: row_scale[c0:c1], _chunk_kernel(backend))
    return result.grad_hidden, result.grad_weight, result.grad_bias
