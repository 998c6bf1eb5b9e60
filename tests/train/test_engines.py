"""The lean engine against its references: the uncached prefix path (bit-exact) and the
plain transformers + PEFT + F.cross_entropy engine (`--engine hf`, within fp32 tolerance)."""

from __future__ import annotations

import pytest
import torch

from fastmem.train import train
from fastmem.train.adapters import attach_lora, model_parts
from fastmem.train.engine_fast import FastEngine
from fastmem.train.engine_hf import HFEngine
from fastmem.train.prefix_cache import PrefixCache
from tests.train.tiny import make_samples, tiny_config, tiny_model

CPU = torch.device("cpu")


def _setup(config, samples):
    peft_model, layer_ids = attach_lora(tiny_model(), config)
    with torch.no_grad():  # B starts at zero; make it non-zero so A gets a gradient too
        g = torch.Generator().manual_seed(7)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.train()
    return peft_model, model_parts(peft_model, layer_ids)


def _loss_and_grads(engine, peft_model, indices, window=None):
    peft_model.zero_grad(set_to_none=True)
    loss, stats = engine.forward(indices, window)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return loss.detach(), stats, grads


def test_cached_prefix_equals_model_hidden_states():
    config = tiny_config()
    samples = make_samples(2)
    peft_model, parts = _setup(config, samples)
    cache = PrefixCache(peft_model, parts, samples, CPU)
    cache.build_all()
    for index, sample in enumerate(samples):
        with torch.no_grad(), peft_model.disable_adapter():
            out = parts.causal_lm(input_ids=torch.tensor([sample.input_ids]), output_hidden_states=True)
        # hidden_states[k] is the input of layer k
        torch.testing.assert_close(cache.get(index).hidden, out.hidden_states[parts.first_adapted], rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["sft", "ot", "sw"])
def test_cached_and_uncached_prefix_give_identical_loss_and_grads(objective):
    config = tiny_config(objective=objective, threshold=1.0)
    samples = make_samples(2)
    peft_model, parts = _setup(config, samples)
    cached = FastEngine(config, parts, PrefixCache(peft_model, parts, samples, CPU, enabled=True))
    cached.cache.build_all()
    uncached = FastEngine(config, parts, PrefixCache(peft_model, parts, samples, CPU, enabled=False))
    loss_c, stats_c, grads_c = _loss_and_grads(cached, peft_model, [0, 1])
    loss_u, stats_u, grads_u = _loss_and_grads(uncached, peft_model, [0, 1])
    assert uncached.cache.entries == {}  # really recomputed
    assert torch.equal(loss_c, loss_u)
    assert torch.equal(stats_c.loss, stats_u.loss)
    for name in grads_c:
        assert torch.equal(grads_c[name], grads_u[name]), name
    assert any(g.abs().sum() > 0 for g in grads_c.values())


@pytest.mark.parametrize("objective", ["sft", "ot", "sw"])
def test_fast_and_hf_engines_agree_on_loss_stats_and_grads(objective):
    config = tiny_config(objective=objective, threshold=1.0, sw_window=3)
    samples = make_samples(2, answer_len=10)
    peft_model, parts = _setup(config, samples)
    fast = FastEngine(config, parts, PrefixCache(peft_model, parts, samples, CPU))
    fast.cache.build_all()
    hf = HFEngine(config, peft_model, samples, CPU)
    window = torch.tensor([3.0, 5.0])
    loss_f, stats_f, grads_f = _loss_and_grads(fast, peft_model, [0, 1], window)
    loss_h, stats_h, grads_h = _loss_and_grads(hf, peft_model, [0, 1], window)
    torch.testing.assert_close(loss_f, loss_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_f.loss, stats_h.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats_f.weight, stats_h.weight, rtol=1e-4, atol=1e-6)
    assert torch.equal(stats_f.correct, stats_h.correct)
    assert torch.equal(stats_f.first_error, stats_h.first_error)
    for name in grads_f:
        scale = grads_h[name].abs().max().item()
        torch.testing.assert_close(grads_f[name], grads_h[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3))
    assert float(stats_f.weight.sum()) > 0


def test_train_step_one_same_loss_on_both_engines():
    samples = make_samples(2)
    losses = {}
    for engine in ("fast", "hf"):
        result = train(tiny_config(engine=engine, max_steps=1, batch_size=2), samples, model=tiny_model())
        losses[engine] = result.metrics[0]["loss"]
        assert result.summary["base_loss"] > 0
    assert losses["fast"] == pytest.approx(losses["hf"], rel=1e-5)


def test_right_padded_batch_equals_one_sample_at_a_time():
    config = tiny_config(objective="sft")
    samples = make_samples(3)  # prompts of 4, 6, 8 tokens, answers of 12, 13, 14
    peft_model, parts = _setup(config, samples)
    engine = FastEngine(config, parts, PrefixCache(peft_model, parts, samples, CPU))
    with torch.no_grad():
        _, batched = engine.forward([2, 0, 1])
        for row, index in enumerate([2, 0, 1]):
            _, alone = engine.forward([index])
            n = samples[index].answer_len
            torch.testing.assert_close(batched.loss[row, :n], alone.loss[0], rtol=1e-5, atol=1e-6)
            assert not batched.valid[row, n:].any()


def test_fused_lora_switch_gives_the_same_loss_and_grads():
    pytest.importorskip("fastmem.integrations.peft")  # the switch only lights up when the fused op exists
    samples = make_samples(2)
    results = {}
    for fused in (False, True):
        config = tiny_config(fused_lora=fused)
        peft_model, parts = _setup(config, samples)
        patched = [m for m in peft_model.modules() if "_fused_forward" in str(getattr(m, "forward", ""))]
        assert bool(patched) == fused
        engine = FastEngine(config, parts, PrefixCache(peft_model, parts, samples, CPU))
        results[fused] = _loss_and_grads(engine, peft_model, [0, 1])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, rtol=1e-4, atol=1e-6)
