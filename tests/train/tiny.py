"""Tiny models and made-up samples for the trainer tests (no tokenizer needed)."""

from __future__ import annotations

import torch

from fastmem.data.sample import MemorySample
from fastmem.train import TrainConfig
from tests.conftest import tiny_llama_config

VOCAB = 97


def tiny_model(seed: int = 0, **overrides):
    """A random 4-layer llama. initializer_range 0.5 (not 0.02) lets LoRA on down_proj push a
    target's probability past 0.5 in a few dozen steps, so recall and the stop rule can be
    exercised; at 0.02 the logits stay near-uniform over the 97 tokens."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    values = dict(initializer_range=0.5)
    values.update(overrides)
    return LlamaForCausalLM(tiny_llama_config(**values)).eval()


def make_sample(name: str, prompt_len: int, answer_len: int, seed: int) -> MemorySample:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (prompt_len,), generator=g).tolist()
    answer = torch.randint(3, VOCAB, (answer_len,), generator=g).tolist()
    return MemorySample(name, f"prompt {name}", f"answer {name}", tuple(prompt), tuple(answer))


def make_samples(count: int = 2, answer_len: int = 12, seed: int = 0) -> list[MemorySample]:
    """Samples with different prompt lengths, so batches mix sequence lengths."""
    return [make_sample(f"s{i}", 4 + 2 * i, answer_len + i, seed + i) for i in range(count)]


def tiny_config(**overrides) -> TrainConfig:
    values = dict(rank=4, alpha=8.0, dropout=0.0, layers=[2, 3], max_steps=5, progress=False,
                  verify_greedy=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in peft_model.named_parameters() if "lora_" in name}
