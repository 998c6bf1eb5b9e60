"""Numerics of fastmem.linear_cross_entropy that the anchors got wrong (docs/design.md, section 4):
confident targets (1 - p_y <= 1e-5) at logit offsets 0 and +20, vocabulary tiles that are
entirely -inf, NaN / Inf hidden states, double backward, > 2^31 gradient elements (GPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastmem
from tests.ops.test_linear_cross_entropy import BACKENDS, on_device, rel_err, run_both

CONFIDENT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# grad_hidden vs float64. The logits of the case are exact in every dtype (integers), so what
# is left is the op's own rounding: fp32 math, then dlogits and the GEMM output rounded once
# to bf16 (2^-9) / fp16. exp(z - lse) - 1 (the bug) was off by 10-50% here in fp32.
CONFIDENT_GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 1.5e-2}


def representable_floor(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The error of the exact gradient merely stored in `dtype`. In fp16 these gradients
    (~1e-7) are subnormals (spacing 6e-8): no fp16 result can be closer than this."""
    return rel_err(exact.to(dtype), exact)


def confident_case(dtype, offset: float, *, n_rows=24, vocab=67, seed=0):
    """Rows whose target has 1 - p_y in (3.7e-6, 1e-5], all logits integers (exact in bf16).

    weight = [P | R]: P a signed permutation (hidden's first V columns set the logits
    exactly), R small integers that mix every column into grad_hidden's last 8 columns.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(-4, 5, (n_rows, vocab), generator=gen).double() + offset
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    z.scatter_(1, labels[:, None], float("-inf"))
    # the target margin that puts rest = sum_{c != y} exp(z_c - z_y) just under 1e-5
    margin = torch.ceil(torch.logsumexp(z, dim=1) - offset - math.log(1e-5))
    z.scatter_(1, labels[:, None], (offset + margin)[:, None])
    perm = torch.randperm(vocab, generator=gen)
    signs = torch.where(torch.rand(vocab, generator=gen) < 0.5, -1.0, 1.0).double()
    P = torch.zeros(vocab, vocab, dtype=torch.float64)
    P[torch.arange(vocab), perm] = signs
    R = torch.randint(-2, 3, (vocab, 8), generator=gen).double()
    weight = torch.cat([P, R], dim=1)
    hidden = torch.cat([z @ P, torch.zeros(n_rows, 8, dtype=torch.float64)], dim=1)  # z = hidden @ weight.T
    assert torch.equal(hidden @ weight.t(), z)
    p_y = torch.softmax(z, dim=1).gather(1, labels[:, None])
    assert bool(((1 - p_y) <= 1e-5).all() & ((1 - p_y) > 3e-6).all())
    return hidden.to(dtype).reshape(2, n_rows // 2, -1), weight.to(dtype), labels.reshape(2, n_rows // 2)


@pytest.mark.parametrize("offset", [0.0, 20.0])
@pytest.mark.parametrize("dtype", CONFIDENT_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_targets_keep_their_gradient(backend, dtype, offset):
    hidden, weight, labels = confident_case(dtype, offset)
    ours, ref = run_both(hidden, weight, labels, backend=backend, objective="sft")
    tolerance = max(CONFIDENT_GRAD_TOL[dtype], 2 * representable_floor(ref["grad_hidden"], dtype))
    assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= tolerance
    # the tiny per-token loss itself (1e-5 next to an lse of 20-40) keeps fp32 precision
    assert rel_err(ours["stats"].loss.reshape(-1), ref["tok"]["loss"]) <= 1e-5
    assert bool(ours["stats"].correct.all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_targets_under_ot_and_sw(backend):
    hidden, weight, labels = confident_case(torch.float32, 20.0, seed=1)
    for objective in ("ot", "sw"):  # threshold below every loss: all weighted
        ours, ref = run_both(hidden, weight, labels, backend=backend, objective=objective, threshold=1e-7)
        assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= 2e-5


def masked_bias_case(dtype=torch.float32, *, vocab=300, masked=slice(0, 256), seed=0):
    """A bias of -inf over whole tiles of the vocabulary (the Triton tile is 64 in these tests)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, 16, generator=gen, dtype=torch.float64) * 0.5
    bias = torch.zeros(vocab, dtype=torch.float64)
    bias[masked] = float("-inf")
    allowed = torch.arange(vocab)[bias == 0]
    labels = allowed[torch.randint(0, allowed.numel(), (2, 9), generator=gen)]
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels


