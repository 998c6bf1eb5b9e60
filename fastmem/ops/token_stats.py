"""Per-token statistics that come out of the fused cross-entropy pass for free."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmem.constants import L_CRIT, is_stubborn


# The per-call statistics in the order the op returns them (first_error last: it is per sample).
# TokenStats is built from them by name, so a new per-token field is: its name here, a
# dataclass field, its tensor in cross_entropy/forward.py (the chunk loop's result also
# carries each row's target and best non-target logit), its dtype in the op's fake impl and
# one more tensor in the op's return annotation (cross_entropy/custom_op.py).
STAT_FIELDS = ("loss", "prob", "correct", "lse", "weight", "valid", "margin", "entropy", "first_error")


@dataclass
class TokenStats:
    """Statistics of one fused cross-entropy call.

    Every per-token tensor is shaped like `labels`; ignored positions hold loss 0, prob 0,
    lse 0, weight 0, correct False and valid False.

    Attributes:
        loss: per-token cross-entropy L_t = -log p_y (fp32), of the soft-capped logits,
            without label smoothing or z-loss (what recall and the MemFT weights read).
        prob: p_t = exp(-L_t), the probability of the target (fp32).
        correct: greedy argmax == target; a tie with another logit counts as wrong (bool).
        lse: log-sum-exp of the token's (soft-capped) logits (fp32); the z-loss is s lse^2.
        weight: the (detached) MemFT weight w_t the loss used (fp32).
        valid: label != ignore_index (bool).
        first_error: per sample (leading dims of `labels`, `[]` for 1-D labels) the position
            of the first wrong greedy prediction among valid tokens, -1 if none (int64).
        margin: top-1 margin, the target's logit minus the best other logit (fp32; > 0 exactly
            where correct; 0 on ignored positions; +inf with a one-column vocabulary). None
            when the producer had no logits pass (a stats object built by hand).
        entropy: H_t = lse_t - sum_v p_v z_v of the token's (soft-capped) logits (fp32; 0 on
            ignored positions), from the same chunk pass as the loss. None when the producer
            had no logits pass.
    """

    loss: torch.Tensor
    prob: torch.Tensor
    correct: torch.Tensor
    lse: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor
    first_error: torch.Tensor
    margin: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def stubborn_mask(self, threshold: float = L_CRIT) -> torch.Tensor:
        """Valid tokens not yet recalled: L_t >= threshold (p <= 0.5 at ln 2), or a NaN loss."""
        return self.valid & is_stubborn(self.loss, threshold)

    def all_recalled(self, threshold: float = L_CRIT) -> bool:
        """Every valid token has L_t < threshold (p > 0.5): greedy decoding recalls them all."""
        return not bool(self.stubborn_mask(threshold).any())

    def token_accuracy(self) -> float:
        """Fraction of valid positions whose teacher-forced greedy argmax is the target."""
        n_valid = int(self.valid.sum())
        return float((self.correct & self.valid).sum()) / n_valid if n_valid else 1.0

    def min_prob(self) -> float:
        """Smallest target probability over valid tokens (1.0 when there is none)."""
        return float(self.prob[self.valid].min()) if bool(self.valid.any()) else 1.0
