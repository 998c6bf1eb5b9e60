"""The lean engine: cached frozen prefix -> adapted span -> fused loss on answer rows only."""

from __future__ import annotations

import torch
from torch import nn

from fastmem.constants import IGNORE_INDEX
from fastmem.ops import TokenStats, linear_cross_entropy
from fastmem.train.adapters import ModelParts
from fastmem.train.config import TrainConfig
from fastmem.train.prefix_cache import AdaptedSpan, PrefixCache


def padded_labels(answers: list[torch.Tensor]) -> torch.Tensor:
    """`[B, A_max]` int64 answer tokens, IGNORE_INDEX past each answer's end."""
    return nn.utils.rnn.pad_sequence(answers, batch_first=True, padding_value=IGNORE_INDEX)


class FastEngine:
    """forward(indices, window) -> (loss, TokenStats) for a batch of sample indices.

    The loss is `fastmem.linear_cross_entropy` over `[B, A_max]` answer rows with the model's
    output embedding: the prompt never reaches the head and no `[N, V]` logits exist.
    `span` may be replaced by a DDP / FSDP wrapper of itself (see distributed.py).
    """

    def __init__(self, config: TrainConfig, parts: ModelParts, cache: PrefixCache):
        self.config, self.parts, self.cache = config, parts, cache
        self.span: nn.Module = AdaptedSpan(parts, config.gradient_checkpointing)

    def forward(self, indices: list[int], window: torch.Tensor | None = None,
                objective: str | None = None):
        cfg = self.config
        entries = [self.cache.get(i) for i in indices]
        hidden = self.span(entries)
        labels = padded_labels([e.answer_ids for e in entries])
        if window is None:
            window = torch.full((len(indices),), float(cfg.sw_window), device=hidden.device)
        return linear_cross_entropy(hidden, self.parts.head_weight, labels, self.parts.head_bias,
                                    spec=cfg.loss_spec(objective), window=window.to(hidden.device),
                                    return_stats=True, backend=cfg.loss_backend)

    def sequence_tokens(self, indices: list[int]) -> int:
        return sum(self.cache.samples[i].answer_len + len(self.cache.samples[i].prompt_ids) for i in indices)

    def step_metrics(self, indices: list[int]) -> dict:
        """Nothing beyond the stats (the hf engine's reference forward is a baseline's cost)."""
        return {}


def stats_summary(stats: TokenStats) -> dict:
    """Unweighted answer-token metrics of one pass (recall line: p > 0.5)."""
    valid = stats.valid
    n_valid = int(valid.sum())
    summary = {
        "mean_loss": float(stats.loss[valid].sum()) / max(n_valid, 1),
        "token_acc": stats.token_accuracy(),
        "min_p": stats.min_prob(),
        "stubborn_tokens": int(stats.stubborn_mask().sum()),
        "answer_tokens": n_valid,
    }
    if stats.margin is not None and n_valid:  # the smallest top-1 margin: what stop_on="em" reads
        summary["min_margin"] = float(stats.margin[valid].min())
    return summary
