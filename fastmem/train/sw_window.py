"""MemFT-SW's per-sample window widening (the authors' code; the paper "How LoRA Remembers?").

Each sample's anchor is its first greedy error. When the anchor has not moved for
`patience` (3) consecutive visits, the window's expansion factor grows by `growth` (0.5)
per visit up to `max_factor` (4x); when it moves, the factor resets to 1. The fused loss
takes the result as a per-sample `window = base_window * factor` tensor.
"""

from __future__ import annotations

import torch

NO_ANCHOR_YET = -2  # distinct from the op's -1 ("no error")


class SWWindowState:
    def __init__(self, num_samples: int, base_window: int, patience: int = 3, growth: float = 0.5,
                 max_factor: float = 4.0):
        self.base_window, self.patience, self.growth, self.max_factor = base_window, patience, growth, max_factor
        self.factor = torch.ones(num_samples, dtype=torch.float32)
        self.anchor = torch.full((num_samples,), NO_ANCHOR_YET, dtype=torch.int64)
        self.unmoved = torch.zeros(num_samples, dtype=torch.int64)

    def window(self, indices: list[int]) -> torch.Tensor:
        """`[B]` fp32 windows for the batch's samples (CPU; the engine moves it)."""
        return self.base_window * self.factor[torch.tensor(indices, dtype=torch.long)]

    def update(self, indices: list[int], first_error: torch.Tensor) -> None:
        """Record the anchors `first_error` `[B]` seen for `indices` in this step's forward."""
        for index, anchor in zip(indices, first_error.reshape(-1).tolist()):
            if anchor == int(self.anchor[index]):
                self.unmoved[index] += 1
                if int(self.unmoved[index]) >= self.patience:
                    self.factor[index] = min(float(self.factor[index]) + self.growth, self.max_factor)
            else:
                self.anchor[index], self.unmoved[index], self.factor[index] = anchor, 0, 1.0

    def state_dict(self) -> dict:
        return {"factor": self.factor.clone(), "anchor": self.anchor.clone(), "unmoved": self.unmoved.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.factor, self.anchor, self.unmoved = (state[k].clone() for k in ("factor", "anchor", "unmoved"))
