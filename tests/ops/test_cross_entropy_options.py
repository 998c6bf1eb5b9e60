"""softcap, label_smoothing and lse_square_scale (z-loss) of fastmem.linear_cross_entropy on
every backend against the float64 oracle, with the MemFT weights applied on top."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmem
from tests.ops.test_linear_cross_entropy import (BACKENDS, GRAD_TOL, TOL, make_case, pick_threshold, rel_err,
                                                 run_both)

OPTION_SETS = {
    "softcap": dict(softcap=2.5),
    "smoothing": dict(label_smoothing=0.1),
    "zloss": dict(lse_square_scale=1e-2),
    "all": dict(softcap=4.0, label_smoothing=0.2, lse_square_scale=1e-3),
}


@pytest.mark.parametrize("objective,reduction", [("sft", "mean"), ("ot", "mean"), ("sw", "sum"), ("sw", "none")])
@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_options_match_oracle(backend, name, objective, reduction):
    options = OPTION_SETS[name]
    hidden, weight, bias, labels = make_case(torch.float32, seed=21)
    threshold = pick_threshold(hidden, weight, labels)
    ours, ref = run_both(hidden, weight, labels, bias, backend=backend, train_head=True, objective=objective,
                         reduction=reduction, threshold=threshold, **options)
    assert rel_err(ours["loss"], ref["loss"]) <= 1e-5
    for grad in ("grad_hidden", "grad_weight", "grad_bias"):
        assert rel_err(ours[grad], ref[grad]) <= 1e-4, grad
    stats, tok = ours["stats"], ref["tok"]
    # stats are those of the (capped) logits: -log p_y and its lse, unsmoothed
    assert rel_err(stats.loss.reshape(-1), tok["loss"]) <= 1e-5
    assert rel_err(stats.lse.reshape(-1), tok["lse"]) <= 1e-5
    assert rel_err(stats.weight.reshape(-1), tok["weight"]) <= 1e-4
    assert torch.equal(stats.correct.reshape(-1), tok["correct"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_options_in_half_precision(backend, dtype):
    hidden, weight, _, labels = make_case(dtype, seed=22)
    ours, ref = run_both(hidden, weight, labels, backend=backend, objective="sw", **OPTION_SETS["all"])
    assert rel_err(ours["loss"], ref["loss"]) <= TOL[dtype]
    assert rel_err(ours["grad_hidden"], ref["grad_hidden"]) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_is_f_cross_entropy(backend):
    hidden, weight, bias, labels = make_case(torch.float32, seed=23)
    ours = fastmem.linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=0.3, backend=backend)
    logits = (hidden @ weight.t() + bias).reshape(-1, weight.shape[0])
    ref = F.cross_entropy(logits, labels.reshape(-1), label_smoothing=0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_and_zloss_definitions(backend):
    """softcap = Gemma 2's final_logit_softcapping; z-loss adds s * lse^2 per token (lse in the stats)."""
    hidden, weight, _, labels = make_case(torch.float32, seed=24, ignore="none")
    cap, s = 3.0, 0.05
    loss, stats = fastmem.linear_cross_entropy(hidden, weight, labels, softcap=cap, lse_square_scale=s,
                                               reduction="none", backend=backend, return_stats=True)
    logits = cap * torch.tanh(hidden @ weight.t() / cap)
    lse = torch.logsumexp(logits, dim=-1)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), expected + s * lse.reshape(-1) ** 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.lse, lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.loss.reshape(-1), expected, rtol=1e-5, atol=1e-5)


def test_softcap_zero_or_none_is_off():
    hidden, weight, _, labels = make_case(torch.float32, seed=25)
    plain = fastmem.linear_cross_entropy(hidden, weight, labels)
    assert torch.equal(fastmem.linear_cross_entropy(hidden, weight, labels, softcap=None), plain)
    assert torch.equal(fastmem.linear_cross_entropy(hidden, weight, labels, softcap=0.0), plain)


def test_module_wrapper_passes_the_options():
    from fastmem.nn import FusedLinearMemFTLoss

    hidden, weight, _, labels = make_case(torch.float32, seed=26)
    options = dict(softcap=4.0, label_smoothing=0.2, lse_square_scale=1e-3)
    module = FusedLinearMemFTLoss("sw", **options)
    assert torch.equal(module(hidden, weight, labels),
                       fastmem.linear_cross_entropy(hidden, weight, labels, objective="sw", **options))
