"""Triton backend of the fused LoRA linear: same contract as lora_linear_torch.

Forward: 2 launches (`x A^T` with dropout, then the base GEMM with the LoRA epilogue).
Backward: `dy B`, then `dx = dy W + s drop'((dy B) A)` in one GEMM, `dA` and `dB` as fp32
row-slice partials summed here. The dropout mask is regenerated in every kernel from the seed.
"""

from __future__ import annotations

import torch
import triton

from fastmem.backends import triton_interpreting
from fastmem.kernels.triton.lora_linear import (dropout_keep_kernel, lora_gemm_kernel, rank_grad_kernel,
                                                rank_project_kernel)
from fastmem.ops.lora_linear_checks import DropoutSpec


class _Launch:
    """Per-call constants shared by every kernel: dtype handling and the dropout arguments."""

    def __init__(self, dtype: torch.dtype, dropout: DropoutSpec | None):
        interpreting = triton_interpreting()
        # The interpreter's bf16 tl.dot returns garbage: upcast tiles there.
        self.upcast = interpreting and dtype == torch.bfloat16
        # fp32 follows torch's own TF32 switch, so fp32 results match torch.matmul's; 16-bit
        # operands keep Triton's default (the setting only changes fp32 dots).
        exact_fp32 = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        self.precision = "ieee" if exact_fp32 or interpreting else "tf32"
        self.interpreting = interpreting
        self.dropout = dropout is not None
        self.seed = dropout.seed if dropout is not None else 0
        self.p = dropout.p if dropout is not None else 0.0
        self.keep_scale = dropout.keep_scale if dropout is not None else 1.0


def _multiprocessors(device: torch.device) -> int | None:
    """SM count of a CUDA device (None elsewhere): the launch shapes below fill the GPU with it.
    One seam, so the ahead-of-time compile test can ask for the tiles a GPU run would get."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _row_bucket(n_rows: int) -> int:
    """The autotuning key for the row count: its power of two (capped), not the exact value."""
    return min(triton.next_power_of_2(n_rows), 1 << 16)


def _project(big: torch.Tensor, small_kr: torch.Tensor, launch: _Launch, apply_dropout: bool) -> torch.Tensor:
    """`drop(big [N, K]) @ small_kr [K, r]` → `[N, r]` in big's dtype (fp32 accumulation)."""
    n_rows, n_cols = big.shape
    rank = small_kr.shape[1]
    out = torch.empty(n_rows, rank, dtype=big.dtype, device=big.device)
    block_r = _block_r(rank)
    # GPU tiles sized so 3 pipeline stages of (x tile + small tile) stay near 100 KiB of shared
    # memory at r = 256 and in fp32 (an H100 has 227 KiB, an A100 163 KiB).
    block_m = 16 if launch.interpreting else (64 if block_r <= 64 else 32)
    block_k = 32 if launch.interpreting else (128 if block_r <= 64 else 64) * 2 // big.element_size()
    sms = _multiprocessors(big.device)
    if sms is not None:  # short inputs: smaller row tiles so every SM gets a program
        programs = 2 * sms
        while block_m > 16 and triton.cdiv(n_rows, block_m) < programs:
            block_m //= 2
    grid = (triton.cdiv(n_rows, block_m),)
    rank_project_kernel[grid](
        big, small_kr, out, n_rows, n_cols, rank, big.stride(0), big.stride(1),
        small_kr.stride(0), small_kr.stride(1), out.stride(0), out.stride(1),
        launch.seed, launch.p, launch.keep_scale,
        DROPOUT=apply_dropout and launch.dropout, UPCAST=launch.upcast, INPUT_PRECISION=launch.precision,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4 if block_r <= 64 else 8)
    return out


def _gemm_with_lora(a, b_kj, c, d_rj, bias, scaling: float, launch: _Launch, apply_dropout: bool):
    """`a [M, K] @ b_kj [K, J] + scaling * drop'(c [M, R] @ d_rj [R, J]) (+ bias)` → `[M, J]`."""
    m, k = a.shape
    j = b_kj.shape[1]
    rank = c.shape[1]
    out = torch.empty(m, j, dtype=a.dtype, device=a.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(j, meta["BLOCK_J"]),)

    lora_gemm_kernel[grid](
        a, b_kj, c, d_rj, bias if bias is not None else out, out, m, j, k, rank, _row_bucket(m),
        a.stride(0), a.stride(1), b_kj.stride(0), b_kj.stride(1), c.stride(0), c.stride(1),
        d_rj.stride(0), d_rj.stride(1), out.stride(0), out.stride(1),
        float(scaling), launch.seed, launch.p, launch.keep_scale,
        HAS_BIAS=bias is not None, DROPOUT=apply_dropout and launch.dropout, UPCAST=launch.upcast,
        INPUT_PRECISION=launch.precision, BLOCK_R=min(_block_r(rank), 64))
    return out


