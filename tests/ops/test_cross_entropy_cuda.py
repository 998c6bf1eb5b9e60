"""backend="cuda" (csrc/ kernels) on a GPU: the op suite's expectations against the float64
oracle, the kernels' chunk checks, the custom ops under opcheck / torch.compile, > 2^31
logits. Skipped, with the reason, where there is no GPU or the extension cannot load; the
kernels' math is checked without a GPU in tests/csrc/."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastmem
from fastmem._cuda_build import cuda_gpu_skip_reason
from tests.csrc.ce_reference import CASES, DTYPES, check_chunk_kernels
from tests.ops import test_linear_cross_entropy as op_suite
from tests.ops.cross_entropy_oracle import oracle_loss
from tests.ops.test_linear_cross_entropy import make_case, rel_err


SKIP_REASON = cuda_gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]


@pytest.fixture(scope="module")
def cuda_ops():
    from fastmem.ops.cross_entropy.backend_cuda import cuda_ops as load_ops

    return load_ops()


def run_both_on_gpu(hidden, weight, labels, bias=None, *, backend="cuda", train_head=False, grad_seed=1,
                    **options):
    """The op suite's run_both with ours on the GPU: CPU inputs in, CPU results out."""
    assert backend == "cuda"
    dev = torch.device("cuda")

    def gpu(t):
        return t.to(dev) if isinstance(t, torch.Tensor) else t

    ours_in = [gpu(hidden.detach()).requires_grad_(True), gpu(weight.detach()).requires_grad_(train_head)]
    ours_bias = None if bias is None else gpu(bias.detach()).requires_grad_(train_head)
    loss, stats = fastmem.linear_cross_entropy(ours_in[0], ours_in[1], gpu(labels), ours_bias, return_stats=True,
                                               backend="cuda", chunk_size=16,
                                               **{k: gpu(v) for k, v in options.items()})
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    loss.backward(grad_out.to(dev, loss.dtype))
    stats = dataclasses.replace(stats, **{f.name: getattr(stats, f.name).cpu() for f in dataclasses.fields(stats)})

    ref_in = [hidden.detach().double().clone().requires_grad_(True),
              weight.detach().double().clone().requires_grad_(train_head)]
    ref_bias = None if bias is None else bias.detach().double().clone().requires_grad_(train_head)
    first_error = None
    if hidden.dtype in (torch.float16, torch.bfloat16):
        first_error = stats.first_error.reshape(-1)  # near ties may round either way
    ref_loss, ref_tok, ref_first_error = oracle_loss(ref_in[0], ref_in[1], labels, ref_bias, first_error=first_error,
                                                     **options)
    ref_loss.backward(grad_out)

    def cpu(t):
        return None if t is None else t.detach().cpu()

    ours = dict(loss=cpu(loss), stats=stats, grad_hidden=cpu(ours_in[0].grad), grad_weight=cpu(ours_in[1].grad),
                grad_bias=None if ours_bias is None else cpu(ours_bias.grad))
    ref = dict(loss=ref_loss, tok=ref_tok, first_error=ref_first_error, grad_hidden=ref_in[0].grad,
               grad_weight=ref_in[1].grad, grad_bias=None if ref_bias is None else ref_bias.grad)
    return ours, ref


@pytest.fixture
def suite_on_gpu(monkeypatch):
    """The op suite's own tests, with their run_both running ours on the GPU."""
    monkeypatch.setattr(op_suite, "run_both", run_both_on_gpu)
    return op_suite


@pytest.mark.parametrize("n_cols,offset,pad,threads", CASES, ids=[f"V{c[0]}-off{c[1]}-pad{c[2]}" for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_kernels_on_gpu(cuda_ops, dtype, n_cols, offset, pad, threads):
    check_chunk_kernels(cuda_ops, dtype, n_cols, offset, pad, torch.device("cuda"))


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("objective", ["sft", "ot", "sw"])
@pytest.mark.parametrize("dtype", op_suite.DTYPES, ids=str)
def test_matches_oracle(suite_on_gpu, dtype, objective, reduction, ignore):
    suite_on_gpu.test_matches_oracle("cuda", dtype, objective, reduction, ignore)


@pytest.mark.parametrize("dtype", op_suite.DTYPES, ids=str)
@pytest.mark.parametrize("objective,reduction", [("sft", "mean"), ("ot", "mean"), ("sw", "sum"), ("sft", "none")])
def test_trainable_head_and_bias(suite_on_gpu, dtype, objective, reduction):
    suite_on_gpu.test_trainable_head_and_bias("cuda", dtype, objective, reduction)


@pytest.mark.parametrize("name", ["test_token_weights_and_per_sample_window",
                                  "test_confident_targets_keep_their_gradient_in_bf16", "test_large_logit_offset",
                                  "test_non_contiguous_inputs"])
def test_op_suite_case(suite_on_gpu, name):
    getattr(suite_on_gpu, name)("cuda")


def test_float64_matches_oracle():
    hidden, weight, bias, labels = make_case(torch.float64, seed=11)
    for objective in ("sft", "ot", "sw"):
        ours, ref = run_both_on_gpu(hidden, weight, labels, bias, train_head=True, objective=objective)
        for name in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
            assert rel_err(ours[name], ref[name]) <= 1e-10, name


def test_ties_count_as_wrong():
    weight = torch.eye(4, 4)
    weight = torch.cat([weight, weight[:1]])  # logits 0 and 4 tie
    hidden, labels = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]]), torch.tensor([0, 1])
    _, stats = fastmem.linear_cross_entropy(hidden.cuda(), weight.cuda(), labels.cuda(), backend="cuda",
                                            return_stats=True)
    assert stats.correct.tolist() == [False, True] and int(stats.first_error) == 0


