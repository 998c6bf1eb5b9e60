"""Generic tests of the fused cross-entropy, each iterating the table in cross_entropy_cases.py:
float64 oracle (loss, gradients, every stat including entropy) on the CPU path and on the
sync-free path, gradcheck, opcheck, torch.compile with dynamic None / True / False, and the
host-sync count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastmem
from fastmem.ops.cross_entropy import syncs
from tests.conftest import DEVICE
from tests.ops.cross_entropy_cases import CeCase, cases_for
from tests.ops.cross_entropy_oracle import oracle_loss
from tests.ops.sync_count import CountSyncs

# The syncs one forward + backward spends on the CPU path, where a sync costs no device stall
# and buys skipped work: per call, the label-range check and the compaction of labelled rows;
# per chunk, the underflow test of the log-sum and the all-weights-1 test (each saves a
# [C, V] pass), and for OT / SW the count of active rows (the sparse gradient GEMM).
# README.md quotes these; the sync-free path (every device but the CPU) spends none.
CPU_PATH_SYNCS_PER_CALL = 2
CPU_PATH_SYNCS_PER_CHUNK = {"sft": 3, "ot": 4, "sw": 4}
SYNC_FREE_SYNCS = 0


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def _params(check, **filters):
    return [pytest.param(case, id=case.id, marks=[pytest.mark.skip(reason=case.skip_reason())]
                         if case.skip_reason() else []) for case in cases_for(check, **filters)]


@pytest.fixture
def sync_free_path(monkeypatch):
    """Run the code path of a GPU (no host sync anywhere) on CPU tensors."""
    monkeypatch.setattr(syncs, "SYNC_FREE_DEVICES", ())


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def run_case(case: CeCase, *, chunk_size=16, seed=0):
    """Our loss / stats / gradients (on the CPU) for the case, and the float64 oracle's."""
    hidden, weight, bias, labels, kwargs = case.inputs(seed)
    h = hidden.to(DEVICE, copy=True).requires_grad_(True)
    w = weight.to(DEVICE, copy=True).requires_grad_(case.train_head)
    b = None if bias is None else bias.to(DEVICE, copy=True).requires_grad_(case.train_head)
    loss, stats = fastmem.linear_cross_entropy(h, w, labels.to(DEVICE), b, return_stats=True, backend=case.backend,
                                               chunk_size=chunk_size, **{k: _to(v, DEVICE) for k, v in kwargs.items()})
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    loss.backward(grad_out.to(loss.dtype).to(DEVICE))

    ref_h = hidden.double().clone().requires_grad_(True)
    ref_w = weight.double().clone().requires_grad_(case.train_head)
    ref_b = None if bias is None else bias.double().clone().requires_grad_(case.train_head)
    first_error = None if case.dtype in (torch.float32, torch.float64) else stats.first_error.cpu().reshape(-1)
    ref_loss, ref_tok, ref_first_error = oracle_loss(ref_h, ref_w, labels, ref_b, first_error=first_error, **kwargs)
    ref_loss.backward(grad_out)
    ours = dict(loss=loss.detach().cpu(), stats=stats, grads=(h.grad, w.grad, None if b is None else b.grad))
    ref = dict(loss=ref_loss.detach(), tok=ref_tok, first_error=ref_first_error,
               grads=(ref_h.grad, ref_w.grad, None if ref_b is None else ref_b.grad))
    return ours, ref


def _check_against_oracle(case: CeCase, ours, ref):
    tol, grad_tol = case.tol
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert ours["loss"].dtype == acc and torch.isfinite(ours["loss"]).all()
    assert rel_err(ours["loss"], ref["loss"]) <= tol
    for name, got, want in zip(("hidden", "weight", "bias"), ours["grads"], ref["grads"]):
        if want is None:
            assert got is None, f"grad_{name} formed for a frozen tensor"
        else:
            assert got.dtype == case.dtype
            assert rel_err(got.cpu(), want) <= grad_tol, f"grad_{name}"
    stats, tok = ours["stats"], ref["tok"]
    assert torch.equal(stats.valid.cpu().reshape(-1), tok["valid"])
    for name in ("loss", "prob", "lse", "entropy"):
        assert getattr(stats, name).dtype == acc
        assert rel_err(getattr(stats, name).cpu().reshape(-1), tok[name]) <= tol, name
    assert rel_err(stats.weight.cpu().reshape(-1), tok["weight"]) <= grad_tol
    if case.dtype in (torch.float32, torch.float64):
        assert torch.equal(stats.correct.cpu().reshape(-1), tok["correct"])
        assert torch.equal(stats.first_error.cpu().reshape(-1), ref["first_error"])
    if case.ignore == "all":
        assert float(ours["loss"].abs().sum()) == 0.0 and float(ours["grads"][0].abs().sum()) == 0.0


