"""Ops: one custom op per fused operation, backend dispatch, a pure-torch reference beside each."""

from fastmem.ops.cross_entropy import LossSpec, check_label_range, linear_cross_entropy
from fastmem.ops.token_stats import TokenStats

__all__ = ["linear_cross_entropy", "LossSpec", "check_label_range", "TokenStats"]
