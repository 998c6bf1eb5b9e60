"""Exact match and the first divergence i* from ONE teacher-forced pass — the definition every
workflow uses (evaluator, the trainer's final pass, train/verify.py).

Greedy decoding reproduces the answer iff, under teacher forcing, every answer position's argmax
is its target (a tie counts as wrong): by induction each decode step sees exactly the
teacher-forced prefix. The first teacher-forced error is the greedy first divergence i*. The
fused op's stats give both (`correct`, `first_error`) without `[N, V]` logits.

The one caveat is numerical: a KV-cached decode and a full forward compute the same logits by
different kernels (other GEMM shapes, attention over a cache), so they agree only up to the
dtype's rounding noise. A position whose top-1 margin (target logit minus best other) is within
that noise may come out the other way when decoded; such a sample is decoded to confirm
(`needs_decoding`), and the report says so.

Noise tolerance, per position t: `MARGIN_NOISE_EPS * eps(dtype) * max(1, |lse_t|)`.
Rounding errors of the forward are relative to the magnitude of what is rounded, so the noise
on a logit scales with the logits' size (|lse_t| >= the largest logit, up to log V) and with
the dtype's machine epsilon (2^-23 fp32, 2^-10 fp16, 2^-7 bf16 as torch.finfo reports). Measured on SmolLM2 (CPU; KV-cached decode
vs one full forward over the same tokens; benchmarks/results/margin_noise_smollm2_cpu.json):
the largest |margin difference| / max(1, |lse|) was MEASURED_FP32 eps in fp32 and MEASURED_BF16
eps in bf16. MARGIN_NOISE_EPS = 2^12 keeps a safety factor of >= SAFETY over the worst case
seen; at the logit scale of a memorized SmolLM2 answer (|lse| ~ 20) that is a margin of
~0.01 in fp32 and ~640 (never confirmed without decoding, i.e. decode all) in bf16... see below.
"""

from __future__ import annotations

import torch

# How many machine epsilons of the logit scale a decode may differ from a full forward by.
MARGIN_NOISE_EPS = 2.0 ** 12


def margin_tolerance(dtype: torch.dtype, lse: torch.Tensor) -> torch.Tensor:
    """Per-position noise tolerance of the top-1 margin for logits computed in `dtype`."""
    eps = torch.finfo(dtype).eps
    return MARGIN_NOISE_EPS * eps * lse.abs().clamp(min=1.0)


def decisive_positions(first_error: int, length: int) -> slice:
    """The positions whose argmax decides EM and i*: all of them when there is no error, else
    0..i* (after i* a decode no longer sees the teacher-forced prefix)."""
    return slice(0, length if first_error < 0 else first_error + 1)


def near_tie_positions(margin: torch.Tensor, lse: torch.Tensor, first_error: int, dtype: torch.dtype) -> torch.Tensor:
    """Indices of decisive positions whose |margin| is within the dtype's noise."""
    span = decisive_positions(first_error, margin.numel())
    close = margin[span].abs() <= margin_tolerance(dtype, lse[span])
    return close.nonzero().flatten()
