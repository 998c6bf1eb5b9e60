"""CUDA C++ backend of the fused LoRA linear (csrc/lora_linear.cu): same contract as
lora_linear_torch (`forward`, `backward`, `keep_mask`).

The dense GEMMs run on cuBLAS (tensor cores): x W^T, dy W, dy B, dy^T xa, and the rank-r
products when there is no dropout. With dropout, the three products that touch the
dropped input run in csrc kernels that regenerate the keep-mask from (seed, token row,
feature column), so no `[N, I]` mask or dropped copy of x is ever stored:

    torch.ops.fastmem_cuda.lora_dropout_project(x [N, I], lora_A [r, I], seed, p, scale)
        -> scale * drop(x) @ lora_A^T  [N, r] in x's dtype (x read once)
    torch.ops.fastmem_cuda.lora_dropout_expand_(out [N, I] (mutated), c [N, r], d [r, I], seed, p, alpha)
        out += alpha * drop(c @ d)
    torch.ops.fastmem_cuda.lora_dropout_rank_grad(c [N, r], x [N, I], seed, p, alpha)
        -> alpha * c^T @ drop(x)  [r, I] fp32 (fp64 for fp64)
    torch.ops.fastmem_cuda.lora_keep_mask(like, n_rows, n_cols, seed, p) -> int8 [n_rows, n_cols]

The mask (a hash of seed, row, column) differs from the torch and triton backends' masks;
it is reproducible on its own, like theirs. All dtypes of the op run here, float64 included.
These kernels use CUDA cores (fp32 FMA), not tensor cores: correct first, their speed is
still to be measured on a GPU.
"""

from __future__ import annotations

import torch

from fastmem._cuda_build import OPS_NAMESPACE, cuda_ops_with_fakes
from fastmem.ops.lora_linear_checks import DropoutSpec

# Exactly the strings csrc/bindings.cpp passes to m.def (tests/csrc checks they agree).
SCHEMAS = {
    "lora_dropout_project": "lora_dropout_project(Tensor x, Tensor lora_A, int seed, float p, float scale) -> Tensor",
    "lora_dropout_expand_": "lora_dropout_expand_(Tensor(a!) out, Tensor c, Tensor d, int seed, float p, "
                            "float alpha) -> ()",
    "lora_dropout_rank_grad": "lora_dropout_rank_grad(Tensor c, Tensor x, int seed, float p, float alpha) -> Tensor",
    "lora_keep_mask": "lora_keep_mask(Tensor like, int n_rows, int n_cols, int seed, float p) -> Tensor",
}


def _fake_project(x, lora_A, seed, p, scale):
    return x.new_empty(x.shape[0], lora_A.shape[0])


def _fake_expand_(out, c, d, seed, p, alpha):
    return None


def _fake_rank_grad(c, x, seed, p, alpha):
    return x.new_empty(c.shape[1], x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _fake_keep_mask(like, n_rows, n_cols, seed, p):
    return like.new_empty(n_rows, n_cols, dtype=torch.int8)


def register_fake_impls(namespace: str = OPS_NAMESPACE) -> None:
    """Register the shape-only impls of the LoRA ops in `namespace` (once per process)."""
    for name, fake in (("lora_dropout_project", _fake_project), ("lora_dropout_expand_", _fake_expand_),
                       ("lora_dropout_rank_grad", _fake_rank_grad), ("lora_keep_mask", _fake_keep_mask)):
        torch.library.register_fake(f"{namespace}::{name}", fake)


def cuda_ops():
    """`torch.ops.fastmem_cuda`, loading (or JIT-building) the extension on first use."""
    return cuda_ops_with_fakes(register_fake_impls)


def keep_mask(dropout: DropoutSpec, n_rows: int, n_cols: int, device: torch.device, ops=None) -> torch.Tensor:
    """Bool `[n_rows, n_cols]` keep-mask the kernels regenerate from `dropout.seed`."""
    ops = ops or cuda_ops()
    like = torch.empty(0, device=device)
    return ops.lora_keep_mask(like, n_rows, n_cols, dropout.seed, dropout.p).bool()


def forward(x, weight, lora_A, lora_B, bias, scaling: float, dropout: DropoutSpec | None, ops=None):
    """`x [N, I]` → `(y [N, O], xa [N, r])`, `xa = drop(x) A^T` (saved for backward)."""
    if dropout is None:
        xa = x @ lora_A.t()
    else:
        xa = (ops or cuda_ops()).lora_dropout_project(x, lora_A, dropout.seed, dropout.p, dropout.keep_scale)
    y = torch.nn.functional.linear(x, weight, bias)
    y.addmm_(xa, lora_B.t(), alpha=scaling)
    return y, xa


def backward(grad_out, x, weight, lora_A, lora_B, xa, scaling: float, dropout: DropoutSpec | None,
             want_x: bool, want_A: bool, want_B: bool, ops=None):
    """`(dx [N, I], dA [r, I], dB [O, r])`, each None unless wanted. No dW here (see the op)."""
    grad_x = grad_A = grad_B = None
    if want_x or want_A:
        grad_xa = grad_out @ lora_B  # [N, r]: the only tensor both dx and dA need
    if want_x:
        grad_x = grad_out @ weight
        if dropout is None:
            grad_x.addmm_(grad_xa, lora_A, alpha=scaling)
        else:
            (ops or cuda_ops()).lora_dropout_expand_(grad_x, grad_xa, lora_A, dropout.seed, dropout.p,
                                                     scaling * dropout.keep_scale)
    if want_A:
        if dropout is None:
            grad_A = (grad_xa.t() @ x).mul_(scaling)
        else:
            grad_A = (ops or cuda_ops()).lora_dropout_rank_grad(grad_xa, x, dropout.seed, dropout.p,
                                                                scaling * dropout.keep_scale).to(lora_A.dtype)
    if want_B:
        grad_B = (grad_out.t() @ xa).mul_(scaling)
    return grad_x, grad_A, grad_B
