"""Float64 reference of one chunk of the cross-entropy kernels, and chunks that stress them
(unaligned, padded rows, a tie, a confident target); shared by the host and GPU tests."""

from __future__ import annotations

import math

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Gradient entries vs the exactly rounded float64 value: one ulp of the storage type (the
# value is rounded once) plus fp32's relative error of exp / expm1 of (z - max) - log_sum.
GRAD_RTOL = {torch.float32: 5e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 1e-12}
GRAD_ATOL = {torch.float32: 1e-30, torch.float16: 6e-8, torch.bfloat16: 1e-30, torch.float64: 1e-300}
LSE_TOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6, torch.float64: 1e-12}
# relative error of a confident target's gradient w (p_y - 1) at p_y = 1 - 1e-4: an fp32 lse
# (or a sum near 1) would cost 0.1-1% of it, rounding p_y to bf16 first all of it
CONFIDENT_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10 + 1e-5, torch.bfloat16: 2.0**-7 + 1e-5,
                  torch.float64: 1e-12}
SENTINEL = {torch.float32: 1e4, torch.float16: 6e4, torch.bfloat16: 1e4, torch.float64: 1e4}


def make_chunk(dtype, rows, n_cols, offset, pad, seed=0):
    """A [rows, n_cols] view at element `offset` of a storage with row stride n_cols + pad; the
    padding and everything around the view hold a large sentinel that must never be read."""
    gen = torch.Generator().manual_seed(seed)
    stride = n_cols + pad
    storage = torch.full((offset + rows * stride + 8,), SENTINEL[dtype], dtype=torch.float64)
    logits = storage[offset:offset + rows * stride].view(rows, stride)[:, :n_cols]
    logits.copy_(torch.randn(rows, n_cols, generator=gen, dtype=torch.float64) * 4)
    labels = torch.randint(0, n_cols, (rows,), generator=gen)
    labels[0], labels[1] = 0, n_cols - 1
    if n_cols >= 2:
        labels[2] = n_cols // 2
        other = (labels[2] + 1) % n_cols
        logits[2, labels[2]] = logits[2, other] = logits[2].max() + 1  # a tie for the top: wrong
    # a confident target: p_y = 1 - 1e-4 roughly, whatever V
    logits[3] = torch.randn(n_cols, generator=gen, dtype=torch.float64) * 0.5
    logits[3, labels[3]] = math.log(max(n_cols - 1, 1) / 1e-4)
    storage = storage.to(dtype)
    logits = storage.as_strided((rows, n_cols), (stride, 1), offset)
    return storage, logits, labels


def reference(logits, labels, weight, softcap=0.0, label_smoothing=0.0, lse_square_scale=0.0):
    """float64 lse, log sum exp(z - max), target, best non-target logit, w dloss/dz of the
    (capped) logits, sum of z and entropy, with p_y - 1 through log1p / expm1 (plain softmax - 1
    cancels to ~1e-12 even in float64) and H = log S - sum e d / S (d = z - max, e = exp(d))."""
    raw = logits.double()
    z = softcap * torch.tanh(raw / softcap) if softcap else raw
    row_max = z.max(dim=1, keepdim=True).values
    shifted = torch.exp(z - row_max)
    e_d = (shifted * (z - row_max)).nan_to_num(0.0, 0.0, 0.0).sum(dim=1)
    shifted.scatter_(1, z.argmax(dim=1, keepdim=True), 0.0)  # every term but one 1
    log_sum = torch.log1p(shifted.sum(dim=1, keepdim=True))
    entropy = log_sum.squeeze(1) - e_d / (1.0 + shifted.sum(dim=1))
    lse = row_max + log_sum
    log_p = z - row_max - log_sum
    rows, col = torch.arange(len(labels)), labels[:, None]
    n_cols = z.shape[1]
    grad = torch.exp(log_p) * (1 + 2 * lse_square_scale * lse) - label_smoothing / n_cols
    log_p_y = log_p.gather(1, col).squeeze(1)
    grad[rows, labels] = (torch.expm1(log_p_y) + 2 * lse_square_scale * lse.squeeze(1) * torch.exp(log_p_y)
                          + label_smoothing * (1 - 1 / n_cols))
    if softcap:
        grad = grad * (1 - torch.tanh(raw / softcap) ** 2)
    target = z.gather(1, col).squeeze(1)
    best_other = z.scatter(1, col, float("-inf")).max(dim=1).values
    return (lse.squeeze(1), log_sum.squeeze(1), target, best_other, grad * weight.double()[:, None],
            z.sum(dim=1), entropy)


