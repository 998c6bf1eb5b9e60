"""Batch order, the temporal curriculum, and gradient checkpointing of the adapted span."""

from __future__ import annotations

import torch

from fastmem.data import TemporalCurriculum
from fastmem.train import train
from fastmem.train.adapters import attach_lora, model_parts
from fastmem.train.config import default_layers
from fastmem.train.engine_fast import FastEngine
from fastmem.train.prefix_cache import PrefixCache
from fastmem.train.schedule import build_schedule, rank_slice
from tests.train.tiny import make_samples, tiny_config, tiny_model


def test_default_layers_are_two_upper_middle_layers():
    assert default_layers(30) == [20, 24]  # SmolLM2: the layers docs/design.md's figures use
    assert default_layers(4) == [2, 3]
    assert default_layers(1) == [0]


def test_schedule_is_deterministic_and_covers_every_sample_each_epoch():
    steps = build_schedule(5, batch_size=2, epochs=3, max_steps=None, seed=3)
    assert steps == build_schedule(5, batch_size=2, epochs=3, max_steps=None, seed=3)
    assert len(steps) == 9  # ceil(5 / 2) batches x 3 epochs, short last batch kept
    for epoch in range(3):
        seen = [i for s in steps if s.epoch == epoch for i in s.global_batch]
        assert sorted(seen) == list(range(5))
    assert build_schedule(5, 2, 3, max_steps=4, seed=3) == steps[:4]


def test_schedule_pads_for_two_ranks_like_distributed_sampler():
    steps = build_schedule(3, batch_size=1, epochs=1, max_steps=None, seed=0, world_size=2)
    assert len(steps) == 2 and all(len(s.global_batch) == 2 for s in steps)
    assert sorted(set(i for s in steps for i in s.global_batch)) == [0, 1, 2]
    assert rank_slice(steps[0], 1, 1) == [steps[0].global_batch[1]]


def test_curriculum_trains_the_prefix_of_its_order_until_the_boundary():
    samples = make_samples(4, answer_len=6)
    config = tiny_config(objective="ot", curriculum=True, curriculum_ratios=[0.5, 1.0],
                         curriculum_boundaries=[2, 4], epochs=4, max_steps=None)
    result = train(config, samples, model=tiny_model())
    order = TemporalCurriculum(4, [0.5, 1.0], [2, 4], seed=config.seed).order
    early = {i for row in result.metrics if row["epoch"] < 2 for i in row["samples"]}
    late = {i for row in result.metrics if row["epoch"] >= 2 for i in row["samples"]}
    assert early == set(order[:2]) and late == set(range(4))
    assert result.summary["total_steps"] == 2 + 2 + 4 + 4


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    samples = make_samples(2)
    grads = {}
    for checkpointing in (False, True):
        config = tiny_config(dropout=0.1, gradient_checkpointing=checkpointing)
        peft_model, layers = attach_lora(tiny_model(), config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.05)
        peft_model.train()
        parts = model_parts(peft_model, layers)
        engine = FastEngine(config, parts, PrefixCache(peft_model, parts, samples, torch.device("cpu")))
        torch.manual_seed(5)  # the same dropout masks; checkpointing must replay them in backward
        loss, _ = engine.forward([0, 1])
        loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-6, atol=1e-8)
        assert grad.abs().sum() > 0


def test_eager_attention_is_switched_to_sdpa():
    model = tiny_model(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    result = train(tiny_config(max_steps=1), make_samples(1), model=model)
    assert result.model.get_base_model().config._attn_implementation == "sdpa"


def _eager_plan(num_samples, batch_size, epochs, max_steps, seed, world_size=1, curriculum=None):
    """The plan built up front, step by step: the oracle of the lazy StepPlan."""
    import math

    from fastmem.train.schedule import ScheduledStep, epoch_order

    steps, epoch, size = [], 0, batch_size * world_size
    while max_steps is None and epoch < epochs or max_steps is not None and len(steps) < max_steps:
        active = curriculum.active(epoch) if curriculum else list(range(num_samples))
        order = epoch_order(active, seed, epoch)
        if world_size > 1:
            order = [order[i % len(order)] for i in range(math.ceil(len(order) / size) * size)]
        steps += [ScheduledStep(epoch, tuple(order[i:i + size]), len(active) == num_samples)
                  for i in range(0, len(order), size)]
        epoch += 1
    return steps[:max_steps] if max_steps is not None else steps


def test_lazy_plan_matches_the_eager_plan():
    for n, batch, epochs, max_steps, world in [(5, 2, 3, None, 1), (5, 2, 3, 11, 1), (3, 1, 2, None, 2),
                                               (7, 3, 5, 23, 2), (1, 1, 4, None, 1), (8, 3, 6, None, 3)]:
        for ratios in (None, ([0.25, 0.5, 1.0], [1, 3, 5])):
            curriculum = TemporalCurriculum(n, *ratios, seed=1) if ratios else None
            plan = build_schedule(n, batch, epochs, max_steps, seed=4, world_size=world, curriculum=curriculum)
            eager = _eager_plan(n, batch, epochs, max_steps, 4, world, curriculum)
            assert len(plan) == len(eager) and list(plan) == eager
            assert [plan[i] for i in reversed(range(len(plan)))] == eager[::-1]  # any order of access


def test_a_billion_step_plan_costs_nothing_up_front():
    import time

    started = time.perf_counter()
    plan = build_schedule(3, 1, epochs=1, max_steps=10 ** 9, seed=0)
    assert len(plan) == 10 ** 9 and plan[10 ** 9 - 1].epoch == (10 ** 9 - 1) // 3
    assert time.perf_counter() - started < 1.0
