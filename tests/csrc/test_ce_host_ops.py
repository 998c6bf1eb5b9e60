"""The CUDA cross-entropy backend's Python side on the host: the op schemas with their fake
impls (torch.library.opcheck, torch.compile), and the op test suite's expectations run
through the kernels' host build behind those schemas and backend_cuda's chunk glue: the
table's "cuda" rows (tests/ops/cross_entropy_cases.py) run here on the host kernels.
(That the schemas equal csrc/bindings.cpp's is checked in test_lora_host_math.py.)"""

from __future__ import annotations

import dataclasses
import functools
import importlib

from types import SimpleNamespace

import pytest
import torch

from fastmem import backends
from fastmem.ops.cross_entropy import backend_cuda as cross_entropy_cuda
from tests.csrc.ce_host_kernels import CeHostKernels
from tests.csrc.cuda_toolchain import register_host_ops
from tests.ops import test_cross_entropy_numerics as numerics_suite
from tests.ops import test_cross_entropy_options as options_suite
from tests.ops import test_cross_entropy_table as table_suite
from tests.ops import test_linear_cross_entropy as op_suite
from tests.ops.cross_entropy_cases import cases_for
from tests.ops.test_cross_entropy_table import _check_against_oracle, run_case

HOST_NAMESPACE = "fastmem_cuda_host"
lce_op = importlib.import_module("fastmem.ops.cross_entropy.forward")


@pytest.fixture(autouse=True)
def inputs_on_the_host(monkeypatch):
    """The host kernels read host memory: the op suites' inputs stay on the CPU here, also on a
    machine with a GPU (where the suites move them to it; found on an H200)."""
    for suite in (op_suite, table_suite):
        monkeypatch.setattr(suite, "DEVICE", torch.device("cpu"))


@pytest.fixture(scope="module")
def host_ops(ce_host_library):
    """torch.ops.fastmem_cuda_host: the CUDA ops' schemas and fakes, CPU kernels from the host build."""
    ops, library = register_host_ops(HOST_NAMESPACE, cross_entropy_cuda, CeHostKernels(ce_host_library))
    yield ops
    library._destroy()


def _chunk(dtype, rows=5, vocab=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab + 3, generator=gen) * 3).to(dtype)[:, 1:vocab + 1]  # unaligned, padded
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_schemas_and_fakes(host_ops, dtype):
    logits, labels = _chunk(dtype)
    torch.library.opcheck(host_ops.ce_row_stats, (logits, labels, 3.0))
    row_max, log_sum, *_ = host_ops.ce_row_stats(logits, labels, 0.0)
    weight = torch.linspace(0.0, 1.0, logits.shape[0], dtype=row_max.dtype)
    torch.library.opcheck(host_ops.ce_softmax_grad_, (logits.clone(), labels, row_max, log_sum, weight, 0.0, 0.1,
                                                      1e-3))


def test_ops_trace_whole_under_torch_compile(host_ops):
    def chunk_step(logits, labels):
        row_max, log_sum, target, best_other, _, _ = host_ops.ce_row_stats(logits, labels, 0.0)
        weight = ((row_max + log_sum - target) > 0.5).to(row_max.dtype)
        host_ops.ce_softmax_grad_(logits, labels, row_max, log_sum, weight, 0.0, 0.0, 0.0)
        return row_max + log_sum, target > best_other

    logits, labels = _chunk(torch.float32, rows=8, vocab=50, seed=1)
    eager_logits, compiled_logits = logits.clone(), logits.clone()
    expected = chunk_step(eager_logits, labels)
    compiled = torch.compile(chunk_step, fullgraph=True, backend="aot_eager")
    got = compiled(compiled_logits, labels)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1]) and torch.equal(compiled_logits, eager_logits)


@pytest.fixture
def chunks_on_host_kernels(host_ops):
    """Route linear_cross_entropy's chunks through cross_entropy_cuda.run_chunk_kernels over the
    host ops (the CUDA path minus the device), counting the chunks."""
    calls = []

    def process_chunk(logits, labels, weigh, want_grad, options, raw_rows=None):
        calls.append(logits.shape)
        return cross_entropy_cuda.run_chunk_kernels(host_ops.ce_row_stats, host_ops.ce_softmax_grad_, logits,
                                                    labels, weigh, want_grad, options)

    with backends.override_implementation(lce_op.OP_NAME, "torch", SimpleNamespace(process_chunk=process_chunk)):
        yield calls


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu-path", "sync-free-path"])
@pytest.mark.parametrize("case", cases_for("oracle", backends=("cuda",)), ids=lambda case: case.id)
def test_table_cuda_rows_on_the_host_kernels(chunks_on_host_kernels, monkeypatch, case, sync_free):
    """Every "cuda" row of the table, its chunks on the host build of the CUDA kernels (on the
    sync-free path a row of weight 0 reaches the dense gradient GEMM: the kernel zeroes it)."""
    from fastmem.ops.cross_entropy import syncs

    if sync_free:
        monkeypatch.setattr(syncs, "SYNC_FREE_DEVICES", ())
    host_case = dataclasses.replace(case, backend="torch")
    _check_against_oracle(host_case, *run_case(host_case))
    if case.ignore != "all" or sync_free:  # the CPU path runs no chunk without a labelled row
        assert chunks_on_host_kernels, "the chunks did not run on the host kernels"


@pytest.mark.parametrize("name", [
    "test_ties_count_as_wrong", "test_confident_targets_keep_their_gradient_in_bf16", "test_large_logit_offset",
    "test_non_contiguous_inputs", "test_empty_and_one_dimensional_inputs",
])
def test_op_suite_edge_cases(chunks_on_host_kernels, name):
    getattr(op_suite, name)("torch")
    assert chunks_on_host_kernels


def test_run_chunk_kernels_rejects_a_strided_vocabulary(host_ops):
    logits = torch.randn(4, 20)[:, ::2]
    with pytest.raises(ValueError, match="column stride 1"):
        cross_entropy_cuda.run_chunk_kernels(host_ops.ce_row_stats, host_ops.ce_softmax_grad_, logits,
                                             torch.zeros(4, dtype=torch.long), functools.partial(torch.ones_like),
                                             True)


@pytest.mark.parametrize("offset", [0.0, 20.0])
@pytest.mark.parametrize("dtype", numerics_suite.CONFIDENT_DTYPES, ids=str)
def test_confident_targets_through_the_host_kernels(chunks_on_host_kernels, dtype, offset):
    numerics_suite.test_confident_targets_keep_their_gradient("torch", dtype, offset)
    assert chunks_on_host_kernels


def test_minus_inf_columns_through_the_host_kernels(chunks_on_host_kernels, monkeypatch):
    numerics_suite.test_every_column_but_the_target_minus_inf("torch", monkeypatch)
    for masked in (slice(0, 256), slice(64, 299)):
        numerics_suite.test_vocabulary_tiles_of_minus_inf("torch", masked, monkeypatch)
    assert chunks_on_host_kernels


@pytest.mark.parametrize("name", list(options_suite.OPTION_SETS))
def test_options_through_the_host_kernels(chunks_on_host_kernels, name):
    for objective, reduction in (("sft", "mean"), ("sw", "none")):
        options_suite.test_options_match_oracle("torch", name, objective, reduction)
    options_suite.test_options_in_half_precision("torch", torch.bfloat16)
    assert chunks_on_host_kernels
