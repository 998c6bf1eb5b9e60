"""Pure-PyTorch chunk kernel of the fused cross-entropy (the reference backend, CPU path).

One chunk of logits `[C, V]` in, per-row stats and (optionally) the weighted logit gradient
`w dloss/dz` out, written over the fp32 working copy: one amax pass, one in-place softmax
(row by row in cache), one sum, a scale only when the weights are not all 1; no extra
`[C, V]` tensor beyond that copy (and, with softcap, its derivative).

Entropy H = lse - sum_c p_c z_c = log S - sum_c p_c (z_c - max) comes from the softmax pass:
each block of rows keeps z - max in a small cache-resident scratch while its softmax is formed
in place, and one batched dot gives sum p (z - max). Both terms are >= 0 (no cancellation),
so a confident row's H -> 0 keeps fp32's relative precision.

Numerics (see row_math and `_log_sum`): where the target holds the row max, the
sum of exp(z - max) is kept as `rest`, the sum without the target's term, so log_sum =
log1p(rest) and p_y - 1 = expm1(log p_y) keep fp32's relative precision however confident
the target.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastmem.ops.cross_entropy.row_math import NO_OPTIONS, ChunkStats, row_losses, target_grad
from fastmem.ops.cross_entropy.spec import LossSpec
from fastmem.ops.cross_entropy.syncs import host_sync_is_free
from fastmem.ops.host_buffers import empty_scratch

Weigh = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RawRows = Callable[[torch.Tensor], torch.Tensor]


def process_chunk(logits: torch.Tensor, labels: torch.Tensor, weigh: Weigh, want_grad: bool,
                  options: LossSpec = NO_OPTIONS, raw_rows: RawRows | None = None) -> ChunkStats:
    """Stats, weights and gradient of one chunk.

    Args:
        logits: `[C, V]` from the GEMM; fp32/fp64 is worked on in place, bf16/fp16 is
            upcast once (softmax - onehot must be formed in fp32: the target column's
            gradient p_y - 1 vanishes when p_y is rounded to bf16 first). With softcap an
            fp32 copy is taken, and `logits` keeps z for the softcap derivative.
        labels: `[C]` int64, all valid.
        weigh: `(nll [C], correct [C]) -> weight [C]` in the accumulation dtype.
        want_grad: form the gradient.
        options: softcap, label smoothing, z-loss; `greedy_stats` / `entropy` off skip
            the passes only TokenStats reads.
        raw_rows: `(local row indices) -> [k, V]` the GEMM's logits of those rows again. With
            it, a chunk that needs no greedy stats skips the row-max pass (see `_nll_without_max`).

    Returns:
        ChunkStats (fp64 for fp64 logits, else fp32).
    """
    n_cols = logits.shape[1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cap = options.softcap
    if cap:
        work = _working_copy(logits, acc).div_(cap).tanh_().mul_(cap)
    else:
        work = logits if logits.dtype == acc else _working_copy(logits, acc)
    col = labels.unsqueeze(1)
    target = work.gather(1, col)
    greedy = options.greedy_stats or options.objective == "sw"  # SW's spatial factor reads the first error
    skip_max = (not greedy and not options.entropy and _host_sync_is_free(work)
                and (raw_rows is not None or work is not logits))
    if skip_max:
        # Nobody reads correct / margin (linear_cross_entropy without return_stats, not SW).
        row_max, best_other = None, torch.full_like(target, float("nan"))
        correct = torch.zeros_like(target, dtype=torch.bool)
    else:
        # Greedy correctness with ties counting as wrong: the target must beat every other
        # logit strictly, so take the max with the target column masked out (amax: no indices,
        # a third of max's time on CPU).
        work.scatter_(1, col, float("-inf"))
        best_other = work.amax(dim=1, keepdim=True)
        work.scatter_(1, col, target)
        correct = target > best_other
        row_max = torch.maximum(best_other, target)
    sum_z = work.sum(dim=1, keepdim=True) if options.label_smoothing else None
    if options.entropy:
        shifted_dot = _softmax_in_place(work, row_max)
    else:
        _plain_softmax_in_place(work, row_max)
        shifted_dot = None
    p_y = work.gather(1, col)
    if skip_max:
        # row_losses and target_grad take any reference point m with log_sum = lse - m: the
        # target's logit with log_sum = nll needs no row max.
        log_sum = _nll_without_max(work, col, p_y, target, logits if work is not logits else None, raw_rows, cap)
        row_max = target
    else:
        log_sum = _log_sum(work, col, p_y, target, row_max)
    lse, nll, loss = row_losses(row_max, log_sum, target, sum_z, n_cols, options)
    entropy = torch.zeros_like(log_sum) if shifted_dot is None else log_sum - shifted_dot
    weight = weigh(nll.squeeze(1), correct.squeeze(1))
    grad = None
    if want_grad:
        w = weight.to(acc).unsqueeze(1)
        scale = w  # on p_c
        if options.lse_square_scale:
            scale = scale * (1.0 + 2.0 * options.lse_square_scale * lse)
        shift = w * (options.label_smoothing / n_cols)
        if options.lse_square_scale or not _all_ones(weight):
            work.mul_(scale)
        if options.label_smoothing:
            work.sub_(shift)
        work.scatter_(1, col, target_grad(w, row_max, log_sum, target, n_cols, options))
        if cap:
            work.mul_(logits.to(acc).div_(cap).tanh_().square_().neg_().add_(1.0))
        grad = work
    return ChunkStats(lse.squeeze(1), nll.squeeze(1), loss.squeeze(1), target.squeeze(1), best_other.squeeze(1),
                      correct.squeeze(1), weight, entropy.squeeze(1), grad)


def _others(p: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """sum of p over the non-target columns (the target column is zeroed: the gradient
    overwrites it later)."""
    p.scatter_(1, col, 0.0)
    return p.sum(dim=1, keepdim=True)


def _confident_rows_exist(p_y: torch.Tensor) -> bool:
    """Some row has p_y > 1/2, where only log1p(others / p_y) keeps nll's relative precision.
    Elsewhere nll >= ln 2 and -log p_y (p_y to a few ulps) is precise, and the pass over the
    chunk that sums the others is skipped (a host sync, taken only where it is free)."""
    return not _host_sync_is_free(p_y) or bool((p_y > 0.5).any())


def _nll_without_max(p: torch.Tensor, col: torch.Tensor, p_y: torch.Tensor, target: torch.Tensor,
                     raw: torch.Tensor | None, raw_rows: RawRows | None, cap: float) -> torch.Tensor:
    """nll per row from the softmax `p` without the row max (CPU: host syncs are free).

    `_log_sum_normal` with the target's logit as the reference point (log_sum = nll): p_y > 1/2 gives
    log1p(others / p_y), other rows -log p_y. A row whose p_y underflowed (nll above ~87) has
    lost z_y - max to the softmax: its logits are taken again (`raw`, the untouched GEMM output,
    or `raw_rows`) and its nll is logsumexp(z) - z_y.
    """
    nll = _log_sum_normal(p, col, p_y, target, row_max=target)
    underflow = (p_y < torch.finfo(p.dtype).tiny).squeeze(1)
    if bool(underflow.any()):
        rows = underflow.nonzero().squeeze(1)
        z = raw.index_select(0, rows) if raw is not None else raw_rows(rows)
        z = z.to(p.dtype)
        if cap:
            z = z.div(cap).tanh_().mul_(cap)
        nll[rows] = torch.logsumexp(z, dim=1, keepdim=True) - target.index_select(0, rows)
    return nll


def _log_sum_normal(p: torch.Tensor, col: torch.Tensor, p_y: torch.Tensor, target: torch.Tensor,
                    row_max: torch.Tensor) -> torch.Tensor:
    """`_log_sum` for rows whose p_y is a normal float (the underflowed ones are the caller's)."""
    plain = (target - row_max) - torch.log(p_y)
    if not _confident_rows_exist(p_y):
        return plain
    confident = (target >= row_max) & (p_y > 0.5)
    return torch.where(confident, torch.log1p(_others(p, col) / p_y), plain)


def _log_sum(p: torch.Tensor, col: torch.Tensor, p_y: torch.Tensor, target: torch.Tensor,
             row_max: torch.Tensor) -> torch.Tensor:
    """log S, S = sum_c exp(z_c - max), from the softmax `p`.

    Target at the max with p_y > 1/2: S = 1 + rest with rest = others / p_y (a sum of small
    terms, the softmax's 1 / S cancels), and log1p keeps its relative precision however
    confident the target. Elsewhere p_y = exp(z_y - max) / S gives log S = (z_y - max) - log p_y,
    exact to a few fp32 ulps while p_y is a normal float (and nll >= ln 2 where the target
    holds the max); rows where p_y underflowed (z_y more than ~87 below the max) take -log of
    their largest p = 1 / S instead (an extra pass, on those rows only on CPU, where the test
    costs no device sync).
    """
    log_sum = _log_sum_normal(p, col, p_y, target, row_max)
    tiny = torch.finfo(p.dtype).tiny
    underflow = (target < row_max) & (p_y < tiny)
    if not _host_sync_is_free(p):
        return torch.where(underflow, -torch.log(p.amax(dim=1, keepdim=True)), log_sum)
    if bool(underflow.any()):
        rows = underflow.squeeze(1).nonzero().squeeze(1)
        log_sum[rows] = -torch.log(p.index_select(0, rows).amax(dim=1, keepdim=True))
    return log_sum


def _working_copy(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return empty_scratch(tuple(logits.shape), dtype, logits.device).copy_(logits)


def _all_ones(weight: torch.Tensor) -> bool:
    """SFT's weights are all 1 (a host sync, but only where it saves a pass over [C, V])."""
    return _host_sync_is_free(weight) and bool((weight == 1).all())


def _host_sync_is_free(work: torch.Tensor) -> bool:
    return host_sync_is_free(work.device)


def _softmax_may_alias(work: torch.Tensor) -> bool:
    return work.device.type == "cpu"


def _plain_softmax_in_place(work: torch.Tensor, row_max: torch.Tensor | None) -> None:
    """work <- softmax(work), no entropy (LossSpec(entropy=False)): ATen's row-by-row kernel
    where it may alias (the CPU), else three passes."""
    if _softmax_may_alias(work):
        try:
            torch.ops.aten._softmax.out(work, 1, False, out=work)
            return
        except RuntimeError:
            pass
    work.sub_(work.amax(dim=1, keepdim=True) if row_max is None else row_max).exp_()
    work.div_(work.sum(dim=1, keepdim=True))


# Rows per softmax block: small enough that a block and its z - max scratch stay in L2
# between the softmax and the product (4 x V x 4 bytes = 0.75 MiB each at V = 49152). Quiet
# 2-core Xeon (2 MiB L2 per core), N=2048, H=576, V=49152 fwd+bwd with stats: the entropy cost
# +7.7% at 16 rows, +6.7% at 8, +5.3% at 4, +6.2% at 2 (per-block dispatch starts to show).
SOFTMAX_BLOCK_ROWS = 4


def _softmax_in_place(work: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """work <- softmax(work) along rows; returns sum_c p_c (z_c - max) per row `[C, 1]`.

    On the CPU, ATen's softmax runs max, exp-sum and scale row by row while the row is in
    cache; its out= may alias the input (each element is read before it is written, by the
    same thread). It runs on blocks of SOFTMAX_BLOCK_ROWS rows, each block's z - max kept in a
    scratch for the product with p. A -inf logit makes that product 0 * -inf = NaN: only the
    rows where that happened are redone with the -inf terms dropped. Elsewhere (GPU kernels
    are not checked for aliasing): three whole-chunk passes and a `[C, V]` temporary.
    """
    rows = work.shape[0]
    dot = torch.empty_like(row_max)
    if _softmax_may_alias(work) and rows:
        block = min(SOFTMAX_BLOCK_ROWS, rows)
        scratch = torch.empty((block, work.shape[1]), dtype=work.dtype, device=work.device)
        try:
            for r0 in range(0, rows, block):
                r1 = min(r0 + block, rows)
                work_b, shifted_b = work[r0:r1], scratch[: r1 - r0]
                torch.sub(work_b, row_max[r0:r1], out=shifted_b)
                torch.ops.aten._softmax.out(work_b, 1, False, out=work_b)
                torch.sum(shifted_b.mul_(work_b), dim=1, keepdim=True, out=dot[r0:r1])
        except RuntimeError:
            if r0 != 0:
                raise
        else:
            return _drop_minus_inf_terms(dot, work, row_max)
    shifted = work.sub_(row_max).clone()
    work.exp_()
    work.div_(work.sum(dim=1, keepdim=True))
    return shifted.mul_(work).nan_to_num_(nan=0.0).sum(dim=1, keepdim=True)


def _drop_minus_inf_terms(dot: torch.Tensor, p: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """Rows whose sum p (z - max) is NaN from 0 * -inf terms (a -inf logit, p = 0 there):
    recomputed from log p = z - max - log S without them (a host sync, on the CPU only)."""
    bad = dot.isnan().squeeze(1)
    if not bool(bad.any()):
        return dot
    rows = bad.nonzero().squeeze(1)
    p_rows = p.index_select(0, rows)
    log_p = p_rows.log()
    log_sum = -torch.log(p_rows.amax(dim=1, keepdim=True))  # p_max = 1 / S
    terms = torch.where(p_rows > 0, p_rows * (log_p + log_sum), torch.zeros_like(p_rows))
    dot[rows] = terms.sum(dim=1, keepdim=True)
    return dot
