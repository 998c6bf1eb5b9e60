"""Triton kernels of the fused LoRA linear `y = x W^T + s (drop(x) A^T) B^T (+ b)`.

Following LoRAFusion (arXiv 2510.00206) the graph is split at the small `[N, r]` tensor, so
every large operand is read once per direction and no `[N, I]` or extra `[N, O]` tensor is
ever written:

* `rank_project_kernel`   `out[N, r] = drop(big[N, K]) @ small[K, r]`: one read of x for the
  dropout and `x A^T` (forward), one read of dy for `dy B` (backward).
* `lora_gemm_kernel`      `out[M, J] = a[M, K] @ b[K, J] + s * drop'(c[M, R] @ d[R, J]) (+ bias)`:
  the base GEMM with the LoRA term added in its epilogue. Forward: `x W^T + s (x A^T) B^T`;
  backward: `dx = dy W + s mask ⊙ ((dy B) A) / (1 - p)`.
* `rank_grad_kernel`      `part[S, r, K] = c[N, r]^T @ drop(big[N, K])` over S slices of rows:
  `dA` (big = x) and `dB^T` (big = dy), fp32 partials summed on the host (deterministic, no atomics).

The dropout keep-mask is a pure function of (seed, row, column): a Philox draw (`_keep_tile`),
kept where the uniform number is `>= p`. The forward, both backward kernels and
`dropout_keep_kernel` (the mask for tests) regenerate the same bits, whatever their tile sizes.

Every accumulator is fp32. `UPCAST` turns tiles into fp32 before `tl.dot`: Triton's CPU
interpreter returns garbage for bf16 dots. Row offsets are int64 (N * I passes 2^31 at 32k x 14k
once a batch dim is added). `seed` is never specialized on: a fresh seed per step must not
compile a new variant.
"""

import os

