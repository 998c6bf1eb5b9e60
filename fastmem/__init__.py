"""fastmem: fused kernels and a lean toolkit for exact memorization fine-tuning with LoRA."""

from fastmem._cuda_build import build_cuda_extension
from fastmem.constants import L_CRIT
from fastmem.ops import TokenStats, linear_cross_entropy
from fastmem.ops.lora_linear import lora_dropout_mask, lora_linear

__version__ = "0.1.0"
__all__ = ["linear_cross_entropy", "lora_linear", "lora_dropout_mask", "TokenStats", "L_CRIT", "build_cuda_extension",
           "__version__"]
