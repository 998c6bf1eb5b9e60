"""Greedy-decoding exact match: does argmax decoding from the prompt reproduce the answer?

A plain batched loop over a KV cache rather than `generate()`: no generation config of the
model (repetition penalties, forced tokens, EOS handling) can change what "greedy" means, and
with `fast_fail` a sample stops at its first divergence (the batch stops when all have).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fastmem.data.sample import MemorySample
from fastmem.data.sample import check_samples
from fastmem.eval.teacher_forcing import length_batches
from fastmem.integrations.heads import causal_lm_of
from fastmem.nn.modes import eval_mode


def _cache_argument(model) -> str:
    # transformers 5 names the KV cache `cache`; 4.x called it `past_key_values`.
    params = inspect.signature(causal_lm_of(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class GreedyResult:
    """exact_match: the first answer_len greedy tokens equal the answer. first_divergence: the
    first answer position where they differ (-1 if none). generated: the greedy tokens, up to
    and including the divergence when fast-failing, else answer_len of them."""

    exact_match: bool
    first_divergence: int
    generated: list[int]


def _left_padded_prompts(batch: Sequence[MemorySample], device, pad_id: int):
    # Left padding lines every prompt's last token up in the last column, so one decode step
    # serves the whole batch; position ids skip the pad so each sample sees its own positions.
    width = max(len(s.prompt_ids) for s in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.int64, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for b, sample in enumerate(batch):
        n = len(sample.prompt_ids)
        input_ids[b, width - n:] = torch.tensor(sample.prompt_ids, device=device)
        attention_mask[b, width - n:] = 1
    return input_ids, attention_mask


def _decode_batch(model, batch: Sequence[MemorySample], fast_fail: bool, pad_token_id: int,
                  cache_arg: str, bar=None) -> list[GreedyResult]:
    device = next(model.parameters()).device
    answer_len = torch.tensor([s.answer_len for s in batch], device=device)
    targets = torch.full((len(batch), int(answer_len.max())), -1, dtype=torch.int64, device=device)
    for b, sample in enumerate(batch):
        targets[b, :sample.answer_len] = torch.tensor(sample.answer_ids, device=device)
    input_ids, prompt_mask = _left_padded_prompts(batch, device, pad_token_id)
    position_ids = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    # One mask for the whole decode, sliced per step (no re-concatenation at every token).
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(batch), targets.shape[1])], dim=1)
    attention_mask = prompt_mask
    generated = torch.full_like(targets, -1)
    divergence = torch.full((len(batch),), -1, dtype=torch.int64, device=device)
    cache = None
    for step in range(targets.shape[1]):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache = getattr(out, cache_arg)
        token = out.logits[:, -1].argmax(-1)
        live = step < answer_len
        generated[:, step] = torch.where(live, token, -1)
        divergence[live & (divergence < 0) & (token != targets[:, step])] = step
        finished = step + 1 >= answer_len
        if fast_fail:
            finished = finished | (divergence >= 0)
        if bar is not None and (step % 32 == 31 or bool(finished.all())):
            bar.set_postfix_str(f"token {step + 1}/{targets.shape[1]}", refresh=True)
        if bool(finished.all()):
            break
        input_ids = token[:, None]
        attention_mask = full_mask[:, :prompt_mask.shape[1] + step + 1]
        position_ids = position_ids[:, -1:] + 1
    results = []
    for b, sample in enumerate(batch):
        first = int(divergence[b])
        kept = sample.answer_len if first < 0 or not fast_fail else first + 1
        results.append(GreedyResult(exact_match=first < 0, first_divergence=first,
                                    generated=[int(t) for t in generated[b, :kept] if t >= 0]))
    return results


@torch.no_grad()
def greedy_check(model, samples: Sequence[MemorySample], *, batch_size: int = 4, fast_fail: bool = True,
                 pad_token_id: int = 0, progress: bool = True) -> list[GreedyResult]:
    """Greedy-decode each sample's answer from its prompt; one GreedyResult per sample, in order.

    Args:
        model: a causal LM (optionally PEFT-wrapped) with a KV cache; run in eval mode, its own
            mode restored afterwards.
        fast_fail: stop a sample at its first wrong token (EM is then already decided).
        pad_token_id: any valid id; padded positions are masked out of attention.
    """
    check_samples(samples, causal_lm_of(model).get_input_embeddings().num_embeddings)
    cache_arg = _cache_argument(model)
    results: list[GreedyResult | None] = [None] * len(samples)
    # One tick per sample; the postfix counts decode steps, since a long answer takes minutes.
    with eval_mode(model), tqdm(total=len(samples), desc="greedy decoding", unit="sample",
                                disable=not progress) as bar:
        for indices in length_batches(samples, batch_size):
            decoded = _decode_batch(model, [samples[i] for i in indices], fast_fail, pad_token_id, cache_arg,
                                    bar if progress else None)
            for i, result in zip(indices, decoded):
                results[i] = result
            bar.update(len(indices))
    return results