import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _keep_tile(seed, rows, col_start, n_cols, p_drop, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep-mask of the tile rows x [col_start, col_start + BLOCK_COLS), col_start % 4 == 0.

    Element (row, col) takes word `col % 4` of Philox(seed, counter = row * ceil(n_cols / 4) +
    col // 4): one 10-round Philox call per 4 elements, 4x less integer work than `tl.rand` in
    passes that are otherwise memory-bound (the x A^T pass and dA)."""
    groups = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    counters = rows.to(tl.int64)[:, None] * ((n_cols + 3) // 4) + groups.to(tl.int64)[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    # join(join(w0, w1), join(w2, w3)) is [rows, groups, 2, 2]; flattened, column 4g + m holds word m.
    words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_ROWS, BLOCK_COLS))
    return tl.uint_to_uniform_float(words) >= p_drop


@triton.jit(do_not_specialize=["seed"])
def dropout_keep_kernel(out_ptr, n_rows, n_cols, seed, p_drop,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the int8 keep-mask the other kernels use (tests and debugging only)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_tile(seed, rows, tl.program_id(1) * BLOCK_K, n_cols, p_drop, BLOCK_M, BLOCK_K)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(out_ptr + offsets, keep.to(tl.int8), mask=inside)


@triton.jit(do_not_specialize=["seed"])
def rank_project_kernel(big_ptr, small_ptr, out_ptr, n_rows, n_cols, rank,
                        stride_bm, stride_bk, stride_sk, stride_sr, stride_om, stride_or,
                        seed, p_drop, keep_scale,
                        DROPOUT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_in = rows < n_rows
    rank_in = ranks < rank
    big_rows = big_ptr + rows.to(tl.int64)[:, None] * stride_bm
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_in = cols < n_cols
        big = tl.load(big_rows + cols[None, :] * stride_bk, mask=row_in[:, None] & col_in[None, :], other=0.0)
        if DROPOUT:
            big = tl.where(_keep_tile(seed, rows, k0, n_cols, p_drop, BLOCK_M, BLOCK_K), big, 0.0)
        small = tl.load(small_ptr + cols[:, None] * stride_sk + ranks[None, :] * stride_sr,
                        mask=col_in[:, None] & rank_in[None, :], other=0.0)
        if UPCAST:
            big, small = big.to(tl.float32), small.to(tl.float32)
        acc = tl.dot(big, small, acc, input_precision=INPUT_PRECISION)
    if DROPOUT:
        # 1/(1-p) once on the [M, r] result instead of on every element of x.
        acc = acc * keep_scale
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + ranks[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & rank_in[None, :])


@triton.jit
def _rank_term(acc, c_rows, stride_cr, d_ptr, stride_dr, stride_dj, cols, row_in, col_in, R, c_scale,
               UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """`acc + (c_scale * c[rows, :R]) @ d[:R, cols]` in BLOCK_R slices of the rank."""
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_in = rs < R
        c = tl.load(c_rows + rs[None, :] * stride_cr, mask=row_in[:, None] & r_in[None, :], other=0.0)
        d = tl.load(d_ptr + rs[:, None] * stride_dr + cols[None, :] * stride_dj,
                    mask=r_in[:, None] & col_in[None, :], other=0.0)
        if UPCAST:
            c, d = c.to(tl.float32) * c_scale, d.to(tl.float32)
        else:
            c = (c.to(tl.float32) * c_scale).to(d.dtype)
        acc = tl.dot(c, d, acc, input_precision=INPUT_PRECISION)
    return acc


# The base GEMM dominates the op: on a GPU it is autotuned; the interpreter runs one small config
# (a single config skips the timing runs, so both go through the same launch code).
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_J": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1),
] if _INTERPRETING else [
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_J": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_J": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_J": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]


# Tuned per power-of-two bucket of rows (M_BUCKET), not per M: every sample of a run has its own
# length, and re-tuning for each would cost more than it saves.
@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "J", "K", "R", "DROPOUT", "HAS_BIAS"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["seed"])
def lora_gemm_kernel(a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, out_ptr, M, J, K, R, M_BUCKET,
                     stride_am, stride_ak, stride_bk, stride_bj, stride_cm, stride_cr,
                     stride_dr, stride_dj, stride_om, stride_oj,
                     scaling, seed, p_drop, keep_scale,
                     HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    # Grouped launch order: GROUP_M row blocks share each column block of b while it is in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_j = tl.cdiv(J, BLOCK_J)
    per_group = GROUP_M * blocks_j
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_j = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    row_in = rows < M
    col_in = cols < J
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_bj

    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # the common case (I, O multiples of 64): no mask along the reduction
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=row_in[:, None], other=0.0)
            b = tl.load(b_cols + ks.to(tl.int64)[:, None] * stride_bk, mask=col_in[None, :], other=0.0)
        else:
            k_in = ks < K
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=row_in[:, None] & k_in[None, :], other=0.0)
            b = tl.load(b_cols + ks.to(tl.int64)[:, None] * stride_bk, mask=k_in[:, None] & col_in[None, :],
                        other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # Epilogue: the rank-r term joins the output tile while it is still in registers.
    c_rows = c_ptr + rows.to(tl.int64)[:, None] * stride_cm
    if DROPOUT:
        lora = _rank_term(tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32), c_rows, stride_cr, d_ptr, stride_dr,
                          stride_dj, cols, row_in, col_in, R, 1.0, UPCAST, INPUT_PRECISION, BLOCK_R)
        keep = _keep_tile(seed, rows, pid_j * BLOCK_J, J, p_drop, BLOCK_M, BLOCK_J)
        acc += tl.where(keep, lora * (scaling * keep_scale), 0.0)
    else:
        # s folded into the small c tile: no second [BLOCK_M, BLOCK_J] fp32 accumulator, which
        # at 128 x 256 tiles would spill registers.
        acc = _rank_term(acc, c_rows, stride_cr, d_ptr, stride_dr, stride_dj, cols, row_in, col_in, R,
                         scaling, UPCAST, INPUT_PRECISION, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_oj
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@triton.jit(do_not_specialize=["seed"])
def rank_grad_kernel(c_ptr, big_ptr, part_ptr, n_rows, n_cols, rank, rows_per_slice,
                     stride_cn, stride_cr, stride_bn, stride_bk, stride_ps, stride_pr, stride_pk,
                     seed, p_drop,
                     DROPOUT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_k = tl.program_id(0)
    row_slice = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    col_in = cols < n_cols
    rank_in = ranks < rank
    first = row_slice * rows_per_slice
    last = min(first + rows_per_slice, n_rows)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for n0 in range(first, last, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_in = rows < last
        # c^T tile [r, rows]: the reduction runs over token rows.
        c_t = tl.load(c_ptr + ranks[:, None] * stride_cr + rows.to(tl.int64)[None, :] * stride_cn,
                      mask=rank_in[:, None] & row_in[None, :], other=0.0)
        big = tl.load(big_ptr + rows.to(tl.int64)[:, None] * stride_bn + cols[None, :] * stride_bk,
                      mask=row_in[:, None] & col_in[None, :], other=0.0)
        if DROPOUT:
            big = tl.where(_keep_tile(seed, rows, pid_k * BLOCK_K, n_cols, p_drop, BLOCK_N, BLOCK_K), big, 0.0)
        if UPCAST:
            c_t, big = c_t.to(tl.float32), big.to(tl.float32)
        acc = tl.dot(c_t, big, acc, input_precision=INPUT_PRECISION)
    part = part_ptr + row_slice * stride_ps + ranks[:, None] * stride_pr + cols[None, :] * stride_pk
    tl.store(part, acc, mask=rank_in[:, None] & col_in[None, :])
