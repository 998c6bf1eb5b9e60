"""LossSpec: every option of the fused loss in one frozen value, validated once.

The same object (same field names) travels from `linear_cross_entropy` through
`FusedLinearMemFTLoss`, `apply_fastmem`, `TrainConfig.loss_spec()` and the fast engine into the
custom op, where it crosses the dispatcher as one string (`op_arg`) instead of a row of
flattened scalars. Field names are TrainConfig's where they mean the same thing (`sw_kappa`,
not `kappa`), so nothing is renamed on the way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from fastmem.constants import IGNORE_INDEX, L_CRIT, MEMFT_EPS, SW_FLOOR, SW_KAPPA, SW_TAU, SW_WINDOW
from fastmem.ops.memft_weights import OBJECTIVES, MemFTConfig

REDUCTIONS = ("mean", "sum", "none")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    # `value != value` and the infinity comparisons, not math.isfinite: a spec built inside a
    # torch.compile region may see a symbolic float, which math.isfinite cannot take.
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _optional_positive_int(name: str, value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


@dataclass(frozen=True)
class LossSpec:
    """The fused loss's options (see `fastmem.linear_cross_entropy` for their meaning).

    objective: "sft" | "ot" | "sw".  threshold: MemFT's weighting line on L_t (> 0).
    eps: normaliser guard, sum(w) + eps (> 0).  sw_kappa, sw_tau (> 0), sw_window (> 0,
    the default per-sample window; a per-call window tensor replaces it), sw_floor (in [0, 1]):
    MemFT-SW's constants.  softcap (>= 0, 0 = off), label_smoothing (in [0, 1]),
    lse_square_scale (>= 0): logit options.  reduction: "mean" | "sum" | "none".
    ignore_index: label of tokens without loss.  chunk_size / max_chunk_bytes: chunking
    (None: the rule in chunk_loop.chunk_rows_for).  entropy: compute TokenStats.entropy (the
    Triton and CUDA kernels carry it in their online pass for free; on the torch backend it
    costs one more in-cache pass per chunk, see docs/design.md section 8); False leaves
    `TokenStats.entropy` None.  greedy_stats: compute TokenStats.correct and .margin (the
    runner-up logit: one more pass over each chunk on the torch backend; MemFT-SW computes
    them regardless, its weights read the first error). `linear_cross_entropy` turns both
    off when `return_stats=False`, and refuses `return_stats=True` with greedy_stats off.
    """

    objective: str = "sft"
    threshold: float = L_CRIT
    eps: float = MEMFT_EPS
    sw_kappa: float = SW_KAPPA
    sw_tau: float = SW_TAU
    sw_window: float = float(SW_WINDOW)
    sw_floor: float = SW_FLOOR
    softcap: float = 0.0
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    reduction: str = "mean"
    ignore_index: int = IGNORE_INDEX
    chunk_size: int | None = None
    max_chunk_bytes: int | None = None
    entropy: bool = True
    greedy_stats: bool = True

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        set_field = functools.partial(object.__setattr__, self)
        set_field("softcap", 0.0 if self.softcap is None else self.softcap)
        for name in ("threshold", "eps", "sw_kappa", "sw_tau", "sw_floor", "softcap", "label_smoothing",
                     "lse_square_scale"):
            set_field(name, _number(name, getattr(self, name)))
        if self.threshold <= 0:
            raise ValueError(f"threshold must be > 0 (a loss level; ln 2 = p 0.5), got {self.threshold}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps sum(w) + eps away from 0 when no token is active), "
                             f"got {self.eps}")
        if self.sw_kappa <= 0:
            raise ValueError(f"sw_kappa must be > 0, got {self.sw_kappa}")
        if self.sw_tau <= 0:
            raise ValueError(f"sw_tau must be > 0, got {self.sw_tau}")
        if isinstance(self.sw_window, bool) or not isinstance(self.sw_window, (int, float)) or not self.sw_window > 0:
            raise ValueError(f"sw_window must be a positive number (or inf), got {self.sw_window!r}")
        set_field("sw_window", float(self.sw_window))
        if not 0.0 <= self.sw_floor <= 1.0:
            raise ValueError(f"sw_floor must be in [0, 1], got {self.sw_floor}")
        if self.softcap < 0:
            raise ValueError(f"softcap must be > 0 (or None / 0 for off), got {self.softcap}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if self.lse_square_scale < 0:
            raise ValueError(f"lse_square_scale must be >= 0, got {self.lse_square_scale}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _optional_positive_int("chunk_size", self.chunk_size)
        _optional_positive_int("max_chunk_bytes", self.max_chunk_bytes)

    @classmethod
    def from_options(cls, base: "LossSpec | None" = None, **options) -> "LossSpec":
        """`base` (or the defaults) with `options` replaced; an unknown name is a TypeError that
        lists the valid ones."""
        if base is not None and not options:
            return base  # passed unchanged
        unknown = sorted(set(options) - set(FIELD_NAMES))
        if unknown:
            raise TypeError(f"unknown loss option(s) {unknown}; LossSpec fields are {FIELD_NAMES}")
        return dataclasses.replace(base or cls(), **options)

    @property
    def weighted(self) -> bool:
        """The normaliser is sum(w) + eps (MemFT), not the token count."""
        return self.objective != "sft"

    @property
    def memft(self) -> MemFTConfig:
        return MemFTConfig(self.objective, self.threshold, self.eps, self.sw_kappa, self.sw_tau, self.sw_floor)

    @property
    def op_arg(self) -> str:
        """The spec as the custom op's one string argument (a graph constant under compile).

        Floats go as float.hex (exact, and traceable: under `torch.compile(dynamic=True)` a
        float read from a closure may be symbolic, and dynamo can repr neither it nor a tuple
        holding it; `float(x).hex()` specializes it instead). None is "-"."""
        parts = []
        for name in FIELD_NAMES:
            value = getattr(self, name)
            if value is None:
                text = "-"
            elif name in _FLOAT_FIELDS:
                text = float(value).hex()
            elif name in _INT_FIELDS:
                text = str(int(value))
            elif name in _BOOL_FIELDS:
                text = "1" if value else "0"
            else:
                text = value
            parts.append(name + "=" + text)
        return ";".join(parts)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(LossSpec))
_FLOAT_FIELDS = ("threshold", "eps", "sw_kappa", "sw_tau", "sw_window", "sw_floor", "softcap", "label_smoothing",
                 "lse_square_scale")
_INT_FIELDS = ("ignore_index", "chunk_size", "max_chunk_bytes")
_BOOL_FIELDS = ("entropy", "greedy_stats")


@functools.lru_cache(maxsize=64)
def spec_from_op_arg(arg: str) -> LossSpec:
    """Inverse of LossSpec.op_arg."""
    fields = {}
    for part in arg.split(";"):
        name, text = part.split("=", 1)
        if text == "-":
            fields[name] = None
        elif name in _FLOAT_FIELDS:
            fields[name] = float.fromhex(text)
        elif name in _INT_FIELDS:
            fields[name] = int(text)
        elif name in _BOOL_FIELDS:
            fields[name] = text == "1"
        else:
            fields[name] = text
    return LossSpec(**fields)
