"""Pure-PyTorch chunk kernel of the fused cross-entropy (the reference backend, CPU path).

One chunk of logits `[C, V]` in, per-row stats and (optionally) the weighted logit gradient
`w dloss/dz` out, written over the fp32 working copy: one max pass, one in-place softmax
(row by row in cache), one sum, a scale only when the weights are not all 1; no extra
`[C, V]` tensor beyond that copy (and, with softcap, its derivative).

Numerics (see cross_entropy_options): the sum of exp(z - max) is kept as `rest`, the sum
without one element at the max, so log_sum = log1p(rest), 1 - p_max = rest / (1 + rest) and
p_y - 1 = expm1(log p_y) keep fp32's relative precision however confident the target.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastmem.ops.cross_entropy_options import NO_OPTIONS, ChunkStats, LogitOptions, row_losses, target_grad

Weigh = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def process_chunk(logits: torch.Tensor, labels: torch.Tensor, weigh: Weigh, want_grad: bool,
                  options: LogitOptions = NO_OPTIONS) -> ChunkStats:
    """Stats, weights and gradient of one chunk.

    Args:
        logits: `[C, V]` from the GEMM; fp32/fp64 is worked on in place, bf16/fp16 is
            upcast once (softmax - onehot must be formed in fp32: the target column's
            gradient p_y - 1 vanishes when p_y is rounded to bf16 first). With softcap an
            fp32 copy is taken, and `logits` keeps z for the softcap derivative.
        labels: `[C]` int64, all valid.
        weigh: `(nll [C], correct [C]) -> weight [C]` in the accumulation dtype.
        want_grad: form the gradient.
        options: softcap, label smoothing, z-loss.

    Returns:
        ChunkStats (fp64 for fp64 logits, else fp32).
    """
    n_cols = logits.shape[1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cap = options.softcap
    if cap:
        work = logits.to(acc, copy=True).div_(cap).tanh_().mul_(cap)
    else:
        work = logits if logits.dtype == acc else logits.to(acc)
    col = labels.unsqueeze(1)
    target = work.gather(1, col)
    # Greedy correctness with ties counting as wrong: the target must beat every other
    # logit strictly, so take the max with the target column masked out.
    work.scatter_(1, col, float("-inf"))
    best_other, best_col = work.max(dim=1, keepdim=True)
    work.scatter_(1, col, target)
    correct = target > best_other
    row_max = torch.maximum(best_other, target)
    max_col = torch.where(target >= best_other, col, best_col)  # one column at the row max
    sum_z = work.sum(dim=1, keepdim=True) if options.label_smoothing else None
    _softmax_in_place(work, row_max)
    # rest = sum over c != max of exp(z_c - max) = (sum of those p_c) / p_max: a sum of small
    # terms (never 1 + small), and the softmax's 1 / sum cancels in the ratio.
    p_max = work.gather(1, max_col)
    work.scatter_(1, max_col, 0.0)
    rest = work.sum(dim=1, keepdim=True) / p_max
    log_sum = torch.log1p(rest)
    lse, nll, loss = row_losses(row_max, log_sum, target, sum_z, n_cols, options)
    weight = weigh(nll.squeeze(1), correct.squeeze(1))
    grad = None
    if want_grad:
        w = weight.to(acc).unsqueeze(1)
        scale = w  # on p_c
        if options.lse_square_scale:
            scale = scale * (1.0 + 2.0 * options.lse_square_scale * lse)
        shift = w * (options.label_smoothing / n_cols)
        if options.lse_square_scale or not _all_ones(weight):
            work.mul_(scale)
        if options.label_smoothing:
            work.sub_(shift)
        work.scatter_(1, max_col, scale * p_max - shift)
        work.scatter_(1, col, target_grad(w, row_max, log_sum, target, n_cols, options))
        if cap:
            work.mul_(logits.to(acc).div_(cap).tanh_().square_().neg_().add_(1.0))
        grad = work
    return ChunkStats(lse.squeeze(1), nll.squeeze(1), loss.squeeze(1), target.squeeze(1), best_other.squeeze(1),
                      correct.squeeze(1), weight, grad)


def _all_ones(weight: torch.Tensor) -> bool:
    """SFT's weights are all 1 (a host sync, but only where it saves a pass over [C, V])."""
    return weight.device.type == "cpu" and bool((weight == 1).all())


def _softmax_in_place(work: torch.Tensor, row_max: torch.Tensor) -> None:
    """work <- softmax(work) along rows. ATen's CPU kernel runs max, exp-sum and scale row by
    row while the row is in cache (3x fewer trips to memory than three whole-chunk passes);
    its out= may alias the input. Where a build refuses the alias, three passes instead."""
    try:
        torch.ops.aten._softmax.out(work, 1, False, out=work)
    except RuntimeError:
        work.sub_(row_max).exp_()
        work.div_(work.sum(dim=1, keepdim=True))
