"""LoRALinear: a drop-in nn.Linear with a LoRA adapter, running the fused lora_linear op."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastmem.ops.lora_linear import lora_linear


class LoRALinear(nn.Module):
    """`y = x W^T + s (drop(x) A^T) B^T (+ b)` with frozen `weight [O, I]` / `bias [O]` and
    trainable `lora_A.weight [r, I]`, `lora_B.weight [O, r]`.

    State-dict keys: `weight`, `bias` (as nn.Linear's, so the module drops in where a Linear
    was) and `lora_A.weight`, `lora_B.weight` (PEFT's adapter key names, minus the adapter name).
    Initialised as PEFT does: A Kaiming-uniform, B zero, so a fresh adapter changes nothing.
    `scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`). Dropout acts only in
    training mode. Adapter weights of another dtype than x (PEFT keeps them in fp32 under a
    bf16 base) are cast to x's dtype per call; their gradients come back in their own dtype.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8.0,
                 lora_dropout: float = 0.0, bias: bool = True, *, use_rslora: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        weight = torch.empty(out_features, in_features, **factory)
        bias_tensor = torch.empty(out_features, **factory) if bias else None
        self._attach(weight, bias_tensor, r, lora_alpha, lora_dropout, use_rslora, backend)
        self.reset_parameters()

    def _attach(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, backend) -> None:
        """Hold `weight` / `bias` as frozen parameters (shared if they already are) and add A, B."""
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.out_features, self.in_features = weight.shape
        self.r, self.lora_alpha, self.lora_dropout = r, float(lora_alpha), float(lora_dropout)
        self.use_rslora, self.backend = use_rslora, backend
        as_frozen = (lambda t: t.requires_grad_(False) if isinstance(t, nn.Parameter)
                     else nn.Parameter(t, requires_grad=False))
        self.weight = as_frozen(weight)
        self.bias = as_frozen(bias) if bias is not None else None
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_parameters(self) -> None:
        # nn.Linear's own init for the base, PEFT's for the adapter (B = 0: starts at the base).
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    *, use_rslora: bool = False, backend: str = "auto") -> "LoRALinear":
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, backend)
        module.reset_lora_parameters()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A.weight, self.lora_B.weight
        if lora_A.dtype != x.dtype:
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        dropout = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight, lora_A, lora_B, self.scaling, self.bias,
                           dropout=dropout, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
