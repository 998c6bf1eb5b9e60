"""The chunk loop of the fused linear cross-entropy, shared by every backend.

Per chunk of valid token rows, in position order:
    logits = h W^T (+ b)                      one GEMM pass, [C, V] buffer only
    lse, L, p, correct, w  = chunk kernel     one read of the logits
    dlogits = w dloss/dz                      in place, only if a gradient is wanted
    grad_hidden[active] = dlogits[active] W   second GEMM pass, only rows with w != 0
    grad_W += dlogits[active]^T h[active]     only when the head is trainable
Ignored rows never reach a GEMM, and with MemFT-OT neither do rows already below the line:
a step with a fraction `a` of active rows costs about 1 + a GEMM passes.

The global normaliser Z = sum(w) + eps is known only after the last chunk; the gradients are
stored unnormalised and scaled by grad_output / Z in backward (a per-row scale suffices
because grad_hidden_t = (w_t / Z) (softmax_t W - W[y_t])).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastmem.ops.cpu_gemm import matmul_nn, matmul_nt, onednn_applies, onednn_serves
from fastmem.ops.cross_entropy.row_math import NO_OPTIONS
from fastmem.ops.cross_entropy.spec import LossSpec
from fastmem.ops.host_buffers import empty_scratch

# ---- how many token rows a chunk takes ----
#
# A chunk of M rows costs 2 M H V FLOPs in its logits GEMM and reads all of W (V H elements
# of `elem` bytes): 2 M / elem FLOP per byte of W. Below the GPU's ridge point (peak FLOP/s /
# HBM bandwidth) the GEMM is memory-bound and W is re-read once per chunk for nothing. The
# ridge of H100 SXM in bf16 is 989 TFLOP/s / 3.35 TB/s ~ 300 FLOP/B (H200: ~210), so a chunk
# takes at least next_pow2(300 elem / 2) rows: 512 for bf16 / fp16, 1024 for fp32 (TF32 has
# the same ridge per element pair), or all rows when there are fewer. Above that floor the
# chunk grows to GPU_CHUNK_BYTES of logits (fewer launches and syncs); `max_chunk_bytes`
# replaces both with a hard cap when memory matters more than GEMM efficiency.
# The budget counts each logit in its own dtype, plus the fp32 working copy the torch
# backend takes of 16-bit logits (the triton / cuda kernels work in place).
RIDGE_FLOP_PER_BYTE = 300
GPU_CHUNK_BYTES = 256 * 2**20
# CPU, measured at N=2048, H=576, V=49152 fwd+bwd on 2 cores (benchmarks/results/
# cross_entropy_cpu_*.md). fp32 runs its GEMMs through oneDNN (cpu_gemm), whose output is a
# fresh tensor per chunk: 24 MiB of logits (128 rows there) stays under glibc's 32 MiB mmap
# threshold, so each chunk reuses the last one's freed memory instead of faulting in new
# pages, and the GEMM is as fast per row as at 512 rows. With MKL (other dtypes) the chunk
# writes into one reused buffer, and 96 MiB (512 rows) was the measured sweet spot.
CPU_CHUNK_BYTES = 96 * 2**20
CPU_ONEDNN_CHUNK_BYTES = 24 * 2**20


ChunkWeigh = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ChunkLoopResult:
    """Per valid row (in `rows` order) stats, and the unnormalised gradients."""

    lse: torch.Tensor
    nll: torch.Tensor
    loss: torch.Tensor
    target: torch.Tensor  # the target's (capped) logit; target - best_other > 0 iff correct
    best_other: torch.Tensor
    correct: torch.Tensor
    weight: torch.Tensor
    entropy: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def ridge_rows(dtype: torch.dtype) -> int:
    """The fewest rows whose logits GEMM is compute-bound (the ridge rule above)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 1 << math.ceil(math.log2(RIDGE_FLOP_PER_BYTE * elem / 2))


def bytes_per_logit(dtype: torch.dtype, backend: str) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return elem + (4 if backend == "torch" and elem < 4 else 0)


