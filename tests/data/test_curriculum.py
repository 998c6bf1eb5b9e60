"""The Inter-Batch Temporal Curriculum: schedule at the boundaries, determinism, resume."""

import json
import math

import pytest

from fastmem.data import TemporalCurriculum


@pytest.mark.parametrize("num_samples", [1, 3, 10, 37])
def test_schedule_at_the_boundaries(num_samples):
    curriculum = TemporalCurriculum(num_samples, seed=5)
    assert sorted(curriculum.order) == list(range(num_samples))
    expected = {0: 0.2, 19: 0.2, 20: 0.4, 39: 0.4, 40: 0.6, 59: 0.6, 60: 0.8, 79: 0.8,
                80: 1.0, 199: 1.0, 200: 1.0, 10_000: 1.0}
    for epoch, ratio in expected.items():
        active = curriculum.active(epoch)
        assert len(active) == max(1, math.ceil(round(ratio * num_samples, 9)))
        assert active == curriculum.order[:len(active)]  # a prefix of the one fixed order
    assert curriculum.total_epochs == 200
    assert [curriculum.stage(e) for e in (0, 19, 20, 80, 199, 200)] == [0, 0, 1, 4, 4, 4]


def test_exact_counts_on_ten_samples():
    curriculum = TemporalCurriculum(10, seed=0)
    assert [len(curriculum.active(e)) for e in range(0, 100, 10)] == [2, 2, 4, 4, 6, 6, 8, 8,
                                                                       10, 10]
    # Float noise must not add a sample: 0.6 * 5 = 3.0000000000000004.
    assert len(TemporalCurriculum(5).active(40)) == 3


def test_custom_schedule_from_the_papers_phonebook_scripts():
    curriculum = TemporalCurriculum(100, boundaries=(30, 60, 90, 120, 350), seed=1)
    assert [len(curriculum.active(e)) for e in (29, 30, 119, 120, 349)] == [20, 40, 80, 100, 100]
    half = TemporalCurriculum(8, ratios=(0.5,), boundaries=(10,))
    assert len(half.active(0)) == len(half.active(99)) == 4


def test_order_is_deterministic_in_the_seed():
    assert TemporalCurriculum(50, seed=3).order == TemporalCurriculum(50, seed=3).order
    assert TemporalCurriculum(50, seed=3).order != TemporalCurriculum(50, seed=4).order
    assert TemporalCurriculum(50, seed=3).order != list(range(50))  # actually shuffled


def test_state_dict_round_trip_restores_the_order():
    saved = TemporalCurriculum(20, boundaries=(2, 4, 6, 8, 10), seed=9)
    state = json.loads(json.dumps(saved.state_dict()))  # what a checkpoint stores
    restored = TemporalCurriculum(20, seed=123)  # another seed: the saved order must win
    restored.load_state_dict(state)
    assert restored.order == saved.order and restored.boundaries == saved.boundaries
    assert all(restored.active(e) == saved.active(e) for e in range(12))
    with pytest.raises(ValueError, match="num_samples=20"):
        TemporalCurriculum(21).load_state_dict(state)
    with pytest.raises(ValueError, match="not a permutation"):
        restored.load_state_dict({**state, "order": [0] * 20})


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=4, ratios=(0.5, 1.0), boundaries=(10,)), "equal length"),
    (dict(num_samples=4, ratios=(0.6, 0.4), boundaries=(10, 20)), "non-decreasing"),
    (dict(num_samples=4, ratios=(0.0, 1.0), boundaries=(10, 20)), r"\(0, 1\]"),
    (dict(num_samples=4, ratios=(0.5, 1.0), boundaries=(20, 20)), "strictly increasing"),
    (dict(num_samples=4, ratios=(0.5, 1.0), boundaries=(0, 20)), "ints >= 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemporalCurriculum(**kwargs)


def test_bad_epoch():
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        TemporalCurriculum(4).active(-1)
