"""FusedLinearMemFTLoss: the fused lm_head + MemFT cross-entropy as a module."""

from __future__ import annotations


import torch
from torch import nn

from fastmem.constants import IGNORE_INDEX, L_CRIT, MEMFT_EPS, SW_FLOOR, SW_KAPPA, SW_TAU, SW_WINDOW
from fastmem.ops.linear_cross_entropy import linear_cross_entropy


class FusedLinearMemFTLoss(nn.Module):
    """`loss = module(hidden, lm_head_weight, labels, bias=None, token_weights=None, window=None)`.

    Holds the objective and its constants; the head weight is passed per call so the module
    can sit beside an existing (tied or untied) lm_head without owning it. Setting
    `return_stats=True` makes the call return `(loss, TokenStats)`.
    """

    def __init__(self, objective: str = "sft", *, threshold: float = L_CRIT, eps: float = MEMFT_EPS,
                 kappa: float = SW_KAPPA, tau: float = SW_TAU, window: int | float = SW_WINDOW,
                 floor: float = SW_FLOOR, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                 return_stats: bool = False, backend: str = "auto", chunk_size: int | None = None,
                 softcap: float | None = None, label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                 max_chunk_bytes: int | None = None):
        super().__init__()
        self.softcap, self.label_smoothing, self.lse_square_scale = softcap, label_smoothing, lse_square_scale
        self.max_chunk_bytes = max_chunk_bytes
        self.objective, self.threshold, self.eps = objective, threshold, eps
        self.kappa, self.tau, self.window, self.floor = kappa, tau, window, floor
        self.ignore_index, self.reduction, self.return_stats = ignore_index, reduction, return_stats
        self.backend, self.chunk_size = backend, chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                window: int | float | torch.Tensor | None = None):
        return linear_cross_entropy(
            hidden, weight, labels, bias, objective=self.objective, threshold=self.threshold,
            eps=self.eps, token_weights=token_weights, kappa=self.kappa, tau=self.tau,
            window=self.window if window is None else window, floor=self.floor,
            ignore_index=self.ignore_index, reduction=self.reduction,
            return_stats=self.return_stats, backend=self.backend, chunk_size=self.chunk_size,
            softcap=self.softcap, label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
            max_chunk_bytes=self.max_chunk_bytes)

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, threshold={self.threshold:.4g}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