def chunk_rows_for(n_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device, backend: str, *,
                   max_chunk_bytes: int | None = None) -> int:
    """Rows per chunk for `n_rows` tokens against a `[n_cols, H]` head (see the rule above)."""
    per_row = max(n_cols, 1) * bytes_per_logit(dtype, backend)
    if max_chunk_bytes is not None:
        rows = max_chunk_bytes // per_row
        if rows < 1:
            raise ValueError(f"max_chunk_bytes={max_chunk_bytes} is below one row of logits "
                             f"({per_row} bytes at V={n_cols}, {dtype})")
    elif device.type == "cuda":
        rows = max(ridge_rows(dtype), GPU_CHUNK_BYTES // per_row)
    else:
        rows = (CPU_ONEDNN_CHUNK_BYTES if onednn_serves(dtype, device) else CPU_CHUNK_BYTES) // per_row
    if rows >= 256:
        rows = rows // 128 * 128  # whole GEMM tiles
    return int(max(1, min(rows, n_rows)))


@dataclass(frozen=True)
class LoopPlan:
    """How the chunk loop runs.

    rows: ascending int64 indices of the rows to run, or None for every row (then `labels`
        must already be in [0, V) everywhere and `weigh` gives ignored rows weight 0).
    chunk_rows: rows per chunk.  wants: (grad_hidden, grad_weight, grad_bias) to form.
    sparse: the gradient GEMMs take only the chunk's rows with w != 0, counted on the host
        (one sync per chunk: only where syncs are free, see syncs.py); otherwise they take
        the whole chunk, with no sync.
    spec: the logit options (softcap, label smoothing, z-loss) the chunk kernel applies.
    """

    rows: torch.Tensor | None
    chunk_rows: int
    wants: tuple[bool, bool, bool]
    sparse: bool = False
    spec: LossSpec = NO_OPTIONS


def run_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               plan: LoopPlan, weigh: ChunkWeigh, process_chunk) -> ChunkLoopResult:
    """Run the chunk loop over the rows `plan.rows` of `hidden [N, H]`.

    Args:
        weigh: `(c0, c1, rows_c, loss_c, correct_c) -> weight_c` for rows c0:c1 of the run.
        process_chunk: the backend's chunk kernel (see backend_torch.process_chunk); its
            gradient rows of weight 0 are 0 (or never read, with `plan.sparse`).
    Returns:
        stats per valid row; grad_hidden `[N, H]` in hidden's dtype (zero on rows that are
        ignored or weigh 0), grad_weight `[V, H]` and grad_bias `[V]` in fp32 (fp64 for
        fp64 inputs), all scaled by w_t but not by 1/Z.
    """
    rows, chunk_rows, options = plan.rows, plan.chunk_rows, plan.spec
    want_grad_hidden, want_grad_weight, want_grad_bias = plan.wants
    n_rows, hidden_size = hidden.shape
    n_valid = n_rows if rows is None else rows.numel()
    device = hidden.device
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    want_grad = want_grad_hidden or want_grad_weight or want_grad_bias

    lse = torch.empty(n_valid, dtype=acc_dtype, device=device)
    nll, loss, target, best_other, weight_rows, entropy = (torch.empty_like(lse) for _ in range(6))
    correct = torch.empty(n_valid, dtype=torch.bool, device=device)
    grad_hidden = (torch.zeros(n_rows, hidden_size, dtype=hidden.dtype, device=device)
                   if want_grad_hidden else None)
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if want_grad_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=device) if want_grad_bias else None

    # One logits buffer for every chunk: a new one per chunk would briefly hold two. The CPU's
    # oneDNN GEMM writes a fresh tensor instead (no out=), freed before the next chunk's.
    fresh_logits = onednn_applies(hidden, weight)
    logits_buffer = (None if fresh_logits else
                     empty_scratch((min(chunk_rows, n_valid), weight.shape[0]), hidden.dtype, device))
    for c0 in range(0, n_valid, chunk_rows):
        c1 = min(c0 + chunk_rows, n_valid)
        if rows is None:
            rows_c = torch.arange(c0, c1, device=device)
            hidden_c, labels_c = hidden[c0:c1], labels[c0:c1]
        else:
            rows_c = rows[c0:c1]
            hidden_c, labels_c = hidden.index_select(0, rows_c), labels.index_select(0, rows_c)
        logits = matmul_nt(hidden_c, weight, bias, out=None if fresh_logits else logits_buffer[: c1 - c0])
        out = process_chunk(logits, labels_c, lambda nll_c, ok: weigh(c0, c1, rows_c, nll_c, ok), want_grad, options,
                            raw_rows=lambda idx, h=hidden_c: matmul_nt(h.index_select(0, idx), weight, bias))
        lse[c0:c1], nll[c0:c1], loss[c0:c1], target[c0:c1] = out.lse, out.nll, out.loss, out.target
        best_other[c0:c1], correct[c0:c1], weight_rows[c0:c1] = out.best_other, out.correct, out.weight
        entropy[c0:c1] = out.entropy
        if want_grad:
            _accumulate_grads(out.grad, out.weight, hidden_c, rows_c, weight, (grad_hidden, grad_weight, grad_bias),
                              out_rows=slice(c0, c1) if rows is None else None, sparse=plan.sparse)
        del out, logits
    return ChunkLoopResult(lse, nll, loss, target, best_other, correct, weight_rows, entropy, grad_hidden,
                           grad_weight, grad_bias)


def _accumulate_grads(dlogits, weight_c, hidden_c, rows_c, weight, grads, out_rows, sparse):
    """The second GEMM pass of a chunk into `grads` = (grad_hidden, grad_weight, grad_bias).
    With `sparse`, over its rows with w != 0 only: counting them is this chunk's one host
    sync (the GEMM's row count depends on it)."""
    grad_hidden, grad_weight, grad_bias = grads
    if sparse:
        keep = (weight_c != 0).nonzero().squeeze(1)
        n_active = keep.numel()
        if n_active == 0:
            return
        if n_active < dlogits.shape[0]:
            dlogits, hidden_c, rows_c = dlogits.index_select(0, keep), hidden_c.index_select(0, keep), rows_c[keep]
            out_rows = None
    dlogits = dlogits.to(hidden_c.dtype)
    if grad_hidden is not None:
        if out_rows is not None:
            matmul_nn(dlogits, weight, out=grad_hidden[out_rows])
        else:
            grad_hidden.index_copy_(0, rows_c, matmul_nn(dlogits, weight))
    if grad_weight is not None:
        grad_weight.add_(matmul_nn(dlogits.t(), hidden_c))
    if grad_bias is not None:
        grad_bias.add_(dlogits.sum(0, dtype=grad_bias.dtype))
