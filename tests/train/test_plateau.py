"""The plateau stop (fastmem/train/plateau.py): the law's cells train until the loss stops falling."""

from __future__ import annotations

import pytest

from fastmem.errors import UsageError
from fastmem.train import train
from fastmem.train.plateau import PlateauRule
from tests.train.tiny import make_samples, tiny_config, tiny_model


def test_the_rule_stops_once_the_last_steps_beat_the_best_before_them_by_no_more_than_tol():
    rule = PlateauRule(patience=3, tol=0.1)
    losses = [5.0, 4.0, 3.0, 2.95, 2.92, 2.91]
    # step 6: the last three (2.95, 2.92, 2.91) do not beat 3.0 - 0.1 = 2.9
    assert [rule.update(x) for x in losses] == [False, False, False, False, False, True]
    assert not PlateauRule(patience=3, tol=0.1).update(1.0)  # never before patience + 1 steps
    off = PlateauRule(patience=0, tol=0.1)
    assert not any(off.update(1.0) for _ in range(10))


def test_a_noisy_rise_is_a_plateau_and_a_late_drop_is_not():
    rule = PlateauRule(patience=2, tol=0.0)
    assert [rule.update(x) for x in (3.0, 2.0, 2.5, 1.5)] == [False, False, False, False]
    assert rule.update(1.6) is False and rule.update(1.7) is True  # 1.6, 1.7 do not beat 1.5


def test_state_round_trips():
    rule = PlateauRule(patience=2, tol=0.0)
    for x in (3.0, 2.0):
        rule.update(x)
    copy = PlateauRule(patience=2, tol=0.0)
    copy.load_state_dict(rule.state_dict())
    assert [copy.update(x) for x in (2.5, 2.4)] == [rule.update(x) for x in (2.5, 2.4)] == [False, True]


def test_a_run_that_cannot_learn_stops_on_the_plateau_not_on_recall(tmp_path):
    samples = make_samples(2)
    result = train(tiny_config(lr=1e-9, max_steps=50, batch_size=2, plateau_patience=3, plateau_tol=1e-3,
                               stop_on_recall=True, out=str(tmp_path / "run")), samples, model=tiny_model())
    assert result.summary["steps"] == 4 and result.summary["stopped_on_plateau"]
    assert not result.summary["stopped_on_recall"]
    assert [row["decision"] for row in result.metrics][-1] == "plateau"


def test_a_learning_run_is_not_stopped_by_it():
    samples = make_samples(2)
    result = train(tiny_config(lr=2e-2, max_steps=6, batch_size=2, plateau_patience=3, stop_on_recall=False),
                   samples, model=tiny_model())
    assert result.summary["steps"] == 6 and not result.summary["stopped_on_plateau"]


def test_a_resumed_run_keeps_the_losses_it_had_seen(tmp_path):
    samples = make_samples(2)
    settings = dict(lr=1e-9, max_steps=50, batch_size=2, plateau_patience=3, checkpoint_every=2,
                    out=str(tmp_path / "run"))
    train(tiny_config(**settings), samples, model=tiny_model(), halt_after_steps=2)
    resumed = train(tiny_config(**settings), samples, model=tiny_model())
    assert resumed.summary["steps"] == 4 and resumed.summary["stopped_on_plateau"]  # as the straight run


@pytest.mark.parametrize("bad", [dict(plateau_patience=-1), dict(plateau_patience=1.5), dict(plateau_tol=-0.1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(UsageError, match="plateau"):
        tiny_config(**bad).validate()
