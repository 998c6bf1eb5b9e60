"""Teacher-forced per-token scores of the answer tokens, without `[N, V]` logits for the answer.

One decoder forward per batch gives the final hidden states; the answer rows go through
`fastmem.linear_cross_entropy(..., return_stats=True)` for loss, p, greedy-argmax correctness,
the top-1 margin and the first error (i*). The rank of the target is 0 wherever the argmax is
right, so the extra head GEMM that ranks targets runs only over the wrong rows: on a
memorized answer it costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastmem.constants import IGNORE_INDEX, is_stubborn
from fastmem.data.sample import MemorySample, check_samples
from fastmem.integrations.heads import causal_lm_of, plain_head
from fastmem.nn.modes import eval_mode
from fastmem.ops import linear_cross_entropy

# Logits held at once by the rank computation (elements): 64 MiB of fp32 on a CPU; 256 MiB on
# a GPU, where a 152k vocabulary would otherwise leave GEMMs of ~100 rows.
RANK_LOGITS_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 26}


@dataclass
class TokenScores:
    """Teacher-forced scores of one sample's answer tokens (CPU tensors, length = answer_len).

    loss: fp32 L_t; prob: fp32 p_t = exp(-L_t); correct: bool, greedy argmax == target (a tie
    counts as wrong); target_rank: int64, how many vocabulary logits are strictly above the
    target's (0: the target is an argmax); first_error: first position with correct False, -1
    if none (the greedy first divergence i*); margin: fp32 top-1 margin, target logit minus the
    best other logit (> 0 exactly where correct); lse: fp32 log-sum-exp of the logits (their
    scale, for the margin's noise tolerance); dtype: the dtype the head ran in.
    """

    loss: torch.Tensor
    prob: torch.Tensor
    correct: torch.Tensor
    target_rank: torch.Tensor
    first_error: int
    margin: torch.Tensor
    lse: torch.Tensor
    dtype: torch.dtype = torch.float32

    @property
    def exact_match(self) -> bool:
        """Greedy decoding reproduces the answer iff every teacher-forced argmax is right."""
        return self.first_error < 0

    def stubborn_mask(self) -> torch.Tensor:
        """Answer tokens not recalled (p <= 0.5, or a NaN loss): fastmem.constants.is_stubborn."""
        return is_stubborn(self.loss)


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """`(decoder, head_weight [V, H], head_bias [V] | None)` of a causal LM.

    The head comes from the one resolver (fastmem.integrations.heads.plain_head): a plain,
    tied, LoRA (folded, exact in eval mode) or modules_to_save head; heads that rescale or
    soft-cap their logits are refused rather than silently mis-scored.
    """
    weight, bias = plain_head(model)
    return causal_lm_of(model).get_decoder(), weight, bias


def target_ranks(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 bias: torch.Tensor | None = None, *, budget: int | None = None) -> torch.Tensor:
    """Rank of each target among its row's logits: `#{v : z_v > z_label}` (0 = an argmax).

    hidden `[N, H]`, weight `[V, H]` (same dtype), labels `[N]` int64 in [0, V), bias `[V]`.
    Returns int64 `[N]`. Logits are formed `budget // V` rows at a time (never `[N, V]`;
    default budget from RANK_LOGITS_BUDGET) by the head GEMM in the model's dtype (fp32
    accumulation, rounded to that dtype: in bf16 near-ties can tie); the target's logit comes
    from the same GEMM, so a row never outranks itself.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and labels [N]; got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if budget is None:
        budget = RANK_LOGITS_BUDGET["cuda" if hidden.device.type == "cuda" else "cpu"]
    rows = max(1, budget // weight.shape[0])
    ranks = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start:start + rows], weight, bias)
        target = logits.gather(1, labels[start:start + rows, None])
        ranks[start:start + rows] = (logits > target).sum(1)
    return ranks


