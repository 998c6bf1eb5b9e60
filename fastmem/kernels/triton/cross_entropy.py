"""Triton kernels for one chunk of logits of the fused cross-entropy.

The GEMMs around them (logits = h W^T, grad_hidden = dlogits W) run on cuBLAS; these two
kernels do the memory-bound part in two reads and one write of the chunk:

* `row_stats_kernel`: one pass over a row in vocabulary tiles with an online log-sum-exp,
  the target logit and the best non-target logit (greedy correctness, ties count as wrong).
* `softmax_grad_kernel`: overwrites the row with `w (softmax - onehot)`, formed in fp32 and
  rounded once (p_y - 1 of a confident target is lost if p_y is rounded to bf16 first).
  Rows with w = 0 are skipped: they never reach the gradient GEMM.

Padded columns of the last tile are masked out of the max, the lse, the argmax and the
target match. Row offsets are int64: C * V passes 2^31 at long vocabularies.
"""

import triton
import triton.language as tl


@triton.jit
def row_stats_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, target_ptr, best_other_ptr,
                     n_cols, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    target = tl.load(row_ptr + label).to(tl.float32)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    best_other = tl.full((), float("-inf"), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
        other = tl.where(cols == label, float("-inf"), z)
        best_other = tl.maximum(best_other, tl.max(other, axis=0))
    tl.store(lse_ptr + row, running_max + tl.log(running_sum))
    tl.store(target_ptr + row, target)
    tl.store(best_other_ptr + row, best_other)


@triton.jit
def softmax_grad_kernel(logits_ptr, stride_row, labels_ptr, lse_ptr, weight_ptr, n_cols,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    weight = tl.load(weight_ptr + row)
    if weight != 0.0:
        row_ptr = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row)
        lse = tl.load(lse_ptr + row)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = weight * (tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0))
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)
