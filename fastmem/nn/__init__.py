"""nn.Module wrappers of the fused ops."""

from fastmem.nn.losses import FusedLinearMemFTLoss

__all__ = ["FusedLinearMemFTLoss"]
