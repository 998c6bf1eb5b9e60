"""The LoRA dropout kernels (csrc/lora_math.h) built for the host: the keep-mask hash, the
tiled GEMM in its three masked modes against float64 torch, the op schemas under opcheck,
and the LoRA op suite run through fastmem/ops/lora_linear_cuda.py on these kernels."""

from __future__ import annotations

import functools
import importlib
import math
import re
import types

import pytest
import torch

from fastmem.ops import lora_linear_cuda
from fastmem.ops.cross_entropy import backend_cuda as cross_entropy_cuda
from tests.csrc.cuda_toolchain import CSRC, register_host_ops

lora_op = importlib.import_module("fastmem.ops.lora_linear")
lora_suite = importlib.import_module("tests.ops.test_lora_linear")
HOST_NAMESPACE = "fastmem_cuda_lora_host"
# max error relative to the reference's largest entry (fp32 accumulation, one rounding)
GEMM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
DTYPES = list(GEMM_TOL)


def rel_err(actual, expected) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def test_binding_registers_exactly_the_python_schemas():
    text = (CSRC / "bindings.cpp").read_text()
    schemas = {**cross_entropy_cuda.SCHEMAS, **lora_linear_cuda.SCHEMAS}
    assert sorted(re.findall(r'm\.def\(\s*"([^"]+)"\s*\)', text)) == sorted(schemas.values())
    assert sorted(re.findall(r'm\.impl\(\s*"(\w+)"', text)) == sorted(schemas)
    # each op's fakes live in the module set just before its m.def
    for module, names in (("fastmem.ops.cross_entropy.backend_cuda", cross_entropy_cuda.SCHEMAS),
                          ("fastmem.ops.lora_linear_cuda", lora_linear_cuda.SCHEMAS)):
        block = text.split(f'm.set_python_module("{module}");')[1].split("set_python_module")[0]
        assert all(f'm.def("{name}(' in block for name in names), module


def test_drop_below_is_floor_p_times_2_pow_32(lora_host):
    for p in (0.0, 0.1, 0.25, 0.5, 0.999999):
        assert lora_host.drop_below(p) == min(math.floor(p * 2**32), 2**32 - 1)


def test_keep_mask_is_a_fair_reproducible_function_of_seed_row_and_column(lora_host):
    rows, cols, p = 512, 300, 0.25
    mask = lora_host.lora_keep_mask(None, rows, cols, 7, p).bool()
    kept = float(mask.float().mean())
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / mask.numel())
    assert torch.equal(mask, lora_host.lora_keep_mask(None, rows, cols, 7, p).bool())
    other = lora_host.lora_keep_mask(None, rows, cols, 8, p).bool()
    assert abs(float((mask != other).float().mean()) - 2 * p * (1 - p)) < 0.02  # independent seeds
    assert abs(float((mask[1:] != mask[:-1]).float().mean()) - 2 * p * (1 - p)) < 0.02  # rows differ
    assert abs(float((mask[:, 1:] != mask[:, :-1]).float().mean()) - 2 * p * (1 - p)) < 0.02  # columns differ
    # a smaller request is the top-left corner of a larger one: the mask depends on (row, col) only
    assert torch.equal(lora_host.lora_keep_mask(None, 5, 7, 7, p).bool(), mask[:5, :7])
    assert bool(lora_host.lora_keep_mask(None, 9, 4, 7, 0.0).bool().all())


