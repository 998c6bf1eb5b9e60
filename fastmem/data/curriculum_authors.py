"""The curriculum as the authors' loader runs it (MemFTModelTrainer.py, curriculum_type
"prefix_ratio", curriculum_shuffle_once and curriculum_drop_last true, as their PhoneBook scripts
set them).

Where it differs from TemporalCurriculum (which trains ceil(ratio·N) samples, reshuffled each
epoch):
- the order is `torch.randperm(N)` from a generator seeded with the run's seed, drawn once;
- a stage trains int(N·ratio) samples rounded down to whole batches, at least one batch and
  at most the N // B whole batches (the last partial batch is dropped, at every stage: with
  N % B != 0 some samples are never trained, as in their runs);
- every epoch walks the active prefix in that fixed order (their DataLoader: shuffle=False).
"""

from __future__ import annotations

import torch

from fastmem.data.curriculum import DEFAULT_BOUNDARIES, DEFAULT_RATIOS, TemporalCurriculum


class AuthorsCurriculum(TemporalCurriculum):
    """TemporalCurriculum with the authors' order, batch rounding and no per-epoch reshuffle."""

    reshuffle = False  # build_schedule walks `active(epoch)` in this order

    def __init__(self, num_samples: int, batch_size: int, ratios=DEFAULT_RATIOS, boundaries=DEFAULT_BOUNDARIES,
                 seed: int = 0):
        super().__init__(num_samples, ratios, boundaries, seed)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_samples < batch_size:
            raise ValueError(f"the authors' curriculum needs at least one full batch: {num_samples} samples, "
                             f"batch_size {batch_size}")
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(num_samples, generator=generator).tolist()

    def num_active(self, epoch: int) -> int:
        ratio = self.ratios[self.stage(epoch)]
        whole = (self.num_samples // self.batch_size) * self.batch_size
        active = (int(self.num_samples * ratio) // self.batch_size) * self.batch_size
        return min(whole, max(self.batch_size, active))
