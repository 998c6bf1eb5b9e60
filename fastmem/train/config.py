"""TrainConfig: every setting of a memorization run, with the paper's defaults ("How LoRA Remembers?")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fastmem.constants import L_CRIT, MEMFT_EPS, SW_FLOOR, SW_KAPPA, SW_TAU, SW_WINDOW
from fastmem.ops.cross_entropy import LossSpec

OBJECTIVES = ("sft", "ot", "sw")
ENGINES = ("fast", "hf")
DISTRIBUTED = ("ddp", "fsdp2")

# The paper's stress-test budget: 2000 epochs at batch 1.
PAPER_EPOCHS = 2000


def default_layers(num_layers: int) -> list[int]:
    """Two upper-middle layers: 2/3 and 4/5 of the depth (SmolLM2's 30 layers -> [20, 24],
    the pair docs/design.md's measurements use; the paper adapts 18/20 or 20/24 of 32-36)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    picks = {min(num_layers * 2 // 3, num_layers - 1), min(num_layers * 4 // 5, num_layers - 1)}
    return sorted(picks)


# MemFT's weighting threshold in the trainer (the op's own default stays ln 2, the paper's).
DEFAULT_THRESHOLD = 0.1
# Settings a run can only be resumed under (the rest — progress bar, checkpoint interval,
# greedy check, prefix cache — may change between the interrupted and the resumed process).
# One list for the trainer's checkpoint check and `fastmem train`'s run-directory check.
RESUME_MUST_MATCH = ("model", "objective", "rank", "alpha", "dropout", "modules", "layers", "lr",
                     "weight_decay", "max_grad_norm", "batch_size", "epochs", "max_steps", "threshold",
                     "eps", "sw_kappa", "sw_tau", "sw_window", "sw_floor", "curriculum",
                     "curriculum_ratios", "curriculum_boundaries", "stop_on_recall", "seed", "engine")


@dataclass
class TrainConfig:
    """One memorization run.

    `threshold` is MemFT's weighting threshold (OT: weight tokens with L_t > threshold; SW:
    the sigmoid's centre). Recall is a separate, fixed line: p > 0.5 (L_t < ln 2), used by
    the stop rule and every metric. The default is 0.1, not the paper's ln 2, from the
    threshold study of issue 15 (SmolLM2, rank 8, 256 answer tokens, real text / 25% random
    tokens / PhoneBook, `docs/reproduction.md` section 4, databases in
    benchmarks/results/reproduce/cpu/threshold_*.sqlite): at ln 2 a token pushed just under
    the recall line leaves the objective and drifts back, so OT needed 89 / 189 / 189 steps
    to 100% recall with 360 / 1050 / 1178 re-crossings; at 0.5, 42 / 66 / 84; at 0.3,
    23 / 45 / 60; at 0.1, 23 / 39 / 42 with 20 / 77 / 114 re-crossings (SW likewise: 117 /
    236 / 70 steps at ln 2, 89 / 146 / 41 at 0.1). The objective default stays "sft": in the
    same study plain SFT needed 25 / 41 / 46 steps, level with OT at 0.1, and far from the
    adapter's capacity limit SFT was the fastest (issue 12: 4096 real tokens, SFT 21 steps,
    OT 81, SW 184); MemFT is the choice where SFT stalls below 100% recall.
    """

    model: str = "smollm2"
    objective: str = "sft"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    modules: list[str] = field(default_factory=lambda: ["down_proj"])
    layers: list[int] | None = None  # None: default_layers(model depth)
    lr: float = 1e-2
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping
    batch_size: int = 1
    epochs: int = PAPER_EPOCHS
    max_steps: int | None = None  # overrides epochs when set
    threshold: float = DEFAULT_THRESHOLD  # see the docstring: 0.1 beat ln 2 by 2-4x in steps
    eps: float = MEMFT_EPS
    sw_kappa: float = SW_KAPPA
    sw_tau: float = SW_TAU
    sw_window: int = SW_WINDOW
    sw_floor: float = SW_FLOOR
    curriculum: bool = False  # Inter-Batch Temporal Curriculum (used with MemFT-OT)
    curriculum_ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])
    curriculum_boundaries: list[int] = field(default_factory=lambda: [20, 40, 60, 80, 200])
    stop_on_recall: bool = True  # stop_rule.py; False: train the whole budget
    seed: int = 42
    out: str | None = None
    engine: str = "fast"
    prefix_cache: bool = True  # False: rerun the frozen prefix every step (reference path)
    gradient_checkpointing: bool = False  # fast engine: recompute the span in backward, attention outputs kept
    fused_lora: bool = False  # fastmem.integrations.peft.patch_peft_model when installed
    loss_backend: str = "auto"  # fastmem.linear_cross_entropy backend
    checkpoint_every: int = 0  # steps; 0: only at the end
    verify_greedy: bool = True  # final pass: greedy-decode samples whose EM hinges on a near tie (margin within noise)
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp2"
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the setting for anything that cannot train."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.modules or any(not isinstance(m, str) or not m for m in self.modules):
            raise ValueError(f"modules must be a non-empty list of module names, got {self.modules!r}")
        if self.layers is not None and (not self.layers or any(i < 0 for i in self.layers)):
            raise ValueError(f"layers must be a non-empty list of indices >= 0, got {self.layers!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.threshold <= 0:
            raise ValueError(f"threshold must be > 0 (a loss value; ln 2 = {L_CRIT:.4f}), got {self.threshold}")
        if self.sw_window < 1:
            raise ValueError(f"sw_window must be >= 1, got {self.sw_window}")
        if len(self.curriculum_ratios) != len(self.curriculum_boundaries):
            raise ValueError("curriculum_ratios and curriculum_boundaries must have the same length")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def to_dict(self) -> dict:
        return asdict(self)

    def loss_spec(self, objective: str | None = None) -> LossSpec:
        """The fused loss's LossSpec of this run (same field names); `objective` overrides the
        run's (the curriculum's SFT warm-up). The trainer reads no entropy: it is not computed
        (a pass per chunk saved on the CPU)."""
        return LossSpec(objective=objective or self.objective, threshold=self.threshold, eps=self.eps,
                        sw_kappa=self.sw_kappa, sw_tau=self.sw_tau, sw_window=self.sw_window,
                        sw_floor=self.sw_floor, entropy=False)