@pytest.mark.parametrize("masked", [slice(0, 256), slice(64, 299), slice(0, 128)], ids=["head", "tail", "first2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_tiles_of_minus_inf(backend, masked, monkeypatch):
    import fastmem.ops.cross_entropy.backend_triton as triton_chunk

    monkeypatch.setattr(triton_chunk, "_block_v", lambda n_cols: 64)
    hidden, weight, bias, labels = masked_bias_case(masked=masked)
    for objective in ("sft", "sw"):
        ours, ref = run_both(hidden, weight, labels, bias, backend=backend, objective=objective)
        assert torch.isfinite(ours["loss"]).all() and torch.isfinite(ours["grad_hidden"]).all()
        assert rel_err(ours["loss"], ref["loss"]) <= 1e-5
        assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_column_but_the_target_minus_inf(backend, monkeypatch):
    """p_y = 1 exactly: loss 0, gradient 0, correct, finite everywhere (5000 columns as the issue's case)."""
    import fastmem.ops.cross_entropy.backend_triton as triton_chunk

    monkeypatch.setattr(triton_chunk, "_block_v", lambda n_cols: 1024)
    gen = torch.Generator().manual_seed(3)
    vocab = 5000
    hidden = torch.randn(6, 8, generator=gen)
    weight = torch.randn(vocab, 8, generator=gen)
    labels = torch.tensor([0, 4999, 2500, 1023, 1024, 4200])
    bias = torch.full((vocab,), float("-inf"))
    bias[labels] = 0.0
    ours, ref = run_both(hidden.reshape(2, 3, 8), weight, labels.reshape(2, 3), bias, backend=backend, objective="sw")
    # each row has 6 finite columns (all the labels); masked-out rows by the others' -inf
    assert torch.isfinite(ours["loss"]).all() and torch.isfinite(ours["grad_hidden"]).all()
    assert rel_err(ours["loss"], ref["loss"]) <= 1e-5
    assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= 1e-4
    only_target = torch.full((vocab,), float("-inf"))
    only_target[7] = 1.0
    h = on_device(hidden[:1]).clone().requires_grad_(True)
    loss, stats = fastmem.linear_cross_entropy(h, on_device(weight), on_device(torch.tensor([7])),
                                               on_device(only_target), backend=backend, return_stats=True)
    loss.backward()
    assert float(loss) == 0.0 and bool(stats.correct.all()) and float(h.grad.abs().max()) == 0.0


def far_below_case(masked_target: bool):
    """float64 rows whose targets sit 120 and 300 below the max (fp32 p_y underflows), the
    target of row 2 masked by a bias of -inf when `masked_target`, the rest ordinary."""
    gen = torch.Generator().manual_seed(4)
    vocab = 97
    hidden = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, 12, generator=gen, dtype=torch.float64)
    labels = torch.tensor([3, 10, 50, 96, 0, 7])
    bias = torch.zeros(vocab, dtype=torch.float64)
    bias[3], bias[10] = -120.0, -300.0
    if masked_target:
        bias[50] = float("-inf")
    return hidden, weight, labels, bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_far_below_the_max_keep_lse(backend):
    """fp32 p_y underflows (z_y 120 and 300 below the max, and a bias of -inf on the target):
    lse still equals float64's, and the finite rows' losses and gradients too."""
    hidden, weight, labels, bias = far_below_case(masked_target=True)
    logits = hidden @ weight.t() + bias
    ours, ref = run_both(hidden.float().reshape(2, 3, 12), weight.float(), labels.reshape(2, 3), bias.float(),
                         backend=backend, objective="sft", reduction="none")
    lse = ours["stats"].lse.reshape(-1).double()
    assert torch.allclose(lse, torch.logsumexp(logits, dim=1), rtol=1e-6, atol=1e-5)
    nll = ours["stats"].loss.reshape(-1).double()
    expected = torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(nll[[0, 1, 3, 4, 5]], expected[[0, 1, 3, 4, 5]], rtol=1e-6)
    assert nll[2] == float("inf") and not bool(ours["stats"].correct.reshape(-1)[:3].any())
    finite = torch.tensor([True, True, False, True, True, True]).reshape(2, 3)
    assert rel_err(ours["grad_hidden"][finite], ref["grad_hidden"][finite]) <= 1e-4


def _far_below_case():
    """far_below_case in fp32, as samples: the target of row 2 keeps its finite logit."""
    hidden, weight, labels, bias = far_below_case(masked_target=False)
    return hidden.float().reshape(2, 3, 12), weight.float(), labels.reshape(2, 3), bias.float()


def _mixed_confidence_case(dtype):
    """Half the rows confident (1 - p_y ~ 1e-5), half ordinary: the chunk needs the others' sum."""
    hidden, weight, labels = confident_case(torch.float64, 20.0, seed=2)
    hidden = hidden.clone()
    hidden[1] = hidden[1] * 0.05  # the second sample's logits shrink to ordinary confidence
    return hidden.to(dtype), weight.to(dtype), labels, None


@pytest.mark.parametrize("softcap", [0.0, 400.0])
@pytest.mark.parametrize("case", ["far_below", "mixed_fp32", "mixed_bf16"])
@pytest.mark.parametrize("objective", ["sft", "ot"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_stats_the_loss_and_gradient_are_the_ones_with_stats(backend, objective, case, softcap):
    """return_stats=False skips the runner-up logit (and, on the CPU, the row max: a row whose
    p_y underflowed is taken again from the GEMM): per-token losses and gradients still match
    float64 and the stats path."""
    hidden, weight, labels, bias = _far_below_case() if case == "far_below" else _mixed_confidence_case(
        torch.bfloat16 if case == "mixed_bf16" else torch.float32)
    options = dict(backend=backend, objective=objective, threshold=1e-7, reduction="none", softcap=softcap)
    bare, ref = run_both(hidden, weight, labels, bias, return_stats=False, **options)
    with_stats, _ = run_both(hidden, weight, labels, bias, **options)
    tol = 1e-5 if hidden.dtype == torch.float32 else 2e-2
    assert rel_err(bare["loss"].reshape(-1), ref["tok"]["loss"]) <= tol
    assert rel_err(bare["grad_hidden"], ref["grad_hidden"]) <= 10 * tol
    assert torch.allclose(bare["loss"], with_stats["loss"], rtol=1e-6, atol=0)
    assert torch.allclose(bare["grad_hidden"], with_stats["grad_hidden"], rtol=1e-5, atol=1e-6)


def test_return_stats_needs_greedy_stats():
    hidden, weight, labels = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="greedy_stats"):
        fastmem.linear_cross_entropy(hidden, weight, labels, return_stats=True, greedy_stats=False)


@pytest.mark.parametrize("sync_free", [False, True], ids=["device-path", "sync-free-path"])
@pytest.mark.parametrize("objective", ["sft", "ot", "sw"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_or_inf_hidden_gives_a_nan_loss(backend, bad, objective, sync_free, monkeypatch):
    """Also on the GPU's sync-free path (forced here on the CPU), where ignored rows run through
    the chunk loop: found on an H200, SW's weight of an ignored NaN row made the loss NaN."""
    if sync_free:
        from fastmem.ops.cross_entropy import syncs

        monkeypatch.setattr(syncs, "SYNC_FREE_DEVICES", ())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 8, generator=gen)
    weight = torch.randn(13, 8, generator=gen)
    labels = torch.randint(0, 13, (2, 6), generator=gen)
    hidden[1, 2, 3] = bad
    for reduction in ("mean", "sum"):
        loss = fastmem.linear_cross_entropy(on_device(hidden), on_device(weight), on_device(labels),
                                            objective=objective, reduction=reduction, backend=backend)
        assert math.isnan(float(loss)), (reduction, float(loss))
    per_token = fastmem.linear_cross_entropy(on_device(hidden), on_device(weight), on_device(labels),
                                             objective=objective, reduction="none", backend=backend)
    assert math.isnan(float(per_token[1, 2]))
    # an ignored row is never read: its NaN does not reach the loss
    labels[1, 2] = -100
    loss = fastmem.linear_cross_entropy(on_device(hidden), on_device(weight), on_device(labels),
                                        objective=objective, backend=backend)
    assert math.isfinite(float(loss))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_raises(reduction):
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    loss = fastmem.linear_cross_entropy(hidden, weight, labels, reduction=reduction).sum()
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        grad.sum().backward()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: N*V past 2^31 gradient elements")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_more_than_2_pow_31_gradient_elements_on_gpu(backend):
    """One chunk of N * V > 2^31 logits: the stats and gradient kernels' offsets are int64."""
    from fastmem.backends import available_backends

    if backend not in available_backends(torch.device("cuda")):
        pytest.skip(f"backend {backend} is unavailable here")
    n_rows, hidden_size, vocab = 16384 + 8, 64, 131101  # N * V = 2.149e9 > 2^31
    torch.manual_seed(0)
    hidden = torch.randn(n_rows, hidden_size, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.2
    labels = torch.randint(0, vocab, (n_rows,), device="cuda")
    loss = fastmem.linear_cross_entropy(hidden, weight, labels, backend=backend, chunk_size=n_rows)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref = 0.0
    for i in range(0, n_rows, 1024):  # the reference in chunks of 1024 rows, fp32
        part = F.cross_entropy(ref_hidden[i:i + 1024].float() @ weight.float().t(), labels[i:i + 1024],
                               reduction="sum") / n_rows
        part.backward()
        ref += float(part)
    torch.testing.assert_close(float(loss), ref, rtol=1e-3, atol=1e-3)
    # the last rows live past element 2^31 of the chunk's logits
    tail = slice(n_rows - 64, n_rows)
    assert rel_err(hidden.grad[tail].float(), ref_hidden.grad[tail].float()) <= 2e-2
    assert rel_err(hidden.grad.float(), ref_hidden.grad.float()) <= 2e-2


def test_torch_backend_without_the_aliased_softmax(monkeypatch):
    """The torch backend's GPU paths (three-pass softmax, no row subsets that need a host sync)
    keep the same numerics."""
    import fastmem.ops.cross_entropy.backend_torch as torch_chunk

    monkeypatch.setattr(torch_chunk, "_softmax_may_alias", lambda work: False)
    monkeypatch.setattr(torch_chunk, "_host_sync_is_free", lambda work: False)
    test_targets_far_below_the_max_keep_lse("torch")
    for offset in (0.0, 20.0):
        test_confident_targets_keep_their_gradient("torch", torch.float32, offset)
    test_vocabulary_tiles_of_minus_inf("torch", slice(0, 256), monkeypatch)