@pytest.mark.parametrize("case", _params("oracle"))
def test_matches_float64_oracle(case):
    _check_against_oracle(case, *run_case(case))


@pytest.mark.parametrize("case", _params("oracle", backends=("torch", "triton")))
def test_sync_free_path_matches_float64_oracle(case, sync_free_path):
    """The GPU's code path (every row through the chunk loop, ignored rows at weight 0, dense
    gradient GEMMs), run on CPU tensors."""
    _check_against_oracle(case, *run_case(case))


@pytest.mark.parametrize("case", _params("gradcheck", backends=("torch",), dtypes=(torch.float64,)))
def test_gradcheck(case):
    hidden, weight, bias, labels, kwargs = case.inputs(batch=2, seq=5, hidden_size=4, vocab=7)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(case.train_head)
    b = None if bias is None else bias.clone().requires_grad_(case.train_head)
    # The op's gradient holds the MemFT weights constant (detached): keep them locally constant
    # under the probe's perturbation, OT's step far from every loss and SW's sigmoid saturated.
    if case.objective == "ot":
        kwargs["threshold"] = 1e-3
    if case.objective == "sw":
        kwargs["sw_kappa"] = 1e4

    def fn(h, w, b):
        return fastmem.linear_cross_entropy(h, w, labels, b, chunk_size=3, **kwargs)

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_args(case: CeCase):
    hidden, weight, bias, labels, kwargs = case.inputs(batch=2, seq=6, hidden_size=8, vocab=13)
    from fastmem.ops.cross_entropy import LossSpec

    token_weights = kwargs.pop("token_weights", None)
    window = kwargs.pop("window", None)
    spec = LossSpec(chunk_size=4, **kwargs)
    window = torch.full((2,), spec.sw_window) if window is None else window
    return (hidden.reshape(-1, 8).requires_grad_(True), weight.requires_grad_(case.train_head),
            None if bias is None else bias.requires_grad_(case.train_head), labels,
            None if token_weights is None else token_weights.reshape(-1), window, spec.op_arg, "torch",
            [True, case.train_head, case.train_head and bias is not None])


@pytest.mark.parametrize("case", _params("opcheck", backends=("torch",), dtypes=(torch.float32, torch.float64)))
def test_opcheck(case):
    """Schema, fake impl (shapes / dtypes), autograd registration and AOT dispatch of the op."""
    torch.library.opcheck(torch.ops.fastmem.linear_cross_entropy.default, _op_args(case))


# ---- torch.compile ----

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _eager_and_compiled(case: CeCase, dynamic, compile_backend="aot_eager"):
    hidden, weight, bias, labels, kwargs = case.inputs()
    token_weights, window = kwargs.pop("token_weights", None), kwargs.pop("window", None)

    def fn(h, w, b, y, tw, win):
        loss, stats = fastmem.linear_cross_entropy(h, w, y, b, token_weights=tw, window=win, return_stats=True,
                                                   backend=case.backend, chunk_size=16, **kwargs)
        return loss, stats.loss, stats.prob, stats.correct, stats.entropy, stats.weight, stats.first_error

    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=compile_backend)):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(case.train_head)
        b = None if bias is None else bias.clone().requires_grad_(case.train_head)
        outputs = run(h, w, b, labels, token_weights, window)
        outputs[0].backward(torch.full_like(outputs[0], 0.5))
        results.append((outputs, (h.grad, w.grad, None if b is None else b.grad)))
    return results


def _assert_same(case: CeCase, eager, compiled):
    # The op is opaque to the compiler: compiled and eager run the same kernels, equal to the
    # float64 oracle's own tolerance.
    tol = dict(rtol=1e-12, atol=1e-12) if case.dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("dynamic", [None, True, False], ids=lambda d: f"dynamic={d}")
@pytest.mark.parametrize("case", _params("compile", backends=("torch",), dtypes=(torch.float32, torch.float64)))
def test_compile_fullgraph_equals_eager(case, dynamic, fresh_dynamo):
    _assert_same(case, *_eager_and_compiled(case, dynamic))


@pytest.mark.slow
def test_compile_through_inductor(fresh_dynamo):
    case = CeCase("torch", torch.float32, "sw", bias=True, train_head=True, options=(("softcap", 3.0),))
    _assert_same(case, *_eager_and_compiled(case, None, compile_backend="inductor"))


def _compile_counting(dynamic):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, dynamic=dynamic, backend=counter)
    def step(h, w, y):
        return fastmem.linear_cross_entropy(h, w, y, objective="ot", threshold=0.5, return_stats=True)[0]

    return counter, step


