"""The stop rule, decided from the current forward's stats BEFORE the optimizer step.

Recall is p > 0.5 for every answer token (L_t < ln 2), whatever MemFT's weighting threshold:
the paper's line, `stop_on="recall"`. `stop_on="em"` waits for exact recall with a margin
instead: at every answer position the target's logit beats the best other logit by >= δ
(`em_margin`; δ = 0: every teacher-forced argmax is right, which is greedy exact match). Exact
recall comes first: a target can be the argmax at p <= 0.5 (issue 22: ~0.57x the steps on a
300-token stress answer). Below, "recalled" means whichever of the two the run stops on.
- A batch whose answers are all recalled gets no update: the step that would follow can
  only move weights that already recall (docs/design.md, section 9: on SmolLM2 one more AdamW step after
  full recall broke greedy exact match; stopping first kept it).
- The run stops once consecutive recalled batches have covered every sample with no update
  in between (so every check still holds for the final weights) and the curriculum, if any,
  has activated every sample. With one sample this is "stop at the first recalled forward".
- MemFT-OT with no active token, or SW with sum w <= 1e-5, skips the step (the paper's
  zero-bp): AdamW on zero gradients still moves the weights through its momentum.
- With dropout on, the training forward's stats are noisy: before a stop the trainer confirms
  the recalled samples with one eval-mode pass, and `reject` forgets those it did not confirm
  (the current batch, if among them, then trains on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmem.constants import is_stubborn
from fastmem.ops import TokenStats

SW_MIN_WEIGHT_SUM = 1e-5


@dataclass
class BatchSignal:
    """What the decision needs from one forward (summed over ranks under torchrun)."""

    stubborn_tokens: int   # answer tokens with p <= 0.5
    active_tokens: int     # tokens with MemFT weight > 0
    weight_sum: float
    em_short_tokens: int = 0  # answer positions whose target does not beat the runner-up by >= em_margin

    @classmethod
    def from_stats(cls, stats: TokenStats, em_margin: float = 0.0) -> "BatchSignal":
        valid = stats.valid
        weight = stats.weight[valid]
        return cls(int(stats.stubborn_mask().sum()), int((weight > 0).sum()), float(weight.sum()),
                   int(em_short_mask(stats.correct, stats.margin, em_margin)[valid].sum()))


def em_short_mask(correct: torch.Tensor, margin: torch.Tensor | None, em_margin: float) -> torch.Tensor:
    """Positions not exactly recalled with margin δ: the argmax is wrong (a tie counts as wrong)
    or the target beats the runner-up by less than δ."""
    if margin is None:
        if em_margin > 0:
            raise ValueError("stop_on='em' with em_margin > 0 needs the stats' top-1 margins; these stats have none")
        return ~correct
    return ~correct | (margin < em_margin)


def fails_stop(score, stop_on: str, em_margin: float) -> bool:
    """An eval-mode teacher-forced score (fastmem.eval.teacher_forcing.TokenScores) that does
    not meet the run's stop condition: a token at p <= 0.5 (recall), or a position short of
    exact recall with margin δ (em)."""
    if stop_on == "em":
        return bool(em_short_mask(score.correct, score.margin, em_margin).any())
    return bool(is_stubborn(score.loss).any())  # NaN-safe: a NaN loss is never recalled


@dataclass
class StepDecision:
    update: bool   # run backward + optimizer step
    stop: bool     # end the run after this step (its update, if any, is already excluded)
    reason: str    # "train" | "recalled" | "no_active_token" | "all_recalled" | "unconfirmed" | ...


class StopRule:
    def __init__(self, num_samples: int, objective: str, stop_on_recall: bool = True, stop_on: str = "recall"):
        if stop_on not in ("recall", "em"):
            raise ValueError(f"stop_on must be 'recall' or 'em', got {stop_on!r}")
        self.num_samples, self.objective, self.stop_on_recall = num_samples, objective, stop_on_recall
        self.stop_on = stop_on
        self.recalled: set[int] = set()  # samples recalled since the last update

    def decide(self, signal: BatchSignal, batch_indices: list[int], all_samples_active: bool) -> StepDecision:
        """`batch_indices`: the global batch's sample indices (every rank's)."""
        short = signal.em_short_tokens if self.stop_on == "em" else signal.stubborn_tokens
        recalled = short == 0
        if recalled and self.stop_on_recall:
            self.recalled.update(batch_indices)
            done = all_samples_active and len(self.recalled) >= self.num_samples
            return StepDecision(update=False, stop=done, reason="all_recalled" if done else "recalled")
        self.recalled.difference_update(batch_indices)
        if self.objective == "ot" and signal.active_tokens == 0:
            return StepDecision(update=False, stop=False, reason="no_active_token")
        if self.objective == "sw" and signal.weight_sum <= SW_MIN_WEIGHT_SUM:
            return StepDecision(update=False, stop=False, reason="no_active_token")
        self.recalled.clear()  # an update changes the weights: earlier checks no longer hold
        return StepDecision(update=True, stop=False, reason="train")

    def reject(self, unconfirmed: set[int], batch_indices: list[int]) -> StepDecision:
        """The eval-mode pass did not confirm the recall of `unconfirmed` (sample indices): forget
        them and re-decide the current batch, as not recalled when any of its samples is among
        them (it trains on), else as a recalled batch that does not stop.

        The unconfirmed batch trains even when its (noisy) MemFT weights are all zero: skipping
        would leave the weights as they are, and the same sample could then be a candidate that
        is never confirmed at every later step, a stall until the step budget."""
        self.recalled.difference_update(unconfirmed)
        if not unconfirmed.intersection(batch_indices):
            return StepDecision(update=False, stop=False, reason="recalled")
        self.recalled.clear()  # an update changes the weights: earlier checks no longer hold
        return StepDecision(update=True, stop=False, reason="unconfirmed")

    def state_dict(self) -> dict:
        return {"recalled": sorted(self.recalled)}

    def load_state_dict(self, state: dict) -> None:
        self.recalled = set(state["recalled"])
