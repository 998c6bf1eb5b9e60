"""The run's batch order: a pure function of (seed, data size, batch, world size, curriculum).

Every step's batch is computed, not drawn from a stateful loader, so a resumed run needs
only the step counter (and the saved curriculum order) to continue exactly where it stopped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from fastmem.data import TemporalCurriculum


@dataclass(frozen=True)
class ScheduledStep:
    epoch: int
    global_batch: tuple[int, ...]  # every rank's samples, rank r takes [r*B : (r+1)*B]
    all_samples_active: bool


def epoch_order(active: list[int], seed: int, epoch: int) -> list[int]:
    """The epoch's active samples, shuffled by (seed, epoch)."""
    order = list(active)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def build_schedule(num_samples: int, batch_size: int, epochs: int, max_steps: int | None, seed: int,
                   world_size: int = 1, curriculum: TemporalCurriculum | None = None) -> list[ScheduledStep]:
    """All steps of the run. Under torchrun the epoch's order is padded by wrapping around to
    a multiple of batch_size * world_size (as DistributedSampler pads), so every rank gets
    exactly batch_size samples per step; a single process keeps a short last batch."""
    global_size = batch_size * world_size
    if world_size > 1 and not getattr(curriculum, "reshuffle", True):
        raise ValueError("the authors' curriculum loader runs in one process (it drops partial batches; "
                         "torchrun pads them)")
    steps: list[ScheduledStep] = []
    epoch = 0
    while True:
        active = curriculum.active(epoch) if curriculum else list(range(num_samples))
        # the authors' curriculum walks its fixed order every epoch (data/curriculum_authors.py)
        order = epoch_order(active, seed, epoch) if getattr(curriculum, "reshuffle", True) else list(active)
        if world_size > 1:
            padded = math.ceil(len(order) / global_size) * global_size
            order = [order[i % len(order)] for i in range(padded)]
        for start in range(0, len(order), global_size):
            steps.append(ScheduledStep(epoch, tuple(order[start:start + global_size]),
                                       len(active) == num_samples))
            if max_steps is not None and len(steps) >= max_steps:
                return steps
        epoch += 1
        if max_steps is None and epoch >= epochs:
            return steps


def rank_slice(step: ScheduledStep, rank: int, batch_size: int) -> list[int]:
    return list(step.global_batch[rank * batch_size:(rank + 1) * batch_size])
