"""The CUDA LoRA backend (fastmem/ops/lora_linear_cuda.py, csrc/lora_linear.cu) on a GPU: the
GPU keep-mask equals the host build's bit for bit, the masked GEMMs match float64, the LoRA op
suite passes through this backend, and the custom ops pass opcheck. Skipped, with the
reason, without a GPU or the extension; tests/csrc/test_lora_host_math.py covers the same
kernels on the host."""

from __future__ import annotations

import functools
import importlib
import shutil
import types

import pytest
import torch

from fastmem._cuda_build import cuda_gpu_skip_reason
from fastmem.ops import lora_linear_cuda


SKIP_REASON = cuda_gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]
lora_op = importlib.import_module("fastmem.ops.lora_linear")
lora_suite = importlib.import_module("tests.ops.test_lora_linear")
CUDA = torch.device("cuda")
GEMM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(actual, expected) -> float:
    expected = expected.double().cpu()
    return float((actual.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def ops():
    return lora_linear_cuda.cuda_ops()


def test_gpu_keep_mask_equals_the_host_build(ops, tmp_path):
    from tests.csrc import lora_host_kernels
    from tests.csrc.cuda_toolchain import cuda_include_dir

    if shutil.which("g++") is None or cuda_include_dir() is None:
        pytest.skip("g++ or the CUDA headers are missing for the host build")
    host = lora_host_kernels.LoraHostKernels(lora_host_kernels.build(tmp_path, cuda_include_dir()))
    like = torch.empty(0, device=CUDA)
    for rows, cols, seed, p in ((1000, 777, 3, 0.1), (7, 4099, 2**31 + 5, 0.5)):
        gpu = ops.lora_keep_mask(like, rows, cols, seed, p).cpu()
        assert torch.equal(gpu, host.lora_keep_mask(None, rows, cols, seed, p))


@pytest.mark.parametrize("tokens,features,rank", [(37, 45, 5), (300, 1000, 70), (4096, 512, 16)])
@pytest.mark.parametrize("dtype", list(GEMM_TOL), ids=str)
def test_masked_gemms_match_float64(ops, dtype, tokens, features, rank):
    gen = torch.Generator().manual_seed(tokens)
    x, lora_A, c, out0 = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(CUDA)
                          for shape in ((tokens, features), (rank, features), (tokens, rank), (tokens, features)))
    seed, p = 11, 0.3
    keep = ops.lora_keep_mask(x, tokens, features, seed, p).bool().double().cpu()
    x64, a64, c64 = x.double().cpu(), lora_A.double().cpu(), c.double().cpu()
    xa = ops.lora_dropout_project(x, lora_A, seed, p, 1 / (1 - p))
    assert rel_err(xa, (x64 * keep / (1 - p)) @ a64.t()) < GEMM_TOL[dtype]
    out = out0.clone()
    ops.lora_dropout_expand_(out, c, lora_A, seed, p, 0.7)
    assert rel_err(out, out0.double().cpu() + 0.7 * keep * (c64 @ a64)) < GEMM_TOL[dtype]
    grad = ops.lora_dropout_rank_grad(c, x, seed, p, 1.5)
    accum = torch.float64 if dtype == torch.float64 else torch.float32
    assert grad.dtype == accum and rel_err(grad, 1.5 * c64.t() @ (x64 * keep)) < GEMM_TOL[accum]


@pytest.fixture
def lora_on_cuda_backend(ops, monkeypatch):
    """fastmem.lora_linear's backends routed to lora_linear_cuda (whatever its dispatch says)."""
    backend = types.SimpleNamespace(forward=functools.partial(lora_linear_cuda.forward, ops=ops),
                                    backward=functools.partial(lora_linear_cuda.backward, ops=ops),
                                    keep_mask=functools.partial(lora_linear_cuda.keep_mask, ops=ops))
    monkeypatch.setattr(lora_op, "_implementation", lambda name: backend)


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("case", lora_suite.CASES, ids=[c[0] for c in lora_suite.CASES])
def test_lora_suite_matches_float64_oracle(lora_on_cuda_backend, case, dropout):
    lora_suite.test_matches_float64_oracle(case, "torch", dropout, CUDA)


def test_backend_cuda_dispatches_here():
    if "cuda" not in lora_op.SUPPORTED_BACKENDS:
        pytest.skip("fastmem/ops/lora_linear.py does not dispatch backend='cuda' yet")
    lora_suite.test_matches_float64_oracle(lora_suite.CASES[1], "cuda", 0.25, CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(ops, dtype):
    x = torch.randn(20, 40, device=CUDA, dtype=dtype)
    lora_A, c = torch.randn(4, 40, device=CUDA, dtype=dtype), torch.randn(20, 4, device=CUDA, dtype=dtype)
    torch.library.opcheck(ops.lora_dropout_project, (x, lora_A, 5, 0.25, 4 / 3))
    torch.library.opcheck(ops.lora_dropout_expand_, (x.clone(), c, lora_A, 5, 0.25, 0.5))
    torch.library.opcheck(ops.lora_dropout_rank_grad, (c, x, 5, 0.25, 0.5))
    torch.library.opcheck(ops.lora_keep_mask, (x, 6, 7, 5, 0.25))