def _answer_rows(hidden: torch.Tensor, batch: Sequence[MemorySample]):
    """Gather the rows that predict each answer token into `[B, A_max, H]` with labels
    `[B, A_max]` (IGNORE_INDEX past each answer). The token at position p is predicted by
    the hidden state at p - 1."""
    width = max(s.answer_len for s in batch)
    rows = torch.zeros(len(batch), width, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.int64, device=hidden.device)
    for b, sample in enumerate(batch):
        start = len(sample.prompt_ids) - 1
        rows[b, :sample.answer_len] = hidden[b, start:start + sample.answer_len]
        labels[b, :sample.answer_len] = torch.tensor(sample.answer_ids, device=hidden.device)
    return rows, labels


def length_batches(samples: Sequence[MemorySample], batch_size: int) -> list[list[int]]:
    """Indices of `samples` in batches of similar total length (less padding), longest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _score_batch(decoder, weight, bias, batch: Sequence[MemorySample], chunk_size) -> list[TokenScores]:
    device = weight.device
    width = max(len(s.input_ids) for s in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.int64, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for b, sample in enumerate(batch):
        input_ids[b, :len(sample.input_ids)] = torch.tensor(sample.input_ids, device=device)
        attention_mask[b, :len(sample.input_ids)] = 1
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows, labels = _answer_rows(hidden.to(weight.dtype), batch)
    # no entropy: the verdict never reads it, and on the CPU it is an extra pass per chunk
    _, stats = linear_cross_entropy(rows, weight, labels, bias, reduction="none",
                                    return_stats=True, chunk_size=chunk_size, entropy=False)
    # A right argmax is rank 0: only the wrong rows need the ranking GEMM.
    wrong = (labels != IGNORE_INDEX) & ~stats.correct
    ranks = torch.zeros_like(labels)
    if bool(wrong.any()):
        ranks[wrong] = target_ranks(rows[wrong], weight, labels[wrong], bias)
    scores = []
    for b, sample in enumerate(batch):
        n = sample.answer_len
        scores.append(TokenScores(loss=stats.loss[b, :n].float().cpu(), prob=stats.prob[b, :n].float().cpu(),
                                  correct=stats.correct[b, :n].cpu(), target_rank=ranks[b, :n].cpu(),
                                  first_error=int(stats.first_error[b]), margin=stats.margin[b, :n].float().cpu(),
                                  lse=stats.lse[b, :n].float().cpu(), dtype=weight.dtype))
    return scores


@torch.no_grad()
def teacher_forced_scores(model, samples: Sequence[MemorySample], *, batch_size: int = 4,
                          progress: bool = True, chunk_size: int | None = None) -> list[TokenScores]:
    """Score every answer token of `samples` under teacher forcing; one TokenScores per sample,
    in the order given. Batches are right-padded (causal attention keeps the pad out of every
    real position). The model runs in eval mode (no dropout, a LoRA head folded exactly); its own
    mode is restored afterwards."""
    with eval_mode(model):
        decoder, weight, bias = decoder_and_head(model)
        max_positions = getattr(getattr(causal_lm_of(model), "config", None), "max_position_embeddings", None)
        check_samples(samples, min(weight.shape[0], decoder.get_input_embeddings().num_embeddings),
                      max_positions if isinstance(max_positions, int) else None)
        return _score_all(decoder, weight, bias, samples, batch_size, progress, chunk_size)


def _score_all(decoder, weight, bias, samples, batch_size, progress, chunk_size) -> list[TokenScores]:
    scores: list[TokenScores | None] = [None] * len(samples)
    with tqdm(total=len(samples), desc="teacher forcing", unit="sample", disable=not progress) as bar:
        for indices in length_batches(samples, batch_size):
            for i, score in zip(indices, _score_batch(decoder, weight, bias, [samples[i] for i in indices],
                                                      chunk_size)):
                scores[i] = score
            bar.update(len(indices))
    return scores
