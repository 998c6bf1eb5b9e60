"""The MLP-block adapter of the paper's authors: one LoRA-shaped adapter parallel to a whole
MLP block, `out = mlp(x) + s · B A drop(x)` (A: hidden -> r, B: r -> hidden, B zero-init,
s = alpha / r).

The block gets a frozen, zero `nn.Linear(hidden, hidden)` beside it (`PARALLEL_NAME`):
`out = mlp(x) + parallel(x)`, which is `mlp(x)` exactly. PEFT's LoRA on that linear is then
the adapter, so everything PEFT and fastmem do for LoRA carries over unchanged: the adapter is
saved and loaded as PEFT safetensors, `--fused-lora` runs it through fastmem.lora_linear,
`merge_and_unload` folds `s·BA` into the parallel linear's weight (a dense hidden x hidden
matrix: a parallel adapter has no MLP weight to fold into, the MLP is nonlinear). The price is
one hidden x hidden GEMM with a zero weight per token in each adapted layer (SmolLM2: 576^2,
~1/8 of its MLP's 3·576·1536).
"""

from __future__ import annotations

import torch
from torch import nn

# The name PEFT targets; a name no transformers model uses, so it never matches a real linear.
PARALLEL_NAME = "mlp_block_parallel"


class MLPBlockParallel(nn.Module):
    """`mlp(x) + parallel(x)`, with `parallel` a frozen zero hidden x hidden linear (PEFT's LoRA
    target). Keeps the wrapped block as `.mlp`, so its state-dict keys gain one `mlp.` level."""

    def __init__(self, mlp: nn.Module, hidden_size: int):
        super().__init__()
        self.mlp = mlp
        weight = next(mlp.parameters())
        linear = nn.Linear(hidden_size, hidden_size, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(linear.weight)
        linear.requires_grad_(False)
        setattr(self, PARALLEL_NAME, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + getattr(self, PARALLEL_NAME)(x)


def wrap_mlp_blocks(layers: nn.ModuleList, layer_ids: list[int], hidden_size: int) -> None:
    """Put an `MLPBlockParallel` around `layers[i].mlp` for each i (idempotent)."""
    for i in layer_ids:
        mlp = getattr(layers[i], "mlp", None)
        if mlp is None:
            raise ValueError(f"layer {i} ({type(layers[i]).__name__}) has no .mlp block for the MLP-block adapter")
        if not isinstance(mlp, MLPBlockParallel):
            layers[i].mlp = MLPBlockParallel(mlp, hidden_size)


def unwrap_mlp_blocks(layers: nn.ModuleList) -> int:
    """Put each wrapped block back in its layer (after the adapter is unloaded or merged away:
    a merged parallel linear is dropped with it). Returns how many were unwrapped."""
    count = 0
    for layer in layers:
        if isinstance(getattr(layer, "mlp", None), MLPBlockParallel):
            layer.mlp = layer.mlp.mlp
            count += 1
    return count


def is_mlp_block_adapter(target_modules) -> bool:
    """Does a LoRA config's `target_modules` name the MLP-block adapter?"""
    if isinstance(target_modules, str):
        return target_modules == PARALLEL_NAME
    return PARALLEL_NAME in set(target_modules or ())
