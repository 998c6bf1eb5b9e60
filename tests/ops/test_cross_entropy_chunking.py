"""The chunk rule of the fused cross-entropy (cross_entropy/chunk_loop.chunk_rows_for) at the
shapes users run, the max_chunk_bytes knob, and the host syncs per chunk."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import fastmem
from fastmem.ops.cross_entropy.chunk_loop import bytes_per_logit, chunk_rows_for, ridge_rows
from tests.ops.test_linear_cross_entropy import make_case

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs on CUDA here
LLAMA3_V, QWEN_V, SMOLLM2_V = 128256, 151936, 49152
lce_op = importlib.import_module("fastmem.ops.cross_entropy.forward")


def test_ridge_rows_from_the_gpu_arithmetic_intensity():
    # 2 M / elem FLOP per byte of W must pass ~300 (H100 bf16): 512 rows in 16-bit, 1024 in fp32
    assert ridge_rows(torch.bfloat16) == ridge_rows(torch.float16) == 512
    assert ridge_rows(torch.float32) == 1024
    for dtype in (torch.bfloat16, torch.float32):
        elem = torch.empty((), dtype=dtype).element_size()
        assert 2 * ridge_rows(dtype) / elem >= 300


@pytest.mark.parametrize("vocab", [LLAMA3_V, QWEN_V], ids=["llama3", "qwen"])
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_gpu_chunks_reach_the_ridge_at_llama_and_qwen_shapes(vocab, backend):
    rows = chunk_rows_for(16384, vocab, torch.bfloat16, CUDA, backend)
    assert rows >= 512 and rows % 128 == 0
    # the logits buffer is counted in its own dtype (+ fp32 copy on the torch backend)
    assert rows * vocab * bytes_per_logit(torch.bfloat16, backend) <= max(256 * 2**20,
                                                                          512 * vocab * 6)
    # W [V, 4096] bf16 is re-read once per chunk: at N=16k that is at most 32 times, not ~340
    assert math.ceil(16384 / rows) <= 32


def test_gpu_rule_examples():
    assert chunk_rows_for(16384, LLAMA3_V, torch.bfloat16, CUDA, "triton") == 1024  # 256 MiB of bf16 logits
    assert chunk_rows_for(16384, QWEN_V, torch.bfloat16, CUDA, "triton") == 768
    assert chunk_rows_for(16384, QWEN_V, torch.bfloat16, CUDA, "torch") == 512  # + fp32 copy: the ridge floor
    assert chunk_rows_for(300, QWEN_V, torch.bfloat16, CUDA, "triton") == 300  # fewer rows: all of them
    assert chunk_rows_for(0, QWEN_V, torch.bfloat16, CUDA, "triton") == 1


def test_max_chunk_bytes_is_a_hard_cap_in_the_logits_dtype():
    cap = 64 * 2**20
    bf16 = chunk_rows_for(16384, QWEN_V, torch.bfloat16, CUDA, "triton", max_chunk_bytes=cap)
    fp32 = chunk_rows_for(16384, QWEN_V, torch.float32, CUDA, "triton", max_chunk_bytes=cap)
    assert bf16 == cap // (QWEN_V * 2) == 220 and fp32 == cap // (QWEN_V * 4) == 110
    big = chunk_rows_for(16384, QWEN_V, torch.bfloat16, CUDA, "triton", max_chunk_bytes=2**31)
    assert big == 2**31 // (QWEN_V * 2) // 128 * 128 and big * QWEN_V * 2 <= 2**31
    with pytest.raises(ValueError, match="below one row of logits"):
        chunk_rows_for(10, QWEN_V, torch.bfloat16, CUDA, "triton", max_chunk_bytes=1000)


def test_cpu_defaults_are_the_measured_rows_at_the_smollm2_head(monkeypatch):
    import fastmem.ops.cpu_gemm as cpu_gemm

    # fp32 through oneDNN: 128 rows (24 MiB, under glibc's mmap threshold); MKL: 512 (96 MiB)
    expected = 128 if cpu_gemm.onednn_serves(torch.float32, CPU) else 512
    assert chunk_rows_for(2048, SMOLLM2_V, torch.float32, CPU, "torch") == expected
    monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", None)
    assert chunk_rows_for(2048, SMOLLM2_V, torch.float32, CPU, "torch") == 512
    # 16-bit logits never take oneDNN here: their budget counts the fp32 working copy too
    assert chunk_rows_for(2048, SMOLLM2_V, torch.bfloat16, CPU, "torch") == 96 * 2**20 // (SMOLLM2_V * 6) // 128 * 128


def test_onednn_is_there_on_the_ci_torch():
    """The AVX-512 route rests on it: a torch without the op must fail loudly here, not
    silently run 2x slower."""
    import fastmem.ops.cpu_gemm as cpu_gemm

    assert cpu_gemm._ONEDNN_LINEAR is not None


FAST_ONEDNN = {"onednn": 0.01, "mkl": 0.02}
FAST_MKL = {"onednn": 0.03, "mkl": 0.02}


@pytest.mark.parametrize("requested,available,timings,route", [
    ("auto", True, FAST_ONEDNN, "onednn"), ("auto", True, FAST_MKL, "mkl"), ("", True, FAST_ONEDNN, "onednn"),
    ("auto", False, FAST_ONEDNN, "mkl"), ("mkl", True, FAST_ONEDNN, "mkl"), ("onednn", True, FAST_MKL, "onednn"),
    ("onednn", False, FAST_ONEDNN, "mkl"), (" MKL ", True, FAST_ONEDNN, "mkl"),
])
def test_the_cpu_gemm_route_is_the_measured_faster_one_unless_overridden(requested, available, timings, route):
    from fastmem.ops.cpu_gemm import choose_route

    measured = []

    def measure():
        measured.append(True)
        return timings

    chosen, why = choose_route(requested, available, measure)
    assert chosen == route and why
    # measured only when the machine decides
    assert bool(measured) == (requested.strip().lower() in ("", "auto") and available)


def test_a_bad_cpu_gemm_override_is_a_clear_error():
    from fastmem.ops.cpu_gemm import choose_route

    with pytest.raises(ValueError, match="FASTMEM_CPU_GEMM must be one of auto, onednn, mkl"):
        choose_route("blas", True, dict)


def test_the_calibration_is_cached_on_disk(tmp_path, monkeypatch):
    import fastmem.ops.cpu_gemm as cpu_gemm

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(cpu_gemm, "_measure_routes", lambda: calls.append(1) or dict(FAST_MKL))
    assert cpu_gemm._measured_with_cache() == FAST_MKL and cpu_gemm._measured_with_cache() == FAST_MKL
    assert calls == [1]  # the second process-equivalent read the file
    assert (tmp_path / "fastmem" / "cpu_gemm_route.json").exists()


def test_the_calibration_times_both_routes():
    import fastmem.ops.cpu_gemm as cpu_gemm

    seconds = cpu_gemm._measure_routes()
    assert set(seconds) == set(cpu_gemm.ROUTES) and all(0 < t < 60 for t in seconds.values())


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_onednn_gemms_match_torch_mm(with_bias):
    from fastmem.ops.cpu_gemm import matmul_nn, matmul_nt

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 70, generator=gen), torch.randn(301, 70, generator=gen)
    bias = torch.randn(301, generator=gen) if with_bias else None
    exact = a.double() @ b.double().t() + (0 if bias is None else bias.double())
    with torch.no_grad():
        assert torch.allclose(matmul_nt(a, b, bias).double(), exact, rtol=1e-5, atol=1e-4)
        c = torch.randn(301, 9, generator=gen)
        assert torch.allclose(matmul_nn(a @ b.t(), c).double(), (a @ b.t()).double() @ c.double(), rtol=1e-4,
                              atol=1e-3)
        left = torch.randn(301, 37, generator=gen).t()  # a transposed view, as dlogits.t() for grad_weight
        assert torch.allclose(matmul_nn(left, c).double(), left.double() @ c.double(), rtol=1e-5, atol=1e-4)


def test_the_op_runs_the_rule_and_chunk_size_overrides_it(monkeypatch):
    seen = []
    real = lce_op.run_chunks

    def spy(*args, **kwargs):
        seen.append(args[4].chunk_rows)  # the LoopPlan
        return real(*args, **kwargs)

    monkeypatch.setattr(lce_op, "run_chunks", spy)
    hidden, weight, _, labels = make_case(torch.float32, seed=41)
    n_rows, vocab = int((labels != -100).sum()), weight.shape[0]  # the chunk loop runs the labelled rows
    fastmem.linear_cross_entropy(hidden, weight, labels)
    fastmem.linear_cross_entropy(hidden, weight, labels, chunk_size=5)
    fastmem.linear_cross_entropy(hidden, weight, labels, max_chunk_bytes=vocab * 4 * 3)
    assert seen == [min(n_rows, chunk_rows_for(n_rows, vocab, torch.float32, CPU, "torch")), 5, 3]
