"""The per-row math every backend of the fused cross-entropy shares: the logit options
(LossSpec's softcap, label_smoothing, lse_square_scale) and what a chunk kernel returns.

Names and meaning as Liger-Kernel's (so switching is a rename) and as F.cross_entropy's:
    softcap:          z -> softcap * tanh(z / softcap) before everything else (Gemma 2)
    label_smoothing:  eps; loss_t = (1 - eps) nll_t + eps (lse_t - mean_c z_tc)
    lse_square_scale: s; loss_t += s lse_t^2 (z-loss)
The MemFT weight w_t multiplies the whole per-token loss; it is decided from nll_t (recall is
about p_y, not about the smoothed objective).

Gradient of one token's loss with respect to its (capped) logits, p = softmax(z):
    d/dz_c = p_c (1 + 2 s lse) - eps / V - (1 - eps) [c == y]
so the target column is (p_y - 1) + 2 s lse p_y + eps - eps / V, with p_y - 1 formed as
expm1(log p_y) from the row max and a separately kept log-sum (never exp(z - lse) - 1, which
loses p_y - 1 once ulp(lse) nears it). With softcap each column is then multiplied by
d z'/d z = 1 - tanh(z / softcap)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmem.ops.cross_entropy.spec import LossSpec

NO_OPTIONS = LossSpec()


@dataclass
class ChunkStats:
    """What a backend's `process_chunk` returns, per row of the chunk (fp32; fp64 for fp64 logits).

    nll: -log p_y (the token's cross-entropy, what MemFT weighs and recall reads).
    loss: the unweighted per-token objective (nll with label smoothing and z-loss applied).
    best_other: the largest non-target (capped) logit; correct = target > best_other.
    entropy: H = lse - sum_c p_c z_c of the (capped) logits, from the same read of the chunk.
    grad: `[C, V]` w (dloss/dz), in the logits' buffer or the fp32 working copy, or None.
    """

    lse: torch.Tensor
    nll: torch.Tensor
    loss: torch.Tensor
    target: torch.Tensor
    best_other: torch.Tensor
    correct: torch.Tensor
    weight: torch.Tensor
    entropy: torch.Tensor
    grad: torch.Tensor | None


def row_losses(row_max: torch.Tensor, log_sum: torch.Tensor, target: torch.Tensor, sum_z: torch.Tensor | None,
               n_cols: int, options: LossSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, nll, per-token loss) from the row max, log sum exp(z - max), target and sum of z.

    nll is (max - z_y) + log_sum, not lse - z_y: for a confident target both terms are tiny
    where lse (~20 and more) would carry an fp32 rounding of ~1e-6.
    """
    lse = row_max + log_sum
    nll = (row_max - target) + log_sum
    loss = nll
    eps = options.label_smoothing
    if eps:
        smooth = (row_max - sum_z / n_cols) + log_sum
        loss = (1.0 - eps) * nll + eps * smooth
    if options.lse_square_scale:
        loss = loss + options.lse_square_scale * lse * lse
    return lse, nll, loss


def target_grad(weight: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor, target: torch.Tensor,
                n_cols: int, options: LossSpec) -> torch.Tensor:
    """w d loss / d z_y (before the softcap factor), precise for p_y -> 1."""
    log_p = (target - row_max) - log_sum
    value = torch.expm1(log_p)
    if options.lse_square_scale:
        value = value + 2.0 * options.lse_square_scale * (row_max + log_sum) * torch.exp(log_p)
    if options.label_smoothing:
        value = value + options.label_smoothing * (1.0 - 1.0 / n_cols)
    return weight * value
