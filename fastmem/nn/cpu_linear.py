"""Frozen fp32 nn.Linear layers on CPU through oneDNN's GEMM (see fastmem.ops.cpu_gemm).

A training step of the fast engine on CPU is ~half GEMMs of frozen weights (the adapted
span's q/k/v/o/gate/up/down forward, and their input gradients in backward); oneDNN runs
them ~1.8x faster than torch's MKL sgemm on the AVX-512 CI machine, in IEEE fp32.
`use_onednn_linears(module)` reroutes every frozen fp32 CPU nn.Linear inside `module`
(PEFT's LoRA base layers included; LoRA A / B, trainable or loaded, stay as they are). A
layer whose weight requires grad when called, a tensor off the CPU, another dtype, a GEMM of
fewer than ONEDNN_MIN_ROWS rows (a decode step: memory-bound, nothing to gain), or a call
under CPU autocast takes F.linear. Under autocast F.linear runs in the autocast dtype (bf16:
the GEMM the user asked for), which an fp32 oneDNN product would silently undo, so the
reroute steps aside there. The input gradient is the one derivative given: a double backward
(e.g. `create_graph=True` and a gradient of the gradient) is refused (once_differentiable).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastmem.ops.cpu_gemm import matmul_nn, matmul_nt, onednn_serves

ONEDNN_MIN_ROWS = 16


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W, b frozen: backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return matmul_nt(x2d, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return matmul_nn(grad_out.contiguous(), weight), None, None


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return (onednn_serves(x.dtype, x.device) and not torch.is_autocast_enabled("cpu")
            and weight.dtype == x.dtype and not weight.requires_grad
            and (bias is None or (bias.dtype == x.dtype and not bias.requires_grad))
            and rows >= ONEDNN_MIN_ROWS)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a frozen weight, through oneDNN where that applies."""
    if not _applies(x, weight, bias):
        return F.linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return _FrozenLinear.apply(x2d, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, self.weight, self.bias)


def _adapter_linears(module: nn.Module) -> set[int]:
    """ids of the LoRA A / B layers in `module`: frozen once an adapter is loaded for
    inference, yet left on F.linear so that an adapter computes as it did in training (the
    same logits, bit for bit, and they are too small for oneDNN to gain anything)."""
    from peft.tuners.lora import LoraLayer

    return {id(linear) for layer in module.modules() if isinstance(layer, LoraLayer)
            for table in (layer.lora_A, layer.lora_B) for linear in table.values()}


def use_onednn_linears(module: nn.Module) -> int:
    """Reroute the frozen fp32 CPU nn.Linear layers of `module` but its LoRA A / B; returns how
    many. A no-op (0) where oneDNN does not serve fp32 on this torch / device."""
    count = 0
    adapters = _adapter_linears(module)
    for sub in module.modules():
        if (type(sub) is nn.Linear and not sub.weight.requires_grad and id(sub) not in adapters
                and onednn_serves(sub.weight.dtype, sub.weight.device)):
            sub.forward = types.MethodType(_forward, sub)
            count += 1
    return count
