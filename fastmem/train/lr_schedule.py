"""The learning-rate factor per step (LambdaLR), stepped once per trainer step, skipped steps included.

"linear" is the paper's (linear decay to zero over the run, no warm-up) and the authors'
trainer's: `transformers.get_scheduler("linear", num_warmup_steps=0, num_training_steps=T)`,
stepped after every optimizer call, zero-backprop batches included (their optimizer.step()
runs on a None gradient and moves nothing; the scheduler still steps). With warm-up it is
HF's linear schedule too: s / w during the first w steps, then (T - s) / (T - w).
"""

from __future__ import annotations

from typing import Callable


def lr_factor(schedule: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The multiplier of the base learning rate at (0-based) step s."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    if schedule not in ("linear", "constant"):
        raise ValueError(f"lr_schedule must be 'linear' or 'constant', got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor
