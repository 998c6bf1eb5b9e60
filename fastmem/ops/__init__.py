"""Ops: torch.autograd.Functions with backend dispatch; each has a pure-torch reference."""

from fastmem.ops.linear_cross_entropy import linear_cross_entropy
from fastmem.ops.token_stats import TokenStats

__all__ = ["linear_cross_entropy", "TokenStats"]
