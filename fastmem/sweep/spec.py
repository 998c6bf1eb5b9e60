"""A sweep: the grid rank × length × objective × data (× seed) and the fixed budget of each cell."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fastmem.config_file import load_settings
from fastmem.errors import UsageError

DATA_KINDS = ("stress", "phonebook")
# TrainConfig settings a cell takes from the grid and the spec's own fields (sweep/worker.py
# cell_config), so a [train] table cannot set them.
SWEEP_OWNED = frozenset({"model", "objective", "rank", "alpha", "dropout", "modules", "layers", "lr", "max_steps",
                         "seed", "batch_size", "curriculum", "stop_on_recall", "progress", "out", "threshold"})


@dataclass(frozen=True)
class Cell:
    """One trainer run of the sweep. `key` names it in the results database."""

    model: str
    data: str  # "stress" or "phonebook"
    ratio: float  # stress test: fraction of random tokens; phonebook: 0
    length: int  # answer tokens (stress) or book size in answer tokens (phonebook)
    rank: int
    objective: str
    seed: int

    @property
    def key(self) -> str:
        return (f"{self.model}|{self.data}|rho={self.ratio:g}|len={self.length}|rank={self.rank}"
                f"|{self.objective}|seed={self.seed}")

    @property
    def slug(self) -> str:
        """A directory name for the cell: readable, and unique through a hash of the key (two
        model paths may share a basename)."""
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.model.rstrip("/")).name) or "model"
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:8]
        return (f"{model}-{self.data}-rho{self.ratio:g}-len{self.length}-r{self.rank}-{self.objective}"
                f"-s{self.seed}-{digest}")


def _is(value, kind) -> bool:
    """`value` is of `kind` (a bool is no number; an int is a float)."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


@dataclass
class SweepSpec:
    """Grid and budget. Defaults: a small CPU grid on the embedded SmolLM2 (issue 7)."""

    model: str = "smollm2"
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    lengths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    objectives: list[str] = field(default_factory=lambda: ["sft"])
    data: list[str] = field(default_factory=lambda: ["stress"])
    ratios: list[float] = field(default_factory=lambda: [0.25])
    seeds: list[int] = field(default_factory=lambda: [42])
    max_steps: int = 100  # the fixed budget of every cell
    lr: float = 1e-2
    alpha_per_rank: float = 2.0  # lora_alpha = alpha_per_rank * rank: the same LoRA scale s at every rank
    dropout: float = 0.1
    layers: list[int] | None = None  # None: the trainer's default (two upper-middle layers)
    modules: list[str] = field(default_factory=lambda: ["down_proj"])
    threshold: float | None = None  # MemFT weighting threshold; None: TrainConfig's default (0.1)
    stop_on_recall: bool = False  # the law wants the loss after a fixed budget, not at first recall
    # After training, greedy-decode every sample as an independent check of the teacher-forced
    # verdict (the paper's recall claim: every token at p > 0.5 => exact greedy recall). Costs
    # one decode step per answer token; off: samples are decoded only to settle near ties.
    decode_check: bool = False
    # Samples per step; 0: every sample of the cell in one batch, so a step is an epoch for a
    # PhoneBook cell as for a one-sample stress cell (the fixed budget means the same for both).
    batch_size: int = 0
    curriculum: bool = False  # the Inter-Batch Temporal Curriculum (multi-sample cells, MemFT-OT)
    # Where each cell writes its adapter (`<adapters>/<cell.slug>/adapter`, safetensors), by the
    # process that trained it: shared storage under Ray. None: adapters are not kept.
    adapters: str | None = None
    # Positions a cell needs past the model's own context: RoPE-scaled (fastmem.rope_scaling).
    context: int | None = None
    # More TrainConfig settings, the same for every cell (a TOML [train] table), e.g. the authors'
    # protocol: max_grad_norm, adapter, curriculum_loader, stop_on (issue 22). The grid's own
    # settings (SWEEP_OWNED) are set above, not here.
    train: dict = field(default_factory=dict)

    def adapter_dir(self, cell: Cell) -> str | None:
        return None if self.adapters is None else str(Path(self.adapters) / cell.slug)

    def validate(self) -> None:
        for name, kind in (("ranks", int), ("lengths", int), ("seeds", int), ("ratios", float),
                           ("objectives", str), ("data", str)):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(_is(v, kind) for v in values):
                raise UsageError(f"sweep {name} must be a list of {kind.__name__}s, got {values!r}")
            if not values and name != "ratios":
                raise UsageError(f"sweep {name} must not be empty")
        for name in ("max_steps", "batch_size"):
            if not _is(getattr(self, name), int):
                raise UsageError(f"sweep {name} must be an int, got {getattr(self, name)!r}")
        if any(r < 1 for r in self.ranks):
            raise UsageError(f"sweep ranks must be >= 1, got {self.ranks}")
        if any(n < 1 for n in self.lengths):
            raise UsageError(f"sweep lengths must be >= 1, got {self.lengths}")
        from fastmem.train.config import OBJECTIVES

        if any(objective not in OBJECTIVES for objective in self.objectives):
            raise UsageError(f"sweep objectives must be among {OBJECTIVES}, got {self.objectives}")
        if any(kind not in DATA_KINDS for kind in self.data):
            raise UsageError(f"sweep data kinds (--dataset) must be among {DATA_KINDS}, got {self.data}")
        if any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise UsageError(f"sweep ratios must lie in [0, 1], got {self.ratios}")
        if self.batch_size < 0:
            raise UsageError(f"batch_size must be >= 0 (0: every sample of a cell), got {self.batch_size}")
        if self.max_steps < 1:
            raise UsageError(f"max_steps must be >= 1, got {self.max_steps}")
        from fastmem.train.config import TrainConfig

        if not isinstance(self.train, dict):
            raise UsageError(f"sweep train must be a table of TrainConfig settings, got {type(self.train).__name__}")
        allowed = {f.name for f in fields(TrainConfig)} - SWEEP_OWNED
        unknown = sorted(set(self.train) - allowed)
        if unknown:
            raise UsageError(f"sweep train setting(s) {unknown} not allowed: the grid sets "
                             f"{sorted(SWEEP_OWNED & set(unknown)) or 'none of them'}; allowed: {sorted(allowed)}")

    def cells(self) -> list[Cell]:
        self.validate()
        found = []
        for kind, length, rank, objective, seed in itertools.product(self.data, self.lengths, self.ranks,
                                                                     self.objectives, self.seeds):
            for ratio in (self.ratios if kind == "stress" else [0.0]):
                found.append(Cell(self.model, kind, float(ratio), int(length), int(rank), objective, int(seed)))
        return found

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "SweepSpec":
        """Read a YAML (.yaml/.yml) or TOML (.toml) file of SweepSpec fields; flags override it."""
        values = load_settings(path, cls, "sweep")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