def _rand(*shape, dtype, seed, transpose=False):
    gen = torch.Generator().manual_seed(seed)
    if transpose:  # a non-contiguous view with the same shape
        return torch.randn(*reversed(shape), generator=gen, dtype=torch.float64).to(dtype).t()
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("tokens,features,rank,transpose", [(37, 45, 5, False), (70, 33, 70, True), (1, 64, 1, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_gemm_modes_match_float64(lora_host, dtype, tokens, features, rank, transpose):
    seed, p = 99, 0.3
    keep = lora_host.lora_keep_mask(None, tokens, features, seed, p).bool().double()
    x = _rand(tokens, features, dtype=dtype, seed=1, transpose=transpose)
    lora_A = _rand(rank, features, dtype=dtype, seed=2, transpose=transpose)
    c = _rand(tokens, rank, dtype=dtype, seed=3)
    out0 = _rand(tokens, features, dtype=dtype, seed=4)

    xa = lora_host.lora_dropout_project(x, lora_A, seed, p, 1 / (1 - p))
    want = (x.double() * keep / (1 - p)) @ lora_A.double().t()
    assert xa.dtype == dtype and rel_err(xa, want) < GEMM_TOL[dtype]

    out = out0.clone()
    lora_host.lora_dropout_expand_(out, c, lora_A, seed, p, 0.7)
    want = out0.double() + 0.7 * keep * (c.double() @ lora_A.double())
    assert rel_err(out, want) < GEMM_TOL[dtype]

    for splits in (1, 3):
        lora_host.splits = splits
        grad = lora_host.lora_dropout_rank_grad(c, x, seed, p, 1.5)
        want = 1.5 * c.double().t() @ (x.double() * keep)
        assert grad.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert rel_err(grad, want) < GEMM_TOL[torch.float64 if dtype == torch.float64 else torch.float32]


def test_empty_token_dimension(lora_host):
    x, c = torch.zeros(0, 9), torch.zeros(0, 3)
    assert torch.equal(lora_host.lora_dropout_rank_grad(c, x, 1, 0.5, 1.0), torch.zeros(3, 9))
    assert lora_host.lora_dropout_project(x, torch.ones(3, 9), 1, 0.5, 2.0).shape == (0, 3)


@pytest.fixture(scope="module")
def host_ops(lora_host_library):
    from tests.csrc.lora_host_kernels import LoraHostKernels

    ops, library = register_host_ops(HOST_NAMESPACE, lora_linear_cuda, LoraHostKernels(lora_host_library))
    yield ops
    library._destroy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_schemas_and_fakes(host_ops, dtype):
    x, lora_A = _rand(20, 40, dtype=dtype, seed=1), _rand(4, 40, dtype=dtype, seed=2)
    c = _rand(20, 4, dtype=dtype, seed=3)
    torch.library.opcheck(host_ops.lora_dropout_project, (x, lora_A, 5, 0.25, 4 / 3))
    torch.library.opcheck(host_ops.lora_dropout_expand_, (x.clone(), c, lora_A, 5, 0.25, 0.5))
    torch.library.opcheck(host_ops.lora_dropout_rank_grad, (c, x, 5, 0.25, 0.5))
    torch.library.opcheck(host_ops.lora_keep_mask, (x, 6, 7, 5, 0.25))


@pytest.fixture
def lora_on_host_kernels(host_ops, monkeypatch):
    """Every backend name of fastmem.lora_linear routed to lora_linear_cuda over the host ops."""
    backend = types.SimpleNamespace(forward=functools.partial(lora_linear_cuda.forward, ops=host_ops),
                                    backward=functools.partial(lora_linear_cuda.backward, ops=host_ops),
                                    keep_mask=functools.partial(lora_linear_cuda.keep_mask, ops=host_ops))
    monkeypatch.setattr(lora_op, "_implementation", lambda name: backend)


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("case", lora_suite.CASES, ids=[c[0] for c in lora_suite.CASES])
def test_lora_suite_matches_float64_oracle(lora_on_host_kernels, case, dropout):
    lora_suite.test_matches_float64_oracle(case, "torch", dropout, torch.device("cpu"))


def test_float64_gradcheck_with_dropout(lora_on_host_kernels):
    x, weight, lora_A, lora_B, bias = lora_suite.make_inputs((2, 3), 7, 5, 3, torch.float64, "trainable", False,
                                                             torch.device("cpu"))

    def fn(x, lora_A, lora_B, bias):
        return lora_op.lora_linear(x, weight, lora_A, lora_B, 1.5, bias, dropout=0.3, seed=77, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, lora_A, lora_B, bias))
