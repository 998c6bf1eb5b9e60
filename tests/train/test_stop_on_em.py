"""stop_on="em": stop once every answer position's target logit beats the runner-up by >= δ."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastmem.train import train
from fastmem.train.stop_rule import BatchSignal, StopRule, em_short_mask, fails_stop
from tests.train.test_stop_rule import boosted_lora  # noqa: F401  (fixture)
from tests.train.tiny import make_samples, tiny_config, tiny_model


def _run(stop_on: str, em_margin: float = 0.0, **overrides):
    values = dict(objective="sft", lr=2e-2, max_steps=200, stop_on=stop_on, em_margin=em_margin)
    values.update(overrides)
    return train(tiny_config(**values), make_samples(1, answer_len=8), model=tiny_model())


def test_em_short_mask_counts_wrong_argmaxes_and_margins_below_delta():
    correct = torch.tensor([True, True, False, False])  # a tie (margin 0) is not correct
    margin = torch.tensor([2.0, 0.5, 0.0, -1.0])
    assert em_short_mask(correct, margin, 0.0).tolist() == [False, False, True, True]
    assert em_short_mask(correct, margin, 0.5).tolist() == [False, False, True, True]  # >= δ passes
    assert em_short_mask(correct, margin, 1.0).tolist() == [False, True, True, True]
    assert em_short_mask(correct, None, 0.0).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="margins"):
        em_short_mask(correct, None, 0.5)


def test_rule_reads_the_signal_of_its_stop_condition():
    exact_not_recalled = BatchSignal(stubborn_tokens=3, active_tokens=3, weight_sum=3.0, em_short_tokens=0)
    assert StopRule(1, "sft", stop_on="em").decide(exact_not_recalled, [0], True).stop
    assert StopRule(1, "sft").decide(exact_not_recalled, [0], True).update  # recall: trains on
    short = BatchSignal(stubborn_tokens=0, active_tokens=0, weight_sum=0.0, em_short_tokens=1)
    assert StopRule(1, "sft", stop_on="em").decide(short, [0], True).update
    with pytest.raises(ValueError, match="stop_on"):
        StopRule(1, "sft", stop_on="exact")


def test_eval_mode_confirmation_checks_the_margin():
    score = SimpleNamespace(loss=torch.tensor([0.9, 0.1]), correct=torch.tensor([True, True]),
                            margin=torch.tensor([0.3, 4.0]))
    assert fails_stop(score, "recall", 0.0)  # a token at p < 0.5
    assert not fails_stop(score, "em", 0.0) and not fails_stop(score, "em", 0.3)
    assert fails_stop(score, "em", 0.5)


def test_em_stop_fires_no_later_than_recall_and_at_a_margin_of_at_least_delta():
    recall = _run("recall")
    assert recall.summary["stopped_on_recall"]
    previous = 0
    for delta in (0.0, 0.5, 2.0):
        em = _run("em", delta)
        rows = em.metrics
        assert em.summary["stopped_on_recall"], delta
        assert rows[-1]["decision"] == "all_recalled" and not rows[-1]["update"]
        assert rows[-1]["min_margin"] >= delta and rows[-1]["token_acc"] == 1.0
        # every earlier forward had a position short of δ: the rule did not stop there
        assert all(row["min_margin"] < delta or row["token_acc"] < 1.0 for row in rows[:-1])
        # the two runs share their trajectory until the em stop, which cannot come after recall's
        assert em.summary["steps"] <= recall.summary["steps"] or delta > 0
        assert em.summary["steps"] >= previous  # a larger δ never stops earlier
        previous = em.summary["steps"]
        assert em.summary["exact_match"] == 1.0 and em.summary["min_margin"] >= delta - 1e-5
    assert _run("em", 0.0).summary["steps"] <= recall.summary["steps"]


def test_em_stop_never_fires_while_a_margin_is_below_delta():
    result = _run("em", 1e6, max_steps=25)
    assert not result.summary["stopped_on_recall"] and result.summary["steps"] == 25
    assert all(row["decision"] == "train" for row in result.metrics)


def test_em_stop_under_dropout_is_confirmed_by_an_eval_mode_pass(boosted_lora):  # noqa: F811
    result = _run("em", 2.0, max_steps=300, dropout=0.1)
    rows = result.metrics
    assert any(row["confirmation"] == "rejected" for row in rows)
    assert rows[-1]["confirmation"] == "confirmed" and rows[-1]["decision"] == "all_recalled"
    assert result.summary["exact_match"] == 1.0 and result.summary["min_margin"] >= 2.0


def test_hf_engine_reports_the_same_margins_as_the_fast_engine():
    fast = _run("em", 0.5, max_steps=6)
    hf = _run("em", 0.5, max_steps=6, engine="hf")
    for a, b in zip(fast.metrics, hf.metrics):
        assert a["min_margin"] == pytest.approx(b["min_margin"], rel=1e-3, abs=1e-3)
