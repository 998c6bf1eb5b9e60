"""The run's batch order: a pure function of (seed, data size, batch, world size, curriculum).

Every step's batch is computed, not drawn from a stateful loader, so a resumed run needs
only the step counter (and the saved curriculum order) to continue exactly where it stopped.
The plan is lazy: a step's batch is computed when the loop asks for it (one epoch's order at a
time), so its memory does not grow with the step budget; its length comes from the epoch
sizes, which change only at the curriculum's stage boundaries.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from fastmem.data import TemporalCurriculum
from fastmem.errors import UsageError


@dataclass(frozen=True)
class ScheduledStep:
    epoch: int
    global_batch: tuple[int, ...]  # every rank's samples, rank r takes [r*B : (r+1)*B]
    all_samples_active: bool


@dataclass(frozen=True)
class _Stage:
    """Epochs [first_epoch, end_epoch) of equal size; end_epoch None: open-ended."""

    first_epoch: int
    end_epoch: int | None
    first_step: int
    steps_per_epoch: int


def epoch_order(active: list[int], seed: int, epoch: int) -> list[int]:
    """The epoch's active samples, shuffled by (seed, epoch)."""
    order = list(active)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class StepPlan(Sequence):
    """All steps of the run, as a sequence computed on demand (`plan[step]`, `len(plan)`).

    Under torchrun the epoch's order is padded by wrapping around to a multiple of
    batch_size * world_size (as DistributedSampler pads), so every rank gets exactly
    batch_size samples per step; a single process keeps a short last batch. With `max_steps`
    the plan runs that many steps over as many epochs as it takes; without, `epochs` epochs.
    """

    def __init__(self, num_samples: int, batch_size: int, epochs: int, max_steps: int | None, seed: int,
                 world_size: int = 1, curriculum: TemporalCurriculum | None = None):
        if world_size > 1 and not getattr(curriculum, "reshuffle", True):
            raise UsageError("the authors' curriculum loader runs in one process (it drops partial batches; "
                             "torchrun pads them)")
        self.num_samples, self.seed, self.world_size, self.curriculum = num_samples, seed, world_size, curriculum
        self.global_size = batch_size * world_size
        self.stages = self._stages()
        self.length = max_steps if max_steps is not None else self._steps_before(epochs)
        self._cached: tuple[int, list[int], bool] | None = None  # (epoch, order, all active)

    def _active(self, epoch: int) -> list[int]:
        return self.curriculum.active(epoch) if self.curriculum else list(range(self.num_samples))

    def _stages(self) -> list[_Stage]:
        bounds = list(self.curriculum.boundaries[:-1]) if self.curriculum else []
        stages, first_epoch, first_step = [], 0, 0
        for end in [*bounds, None]:
            size = self.curriculum.num_active(first_epoch) if self.curriculum else self.num_samples
            per_epoch = math.ceil(size / self.global_size)
            stages.append(_Stage(first_epoch, end, first_step, per_epoch))
            if end is not None:
                first_step += (end - first_epoch) * per_epoch
                first_epoch = end
        return stages

    def _steps_before(self, epoch: int) -> int:
        """Steps in epochs [0, epoch)."""
        total = 0
        for stage in self.stages:
            end = epoch if stage.end_epoch is None else min(epoch, stage.end_epoch)
            total += max(0, end - stage.first_epoch) * stage.steps_per_epoch
        return total

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, step):
        if isinstance(step, slice):
            return [self[i] for i in range(*step.indices(self.length))]
        if step < 0:
            step += self.length
        if not 0 <= step < self.length:
            raise IndexError(f"step {step} outside the plan of {self.length} steps")
        stage = next(s for s in reversed(self.stages) if s.first_step <= step)
        epoch_in_stage, batch = divmod(step - stage.first_step, stage.steps_per_epoch)
        epoch = stage.first_epoch + epoch_in_stage
        if self._cached is None or self._cached[0] != epoch:
            active = self._active(epoch)
            # the authors' curriculum walks its fixed order every epoch (data/curriculum_authors.py)
            order = (epoch_order(active, self.seed, epoch) if getattr(self.curriculum, "reshuffle", True)
                     else list(active))
            if self.world_size > 1:
                padded = math.ceil(len(order) / self.global_size) * self.global_size
                order = [order[i % len(order)] for i in range(padded)]
            self._cached = (epoch, order, len(active) == self.num_samples)
        _, order, all_active = self._cached
        start = batch * self.global_size
        return ScheduledStep(epoch, tuple(order[start:start + self.global_size]), all_active)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None


def build_schedule(num_samples: int, batch_size: int, epochs: int, max_steps: int | None, seed: int,
                   world_size: int = 1, curriculum: TemporalCurriculum | None = None) -> StepPlan:
    """The run's StepPlan (see there)."""
    return StepPlan(num_samples, batch_size, epochs, max_steps, seed, world_size, curriculum)


def rank_slice(step: ScheduledStep, rank: int, batch_size: int) -> list[int]:
    return list(step.global_batch[rank * batch_size:(rank + 1) * batch_size])
