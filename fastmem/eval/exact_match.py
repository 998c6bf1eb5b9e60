"""When one teacher-forced pass decides exact match and i*, and when a decode must confirm it.

The verdict itself is `TokenScores.exact_match` (eval/teacher_forcing.py: every argmax right);
the evaluator (`RecordResult.exact_match`, eval/evaluator.py) takes a decode's verdict instead
for the samples this module flags as near ties. The trainer's final pass and `fastmem eval`
both read the evaluator. This module holds why that is sound and the noise tolerance.

Greedy decoding reproduces the answer iff, under teacher forcing, every answer position's argmax
is its target (a tie counts as wrong): by induction each decode step sees exactly the
teacher-forced prefix. The first teacher-forced error is the greedy first divergence i*. The
fused op's stats give both (`correct`, `first_error`) without `[N, V]` logits.

The one caveat is numerical: a KV-cached decode and a full forward compute the same logits by
different kernels (other GEMM shapes, attention over a cache), so they agree only up to the
dtype's rounding noise. A position whose top-1 margin (target logit minus best other) is within
that noise may come out the other way when decoded; such a sample is decoded to confirm
(`near_tie_positions`; the evaluator decodes those with decode="auto"), and the report says so.

Noise tolerance, per position t: `MARGIN_NOISE_EPS[dtype] * eps(dtype) * max(1, |lse_t|)`.
Rounding errors are relative to the magnitude of what is rounded, so the noise on a logit
scales with the logits' size (|lse_t| is at least the largest logit) and with the dtype's
machine epsilon (torch.finfo: 2^-23 fp32, 2^-10 fp16, 2^-7 bf16).
- fp32 (and fp64), measured on SmolLM2 (CPU; 2 x 400 greedy tokens, KV-cached decode vs one
  full forward; benchmarks/margin_noise.py, benchmarks/results/margin_noise_smollm2_cpu.json):
  the largest |margin difference| / max(1, |target logit|) was 6.3e-6 = 53 eps (logits differed
  by at most 7.5e-5). 2^10 eps keeps a factor ~19 over that worst case: at SmolLM2's logit
  scale (|lse| ~ 20) margins below ~2.4e-3 are confirmed by decoding.
- bf16 / fp16: the GEMMs accumulate in fp32, so the two paths differ mostly where an activation
  rounds to the other side of a low-precision step, i.e. by a few of the dtype's ulps, not by
  accumulation order; 2^4 eps gives 2.5 logits (bf16) and 0.31 (fp16) at |lse| ~ 20, i.e. 20
  and 320 of their rounding steps at that scale. Not measured yet (CPU bf16 runs did not finish
  on the shared machine): pending a GPU run of benchmarks/margin_noise.py.
"""

from __future__ import annotations

import torch

# How many machine epsilons of the logit scale a decode may differ from a full forward by.
MARGIN_NOISE_EPS = {torch.float64: 2.0 ** 10, torch.float32: 2.0 ** 10,
                    torch.bfloat16: 2.0 ** 4, torch.float16: 2.0 ** 4}


def margin_tolerance(dtype: torch.dtype, lse: torch.Tensor) -> torch.Tensor:
    """Per-position noise tolerance of the top-1 margin for logits computed in `dtype`."""
    if dtype not in MARGIN_NOISE_EPS:
        raise ValueError(f"no margin noise tolerance for {dtype}; known: {sorted(map(str, MARGIN_NOISE_EPS))}")
    return MARGIN_NOISE_EPS[dtype] * torch.finfo(dtype).eps * lse.abs().clamp(min=1.0)


def decisive_positions(first_error: int, length: int) -> slice:
    """The positions whose argmax decides EM and i*: all of them when there is no error, else
    0..i* (after i* a decode no longer sees the teacher-forced prefix)."""
    return slice(0, length if first_error < 0 else first_error + 1)


def near_tie_positions(margin: torch.Tensor, lse: torch.Tensor, first_error: int, dtype: torch.dtype) -> torch.Tensor:
    """Indices of decisive positions whose |margin| is within the dtype's noise."""
    span = decisive_positions(first_error, margin.numel())
    close = margin[span].abs() <= margin_tolerance(dtype, lse[span])
    return close.nonzero().flatten()
