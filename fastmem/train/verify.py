"""End-of-run checks through the evaluator: no second definition of exact match here.

Exact match and i* come from one eval-mode teacher-forced pass (fastmem/eval/exact_match.py:
every argmax right, ties wrong); a sample whose verdict hinges on a near tie is greedy-decoded
to confirm. The trainer's final pass, `exact_match` below and the stop rule's confirmation all
read the same TokenStats-based definition.
"""

from __future__ import annotations

from torch import nn

from fastmem.data.sample import MemorySample
from fastmem.eval.evaluator import EvalReport, evaluate


def verify(model: nn.Module, samples: list[MemorySample], *, decode: str = "auto", batch_size: int = 1,
           progress: bool = False) -> EvalReport:
    """The evaluator's report on `samples` (eval mode; the model's own mode is restored)."""
    return evaluate(model, samples, decode=decode, batch_size=batch_size, progress=progress)


def exact_match(model: nn.Module, samples: list[MemorySample], device=None) -> list[bool]:
    """Per sample: does greedy decoding reproduce every answer token, in order? (`device` is
    accepted for compatibility; the model's own device is used.)"""
    return [record.exact_match for record in verify(model, samples).records]
