"""The paper's Inter-Batch Temporal Curriculum ("prefix_ratio" in the authors' code).

Samples get one fixed shuffled order. During epochs [0, b0) only the first r0 of them are
trained, then the first r1 until b1, and so on; from the last boundary on, the last ratio
(1.0 by default: every sample). Defaults: ratios [0.2, 0.4, 0.6, 0.8, 1.0], boundaries
[20, 40, 60, 80, 200] epochs; the paper's PhoneBook scripts scale the boundaries with the book
(e.g. [30, 60, 90, 120, 350]).
"""

from __future__ import annotations

import bisect
import math
import random

from fastmem.errors import UsageError

DEFAULT_RATIOS = (0.2, 0.4, 0.6, 0.8, 1.0)
DEFAULT_BOUNDARIES = (20, 40, 60, 80, 200)


class TemporalCurriculum:
    """Which samples are trained in each epoch.

    Args:
        num_samples: size of the data set (≥ 1).
        ratios: non-decreasing fractions in (0, 1], one per stage.
        boundaries: strictly increasing epoch numbers (ints ≥ 1), one per stage; stage i covers
            epochs [boundaries[i-1], boundaries[i]) (0-based epochs, stage 0 starts at 0).
            `boundaries[-1]` is the planned number of epochs (`total_epochs`).
        seed: fixes the shuffled order.

    A stage trains the first `ceil(ratio * num_samples)` samples of the order (at least one).
    """

    def __init__(self, num_samples: int, ratios=DEFAULT_RATIOS, boundaries=DEFAULT_BOUNDARIES,
                 seed: int = 0):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise UsageError(f"num_samples must be a positive int, got {num_samples!r}")
        ratios, boundaries = tuple(float(r) for r in ratios), tuple(boundaries)
        if not ratios or len(ratios) != len(boundaries):
            raise UsageError(f"ratios and boundaries must be non-empty and of equal length, got "
                             f"{len(ratios)} ratios and {len(boundaries)} boundaries")
        if any(not 0.0 < r <= 1.0 for r in ratios) or any(
                a > b for a, b in zip(ratios, ratios[1:])):
            raise UsageError(f"ratios must be non-decreasing values in (0, 1], got {ratios}")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in boundaries) or any(
                a >= b for a, b in zip(boundaries, boundaries[1:])):
            raise UsageError(f"boundaries must be strictly increasing ints >= 1, got {boundaries}")
        self.num_samples = num_samples
        self.ratios = ratios
        self.boundaries = boundaries
        self.seed = seed
        self.order = list(range(num_samples))
        random.Random(seed).shuffle(self.order)

    @property
    def total_epochs(self) -> int:
        return self.boundaries[-1]

    def stage(self, epoch: int) -> int:
        """Index of the stage that `epoch` (0-based) falls in; the last stage after the end."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UsageError(f"epoch must be an int >= 0, got {epoch!r}")
        return min(bisect.bisect_right(self.boundaries, epoch), len(self.boundaries) - 1)

    def num_active(self, epoch: int) -> int:
        ratio = self.ratios[self.stage(epoch)]
        # The tiny slack keeps 0.6 * 5 = 3.0000000000000004 from becoming 4.
        return max(1, min(self.num_samples, math.ceil(ratio * self.num_samples - 1e-9)))

    def active(self, epoch: int) -> list[int]:
        """Sample indices trained in `epoch`: a prefix of the fixed shuffled order."""
        return self.order[: self.num_active(epoch)]

    def state_dict(self) -> dict:
        return dict(num_samples=self.num_samples, ratios=list(self.ratios),
                    boundaries=list(self.boundaries), seed=self.seed, order=list(self.order))

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved curriculum (its order included, so resume never re-shuffles)."""
        order = [int(i) for i in state["order"]]
        if sorted(order) != list(range(int(state["num_samples"]))):
            raise UsageError("state 'order' is not a permutation of range(num_samples)")
        if int(state["num_samples"]) != self.num_samples:
            raise UsageError(f"state has num_samples={state['num_samples']}, this curriculum "
                             f"{self.num_samples}: it was saved for another data set")
        fresh = TemporalCurriculum(self.num_samples, state["ratios"], state["boundaries"],
                                   state["seed"])
        self.ratios, self.boundaries, self.seed = fresh.ratios, fresh.boundaries, fresh.seed
        self.order = order

    def __repr__(self) -> str:
        return (f"TemporalCurriculum(num_samples={self.num_samples}, ratios={self.ratios}, "
                f"boundaries={self.boundaries}, seed={self.seed})")
