"""The fused cross-entropy's test table: one row per (backend, dtype, objective, options) case.

PyTorch's OpInfo is the model: the generic tests in test_cross_entropy_table.py iterate these
rows against one float64 oracle (cross_entropy_oracle.py), with the tolerance per dtype written
once, and each row says which generic checks apply to it and, when it cannot run here, why.
The CUDA rows are the same rows with backend="cuda": on a machine without a GPU they carry
their skip reason instead of being a separate suite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastmem.backends import triton_installed, triton_interpreting
from tests.conftest import DEVICE
from tests.ops.cross_entropy_oracle import oracle_loss

# Relative error (norm of the difference / norm of the oracle), per dtype: (loss and stats, gradients).
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 2e-2),
       torch.bfloat16: (4e-2, 6e-2)}
CHECKS = frozenset({"oracle", "gradcheck", "opcheck", "compile", "syncs"})


@dataclass(frozen=True)
class CeCase:
    backend: str
    dtype: torch.dtype
    objective: str = "sft"
    reduction: str = "mean"
    ignore: str = "some"  # "none" | "some" | "all" labels set to ignore_index
    options: tuple = ()  # further LossSpec fields as (name, value) pairs
    bias: bool = False
    train_head: bool = False
    token_weights: bool = False
    per_sample_window: bool = False
    checks: frozenset = field(default=CHECKS)

    @property
    def id(self) -> str:
        parts = [self.backend, str(self.dtype).replace("torch.", ""), self.objective, self.reduction,
                 f"ignore-{self.ignore}"]
        parts += [f"{name}={value}" for name, value in self.options]
        parts += [flag for flag in ("bias", "train_head", "token_weights", "per_sample_window") if getattr(self, flag)]
        return "-".join(parts)

    @property
    def tol(self) -> tuple[float, float]:
        return TOL[self.dtype]

    def skip_reason(self) -> str | None:
        if self.backend == "cuda" and not torch.cuda.is_available():
            return "backend='cuda' needs a CUDA GPU (none here): pending on a GPU machine"
        if self.backend == "triton":
            if not triton_installed():
                return "triton is not installed"
            if DEVICE.type != "cuda" and not triton_interpreting():
                return "triton needs a GPU or TRITON_INTERPRET=1"
            if self.dtype == torch.float64:
                return "triton has no float64 path"
        return None

    def inputs(self, seed: int = 0, *, batch: int = 2, seq: int = 23, hidden_size: int = 24, vocab: int = 131):
        """(hidden, weight, bias, labels, kwargs) on the CPU; kwargs are linear_cross_entropy's
        loss options and per-call tensors, the same for the oracle."""
        hidden, weight, bias, labels = make_case(self.dtype, batch=batch, seq=seq, hidden_size=hidden_size,
                                                 vocab=vocab, ignore=self.ignore, seed=seed)
        kwargs = dict(objective=self.objective, reduction=self.reduction, **dict(self.options))
        if self.objective != "sft":
            kwargs["threshold"] = pick_threshold(hidden, weight, labels)
        if self.token_weights:
            kwargs["token_weights"] = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed + 7)) * 2
        if self.per_sample_window:
            kwargs["window"] = torch.linspace(3.0, 50.0, batch)
        return hidden, weight, bias if self.bias else None, labels, kwargs


def make_case(dtype, *, batch=2, seq=23, hidden_size=24, vocab=131, ignore="some", seed=0, correct_fraction=0.6):
    """Hidden states, head, bias and labels where ~60% of labels are the greedy argmax, so
    samples have first errors at varied positions; vocab 131 is not a multiple of any tile."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * (3.0 / math.sqrt(hidden_size))
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.1
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    logits = hidden.double() @ weight.double().t()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    take_argmax = torch.rand(batch, seq, generator=gen) < correct_fraction
    labels = torch.where(take_argmax, logits.argmax(-1), labels)
    if ignore == "some":
        labels[0, :3] = -100
        labels[1, seq // 3] = -100
        labels[1, -1] = -100
    elif ignore == "all":
        labels[:] = -100
    return hidden, weight, bias, labels


def pick_threshold(hidden, weight, labels) -> float:
    """A weighting threshold in the middle of the widest gap of the token losses, so that
    rounding in fp16/bf16 cannot move a token across it."""
    _, per_token, _ = oracle_loss(hidden.double(), weight.double(), labels)
    losses = per_token["loss"][per_token["valid"]].sort().values
    if losses.numel() < 4:
        return math.log(2)
    lo, hi = int(losses.numel() * 0.2), int(losses.numel() * 0.8)
    gaps = losses[lo + 1:hi + 1] - losses[lo:hi]
    k = int(gaps.argmax())
    return float(losses[lo + k] + gaps[k] / 2)


def _rows() -> list[CeCase]:
    rows = []
    for backend in ("torch", "triton", "cuda"):
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            for objective in ("sft", "ot", "sw"):
                rows.append(CeCase(backend, dtype, objective))
        f32 = torch.float32
        rows += [
            CeCase(backend, f32, "sft", ignore="none"),
            CeCase(backend, f32, "ot", ignore="all"),
            CeCase(backend, f32, "sw", reduction="sum", bias=True, train_head=True),
            CeCase(backend, f32, "sft", reduction="none", bias=True, train_head=True),
            CeCase(backend, f32, "ot", reduction="none"),
            CeCase(backend, f32, "sw", token_weights=True, per_sample_window=True,
                   options=(("sw_tau", 5.0), ("sw_floor", 0.05))),
            CeCase(backend, f32, "sft", token_weights=True),
            CeCase(backend, f32, "sft", options=(("softcap", 3.0),)),
            CeCase(backend, f32, "ot", options=(("label_smoothing", 0.1), ("lse_square_scale", 1e-3))),
            CeCase(backend, f32, "sw", options=(("softcap", 3.0), ("label_smoothing", 0.2), ("lse_square_scale", 1e-2)),
                   bias=True, train_head=True),
        ]
    return rows


CASES = _rows()


def cases_for(check: str, *, backends=("torch", "triton", "cuda"), dtypes=None) -> list[CeCase]:
    """The rows a generic test runs (skipped ones included: they report their reason)."""
    return [c for c in CASES if check in c.checks and c.backend in backends and (dtypes is None or c.dtype in dtypes)]
