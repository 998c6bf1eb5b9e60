"""fastmem.lora_linear: fused LoRA linear `y = x W^T + s (drop(x) A^T) B^T (+ b)`."""

from __future__ import annotations

import torch

from fastmem.backends import choose_backend, implementation, register_op
from fastmem.ops.lora_linear_checks import (DropoutSpec, check_backend_limits, check_dropout, check_inputs,
                                            draw_seed, resolve_dropout)

OP_NAME = "lora_linear"
# Preference order for `auto`: the CUDA LoRA kernels run on CUDA cores (no tensor cores, no
# fused epilogue yet), so Triton goes first until a GPU measurement says otherwise. Each module
# provides `forward`, `backward`, `keep_mask` with one contract (see lora_linear_torch).
SUPPORTED_BACKENDS = ("triton", "cuda", "torch")
register_op(OP_NAME, {"triton": "fastmem.ops.lora_linear_triton", "cuda": "fastmem.ops.lora_linear_cuda",
                      "torch": "fastmem.ops.lora_linear_torch"})


def _implementation(backend: str):
    """The backend module of lora_linear (a seam the tests use to swap or forbid backends)."""
    return implementation(OP_NAME, backend)


def _dropout(p: float, seed: torch.Tensor) -> DropoutSpec | None:
    # Inside the op (opaque to torch.compile), so reading the 0-d seed tensor breaks no graph.
    return DropoutSpec(p, int(seed)) if p > 0.0 else None


# The op is two torch custom ops (forward, backward) joined by register_autograd, so that
# torch.compile(fullgraph=True) traces through it: inside a graph each is one opaque call whose
# output shapes come from the fake impls below. Saved for backward: x (the caller's tensor, no
# copy), `x A^T` `[N, r]` and the parameters; the dropout mask is regenerated from the seed.
@torch.library.custom_op("fastmem::lora_linear_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                bias: torch.Tensor | None, scaling: float, dropout_p: float, seed: torch.Tensor,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [N, I]` -> `(y [N, O], xa [N, r])` on `backend`."""
    return _implementation(backend).forward(x, weight, lora_A, lora_B, bias, scaling, _dropout(dropout_p, seed))


@_forward_op.register_fake
def _forward_fake(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastmem::lora_linear_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor,
                 backend: str, want_x: bool, want_A: bool,
                 want_B: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dx, dA, dB)`; a gradient not wanted is an empty tensor (never computed)."""
    grads = _implementation(backend).backward(grad_y, x, weight, lora_A, lora_B, xa, scaling,
                                               _dropout(dropout_p, seed), want_x, want_A, want_B)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_backward_op.register_fake
def _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, backend, want_x, want_A,
                   want_B):
    return (torch.empty_like(x) if want_x else x.new_empty(0), torch.empty_like(lora_A) if want_A else x.new_empty(0),
            torch.empty_like(lora_B) if want_B else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.call = (scaling, dropout_p, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _unused_grad_xa):
    """The backward op has no autograd of its own: a double backward raises instead of being
    silently wrong (what once_differentiable did for the autograd.Function before)."""
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    scaling, dropout_p, backend = ctx.call
    want_x, want_w, want_A, want_B, want_bias = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_A = grad_B = grad_bias = None
    if want_x or want_A or want_B:
        grad_x, grad_A, grad_B = _backward_op(grad_y.contiguous(), x, weight, lora_A, lora_B, xa, scaling,
                                              dropout_p, seed, backend, want_x, want_A, want_B)
    # A trainable base weight / bias is off the fused path (LoRA freezes them): plain GEMMs.
    if want_w:
        grad_w = grad_y.t() @ x
    if want_bias:
        grad_bias = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
    return (grad_x if want_x else None, grad_w, grad_A if want_A else None, grad_B if want_B else None,
            grad_bias, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
    Backward gives dx, dA, dB (fp32 accumulation) and, only when they require grad, dW and dbias;
    a second (double) backward raises.

    torch.compile: the op is the custom ops `torch.ops.fastmem.lora_linear_forward` / `_backward`
    with fake impls and registered autograd, so `torch.compile(fullgraph=True)` traces the forward
    and the backward without a graph break, dropout included. A seed drawn in a compiled graph
    comes from the compiler's random stream (still seeded by `torch.manual_seed`), so it differs
    from the eager draw; pass `seed=` for the same mask in both. `generator=` is eager-only.
    """
    check_inputs(x, weight, lora_A, lora_B, scaling, bias)
    check_dropout(dropout, seed, generator)
    if dropout == 0.0:
        seed_tensor = torch.zeros((), dtype=torch.int64)
    elif seed is None:
        seed_tensor = draw_seed(generator)
    else:
        seed_tensor = torch.tensor(seed, dtype=torch.int64)
    # auto never picks a backend whose limits this call exceeds
    over_limits = tuple(b for b in SUPPORTED_BACKENDS if not _within_limits(b, x, lora_A.shape[0]))
    chosen = _choose_backend(backend, x.device, over_limits)
    check_backend_limits(chosen, x, lora_A.shape[0])
    y, _ = _forward_op(x.reshape(-1, x.shape[-1]), weight, lora_A, lora_B, bias, float(scaling), float(dropout),
                       seed_tensor, chosen)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@torch.compiler.assume_constant_result
def _choose_backend(requested: str, device: torch.device, exclude: tuple[str, ...]) -> str:
    """The registry's choice. Choosing probes the installation (imports, the CUDA extension,
    a log line): under torch.compile it runs once while tracing and its answer is a constant of
    the graph, instead of Python the compiler would have to trace (or break the graph on)."""
    return choose_backend(OP_NAME, requested, device, exclude=exclude)


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
    chosen = choose_backend(OP_NAME, backend, device)
    return _implementation(chosen).keep_mask(spec, n_rows, in_features, device)
