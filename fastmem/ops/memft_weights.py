"""MemFT token weights (docs/design.md, section 1), computed chunk by chunk in position order.

SFT: w_t = 1.  OT: w_t = 1[L_t > threshold].  SW: w_t = sigmoid(kappa (L_t - threshold))
times a spatial factor from the sample's first greedy error a: exp(-max(t - a, 0) / tau)
while t - a < window, `floor` beyond; a sample with no error keeps factor 1.
`token_weights` multiply the result; ignored tokens weigh 0.

Why chunks can be weighted one at a time: chunks run in position order, so when a chunk's
own correctness is known, every position up to its end has been seen. A token before the
first error seen so far gets factor 1 whether or not an error comes later, and a token at or
after it sees the true first error. The weights of a chunk are final at once, which lets
the gradient be formed in the same pass as the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmem.constants import OBJECTIVES  # noqa: F401 (re-exported: the op's checks)


@dataclass(frozen=True)
class MemFTConfig:
    objective: str
    threshold: float
    eps: float
    kappa: float
    tau: float
    floor: float

    @property
    def weighted(self) -> bool:
        return self.objective != "sft"


class ChunkWeigher:
    """Stateful weigher over chunks of the flattened `[num_samples * seq_len]` token rows.

    `window` is a `[num_samples]` float tensor (the trainer widens it per sample).
    """

    def __init__(self, config: MemFTConfig, num_samples: int, seq_len: int, window: torch.Tensor,
                 device: torch.device):
        self.config = config
        self.seq_len = seq_len
        self.window = window
        # seq_len marks "no error seen yet"; turned into -1 by first_error().
        self._first_error = torch.full((num_samples,), seq_len, dtype=torch.int64, device=device)

    def __call__(self, rows: torch.Tensor, loss: torch.Tensor, correct: torch.Tensor,
                 token_weights: torch.Tensor | None) -> torch.Tensor:
        """Weights (in loss's float type) of the valid rows `rows` (global flat indices, ascending)."""
        cfg = self.config
        sample = torch.div(rows, self.seq_len, rounding_mode="floor")
        position = rows - sample * self.seq_len
        # No host sync: correct positions propose seq_len (= "no error"), which amin ignores.
        proposed = torch.where(correct, torch.full_like(position, self.seq_len), position)
        self._first_error.scatter_reduce_(0, sample, proposed, reduce="amin")
        if cfg.objective == "sft":
            weight = torch.ones_like(loss)
        elif cfg.objective == "ot":
            weight = (loss > cfg.threshold).to(loss.dtype)
        else:
            weight = torch.sigmoid(cfg.kappa * (loss - cfg.threshold)) * self._spatial(sample, position, loss.dtype)
        if token_weights is not None:
            weight = weight * token_weights.to(loss.dtype)
        return weight

    def _spatial(self, sample: torch.Tensor, position: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        cfg = self.config
        anchor = self._first_error[sample]
        offset = (position - anchor).to(dtype)
        decay = torch.exp(-offset.clamp(min=0.0) / cfg.tau)
        inside = offset < self.window[sample]
        # A sample whose anchor is still seq_len has no error: offsets are negative, factor 1.
        return torch.where(inside, decay, torch.full_like(decay, cfg.floor))

    def first_error(self) -> torch.Tensor:
        fe = self._first_error
        return torch.where(fe == self.seq_len, torch.full_like(fe, -1), fe)
