"""Pure-PyTorch chunk kernel of the fused cross-entropy (the reference backend, CPU path).

One chunk of logits `[C, V]` in, per-row stats and (optionally) the weighted logit gradient
`w_t (softmax_t - onehot_t)` out, written over the logits buffer: one max pass, one exp pass,
one sum, one scale; never an extra `[C, V]` tensor beyond the fp32 working copy.
"""

from __future__ import annotations

from typing import Callable

import torch

Weigh = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def process_chunk(logits: torch.Tensor, labels: torch.Tensor, weigh: Weigh, want_grad: bool):
    """Stats, weights and gradient of one chunk.

    Args:
        logits: `[C, V]` from the GEMM; fp32/fp64 is worked on in place, bf16/fp16 is
            upcast once (softmax - onehot must be formed in fp32: the target column's
            gradient p_y - 1 vanishes when p_y is rounded to bf16 first).
        labels: `[C]` int64, all valid.
        weigh: `(loss [C], correct [C]) -> weight [C]` fp32.
        want_grad: form the gradient.

    Returns:
        lse, target_logit, weight (`[C]`, fp64 for fp64 logits, else fp32), correct (bool
        `[C]`), the gradient `[C, V]` in the same float type or None, and the best logit
        other than the target (`[C]`, like lse; -inf when V == 1).
    """
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    col = labels.unsqueeze(1)
    target = work.gather(1, col)
    # Greedy correctness with ties counting as wrong: the target must beat every other
    # logit strictly, so take the max with the target column masked out.
    work.scatter_(1, col, float("-inf"))
    best_other = work.amax(dim=1, keepdim=True)
    work.scatter_(1, col, target)
    correct = target > best_other
    row_max = torch.maximum(best_other, target)
    work.sub_(row_max).exp_()
    sum_exp = work.sum(dim=1, keepdim=True)
    lse = row_max + sum_exp.log()
    loss = (lse - target).squeeze(1)
    weight = weigh(loss, correct.squeeze(1))
    grad = None
    if want_grad:
        scale = weight.to(work.dtype).unsqueeze(1)
        work.mul_(scale / sum_exp)
        work.scatter_add_(1, col, -scale)
        grad = work
    return lse.squeeze(1), target.squeeze(1), correct.squeeze(1), weight, grad, best_other.squeeze(1)
