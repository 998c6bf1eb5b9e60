"""FusedLinearMemFTLoss: the fused lm_head + MemFT cross-entropy as a module."""

from __future__ import annotations

import torch
from torch import nn

from fastmem.ops.cross_entropy import LossSpec, linear_cross_entropy


class FusedLinearMemFTLoss(nn.Module):
    """`loss = module(hidden, lm_head_weight, labels, bias=None, token_weights=None, window=None)`.

    Holds the loss's LossSpec (pass one, or its fields by name: `FusedLinearMemFTLoss("ot",
    threshold=0.3)`); the head weight is passed per call so the module can sit beside an
    existing (tied or untied) lm_head without owning it. `return_stats=True` makes the call
    return `(loss, TokenStats)`.
    """

    def __init__(self, objective: str | None = None, *, spec: LossSpec | None = None, return_stats: bool = False,
                 backend: str = "auto", **options):
        super().__init__()
        if objective is not None:
            options["objective"] = objective
        self.spec = LossSpec.from_options(spec, **options)
        self.return_stats, self.backend = return_stats, backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                window: torch.Tensor | None = None):
        return linear_cross_entropy(hidden, weight, labels, bias, spec=self.spec, token_weights=token_weights,
                                    window=window, return_stats=self.return_stats, backend=self.backend)

    def extra_repr(self) -> str:
        spec = self.spec
        return (f"objective={spec.objective!r}, threshold={spec.threshold:.4g}, reduction={spec.reduction!r}, "
                f"backend={self.backend!r}")
