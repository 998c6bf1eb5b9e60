"""fastmem.linear_cross_entropy: the cases the table (cross_entropy_cases.py, iterated by
test_cross_entropy_table.py) does not express: ties, margins, tiles, contiguity, GEMM counts,
bad input, the module wrapper."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastmem
from fastmem.nn import FusedLinearMemFTLoss
from tests.conftest import DEVICE
from tests.ops.cross_entropy_cases import TOL as CASE_TOL
from tests.ops.cross_entropy_cases import make_case, pick_threshold  # noqa: F401 (used by other suites)
from tests.ops.cross_entropy_oracle import oracle_loss

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative error (norm of the difference / norm of the oracle): the table's, written once per dtype
TOL = {dtype: tol[0] for dtype, tol in CASE_TOL.items()}
GRAD_TOL = {dtype: tol[1] for dtype, tol in CASE_TOL.items()}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def on_device(value):
    """Tests build inputs on the CPU; the op under test runs on the GPU when there is one."""
    return value.to(DEVICE) if isinstance(value, torch.Tensor) else value


def to_cpu(stats):
    return dataclasses.replace(stats, **{f.name: getattr(stats, f.name).cpu() for f in dataclasses.fields(stats)})


def run_both(hidden, weight, labels, bias=None, *, backend, train_head=False, grad_seed=1, return_stats=True,
             **options):
    """Our loss/stats/grads (on DEVICE, returned on the CPU) and the oracle's, from the same input values.
    With return_stats=False ours["stats"] is None (the op's path that skips what only stats read)."""
    ours_in = [on_device(hidden.detach()).clone().requires_grad_(True),
               on_device(weight.detach()).clone().requires_grad_(train_head)]
    ours_bias = None if bias is None else on_device(bias.detach()).clone().requires_grad_(train_head)
    out = fastmem.linear_cross_entropy(ours_in[0], ours_in[1], on_device(labels), ours_bias,
                                       return_stats=return_stats, backend=backend, chunk_size=16,
                                       **{k: on_device(v) for k, v in options.items()})
    loss, stats = out if return_stats else (out, None)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    loss.backward(on_device(grad_out.to(loss.dtype)))
    stats = None if stats is None else to_cpu(stats)

    ref_in = [hidden.detach().double().clone().requires_grad_(True),
              weight.detach().double().clone().requires_grad_(train_head)]
    ref_bias = None if bias is None else bias.detach().double().clone().requires_grad_(train_head)
    first_error = None
    if stats is not None and hidden.dtype in (torch.float16, torch.bfloat16):
        first_error = stats.first_error.reshape(-1)  # near ties may round either way; checked separately
    ref_loss, ref_tok, ref_first_error = oracle_loss(ref_in[0], ref_in[1], labels, ref_bias,
                                                     first_error=first_error, **options)
    ref_loss.backward(grad_out)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    ours = dict(loss=loss.detach().cpu(), stats=stats, grad_hidden=cpu(ours_in[0].grad),
                grad_weight=cpu(ours_in[1].grad), grad_bias=None if ours_bias is None else cpu(ours_bias.grad))
    ref = dict(loss=ref_loss, tok=ref_tok, first_error=ref_first_error, grad_hidden=ref_in[0].grad,
               grad_weight=ref_in[1].grad, grad_bias=None if ref_bias is None else ref_bias.grad)
    return ours, ref


def test_float64_reference_matches_oracle_exactly():
    hidden, weight, bias, labels = make_case(torch.float64, seed=11)
    for objective in ("sft", "ot", "sw"):
        ours, ref = run_both(hidden, weight, labels, bias, backend="torch", train_head=True, objective=objective)
        for name in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
            assert rel_err(ours[name], ref[name]) <= 1e-12, name


def test_sft_mean_is_exactly_f_cross_entropy():
    hidden, weight, bias, labels = make_case(torch.float32, seed=4)
    ours = fastmem.linear_cross_entropy(hidden, weight, labels, bias, backend="torch")
    ref = F.cross_entropy((hidden @ weight.t() + bias).reshape(-1, weight.shape[0]), labels.reshape(-1))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_spanning_several_tiles(backend, monkeypatch):
    """Online lse / argmax across tiles with a padded last tile (131 = 2 * 64 + 3)."""
    import fastmem.ops.cross_entropy.backend_triton as triton_chunk

    monkeypatch.setattr(triton_chunk, "_block_v", lambda n_cols: 64)
    hidden, weight, _, labels = make_case(torch.float32, seed=6)
    ours, ref = run_both(hidden, weight, labels, backend=backend, objective="sw")
    assert rel_err(ours["loss"], ref["loss"]) <= 1e-5
    assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= 1e-4
    assert torch.equal(ours["stats"].first_error, ref["first_error"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_count_as_wrong(backend):
    weight = torch.eye(4, 4)
    weight = torch.cat([weight, weight[:1]])  # row 4 duplicates row 0: logits 0 and 4 tie
    hidden = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    labels = torch.tensor([0, 1])
    _, stats = fastmem.linear_cross_entropy(on_device(hidden), on_device(weight), on_device(labels),
                                            backend=backend, return_stats=True)
    assert stats.correct.tolist() == [False, True]
    assert int(stats.first_error) == 0
    assert stats.margin.tolist() == [0.0, 5.0]  # a tie has margin 0: not > 0, not correct


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_margin_is_target_logit_minus_best_other(backend, dtype):
    hidden, weight, bias, labels = make_case(dtype, vocab=131, seed=3)
    _, stats = fastmem.linear_cross_entropy(on_device(hidden), on_device(weight), on_device(labels),
                                            on_device(bias), backend=backend, return_stats=True)
    logits = (hidden.double() @ weight.double().t() + bias.double()).to(DEVICE)
    valid = labels.to(DEVICE) != -100
    safe = labels.to(DEVICE).clamp(min=0)
    target = logits.gather(-1, safe[..., None]).squeeze(-1)
    best_other = logits.scatter(-1, safe[..., None], float("-inf")).amax(-1)
    expected = torch.where(valid, target - best_other, torch.zeros_like(target))
    assert stats.margin.dtype == torch.float32 and stats.margin.shape == labels.shape
    # the logits GEMM runs in the input dtype: the margin carries its rounding (a few ulps of |z|)
    atol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}[dtype]
    torch.testing.assert_close(stats.margin.double(), expected, atol=atol, rtol=0)
    assert torch.equal(stats.correct, valid & (stats.margin > 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_targets_keep_their_gradient_in_bf16(backend):
    """p_y - 1 of a confident target must be formed in fp32: rounding p_y to bf16 first
    turns 0.9999 into 1.0 and erases the target column's gradient."""
    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    weight = weight / weight.norm(dim=1, keepdim=True)
    labels = torch.arange(8)
    hidden = weight[labels] * 14.0  # target logit far above the rest: p_y ~ 0.9996
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    ours, ref = run_both(hidden, weight, labels, backend=backend, reduction="sum")
    assert float(ref["tok"]["prob"].min()) > 0.999
    # rounding p_y to bf16 before subtracting 1 gives a relative error above 1 here
    assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logit_offset(backend):
    hidden, weight, _, labels = make_case(torch.float32, seed=8)
    bias = torch.full((weight.shape[0],), 3000.0)
    ours, ref = run_both(hidden, weight, labels, bias, backend=backend)
    assert rel_err(ours["loss"], ref["loss"]) <= 1e-4
    assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    hidden, weight, _, labels = make_case(torch.float32, seed=12, hidden_size=24)
    hidden_nc = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # strided [B, S, H] view
    weight_nc = torch.cat([weight, weight], dim=1)[:, ::2]  # column stride 2
    labels_nc = labels.t().contiguous().t()
    assert not hidden_nc.is_contiguous() and not weight_nc.is_contiguous() and not labels_nc.is_contiguous()
    ours, ref = run_both(hidden_nc, weight_nc, labels_nc, backend=backend, objective="sw")
    assert rel_err(ours["loss"], ref["loss"]) <= 1e-5
    assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_one_dimensional_inputs(backend):
    weight = on_device(torch.randn(7, 4))
    empty = on_device(torch.zeros(0, 4)).requires_grad_(True)
    loss = fastmem.linear_cross_entropy(empty, weight, on_device(torch.zeros(0, dtype=torch.long)), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and empty.grad.shape == (0, 4)
    hidden = on_device(torch.randn(5, 4))
    loss, stats = fastmem.linear_cross_entropy(hidden, weight, on_device(torch.tensor([1, 2, 3, 4, 5])),
                                               backend=backend, return_stats=True, objective="sw")
    assert stats.first_error.shape == () and stats.loss.shape == (5,)


class CountGemms:
    """Records the row count of every GEMM the chunk loop runs (its matmul_nt / matmul_nn,
    which take oneDNN or torch.mm): the loop runs inside the custom op, out of reach of a
    TorchFunctionMode."""

    def __enter__(self):
        import fastmem.ops.cross_entropy.chunk_loop as chunk_loop

        calls = self.calls = []
        self._saved = {name: getattr(chunk_loop, name) for name in ("matmul_nt", "matmul_nn")}
        for name, real in self._saved.items():
            def counted(a, *args, _real=real, _name=name, **kwargs):
                calls.append((_name, a.shape[0]))
                return _real(a, *args, **kwargs)

            setattr(chunk_loop, name, counted)
        return self

    def __exit__(self, *exc):
        import fastmem.ops.cross_entropy.chunk_loop as chunk_loop

        for name, real in self._saved.items():
            setattr(chunk_loop, name, real)


def test_frozen_head_runs_two_gemm_passes_and_ot_skips_inactive_rows():
    hidden, weight, _, labels = make_case(torch.float32, ignore="none", correct_fraction=0.0, seed=1)
    threshold = pick_threshold(hidden, weight, labels)
    n_rows, chunk = labels.numel(), 16
    n_chunks = math.ceil(n_rows / chunk)
    for objective in ("sft", "ot"):
        h = hidden.clone().requires_grad_(True)
        with CountGemms() as gemms:
            _, stats = fastmem.linear_cross_entropy(h, weight, labels, objective=objective, threshold=threshold,
                                                    backend="torch", chunk_size=chunk, return_stats=True)
        active = int((stats.weight > 0).sum())
        assert len(gemms.calls) == 2 * n_chunks  # logits + grad_hidden per chunk, no grad_W
        assert sum(rows for _, rows in gemms.calls[0::2]) == n_rows
        assert sum(rows for _, rows in gemms.calls[1::2]) == active
        if objective == "ot":
            assert 0 < active < n_rows  # the case really has inactive rows to skip
    with CountGemms() as gemms:
        fastmem.linear_cross_entropy(hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True),
                                     labels, backend="torch", chunk_size=chunk)
    assert len(gemms.calls) == 3 * n_chunks  # a trainable head adds the grad_W GEMM
    with CountGemms() as gemms:
        with torch.no_grad():
            fastmem.linear_cross_entropy(hidden, weight, labels, backend="torch", chunk_size=chunk)
    assert len(gemms.calls) == n_chunks  # no gradient wanted: the logits GEMM only


def test_backward_twice_with_retain_graph_and_without():
    hidden, weight, _, labels = make_case(torch.float32)
    hidden.requires_grad_(True)
    loss = fastmem.linear_cross_entropy(hidden, weight, labels, objective="sw")
    loss.backward(torch.tensor(0.5), retain_graph=True)
    first = hidden.grad.clone()
    hidden.grad = None
    loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(hidden.grad, first * 4)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_module_wrapper_and_stats_helpers():
    hidden, weight, _, labels = make_case(torch.float32, seed=2)
    module = FusedLinearMemFTLoss("ot", threshold=0.3, return_stats=True)
    loss, stats = module(hidden, weight, labels)
    direct = fastmem.linear_cross_entropy(hidden, weight, labels, objective="ot", threshold=0.3)
    assert torch.equal(loss, direct)
    valid = stats.valid
    assert stats.token_accuracy() == pytest.approx(float(stats.correct[valid].float().mean()))
    assert stats.min_prob() == pytest.approx(float(stats.prob[valid].min()))
    assert torch.equal(stats.stubborn_mask(), valid & (stats.loss >= math.log(2)))
    assert stats.all_recalled() == (not bool(stats.stubborn_mask().any()))
    assert "objective='ot'" in repr(module)


def _bad_calls():
    hidden, weight, labels = torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))
    yield "hidden must be float", dict(hidden=hidden.long())
    yield "weight must have shape", dict(weight=torch.randn(11))
    yield "weight has H=7", dict(weight=torch.randn(11, 7))
    yield "weight dtype", dict(weight=weight.double())
    yield "labels must be an integer", dict(labels=labels.float())
    yield "labels shape", dict(labels=labels[:, :4])
    yield r"labels must lie in \[0, V=11\)", dict(labels=torch.full((2, 5), 11))
    yield "found -3", dict(labels=torch.full((2, 5), -3))
    yield "bias must have shape", dict(bias=torch.randn(10))
    yield "bias dtype", dict(bias=torch.randn(11, dtype=torch.float64))
    yield "objective must be one of", dict(objective="dpo")
    yield "reduction must be one of", dict(reduction="avg")
    yield "token_weights shape", dict(token_weights=torch.ones(2, 4))
    yield "token_weights must be a float", dict(token_weights=torch.ones(2, 5, dtype=torch.long))
    yield "window must be a number or a", dict(window=torch.ones(3))
    yield "window must be a torch.Tensor", dict(window=0)
    yield "sw_window must be a positive", dict(sw_window=0)
    yield "sw_tau must be", dict(sw_tau=0.0)
    yield "sw_floor must be in", dict(sw_floor=2.0)
    yield "unknown loss option", dict(kappa=1.0)
    yield "backend must be one of", dict(backend="cuDNN")
    yield "hidden must be a torch.Tensor", dict(hidden=[[1.0]])
    yield "chunk_size must be", dict(chunk_size=0)
    yield "max_chunk_bytes must be", dict(max_chunk_bytes=0)
    yield "max_chunk_bytes=8 is below one row", dict(max_chunk_bytes=8)
    nan, inf = float("nan"), float("inf")
    for name, values in (("threshold", (nan, inf, 0.0, -1.0)), ("eps", (nan, inf, 0.0, -0.1)),
                         ("sw_kappa", (nan, -inf, 0.0)), ("sw_tau", (nan, inf, -2.0)),
                         ("sw_floor", (nan, -0.5, 1.5)),
                         ("softcap", (nan, inf, -30.0)), ("label_smoothing", (nan, -0.1, 1.01)),
                         ("lse_square_scale", (nan, inf, -1e-4))):
        for value in values:
            yield f"{name} must be", {name: value}
    yield "threshold must be a number", dict(threshold="0.5")
    yield "window must be > 0", dict(window=torch.tensor([3.0, float("nan")]))
    yield "sw_window must be a positive", dict(sw_window=float("nan"))


@pytest.mark.parametrize("message,override", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_a_clear_error_before_any_kernel(message, override, monkeypatch):
    op = importlib.import_module("fastmem.ops.cross_entropy.forward")  # where the chunk loop is called

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was checked")

    monkeypatch.setattr(op, "run_chunks", no_kernel)
    args = dict(hidden=torch.randn(2, 5, 8), weight=torch.randn(11, 8), labels=torch.randint(0, 11, (2, 5)))
    args.update(override)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "labels")}
    with pytest.raises((ValueError, TypeError), match=message):
        fastmem.linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **kwargs)


