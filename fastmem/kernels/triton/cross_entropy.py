"""Triton kernels for one chunk of logits of the fused cross-entropy.

The GEMMs around them (logits = h W^T, grad_hidden = dlogits W) run on cuBLAS; these two
kernels do the memory-bound part in two reads and one write of the chunk:

* `row_stats_kernel`: one pass over a row in vocabulary tiles with an online log-sum-exp kept
  as (row max, rest = sum of exp(z - max) without one element at the max), the target logit,
  the best non-target logit (greedy correctness, ties count as wrong), the sum of the
  logits (label smoothing) and the entropy: A = sum exp(z - max) (z - max), rescaled with the
  max like the sum (A' = e^d (A + d S) for a max that moves by d <= 0), gives
  H = log S - A / S; both terms are >= 0, so H -> 0 of a confident row keeps its precision.
* `softmax_grad_kernel`: overwrites the row with `w dloss/dz`, formed in fp32 and rounded once.
  The target column takes expm1(log p_y), so a confident target's p_y - 1 keeps fp32's
  relative precision (exp(z - lse) - 1 loses it once ulp(lse) nears 1 - p_y). Rows with
  w = 0 are written as zeros without reading them, so a gradient GEMM may take the whole chunk
  (no host-side list of active rows).

softcap (SOFTCAP, CAP) replaces z by CAP tanh(z / CAP) on load; its derivative multiplies the
gradient. Padded columns of the last tile are masked out of the max, the sums, the argmax and
the target match; a tile (or a whole row but the target) of -inf is exact: exp(-inf - max) = 0
and a row that is -inf so far keeps an empty state instead of forming exp(-inf + inf).
Row offsets are int64: C * V passes 2^31 at long vocabularies.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh from one exp (tl has no tanh on every backend the interpreter included):
    # (1 - e) / (1 + e) with e = exp(-2|x|) <= 1, so it never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def row_stats_kernel(logits_ptr, stride_row, labels_ptr, row_max_ptr, log_sum_ptr, target_ptr, best_other_ptr,
                     sum_z_ptr, entropy_ptr, n_cols, cap, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    target = tl.load(row_ptr + label).to(tl.float32)
    if SOFTCAP:
        target = cap * _tanh(target / cap)
    running_max = tl.full((), float("-inf"), tl.float32)
    rest = tl.full((), -1.0, tl.float32)  # empty: sum - 1 = -1
    best_other = tl.full((), float("-inf"), tl.float32)
    sum_z = tl.full((), 0.0, tl.float32)
    shifted_sum = tl.full((), 0.0, tl.float32)  # A = sum exp(z - max) (z - max)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            z = tl.where(in_row, cap * _tanh(z / cap), float("-inf"))
        sum_z += tl.sum(tl.where(in_row, z, 0.0), axis=0)
        tile_max = tl.max(z, axis=0)
        new_max = tl.maximum(running_max, tile_max)
        # A row still all -inf has no finite max: shift by 0 (every exp is 0) instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        e = tl.exp(z - shift)
        # When this tile holds the new max, one element at it is the implicit 1 of the sum.
        holds_max = tile_max > running_max
        first_max = tl.argmax(z, axis=0)
        local = cols - start
        kept = tl.where(holds_max, 0.0, e)  # the slot at the first max: excluded only if it is the new max
        tile_rest = tl.sum(tl.where(local == first_max, kept, e), axis=0)
        # exp(NaN) is NaN, but a NaN at the excluded slot must still reach the sum
        tile_rest += tl.sum(tl.where(z != z, z, 0.0), axis=0)
        scale = tl.exp(running_max - shift)
        rescaled = (1.0 + rest) * scale
        # A moves with the max: e^d (A + d S), d = old max - new max; nothing to move while empty
        # (an empty state has scale 0 and shifted_sum 0; its d is taken as 0, not -inf)
        delta = tl.where(running_max == float("-inf"), 0.0, running_max - shift)
        moved = scale * (shifted_sum + delta * (1.0 + rest))
        tile_shifted = tl.sum(e * tl.where(e > 0.0, z - shift, 0.0), axis=0)
        tile_shifted += tl.sum(tl.where(z != z, z, 0.0), axis=0)
        shifted_sum = tl.where(holds_max, moved, shifted_sum) + tile_shifted
        rest = tl.where(holds_max, rescaled + tile_rest, rest + tile_rest)
        running_max = new_max
        other = tl.where(cols == label, float("-inf"), z)
        best_other = tl.maximum(best_other, tl.max(other, axis=0))
    # log1p(rest) without a libdevice call: log(1 + rest) loses rest below 2^-24, so use
    # the classic correction u = 1 + rest; log(u) * rest / (u - 1).
    u = 1.0 + rest
    log_sum = tl.where(u == 1.0, rest, tl.log(u) * rest / (u - 1.0))
    tl.store(row_max_ptr + row, running_max)
    tl.store(log_sum_ptr + row, log_sum)
    tl.store(target_ptr + row, target)
    tl.store(best_other_ptr + row, best_other)
    tl.store(sum_z_ptr + row, sum_z)
    tl.store(entropy_ptr + row, log_sum - shifted_sum / u)


@triton.jit
def softmax_grad_kernel(logits_ptr, stride_row, labels_ptr, row_max_ptr, log_sum_ptr, weight_ptr, target_grad_ptr,
                        n_cols, lse_square_scale, smooth_per_col, cap, SOFTCAP: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    weight = tl.load(weight_ptr + row)
    row_ptr = logits_ptr + row * stride_row
    if weight == 0.0:
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(row_ptr + cols, tl.zeros((BLOCK_V,), tl.float32).to(logits_ptr.dtype.element_ty),
                     mask=cols < n_cols)
    else:
        label = tl.load(labels_ptr + row)
        row_max = tl.load(row_max_ptr + row)
        log_sum = tl.load(log_sum_ptr + row)
        # w p_c (1 + 2 s lse) - w eps / V off the target; the target's value comes precomputed
        # (ops/cross_entropy/row_math.target_grad: expm1 of log p_y and the option terms)
        scale = weight * (1.0 + 2.0 * lse_square_scale * (row_max + log_sum))
        shift = weight * smooth_per_col
        target_value = tl.load(target_grad_ptr + row)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = _tanh(z / cap)
                z = cap * t
            grad = scale * tl.exp((z - row_max) - log_sum) - shift
            grad = tl.where(cols == label, target_value, grad)
            if SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)
