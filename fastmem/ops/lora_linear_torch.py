"""Pure-torch backend of the fused LoRA linear: the reference implementation and the CPU path.

Same contract as lora_linear_triton: `forward`, `backward`, `keep_mask`. It follows the fused
data flow with eager ops: the dropout mask comes from a `torch.Generator` seeded with the
call's seed and is regenerated in backward, so nothing of size `[N, I]` is saved (each
direction builds it transiently); the output and dx are formed in place (`addmm_`).
`eager_lora_linear` at the end is PEFT's formula under plain autograd: the tests' oracle.
"""

from __future__ import annotations

import torch

from fastmem.ops.lora_linear_checks import DropoutSpec


def _keep_float(dropout: DropoutSpec, n_rows: int, n_cols: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """0/1 keep-mask in `dtype`, regenerated bit for bit from the seed. Always drawn in fp32:
    the random stream of `bernoulli_` may depend on the dtype it fills."""
    generator = torch.Generator(device=device)
    generator.manual_seed(dropout.seed)
    keep = torch.empty(n_rows, n_cols, device=device, dtype=torch.float32)
    return keep.bernoulli_(1.0 - dropout.p, generator=generator).to(dtype)


def keep_mask(dropout: DropoutSpec, n_rows: int, n_cols: int, device: torch.device) -> torch.Tensor:
    """Bool `[n_rows, n_cols]` keep-mask of this backend for `dropout` (True = kept)."""
    return _keep_float(dropout, n_rows, n_cols, device, torch.float32).bool()


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, dropout: DropoutSpec | None) -> torch.Tensor:
    return x if keep is None else x * keep * dropout.keep_scale


def _keep_like(x: torch.Tensor, dropout: DropoutSpec | None) -> torch.Tensor | None:
    return None if dropout is None else _keep_float(dropout, x.shape[0], x.shape[1], x.device, x.dtype)


def forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
            bias: torch.Tensor | None, scaling: float, dropout: DropoutSpec | None):
    """`x [N, I]` → `(y [N, O], xa [N, r])`, `xa = drop(x) A^T` (saved for backward)."""
    xa = _dropped(x, _keep_like(x, dropout), dropout) @ lora_A.t()
    y = torch.nn.functional.linear(x, weight, bias)
    y.addmm_(xa, lora_B.t(), alpha=scaling)
    return y, xa


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
             lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, dropout: DropoutSpec | None,
             want_x: bool, want_A: bool, want_B: bool):
    """`(dx [N, I], dA [r, I], dB [O, r])`, each None unless wanted. No dW here (see the op)."""
    grad_x = grad_A = grad_B = None
    if want_x or want_A:
        grad_xa = grad_out @ lora_B  # [N, r]: the only tensor both dx and dA need
        keep = _keep_like(x, dropout)  # one regeneration serves dx and dA
    if want_x:
        grad_x = grad_out @ weight
        if keep is None:
            grad_x.addmm_(grad_xa, lora_A, alpha=scaling)
        else:
            grad_x.add_(_dropped(grad_xa @ lora_A, keep, dropout), alpha=scaling)
    if want_A:
        grad_A = (grad_xa.t() @ _dropped(x, keep, dropout)).mul_(scaling)
    if want_B:
        grad_B = (grad_out.t() @ xa).mul_(scaling)
    return grad_x, grad_A, grad_B


def eager_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float, bias: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                      p: float = 0.0) -> torch.Tensor:
    """PEFT's eager formula with plain autograd: `x [..., I]`, `keep` a bool mask shaped like
    x (None: no dropout). The oracle the fused backward is tested against, mask included."""
    dropped = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(dropped, lora_A), lora_B)
    return torch.nn.functional.linear(x, weight, bias) + scaling * lora
