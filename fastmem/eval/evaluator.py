"""Evaluate memorized samples: teacher-forced scores, greedy exact match, stubborn tokens.

Definitions (../shared/PAPER.md): token accuracy = teacher-forced greedy-argmax matches /
answer length; exact match = greedy decoding from the prompt reproduces the whole answer;
i* (`first_error`) = the first answer position whose teacher-forced greedy prediction is wrong;
stubborn tokens = answer tokens with p ≤ 0.5 (L ≥ ln 2), which greedy decoding does not
reliably recall.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fastmem.constants import L_CRIT
from fastmem.data.sample import MemorySample
from fastmem.eval.greedy import GreedyResult, greedy_check
from fastmem.eval.teacher_forcing import TokenScores, teacher_forced_scores

REPORT_NAME = "report.json"


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id])


@dataclass
class RecordResult:
    """Everything measured on one sample (per-token tensors in `scores`, on the CPU)."""

    name: str
    answer_ids: tuple[int, ...]
    scores: TokenScores
    greedy: GreedyResult | None
    stubborn: list[dict]

    @property
    def answer_len(self) -> int:
        return len(self.answer_ids)

    @property
    def token_acc(self) -> float:
        return float(self.scores.correct.float().mean())

    @property
    def exact_match(self) -> bool | None:
        return None if self.greedy is None else self.greedy.exact_match

    @property
    def first_error(self) -> int:
        return self.scores.first_error

    @property
    def min_prob(self) -> float:
        return float(self.scores.prob.min())

    @property
    def mean_loss(self) -> float:
        return float(self.scores.loss.double().mean())

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "answer_len": self.answer_len,
            "exact_match": self.exact_match,
            "greedy_first_divergence": None if self.greedy is None else self.greedy.first_divergence,
            "token_acc": self.token_acc,
            "first_error": self.first_error,
            "min_prob": self.min_prob,
            "mean_loss": self.mean_loss,
            "max_target_rank": int(self.scores.target_rank.max()),
            "n_stubborn": len(self.stubborn),
            "stubborn": self.stubborn,
        }


@dataclass
class EvalReport:
    records: list[RecordResult]
    tokenizer: object = None  # draws each token's text in the probability grids

    def totals(self) -> dict:
        tokens = sum(r.answer_len for r in self.records)
        correct = sum(int(r.scores.correct.sum()) for r in self.records)
        greedy_done = [r for r in self.records if r.exact_match is not None]
        n_exact = sum(bool(r.exact_match) for r in greedy_done)
        return {
            "records": len(self.records),
            "tokens": tokens,
            "exact_match": n_exact / len(greedy_done) if greedy_done else None,
            "n_exact_match": n_exact if greedy_done else None,
            "token_acc": correct / tokens,  # over all answer tokens
            "token_acc_mean": sum(r.token_acc for r in self.records) / len(self.records),
            "records_with_error": sum(r.first_error >= 0 for r in self.records),
            "n_stubborn": sum(len(r.stubborn) for r in self.records),
            "records_all_recalled": sum(not r.stubborn for r in self.records),
            "min_prob": min(r.min_prob for r in self.records),
            "mean_loss": sum(float(r.scores.loss.double().sum()) for r in self.records) / tokens,
        }

    def to_dict(self) -> dict:
        return {"records": [r.to_dict() for r in self.records], "totals": self.totals()}

    def write(self, out_dir: str | Path, *, grids: int = 16, grid_width: int = 50) -> Path:
        """Write `out_dir/report.json` and a probability-grid PNG for each of the first `grids`
        records (named in the record as "prob_grid"). Returns the report's path."""
        from fastmem.eval.plots import plot_probability_grid

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = self.to_dict()
        for i, (record, entry) in enumerate(zip(self.records[:max(grids, 0)], report["records"])):
            png = f"prob_grid_{i:03d}_{_file_safe(record.name)}.png"
            tokens = None if self.tokenizer is None else [_token_text(self.tokenizer, i) for i in record.answer_ids]
            plot_probability_grid(record.scores.prob, out / png, width=grid_width,
                                  first_error=record.first_error, title=_grid_title(record), tokens=tokens)
            entry["prob_grid"] = png
        path = out / REPORT_NAME
        path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "sample"


def _grid_title(record: RecordResult) -> str:
    em = "not run" if record.exact_match is None else ("yes" if record.exact_match else "no")
    return (f"{record.name or 'sample'}: {record.answer_len} tokens, token acc {record.token_acc:.3f}, "
            f"EM {em}, i* {record.first_error}, {len(record.stubborn)} with p ≤ 0.5")


def evaluate(model, samples: Sequence[MemorySample], tokenizer=None, *, batch_size: int = 4,
             greedy: bool = True, fast_fail: bool = True, progress: bool = True,
             chunk_size: int | None = None) -> EvalReport:
    """Score `samples` on `model` (a causal LM, PEFT-wrapped or not, frozen).

    Args:
        tokenizer: decodes stubborn tokens to text (ids are shown as "<id>" without it); its
            pad id pads greedy batches.
        batch_size: samples per forward (batched by similar length).
        greedy: run the greedy-decoding exact-match check (one decode step per answer token).
        fast_fail: stop each sample's greedy decoding at its first wrong token.
        chunk_size: token rows per chunk of the fused cross-entropy (None: its default).
    """
    scores = teacher_forced_scores(model, samples, batch_size=batch_size, progress=progress,
                                   chunk_size=chunk_size)
    greedy_results: list[GreedyResult | None] = [None] * len(samples)
    if greedy:
        pad = getattr(tokenizer, "pad_token_id", None)
        greedy_results = greedy_check(model, samples, batch_size=batch_size, fast_fail=fast_fail,
                                      pad_token_id=0 if pad is None else int(pad), progress=progress)
    records = []
    for sample, score, greedy_result in zip(samples, scores, greedy_results):
        stubborn_positions = (score.loss >= L_CRIT).nonzero().flatten().tolist()
        stubborn = [{"position": p, "token": _token_text(tokenizer, sample.answer_ids[p]),
                     "token_id": sample.answer_ids[p], "prob": float(score.prob[p])}
                    for p in stubborn_positions]
        records.append(RecordResult(name=sample.name, answer_ids=sample.answer_ids, scores=score,
                                    greedy=greedy_result, stubborn=stubborn))
    return EvalReport(records, tokenizer)
