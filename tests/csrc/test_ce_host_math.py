"""The cross-entropy kernels' per-thread math and block merge (csrc/ce_math.h), built for the
host, against float64 torch: misaligned and padded rows, odd V, ties, confident targets,
every dtype, several block sizes. The GPU run of the same kernels is in
tests/ops/test_cross_entropy_cuda.py."""

from __future__ import annotations

import math

import pytest
import torch

from tests.csrc.ce_host_kernels import DTYPE_CODES, header_dtype_codes
from tests.csrc.ce_reference import CASES, DTYPES, GRAD_ATOL, GRAD_RTOL, check_chunk_kernels, make_chunk, reference


def test_dtype_codes_match_the_header():
    names = {torch.float32: "FLOAT32", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16", torch.float64: "FLOAT64"}
    assert {names[d]: code for d, code in DTYPE_CODES.items()} == header_dtype_codes()


def test_split_row_covers_the_row_with_aligned_vectors(ce_host):
    for elem_bytes in (2, 4, 8):
        per_vec = 16 // elem_bytes
        for address in range(4096, 4096 + 48):
            for n_cols in (0, 1, 2, 7, 8, 9, 15, 16, 17, 100):
                head, n_vec, tail = ce_host.split_row(address, n_cols, elem_bytes)
                assert 0 <= head <= n_cols and tail == head + n_vec * per_vec <= n_cols
                if address % elem_bytes:  # not element-aligned: all scalar
                    assert (head, n_vec) == (n_cols, 0)
                    continue
                assert head < per_vec
                assert n_cols - tail < per_vec or n_vec == 0
                if n_vec:
                    assert (address + head * elem_bytes) % 16 == 0
                else:
                    assert n_cols - head < per_vec


def test_block_size_is_whole_warps_and_fits_the_row(ce_host):
    for elem_bytes in (2, 4, 8):
        per_vec = 16 // elem_bytes
        for n_cols in (1, 7, 8, 9, 255, 256, 257, 4096, 8191, 49152, 152064, 10**6):
            threads = ce_host.row_block_threads(n_cols, elem_bytes)
            vectors = math.ceil(n_cols / per_vec)
            assert threads % 32 == 0 and 32 <= threads <= 512
            assert threads >= min(512, vectors) and (threads == 32 or threads - 32 < vectors)


CASE_IDS = [f"V{c[0]}-off{c[1]}-pad{c[2]}-t{c[3]}" for c in CASES]


@pytest.mark.parametrize("n_cols,offset,pad,threads", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_stats_and_gradient_match_float64(ce_host, dtype, n_cols, offset, pad, threads):
    ce_host.threads = threads
    check_chunk_kernels(ce_host, dtype, n_cols, offset, pad, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logit_offset(ce_host, dtype):
    """The lse of logits near 3e4 (fp32) / 3e3 (bf16) keeps the loss to the logits' own resolution."""
    offset = 3e4 if dtype == torch.float32 else 3e3
    _, logits, labels = make_chunk(dtype, 6, 999, 0, 0, seed=3)
    logits = (logits.double() + offset).to(dtype)
    row_max, log_sum, target, _, _, _ = ce_host.ce_row_stats(logits, labels)
    ref_lse, _, ref_target, _, _, _, _ = reference(logits, labels, torch.ones(6))
    ulp = torch.finfo(torch.float32).eps * offset
    torch.testing.assert_close((row_max + log_sum - target).double(), ref_lse - ref_target, rtol=0, atol=4 * ulp)
    # kept apart, the loss is exact to fp32 relative precision however large the offset
    torch.testing.assert_close(((row_max - target) + log_sum).double(), ref_lse - ref_target, rtol=1e-6, atol=1e-6)


def test_nan_logit_makes_the_lse_nan_and_bad_labels_read_nothing(ce_host):
    _, logits, labels = make_chunk(torch.float32, 6, 40, 0, 0, seed=4)
    logits[0, 17] = float("nan")
    labels[1] = 40  # out of range: no read, target NaN, never "correct"
    row_max, log_sum, target, best_other, _, _ = ce_host.ce_row_stats(logits, labels)
    lse = row_max + log_sum
    assert math.isnan(float(lse[0])) and math.isfinite(float(lse[2]))
    assert math.isnan(float(target[1])) and not bool(target[1] > best_other[1])


def test_block_size_does_not_change_the_result_beyond_rounding(ce_host):
    _, logits, labels = make_chunk(torch.bfloat16, 6, 5000, 1, 3, seed=5)
    results = []
    for threads in (32, 160, 512, 1024):
        ce_host.threads = threads
        results.append(ce_host.ce_row_stats(logits, labels))
    for row_max, log_sum, target, best_other, _, entropy in results[1:]:
        torch.testing.assert_close(entropy, results[0][5], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(log_sum, results[0][1], rtol=1e-6, atol=1e-7)
        assert torch.equal(row_max, results[0][0]) and torch.equal(target, results[0][2])
        assert torch.equal(best_other, results[0][3])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap,label_smoothing,lse_square_scale",
                         [(5.0, 0.0, 0.0), (0.0, 0.1, 0.0), (0.0, 0.0, 1e-3), (3.0, 0.2, 1e-2)])
def test_options_match_float64(ce_host, dtype, softcap, label_smoothing, lse_square_scale):
    """softcap / label smoothing / z-loss terms of the kernels against the float64 reference,
    on a padded, unaligned chunk with a tie and a confident target."""
    storage, logits, labels = make_chunk(dtype, 6, 1000, 3, 2, seed=7)
    weight = torch.tensor([0.5, 0.0, 1.0, 2.0, 1.5, 0.25], dtype=torch.float64 if dtype == torch.float64
                          else torch.float32)
    ref_lse, ref_log_sum, ref_target, ref_best, ref_grad, ref_sum, ref_entropy = reference(
        logits, labels, weight, softcap, label_smoothing, lse_square_scale)
    row_max, log_sum, target, best_other, sum_z, entropy = ce_host.ce_row_stats(logits, labels, softcap)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close((row_max + log_sum).double(), ref_lse, rtol=tol, atol=tol)
    torch.testing.assert_close(target.double(), ref_target, rtol=tol, atol=tol)
    torch.testing.assert_close(best_other.double(), ref_best, rtol=tol, atol=tol)
    torch.testing.assert_close(sum_z.double(), ref_sum, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-12)
    ce_host.ce_softmax_grad_(logits, labels, row_max, log_sum, weight, softcap, label_smoothing, lse_square_scale)
    active = weight != 0
    torch.testing.assert_close(logits[active].double(), ref_grad[active].to(dtype).double(),
                               rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype] + (1e-6 if label_smoothing else 0.0))

