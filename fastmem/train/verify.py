"""End-of-run checks: the teacher-forced pass in eval mode and greedy exact match."""

from __future__ import annotations

import torch
from torch import nn

from fastmem.data.sample import MemorySample


@torch.no_grad()
def greedy_answer(model: nn.Module, sample: MemorySample, device: torch.device,
                  max_new_tokens: int | None = None) -> list[int]:
    """Greedy decoding (do_sample=False) from the sample's prompt; returns the new token ids."""
    input_ids = torch.tensor([sample.prompt_ids], dtype=torch.long, device=device)
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    eos = getattr(config, "eos_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, (list, tuple)) else eos)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens or sample.answer_len, do_sample=False,
                         pad_token_id=pad if pad is not None else 0)
    return out[0, input_ids.shape[1]:].tolist()


def exact_match(model: nn.Module, samples: list[MemorySample], device: torch.device) -> list[bool]:
    """Per sample: does greedy decoding reproduce every answer token, in order?"""
    was_training = model.training
    model.eval()
    try:
        return [greedy_answer(model, s, device)[: s.answer_len] == list(s.answer_ids) for s in samples]
    finally:
        model.train(was_training)
