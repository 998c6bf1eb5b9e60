"""FusedLinearMemFTLoss: a thin module over fastmem.linear_cross_entropy holding one LossSpec."""

from __future__ import annotations

import pytest
import torch

import fastmem
from fastmem.nn import FusedLinearMemFTLoss
from fastmem.ops import LossSpec
from tests.ops.cross_entropy_cases import make_case


def test_the_module_passes_its_spec_unchanged():
    hidden, weight, _, labels = make_case(torch.float32, seed=3)
    spec = LossSpec(objective="sw", threshold=0.4, sw_kappa=5.0, sw_tau=4.0, sw_window=6, chunk_size=8)
    module = FusedLinearMemFTLoss(spec=spec, return_stats=True)
    assert module.spec is spec
    loss, stats = module(hidden, weight, labels)
    want, want_stats = fastmem.linear_cross_entropy(hidden, weight, labels, spec=spec, return_stats=True)
    assert torch.equal(loss, want) and torch.equal(stats.weight, want_stats.weight)
    assert torch.equal(stats.entropy, want_stats.entropy)


def test_fields_by_name_and_the_objective_positionally():
    module = FusedLinearMemFTLoss("ot", threshold=0.3, reduction="sum")
    assert module.spec == LossSpec(objective="ot", threshold=0.3, reduction="sum")
    assert "objective='ot'" in repr(module)


def test_a_per_sample_window_tensor_overrides_sw_window():
    hidden, weight, _, labels = make_case(torch.float32, seed=4)
    module = FusedLinearMemFTLoss("sw", threshold=0.5, sw_window=50)
    narrow = module(hidden, weight, labels, window=torch.tensor([2.0, 3.0]))
    assert not torch.equal(narrow, module(hidden, weight, labels))
    same = FusedLinearMemFTLoss("sw", threshold=0.5, sw_window=2)(hidden, weight, labels, window=None)
    assert torch.equal(same, FusedLinearMemFTLoss("sw", threshold=0.5)(hidden, weight, labels,
                                                                         window=torch.tensor([2.0, 2.0])))


@pytest.mark.parametrize("options,error,match", [
    (dict(kappa=5.0), TypeError, "unknown loss option"),
    (dict(sw_tau=0.0), ValueError, "sw_tau must be > 0"),
    (dict(threshold=float("nan")), ValueError, "threshold must be finite"),
])
def test_bad_options_fail_when_the_module_is_built(options, error, match):
    with pytest.raises(error, match=match):
        FusedLinearMemFTLoss("sw", **options)