def test_auto_picks_cuda_on_a_gpu():
    from fastmem.backends import resolve_backend

    assert resolve_backend("linear_cross_entropy", "auto", torch.device("cuda"), ("torch", "triton", "cuda")) == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(cuda_ops, dtype):
    logits = (torch.randn(5, 40, device="cuda") * 3).to(dtype)[:, 1:38]
    labels = torch.randint(0, 37, (5,), device="cuda")
    torch.library.opcheck(cuda_ops.ce_row_stats, (logits, labels, 3.0))
    row_max, log_sum, *_ = cuda_ops.ce_row_stats(logits, labels, 0.0)
    weight = torch.linspace(0.0, 1.0, 5, device="cuda", dtype=row_max.dtype)
    torch.library.opcheck(cuda_ops.ce_softmax_grad_, (logits.clone(), labels, row_max, log_sum, weight, 0.0, 0.1,
                                                      1e-3))


def test_ops_compile_with_inductor(cuda_ops):
    def chunk_step(logits, labels):
        row_max, log_sum, target, best_other, _ = cuda_ops.ce_row_stats(logits, labels, 0.0)
        weight = ((row_max + log_sum - target) > 0.5).float()
        cuda_ops.ce_softmax_grad_(logits, labels, row_max, log_sum, weight, 0.0, 0.0, 0.0)
        return row_max + log_sum, target > best_other

    logits = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16) * 3
    labels = torch.randint(0, 1000, (64,), device="cuda")
    eager_logits, compiled_logits = logits.clone(), logits.clone()
    expected = chunk_step(eager_logits, labels)
    got = torch.compile(chunk_step, fullgraph=True)(compiled_logits, labels)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1]) and torch.equal(compiled_logits, eager_logits)


def test_binding_rejects_bad_tensors_clearly(cuda_ops):
    logits = torch.randn(4, 10, device="cuda")
    with pytest.raises(RuntimeError, match="labels must be int64"):
        cuda_ops.ce_row_stats(logits, torch.zeros(4, dtype=torch.int32, device="cuda"), 0.0)
    with pytest.raises(RuntimeError, match="column stride 1"):
        cuda_ops.ce_row_stats(torch.randn(4, 20, device="cuda")[:, ::2], torch.zeros(4, dtype=torch.long,
                                                                                       device="cuda"), 0.0)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        cuda_ops.ce_row_stats(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), 0.0)
    with pytest.raises(RuntimeError, match="softcap must be >= 0"):
        cuda_ops.ce_row_stats(logits, torch.zeros(4, dtype=torch.long, device="cuda"), -1.0)


@pytest.mark.slow
def test_more_than_2_pow_31_logits_elements():
    n_rows, hidden_size, vocab = 16384 + 8, 64, 131101  # N * V > 2^31 in one chunk
    torch.manual_seed(0)
    hidden = torch.randn(n_rows, hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.2
    labels = torch.randint(0, vocab, (n_rows,), device="cuda")
    ours = fastmem.linear_cross_entropy(hidden, weight, labels, backend="cuda", chunk_size=n_rows)
    ref = sum(F.cross_entropy(hidden[i:i + 1024].float() @ weight.float().t(), labels[i:i + 1024], reduction="sum")
              for i in range(0, n_rows, 1024)) / n_rows
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("offset", [0.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_confident_targets(dtype, offset):
    from tests.ops import test_cross_entropy_numerics as numerics_suite

    numerics_suite.test_confident_targets_keep_their_gradient("cuda", dtype, offset)


def test_minus_inf_columns(monkeypatch):
    from tests.ops import test_cross_entropy_numerics as numerics_suite

    numerics_suite.test_every_column_but_the_target_minus_inf("cuda", monkeypatch)
    numerics_suite.test_vocabulary_tiles_of_minus_inf("cuda", slice(0, 256), monkeypatch)


@pytest.mark.parametrize("name", ["softcap", "smoothing", "zloss", "all"])
def test_options(name):
    from tests.ops import test_cross_entropy_options as options_suite

    for objective, reduction in (("sft", "mean"), ("ot", "mean"), ("sw", "none")):
        options_suite.test_options_match_oracle("cuda", name, objective, reduction)
    options_suite.test_options_in_half_precision("cuda", torch.bfloat16)
