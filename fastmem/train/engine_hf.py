"""`--engine hf`: the baseline the lean engine is measured against.

Plain transformers + PEFT: the whole prompt + answer goes through the model every step,
full `[S, V]` logits come out of the lm_head, and `F.cross_entropy` scores the answer
tokens. No prefix cache. The MemFT weights are the same definition the fused op uses
(fastmem.ops.memft_weights), applied to the per-token losses, so A/B runs compare engines,
not objectives.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from fastmem.constants import IGNORE_INDEX
from fastmem.data.sample import MemorySample
from fastmem.ops import TokenStats
from fastmem.ops.memft_weights import ChunkWeigher, MemFTConfig
from fastmem.train.config import TrainConfig
from fastmem.train.engine_fast import padded_labels
from fastmem.train.prefix_cache import answer_slice


def _greedy_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """argmax == label, with a tie for the maximum counting as wrong (as in the fused op)."""
    top2 = logits.topk(2, dim=-1).values
    safe = labels.clamp(min=0)
    target = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (target == top2[..., 0]) & (top2[..., 1] < top2[..., 0])


def _top1_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Target logit minus the best other logit (as the fused op's TokenStats.margin)."""
    top2 = logits.topk(2, dim=-1).values
    target = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return target - torch.where(target >= top2[..., 0], top2[..., 1], top2[..., 0])


class HFEngine:
    """forward(indices, window) -> (loss, TokenStats), like FastEngine, through model(...).logits."""

    def __init__(self, config: TrainConfig, peft_model: nn.Module, samples: list[MemorySample],
                 device: torch.device):
        self.config, self.model, self.samples, self.device = config, peft_model, samples, device

    def step_metrics(self, indices: list[int]) -> dict:
        """What the step adds to metrics.jsonl: with `reference_forward`, the batch's answer loss
        without the adapter and its seconds (the authors' per-step second forward)."""
        if not self.config.reference_forward:
            return {}
        start = time.perf_counter()
        total, count = 0.0, 0
        with torch.no_grad(), self.model.disable_adapter():
            for i in indices:
                labels = torch.tensor(self.samples[i].answer_ids, device=self.device)
                total += float(F.cross_entropy(self._answer_logits(i), labels, reduction="sum"))
                count += labels.numel()
        return {"reference_loss": total / max(count, 1), "reference_s": time.perf_counter() - start}

    def forward(self, indices: list[int], window: torch.Tensor | None = None,
                objective: str | None = None):
        cfg = self.config
        rows = [self._answer_logits(i) for i in indices]
        logits = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [B, A_max, V] fp32
        labels = padded_labels([torch.tensor(self.samples[i].answer_ids, device=self.device) for i in indices])
        batch, seq = labels.shape
        flat_logits, flat_labels = logits.reshape(batch * seq, -1), labels.reshape(-1)
        token_loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
        valid = flat_labels != IGNORE_INDEX
        correct = _greedy_correct(flat_logits.detach(), flat_labels) & valid
        margin = _top1_margin(flat_logits.detach(), flat_labels) * valid

        if window is None:
            window = torch.full((batch,), float(cfg.sw_window), device=self.device)
        memft = MemFTConfig(objective or cfg.objective, cfg.threshold, cfg.eps, cfg.sw_kappa,
                            cfg.sw_tau, cfg.sw_floor)
        weigher = ChunkWeigher(memft, batch, seq, window.to(self.device).float(), self.device)
        rows_valid = valid.nonzero().squeeze(1)
        weight_valid = weigher(rows_valid, token_loss.detach()[rows_valid], correct[rows_valid], None)
        weight = torch.zeros_like(token_loss).index_copy_(0, rows_valid, weight_valid)

        if memft.weighted:
            loss = (weight * token_loss).sum() / (weight.sum() + cfg.eps)
        else:
            loss = token_loss.sum() / max(int(valid.sum()), 1)
        lse = torch.logsumexp(flat_logits.detach(), dim=-1) * valid
        detached = token_loss.detach()
        stats = TokenStats(loss=detached.reshape(batch, seq),
                           prob=(torch.exp(-detached) * valid).reshape(batch, seq),
                           correct=correct.reshape(batch, seq), lse=lse.reshape(batch, seq),
                           weight=weight.reshape(batch, seq), valid=valid.reshape(batch, seq),
                           first_error=weigher.first_error(), margin=margin.reshape(batch, seq))
        return loss, stats

    def _answer_logits(self, i: int) -> torch.Tensor:
        """Sample i's prompt + answer through the model: the logits that predict its answer, fp32."""
        sample = self.samples[i]
        input_ids = torch.tensor([sample.input_ids], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        return logits[0, answer_slice(len(sample.prompt_ids), sample.answer_len)].float()

    def sequence_tokens(self, indices: list[int]) -> int:
        return sum(len(self.samples[i].input_ids) for i in indices)