@pytest.mark.parametrize("how", ["dynamic=None", "mark_dynamic", "dynamic=True"])
def test_five_sequence_lengths_compile_at_most_twice(how, fresh_dynamo):
    counter, step = _compile_counting(True if how == "dynamic=True" else None)
    weight = torch.randn(37, 8)
    for seq in (11, 17, 23, 40, 64):
        hidden = torch.randn(1, seq, 8, requires_grad=True)
        labels = torch.randint(0, 37, (1, seq))
        labels[0, :3] = -100
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(hidden, 1)
            torch._dynamo.mark_dynamic(labels, 1)
        step(hidden, weight, labels).backward()
        assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert counter.frame_count <= (1 if how != "dynamic=None" else 2), counter.frame_count


# ---- host syncs ----

def _count_syncs(case: CeCase):
    hidden, weight, bias, labels, kwargs = case.inputs()
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(case.train_head)
    with CountSyncs() as counted:
        loss = fastmem.linear_cross_entropy(h, w, labels, bias, backend=case.backend, chunk_size=16, **kwargs)
        loss.backward(torch.ones_like(loss))
    return counted


@pytest.mark.parametrize("case", _params("syncs", backends=("torch", "triton"), dtypes=(torch.float32,)))
def test_no_host_sync_on_the_sync_free_path(case, sync_free_path):
    counted = _count_syncs(case)
    assert counted.total == SYNC_FREE_SYNCS, dict(counted.by_op)


@pytest.mark.parametrize("objective", ["sft", "ot", "sw"])
def test_cpu_path_sync_count_is_the_documented_one(objective):
    case = CeCase("torch", torch.float32, objective)
    labels = case.inputs()[3]
    n_chunks = -(-int((labels != -100).sum()) // 16)
    counted = _count_syncs(case)
    expected = CPU_PATH_SYNCS_PER_CALL + n_chunks * CPU_PATH_SYNCS_PER_CHUNK[objective]
    assert counted.total == expected, dict(counted.by_op)


def test_the_counter_sees_syncs_inside_the_op_and_boolean_indexing():
    x = torch.arange(5.0)
    with CountSyncs() as counted:
        x[x > 2].sum().item()
        bool((x > 0).all())
        fastmem.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, -100, 2]))
    assert counted.by_op["index[bool]"] == 1 and counted.by_op["_local_scalar_dense"] >= 2
    assert counted.by_op["nonzero"] >= 1  # the CPU path's compaction of labelled rows, inside the op


# ---- entropy: confident rows and -inf tiles ----

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_of_confident_rows_and_minus_inf_columns(backend):
    """H -> 0 for a confident row keeps fp32's relative precision (1e-5 of float64); a tile
    of -inf logits (a masked vocabulary slice) adds nothing. An identity head makes the GEMM
    exact, so the float64 reference sees the very logits the chunk kernel reads (a GEMM's own
    rounding moves a confident row's H by e^(error of z) ~ 1e-5 relative)."""
    gen = torch.Generator().manual_seed(3)
    vocab = 300
    logits = torch.randn(6, vocab, generator=gen, dtype=torch.float64)
    logits *= torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 30.0], dtype=torch.float64)[:, None]  # sharper and sharper
    hidden, weight = logits.float(), torch.eye(vocab)
    bias = torch.zeros(vocab)
    bias[200:] = float("-inf")  # a whole tile of -inf
    labels = (hidden + bias).argmax(-1)
    _, stats = fastmem.linear_cross_entropy(hidden, weight, labels, bias, return_stats=True, backend=backend)
    z = hidden.double() + bias.double()
    # float64 without cancellation: H = log S - sum_v e_v d_v / S, d = z - max, e = exp(d),
    # log S = log1p(sum of e over all but the max) (lse - sum p z would lose H ~ 1e-28 entirely)
    d = z - z.max(-1, keepdim=True).values
    e = torch.exp(d)
    rest = e.scatter(-1, d.argmax(-1, keepdim=True), 0.0).sum(-1)  # the sum but its 1, never 1 + rest - 1
    expected = torch.log1p(rest) - (e * d.nan_to_num(neginf=0.0)).sum(-1) / (1.0 + rest)
    assert float(expected.min()) < 1e-6  # the case really reaches confident rows
    rel = ((stats.entropy.double() - expected).abs() / expected).max()
    assert rel <= 1e-5, (stats.entropy, expected)


def test_entropy_adds_little_to_the_fused_call():
    """The entropy costs no extra GEMM: the logits GEMM runs once per chunk with or without stats."""
    from tests.ops.test_linear_cross_entropy import CountGemms

    hidden, weight, _, labels = CeCase("torch", torch.float32).inputs()[:4]
    with CountGemms() as gemms:
        fastmem.linear_cross_entropy(hidden, weight, labels, return_stats=True, chunk_size=16)
    assert len(gemms.calls) == -(-int((labels != -100).sum()) // 16)


def test_table_rows_are_unique():
    ids = [case.id for case in cases_for("oracle")]
    assert len(ids) == len(set(ids))
    assert all(dataclasses.is_dataclass(case) for case in cases_for("oracle"))
