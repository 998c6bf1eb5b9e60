"""Fused linear cross-entropy, forward + backward with a frozen head, against the anchors.

One case = (head shape, dtype, loss case, contender); the tables are suite/cases.py and
suite/contenders.py. The floor is the logits GEMM plus the grad_hidden GEMM over the rows with
a non-zero weight: (1 + a) * 2*N*H*V FLOPs.
"""

from __future__ import annotations

import gc

import pytest
import torch

from benchmarks.conftest import skip_unless_runs_here
from benchmarks.suite.cases import CE_SHAPES, DTYPES, LOSS_CASES, selected
from benchmarks.suite.contenders import loss_contenders
from benchmarks.suite.measure import cached_floor, head_floor, run_case


def dtypes_for(where: str) -> tuple[str, ...]:
    return {"smoke": ("fp32",), "cpu": ("fp32", "bf16"), "gpu": ("bf16",)}[where]


def pytest_generate_tests(metafunc):
    if "ce_case" not in metafunc.fixturenames:
        return
    smoke = metafunc.config.getoption("--smoke")
    params = []
    for shape in selected(CE_SHAPES, smoke):
        for dtype in dtypes_for(shape.where):
            for case in LOSS_CASES:
                for contender in loss_contenders():
                    if contender.implements(case) and (contender.in_smoke or not smoke):
                        params.append(pytest.param((shape, dtype, case, contender),
                                                   id=f"{shape.id}-{dtype}-{case.id}-{contender.id}"))
    metafunc.parametrize("ce_case", params)


_inputs: dict[tuple, tuple] = {}


def head_inputs(shape, dtype: str, device: torch.device):
    """hidden [N, H], frozen weight [V, H], labels [N]: one set alive at a time (8B heads are GBs)."""
    key = (shape.n, shape.hidden, shape.vocab, dtype, device.type)
    if key not in _inputs:
        _inputs.clear()
        gc.collect()
        gen = torch.Generator().manual_seed(0)
        hidden = (torch.randn(shape.n, shape.hidden, generator=gen) * 0.5).to(device, DTYPES[dtype])
        weight = (torch.randn(shape.vocab, shape.hidden, generator=gen) / shape.hidden ** 0.5).to(device, DTYPES[dtype])
        labels = torch.randint(0, shape.vocab, (shape.n,), generator=gen).to(device)
        _inputs[key] = (hidden, weight, labels, {})
    return _inputs[key]


def ot_threshold(hidden, weight, labels, active_fraction: float, thresholds: dict) -> float:
    """The loss quantile that leaves `active_fraction` of the tokens above the OT threshold."""
    if active_fraction not in thresholds:
        import fastmem

        with torch.no_grad():
            _, stats = fastmem.linear_cross_entropy(hidden, weight, labels, return_stats=True)
        thresholds[active_fraction] = float(torch.quantile(stats.loss.float(), 1.0 - active_fraction))
    return thresholds[active_fraction]


def test_cross_entropy(benchmark, request, ce_case, device, rounds):
    shape, dtype, case, contender = ce_case
    skip_unless_runs_here(shape.where, device, f"N={shape.n} H={shape.hidden} V={shape.vocab}")
    if device.type == "cpu" and dtype != "fp32":
        pytest.skip(f"{dtype} on this CPU is emulated (no AMX): the CPU subset is fp32")
    reason = contender.skip_reason(device)
    if reason:
        pytest.skip(reason)
    hidden, weight, labels, thresholds = head_inputs(shape, dtype, device)
    threshold = (ot_threshold(hidden, weight, labels, case.active_fraction, thresholds)
                 if case.active_fraction is not None else 0.6931471805599453)
    loss_fn = contender.make(case, threshold)

    def step():
        h = hidden.detach().requires_grad_(True)
        loss_fn(h, weight, labels).backward()

    floor = cached_floor(("head", shape.n, shape.hidden, shape.vocab, dtype, case.floor_active_fraction),
                         lambda: head_floor(hidden, weight, case.floor_active_fraction, reps=rounds))
    benchmark.group = f"cross-entropy {shape.id} H{shape.hidden} V{shape.vocab} {dtype} {case.id}"
    info = dict(op="cross-entropy", preset=shape.preset, N=shape.n, H=shape.hidden, V=shape.vocab, dtype=dtype,
                case=case.id, objective=case.objective, active_fraction=case.active_fraction,
                options=dict(case.options), contender=contender.id)
    try:
        run_case(benchmark, request, step, device, floor, info, rounds)
    except torch.OutOfMemoryError as err:  # an anchor running out of memory is a result too
        pytest.skip(f"out of memory: {str(err).splitlines()[0][:120]}")
