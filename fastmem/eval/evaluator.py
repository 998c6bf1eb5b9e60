"""Evaluate memorized samples: exact match and i* from one teacher-forced pass, token accuracy,
top-1 margins, stubborn tokens; greedy decoding to confirm near ties or on request.

Definitions (the paper "How LoRA Remembers?", fastmem/eval/exact_match.py): token accuracy = teacher-forced
greedy-argmax matches / answer length; exact match = greedy decoding from the prompt reproduces
the whole answer, decided from one teacher-forced pass (every argmax right, ties wrong); i*
(`first_error`) = the first answer position whose greedy prediction is wrong (-1 if none);
stubborn tokens = answer tokens with p <= 0.5 (L >= ln 2), which greedy decoding does not
reliably recall. A sample whose decisive margins lie within the dtype's noise is decoded to
confirm, and its EM / i* are then the decode's (`confirmed_by_decoding`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fastmem.data.sample import MemorySample
from fastmem.eval.exact_match import decisive_positions, margin_tolerance, near_tie_positions
from fastmem.eval.greedy import GreedyResult, greedy_check
from fastmem.eval.teacher_forcing import TokenScores, teacher_forced_scores
from fastmem.files import write_json_atomic

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"
# decode="auto": only samples with a near tie; "all": every sample (an independent check); "none": never.
DECODE_MODES = ("auto", "all", "none")


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    from fastmem.eval.plots import token_label  # a split multi-byte character as its bytes, not "\ufffd"

    return token_label(tokenizer, token_id)


@dataclass
class RecordResult:
    """Everything measured on one sample (per-token tensors in `scores`, on the CPU).

    `greedy` holds the decode when the sample was decoded: `decode_reason` "near_tie" (a
    decisive margin within the dtype's noise: decoded to confirm) or "requested" (decode="all").
    `near_ties`: the decisive positions whose |margin| is within that noise.
    """

    name: str
    answer_ids: tuple[int, ...]
    scores: TokenScores
    greedy: GreedyResult | None
    stubborn: list[dict]
    near_ties: list[int] = field(default_factory=list)
    decode_reason: str | None = None

    @property
    def answer_len(self) -> int:
        return len(self.answer_ids)

    @property
    def token_acc(self) -> float:
        return float(self.scores.correct.float().mean())

    @property
    def exact_match(self) -> bool:
        """Greedy decoding reproduces the answer: the decode's verdict when the sample was
        decoded, else the teacher-forced one (every argmax right)."""
        return self.greedy.exact_match if self.greedy is not None else self.scores.exact_match

    @property
    def first_error(self) -> int:
        """i*: the first greedy divergence (-1 if none), from the same source as exact_match."""
        return self.greedy.first_divergence if self.greedy is not None else self.scores.first_error

    @property
    def confirmed_by_decoding(self) -> bool:
        return self.decode_reason == "near_tie"

    @property
    def decode_agrees(self) -> bool | None:
        """Decoded EM and i* equal the teacher-forced ones (None: not decoded)."""
        if self.greedy is None:
            return None
        return (self.greedy.exact_match, self.greedy.first_divergence) == (self.scores.exact_match,
                                                                          self.scores.first_error)

    @property
    def min_margin(self) -> float:
        """Smallest top-1 margin over the positions that decide EM and i* (0..i*, or all)."""
        span = decisive_positions(self.scores.first_error, self.answer_len)
        return float(self.scores.margin[span].min())

    @property
    def min_prob(self) -> float:
        return float(self.scores.prob.min())

    @property
    def mean_loss(self) -> float:
        return float(self.scores.loss.double().mean())

    def to_dict(self) -> dict:
        tolerance = margin_tolerance(self.scores.dtype, self.scores.lse)
        return {
            "name": self.name,
            "answer_len": self.answer_len,
            "exact_match": self.exact_match,
            "first_error": self.first_error,
            "decided_by": "decoding" if self.greedy is not None else "teacher_forcing",
            "confirmed_by_decoding": self.confirmed_by_decoding,
            "decode_reason": self.decode_reason,
            "teacher_forced": {"exact_match": self.scores.exact_match, "first_error": self.scores.first_error},
            "greedy_first_divergence": None if self.greedy is None else self.greedy.first_divergence,
            "decode_agrees": self.decode_agrees,
            "token_acc": self.token_acc,
            "min_prob": self.min_prob,
            "mean_loss": self.mean_loss,
            "min_margin": self.min_margin,
            "near_ties": [{"position": p, "margin": float(self.scores.margin[p]),
                           "tolerance": float(tolerance[p])} for p in self.near_ties],
            "max_target_rank": int(self.scores.target_rank.max()),
            "n_stubborn": len(self.stubborn),
            "stubborn": self.stubborn,
            "margin": [round(float(m), 4) for m in self.scores.margin],
        }


@dataclass
class EvalReport:
    records: list[RecordResult]
    tokenizer: object = None  # draws each token's text in the probability grids
    timing: dict = field(default_factory=dict)  # wall seconds: teacher_forcing_s, decoding_s
    model: dict | None = None  # the model's context and RoPE scaling (fastmem.rope_scaling.context_record)

    def totals(self) -> dict:
        tokens = sum(r.answer_len for r in self.records)
        correct = sum(int(r.scores.correct.sum()) for r in self.records)
        n_exact = sum(r.exact_match for r in self.records)
        decoded = [r for r in self.records if r.greedy is not None]
        return {
            "records": len(self.records),
            "tokens": tokens,
            "exact_match": n_exact / len(self.records),
            "n_exact_match": n_exact,
            "token_acc": correct / tokens,  # over all answer tokens
            "token_acc_mean": sum(r.token_acc for r in self.records) / len(self.records),
            "records_with_error": sum(r.first_error >= 0 for r in self.records),
            "n_stubborn": sum(len(r.stubborn) for r in self.records),
            "records_all_recalled": sum(not r.stubborn for r in self.records),
            "min_prob": min(r.min_prob for r in self.records),
            "min_margin": min(r.min_margin for r in self.records),
            "mean_loss": sum(float(r.scores.loss.double().sum()) for r in self.records) / tokens,
            "decoded": len(decoded),
            "confirmed_by_decoding": [r.name for r in self.records if r.confirmed_by_decoding],
            "near_tie_unconfirmed": [r.name for r in self.records if r.near_ties and r.greedy is None],
            "decode_disagreements": [r.name for r in decoded if not r.decode_agrees],
        }

    def to_dict(self) -> dict:
        return {"records": [r.to_dict() for r in self.records], "totals": self.totals(), "timing": self.timing,
                "model": self.model}

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
        return write_json_atomic(path, report, indent=1)  # a killed eval never leaves half a report


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "sample"


def _grid_title(record: RecordResult) -> str:
    em = "yes" if record.exact_match else "no"
    return (f"{record.name or 'sample'}: {record.answer_len} tokens, token acc {record.token_acc:.3f}, "
            f"EM {em}, i* {record.first_error}, {len(record.stubborn)} with p ≤ 0.5")


def evaluate(model, samples: Sequence[MemorySample], tokenizer=None, *, batch_size: int = 4,
             decode: str = "auto", fast_fail: bool = True, progress: bool = True,
             chunk_size: int | None = None) -> EvalReport:
    """Score `samples` on `model` (a causal LM, PEFT-wrapped or not, frozen).

    EM and i* come from one teacher-forced pass (fastmem/eval/exact_match.py); greedy decoding
    (one step per answer token) runs only where it is needed or asked for.

    Args:
        tokenizer: decodes stubborn tokens to text (ids are shown as "<id>" without it); its
            pad id pads greedy batches.
        batch_size: samples per forward (batched by similar length).
        decode: "auto" decodes the samples with a near tie (a decisive margin within the
            dtype's noise) to confirm them; "all" decodes every sample as an independent check
            of the teacher-forced verdict; "none" never decodes (near ties are reported
            unconfirmed).
        fast_fail: stop each sample's greedy decoding at its first wrong token.
        chunk_size: token rows per chunk of the fused cross-entropy (None: its default).
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    start = time.perf_counter()
    scores = teacher_forced_scores(model, samples, batch_size=batch_size, progress=progress,
                                   chunk_size=chunk_size)
    timing = {"teacher_forcing_s": time.perf_counter() - start, "decoding_s": 0.0}
    near_ties = [near_tie_positions(s.margin, s.lse, s.first_error, s.dtype).tolist() for s in scores]
    reasons: list[str | None] = [None] * len(samples)
    for i, ties in enumerate(near_ties):
        if decode == "all":
            reasons[i] = "requested"
        elif decode == "auto" and ties:
            reasons[i] = "near_tie"
    greedy_results: list[GreedyResult | None] = [None] * len(samples)
    to_decode = [i for i, reason in enumerate(reasons) if reason is not None]
    if to_decode:
        start = time.perf_counter()
        pad = getattr(tokenizer, "pad_token_id", None)
        decoded = greedy_check(model, [samples[i] for i in to_decode], batch_size=batch_size, fast_fail=fast_fail,
                               pad_token_id=0 if pad is None else int(pad), progress=progress)
        for i, result in zip(to_decode, decoded):
            greedy_results[i] = result
        timing["decoding_s"] = time.perf_counter() - start
    records = []
    for sample, score, greedy_result, ties, reason in zip(samples, scores, greedy_results, near_ties, reasons):
        stubborn_positions = score.stubborn_mask().nonzero().flatten().tolist()
        stubborn = [{"position": p, "token": _token_text(tokenizer, sample.answer_ids[p]),
                     "token_id": sample.answer_ids[p], "prob": float(score.prob[p]),
                     "margin": float(score.margin[p])}
                    for p in stubborn_positions]
        record = RecordResult(name=sample.name, answer_ids=sample.answer_ids, scores=score, greedy=greedy_result,
                              stubborn=stubborn, near_ties=ties, decode_reason=reason)
        if record.decode_agrees is False:
            log.warning("%s: greedy decoding (EM %s, i* %d) differs from the teacher-forced pass (EM %s, i* %d); "
                        "the report takes the decode's", sample.name, record.greedy.exact_match,
                        record.greedy.first_divergence, score.exact_match, score.first_error)
        records.append(record)
    return EvalReport(records, tokenizer, timing)