CASES = [  # n_cols, storage offset (elements), row padding, threads per block (0: the kernels' choice)
    (1, 0, 0, 0), (2, 1, 1, 32), (7, 3, 2, 0), (8, 0, 0, 32), (9, 5, 3, 96), (33, 0, 1, 1024),
    (131, 1, 0, 0), (1000, 2, 5, 64), (4099, 7, 1, 0), (70001, 3, 2, 0),
]


def check_chunk_kernels(ops, dtype, n_cols, offset, pad, device, rows=6):
    """Run `ops.ce_row_stats` / `ops.ce_softmax_grad_` on a make_chunk chunk on `device` and
    check them against `reference`, including that nothing outside the active rows is written."""
    storage, logits, labels = make_chunk(dtype, rows, n_cols, offset, pad)
    accum = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.tensor([0.5, 0.0, 1.0, 2.0, 1.5, 0.25], dtype=accum)  # row 1 is inactive
    ref_lse, ref_log_sum, ref_target, ref_best, ref_grad, ref_sum, ref_entropy = reference(logits, labels, weight)
    storage = storage.to(device)
    logits = storage.as_strided(logits.shape, logits.stride(), offset)

    row_max, log_sum, target, best_other, sum_z, entropy = (t.cpu() for t in ops.ce_row_stats(logits, labels.to(device),
                                                                                              0.0))
    assert row_max.dtype == log_sum.dtype == target.dtype == best_other.dtype == sum_z.dtype == entropy.dtype == accum
    # entropy of the stored logits: relative to float64 (H >= 0, no cancellation), row 3 confident
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=LSE_TOL[dtype] * 5, atol=1e-12)
    torch.testing.assert_close(sum_z.double(), ref_sum, rtol=1e-5, atol=1e-4 * math.sqrt(n_cols))
    assert torch.equal(row_max.double(), logits.double().max(dim=1).values.cpu())
    torch.testing.assert_close(log_sum.double(), ref_log_sum, rtol=LSE_TOL[dtype], atol=0)
    torch.testing.assert_close((row_max + log_sum).double(), ref_lse, rtol=LSE_TOL[dtype], atol=LSE_TOL[dtype])
    assert torch.equal(target.double(), ref_target)  # an exact copy of the stored logit
    assert torch.equal(best_other.double(), ref_best)  # a max is exact
    correct = target > best_other
    assert torch.equal(correct, ref_target > ref_best)
    if n_cols >= 2:
        assert not bool(correct[2]), "a tie for the top logit counts as wrong"
    assert bool(correct[3])

    before = storage.clone()
    ops.ce_softmax_grad_(logits, labels.to(device), row_max.to(device), log_sum.to(device), weight.to(device),
                         0.0, 0.0, 0.0)
    grad, storage, before = logits.cpu(), storage.cpu(), before.cpu()
    active = weight != 0
    torch.testing.assert_close(grad[active].double(), ref_grad[active].to(dtype).double(),
                               rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype])
    if n_cols >= 2:  # the confident target keeps its tiny p_y - 1: formed in fp32, rounded once
        exact = float(ref_grad[3, labels[3]])
        assert -3e-4 < exact < -1e-5
        assert abs(float(grad[3, labels[3]]) - exact) <= CONFIDENT_RTOL[dtype] * abs(exact)
    assert not grad[~active].any(), "a row of weight 0 is written as zeros"
    # row padding and the storage around the view are untouched, bit for bit
    untouched = torch.ones_like(storage, dtype=torch.bool)
    untouched.as_strided(grad.shape, logits.stride(), offset)[:] = False
    assert torch.equal(storage[untouched], before[untouched])
