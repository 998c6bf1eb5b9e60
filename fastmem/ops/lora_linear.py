"""fastmem.lora_linear: fused LoRA linear `y = x W^T + s (drop(x) A^T) B^T (+ b)`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from fastmem.backends import resolve_backend
from fastmem.ops.lora_linear_checks import (DropoutSpec, check_backend_limits, check_inputs,
                                            resolve_dropout)

# preference order for `auto`: the CUDA LoRA kernels run on CUDA cores (no tensor cores, no
# fused epilogue yet), so Triton goes first until a GPU measurement says otherwise
SUPPORTED_BACKENDS = ("triton", "cuda", "torch")


def _implementation(backend: str):
    """The backend module: `forward`, `backward`, `keep_mask` with one contract (see lora_linear_torch)."""
    if backend == "cuda":
        from fastmem.ops import lora_linear_cuda as implementation
    elif backend == "triton":
        from fastmem.ops import lora_linear_triton as implementation
    else:
        from fastmem.ops import lora_linear_torch as implementation
    return implementation


@dataclass(frozen=True)
class _CallPlan:
    backend: str
    scaling: float
    dropout: DropoutSpec | None


class _LoRALinearFunction(torch.autograd.Function):
    """Saved for backward: x `[N, I]` (the caller's tensor, no copy), `x A^T` `[N, r]` and the
    parameters. The dropout mask is regenerated from the seed, never stored."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, plan: _CallPlan):
        y, xa = _implementation(plan.backend).forward(x, weight, lora_A, lora_B, bias, plan.scaling, plan.dropout)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.plan = plan
        ctx.mark_non_differentiable(xa)
        return y, xa

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _unused_grad_xa):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        plan = ctx.plan
        want_x, want_w, want_A, want_B, want_bias = ctx.needs_input_grad[:5]
        grad_x, grad_A, grad_B = _implementation(plan.backend).backward(
            grad_y, x, weight, lora_A, lora_B, xa, plan.scaling, plan.dropout, want_x, want_A, want_B)
        # A trainable base weight / bias is off the fused path (LoRA freezes them): plain GEMMs.
        grad_w = grad_y.t() @ x if want_w else None
        grad_bias = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype) if want_bias else None
        return grad_x, grad_w, grad_A, grad_B, grad_bias, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None, *, dropout: float = 0.0,
                seed: int | None = None, generator: torch.Generator | None = None,
                backend: str = "auto") -> torch.Tensor:
    """`x W^T + scaling * (drop(x) A^T) B^T (+ bias)`, the LoRA layer of PEFT in one fused op.

    Args:
        x: `[..., I]` float16 / bfloat16 / float32 (float64 on the torch backend).
        weight: `[O, I]` base weight (frozen in LoRA: then no dW work; if it requires grad,
            dW = dy^T x is formed with a plain GEMM).
        lora_A: `[r, I]`, lora_B: `[O, r]`, 1 <= r (<= 256 on the triton backend).
        scaling: the constant `s` (PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA).
        bias: optional `[O]`.
        All tensors share x's dtype and device.
        dropout: LoRA dropout probability p in [0, 1), applied to the input of the LoRA branch
            only (as PEFT does), kept entries scaled by 1 / (1 - p). Pass 0 in eval mode.
        seed: int in [0, 2^31 - 1] the dropout mask derives from; by default one is drawn from
            `generator` (or torch's default CPU generator, so `torch.manual_seed` repeats it).
            The mask is a function of (seed, row of the flattened x, column) only, regenerated in
            backward; `lora_dropout_mask` returns it. The masks of the torch and triton backends
            differ (torch.Generator vs Philox): each is reproducible on its own.
        backend: "auto" | "torch" | "triton" | "cuda".

    Returns:
        `[..., O]` in x's dtype.

    Saved for backward: x (a reference, not a copy), `x A^T` `[N, r]` in x's dtype, the seed.
    Backward gives dx, dA, dB (fp32 accumulation) and, only when they require grad, dW and dbias.
    """
    check_inputs(x, weight, lora_A, lora_B, scaling, bias)
    spec = resolve_dropout(dropout, seed, generator)
    supported = SUPPORTED_BACKENDS
    if backend == "auto":  # auto never picks a backend whose limits this call exceeds
        supported = tuple(b for b in SUPPORTED_BACKENDS if _within_limits(b, x, lora_A.shape[0]))
    chosen = resolve_backend("lora_linear", backend, x.device, supported)
    check_backend_limits(chosen, x, lora_A.shape[0])
    plan = _CallPlan(chosen, float(scaling), spec)
    y, _ = _LoRALinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, lora_A, lora_B, bias, plan)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _within_limits(backend: str, x: torch.Tensor, rank: int) -> bool:
    try:
        check_backend_limits(backend, x, rank)
    except (TypeError, ValueError):
        return False
    return True


def lora_dropout_mask(n_rows: int, in_features: int, p: float, seed: int, *,
                      device: torch.device | str = "cpu", backend: str = "auto") -> torch.Tensor:
    """The bool keep-mask `[n_rows, in_features]` that `lora_linear(..., dropout=p, seed=seed,
    backend=backend)` applies to x flattened to `[n_rows, in_features]` (True = kept).

    For tests and debugging: the op itself never materialises it.
    """
    spec = resolve_dropout(p, seed, None)
    device = torch.device(device)
    if spec is None:
        return torch.ones(n_rows, in_features, dtype=torch.bool, device=device)
    chosen = resolve_backend("lora_linear", backend, device, SUPPORTED_BACKENDS)
    return _implementation(chosen).keep_mask(spec, n_rows, in_features, device)
