"""nn.Module wrappers of the fused ops."""

from fastmem.nn.lora_linear import LoRALinear
from fastmem.nn.losses import FusedLinearMemFTLoss

__all__ = ["FusedLinearMemFTLoss", "LoRALinear"]