def test_triton_backend_rejects_float64_and_unavailable_backends_explain_why():
    hidden, weight, labels = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), \
        torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="float64 runs on backend='torch'"):
        fastmem.linear_cross_entropy(hidden, weight, labels, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="backend='cuda'"):
            fastmem.linear_cross_entropy(hidden, weight, labels, backend="cuda")


def test_ignore_index_other_than_default():
    hidden, weight, _, labels = make_case(torch.float32, ignore="none", seed=13)
    labels = labels.clone()
    labels[0, :5] = 7  # a real class id used as the ignore marker
    ours = fastmem.linear_cross_entropy(hidden, weight, labels, ignore_index=7)
    ref = F.cross_entropy((hidden @ weight.t()).reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=7)
    torch.testing.assert_close(ours, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: N*V past 2^31 elements")
def test_more_than_2_pow_31_logits_elements_on_gpu():
    n_rows, hidden_size, vocab = 16384 + 8, 64, 131101  # N * V > 2^31
    torch.manual_seed(0)
    hidden = torch.randn(n_rows, hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.2
    labels = torch.randint(0, vocab, (n_rows,), device="cuda")
    ours = fastmem.linear_cross_entropy(hidden, weight, labels, backend="triton", chunk_size=n_rows)
    ref = sum(F.cross_entropy((hidden[i:i + 1024].float() @ weight.float().t()), labels[i:i + 1024], reduction="sum")
              for i in range(0, n_rows, 1024)) / n_rows
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)


def test_runs_inside_an_autocast_region():
    hidden, weight, _, labels = make_case(torch.float32, seed=14)
    expected = fastmem.linear_cross_entropy(hidden, weight, labels, objective="ot")
    h = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastmem.linear_cross_entropy(h, weight, labels, objective="ot")
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
