"""Long answers need SDPA's causal flash path in both engines.

An explicit `[S, S]` mask costs S² memory (4 GiB of fp32 at 32k tokens), keeps the CPU flash
kernel from skipping the blocks above the diagonal, and on CUDA sends SDPA to the math or
memory-efficient kernel. Every attention call of a training step — forward and backward, fast
engine (cached prefix, right-padded batch) and `--engine hf` — must get no mask and
`is_causal=True`, and the flash kernels must be what runs.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from fastmem.train.adapters import attach_lora, model_parts
from fastmem.train.engine_fast import FastEngine
from fastmem.train.engine_hf import HFEngine
from fastmem.train.prefix_cache import PrefixCache
from tests.train.tiny import make_samples, tiny_config, tiny_model

CPU = torch.device("cpu")
FLASH_FORWARD = "_scaled_dot_product_flash_attention_for_cpu"
FLASH_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


class _AtenCalls(TorchDispatchMode):
    """Counts the aten ops that actually run (autograd's backward included)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every F.scaled_dot_product_attention call's mask and is_causal flag."""
    calls = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append({"mask": attn_mask, "is_causal": is_causal, "q_len": query.shape[-2]})
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def _engine(kind: str, samples):
    config = tiny_config(dropout=0.1, engine="hf" if kind == "hf" else "fast",
                         gradient_checkpointing=kind == "fast-ckpt")
    peft_model, layer_ids = attach_lora(tiny_model(), config)
    peft_model.train()
    parts = model_parts(peft_model, layer_ids)
    if kind != "hf":
        cache = PrefixCache(peft_model, parts, samples, CPU)
        cache.build_all()
        return FastEngine(config, parts, cache), parts
    return HFEngine(config, peft_model, samples, CPU), parts


@pytest.mark.parametrize("kind", ["fast", "fast-ckpt", "hf"])
def test_training_step_attention_is_causal_flash_without_a_mask(kind, sdpa_calls):
    samples = make_samples(2)  # different lengths: the fast engine right-pads one batch
    engine, parts = _engine(kind, samples)
    sdpa_calls.clear()  # the prefix cache's own forward is not a training step
    aten = _AtenCalls()
    # Flash only: a call the flash kernel cannot serve raises instead of falling back silently.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), aten:
        loss, _ = engine.forward([0] if kind == "hf" else [0, 1])
        loss.backward()

    n_layers = len(parts.layers)
    span = n_layers - parts.first_adapted  # layers the fast engine runs
    layers_run = n_layers if kind == "hf" else span
    # A checkpointed span reruns its layers in backward, all but the attention kernel, whose
    # outputs it keeps (prefix_cache._keep_attention): the Python-level call repeats, the
    # kernel does not.
    assert len(sdpa_calls) == (2 * span if kind == "fast-ckpt" else layers_run)
    assert all(call["mask"] is None and call["is_causal"] is True for call in sdpa_calls), sdpa_calls
    assert aten.counts[FLASH_FORWARD] == layers_run
    # Backward reaches the attention of every layer above the lowest adapted one (the lowest
    # adapted layer's LoRA sits after its attention, whose input carries no gradient).
    assert aten.counts[FLASH_BACKWARD] == span - 1


def test_right_padded_batch_keeps_the_causal_flag(sdpa_calls):
    """The batch's kwargs come from its longest sample; the shorter one is padded on the right,
    which under a causal mask never reaches a real position, so no padding mask is built."""
    samples = make_samples(3)
    engine, _ = _engine("fast", samples)
    sdpa_calls.clear()
    with torch.no_grad():
        engine.forward([2, 0, 1])
    assert sdpa_calls and all(c["mask"] is None and c["is_causal"] for c in sdpa_calls)
    assert {c["q_len"] for c in sdpa_calls} == {max(len(s.input_ids) for s in samples)}