def _row_slices(n_rows: int, n_col_blocks: int, block_n: int, device: torch.device) -> int:
    """How many row slices the N-reduction of dA / dB is split into: enough programs to fill
    the GPU (the output has only cdiv(K, BLOCK_K) column blocks), at least 2 in the interpreter
    so the host-side sum is exercised by the CPU tests."""
    row_blocks = triton.cdiv(n_rows, block_n)
    sms = _multiprocessors(device)
    if sms is not None:
        programs = 4 * sms
        return max(1, min(row_blocks, triton.cdiv(programs, n_col_blocks)))
    return min(row_blocks, 2)


def _rank_grad(c: torch.Tensor, big: torch.Tensor, scale: float, launch: _Launch, apply_dropout: bool):
    """`scale * c [N, r]^T @ drop(big [N, K])` → fp32 `[r, K]`."""
    n_rows, n_cols = big.shape
    rank = c.shape[1]
    block_r = _block_r(rank)
    block_k = 32 if (launch.interpreting or block_r > 64) else 64
    block_n = 16 if launch.interpreting else 128 // big.element_size()  # fp32: half the rows per tile
    n_col_blocks = triton.cdiv(n_cols, block_k)
    slices = _row_slices(n_rows, n_col_blocks, block_n, big.device)
    rows_per_slice = triton.cdiv(triton.cdiv(n_rows, slices), block_n) * block_n
    slices = triton.cdiv(n_rows, rows_per_slice)
    partial = torch.empty(slices, rank, n_cols, dtype=torch.float32, device=big.device)
    rank_grad_kernel[(n_col_blocks, slices)](
        c, big, partial, n_rows, n_cols, rank, rows_per_slice, c.stride(0), c.stride(1),
        big.stride(0), big.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        launch.seed, launch.p,
        DROPOUT=apply_dropout and launch.dropout, UPCAST=launch.upcast, INPUT_PRECISION=launch.precision,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4 if block_r <= 64 else 8)
    grad = partial.sum(0) if slices > 1 else partial[0]
    return grad.mul_(scale * (launch.keep_scale if apply_dropout and launch.dropout else 1.0))


def keep_mask(dropout: DropoutSpec, n_rows: int, n_cols: int, device: torch.device) -> torch.Tensor:
    """Bool `[n_rows, n_cols]` keep-mask the kernels regenerate from `dropout.seed`."""
    out = torch.empty(n_rows, n_cols, dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(n_rows, 32), triton.cdiv(n_cols, 32))
        dropout_keep_kernel[grid](out, n_rows, n_cols, dropout.seed, dropout.p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def forward(x, weight, lora_A, lora_B, bias, scaling: float, dropout: DropoutSpec | None):
    """`x [N, I]` → `(y [N, O], xa [N, r])`: x is read once for dropout + `x A^T`, then once by
    the base GEMM, whose epilogue adds `s xa B^T` (and bias) before the only write of y."""
    launch = _Launch(x.dtype, dropout)
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0]), x.new_empty(0, lora_A.shape[0])
    xa = _project(x, lora_A.t(), launch, apply_dropout=True)
    y = _gemm_with_lora(x, weight.t(), xa, lora_B.t(), bias, scaling, launch, apply_dropout=False)
    return y, xa


def backward(grad_out, x, weight, lora_A, lora_B, xa, scaling: float, dropout: DropoutSpec | None,
             want_x: bool, want_A: bool, want_B: bool):
    """`(dx [N, I], dA [r, I], dB [O, r])`, each None unless wanted; dA / dB accumulate in fp32."""
    launch = _Launch(x.dtype, dropout)
    grad_out = grad_out.contiguous()
    if x.shape[0] == 0:
        return (torch.zeros_like(x) if want_x else None, torch.zeros_like(lora_A) if want_A else None,
                torch.zeros_like(lora_B) if want_B else None)
    grad_x = grad_A = grad_B = None
    if want_x or want_A:
        grad_xa = _project(grad_out, lora_B, launch, apply_dropout=False)
    if want_x:
        grad_x = _gemm_with_lora(grad_out, weight, grad_xa, lora_A, None, scaling, launch, apply_dropout=True)
    if want_A:
        grad_A = _rank_grad(grad_xa, x, scaling, launch, apply_dropout=True).to(lora_A.dtype)
    if want_B:
        grad_B = _rank_grad(xa, grad_out, scaling, launch, apply_dropout=False).t().contiguous().to(lora_B.dtype)
    return grad_x, grad_A, grad_B
