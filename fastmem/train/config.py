"""TrainConfig: every setting of a memorization run, with the paper's defaults ("How LoRA Remembers?")."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from fastmem.constants import L_CRIT, MEMFT_EPS, OBJECTIVES, SW_FLOOR, SW_KAPPA, SW_TAU, SW_WINDOW
from fastmem.errors import UsageError
from fastmem.ops.cross_entropy import LossSpec
ENGINES = ("fast", "hf")
DISTRIBUTED = ("ddp", "fsdp2")
ADAPTERS = ("lora", "mlp_block")  # LoRA on `modules`; one parallel adapter per MLP block (nn/mlp_block_adapter.py)
LR_SCHEDULES = ("linear", "constant")  # lr_schedule.py
CURRICULUM_LOADERS = ("fastmem", "authors")  # data/curriculum_authors.py
STOP_ON = ("recall", "em")  # stop_rule.py

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
# The largest step budget (max_steps, epochs) accepted: a billion steps is years of training, and
# anything sized by the budget must stay bounded.
MAX_STEPS = 10 ** 9
# The largest learning rate accepted: beyond it AdamW's first step overflows fp32 (a torch error).
LR_MAX = 1e37


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Settings a run can only be resumed under (the rest — progress bar, checkpoint interval,
# greedy check, prefix cache — may change between the interrupted and the resumed process).
# One list for the trainer's checkpoint check and `fastmem train`'s run-directory check.
RESUME_MUST_MATCH = ("model", "objective", "rank", "alpha", "dropout", "modules", "layers", "lr",
                     "weight_decay", "max_grad_norm", "batch_size", "epochs", "max_steps", "threshold",
                     "eps", "sw_kappa", "sw_tau", "sw_window", "sw_floor", "curriculum",
                     "curriculum_ratios", "curriculum_boundaries", "stop_on_recall", "seed", "engine",
                     "context", "adapter", "lr_schedule", "warmup_steps", "curriculum_loader", "stop_on",
                     "em_margin", "plateau_patience", "plateau_tol")
# The step budget: a run may be resumed or continued (after it used its whole budget) with a
# larger one; the learning rate then decays over the new budget from where the run is.
BUDGET_SETTINGS = ("epochs", "max_steps")


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
    236 / 70 steps at ln 2, 89 / 146 / 41 at 0.1). With the authors' gradient clipping (1.0)
    and three seeds (section 4b, threshold_protocol_*.sqlite) the gap narrows and holds: 58 /
    104 / 128 mean steps at ln 2, 25 / 43 / 59 at 0.1. The objective default stays "sft": in
    both studies plain SFT needed about OT-at-0.1's steps (25 / 41 / 46; 26 / 44 / 64 clipped),
    and far from the adapter's capacity limit SFT was the fastest (issue 12: 4096 real tokens,
    SFT 21 steps, OT 81, SW 184). Where SFT stalled below 100% recall (section 3b: the
    authors' adapter at ranks 1-2, three seeds), OT at ln 2 or 0.1 recalled no more than SFT.
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
    threshold: float = DEFAULT_THRESHOLD  # see the docstring: OT at ln 2 took 2.2-4.8x the steps of 0.1
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
    checkpoint_every: int = 0  # steps; 0: none by step count
    checkpoint_minutes: float = 5.0  # wall time between checkpoints (0: none by time): a crash loses minutes
    verify_greedy: bool = True  # final pass: greedy-decode samples whose EM hinges on a near tie (margin within noise)
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp2"
    progress: bool = True
    context: int | None = None  # positions needed past the model's own: RoPE-scaled (fastmem.rope_scaling)
    # The authors' protocol (issue 22; benchmarks/reproduce/authors.toml cites their code):
    adapter: str = "lora"  # "mlp_block": out = mlp(x) + s·B A drop(x) on each of `layers` (`modules` unused)
    lr_schedule: str = "linear"  # "linear": warm-up then linear decay to 0 (HF get_scheduler("linear")); "constant"
    warmup_steps: int = 0  # linear warm-up steps of either schedule (the paper and the authors: 0)
    curriculum_loader: str = "fastmem"  # "authors": their prefix_ratio loader (fixed order, whole batches only)
    # What the stop rule waits for: "recall", every answer token at p > 0.5 (the paper's line);
    # "em", at every answer position the target logit beats the runner-up by >= em_margin.
    stop_on: str = "recall"
    # δ of stop_on="em", in logits. 0.5: the smallest δ measured whose stop survived HF generate,
    # merging and a bf16 cast in every case; at δ = 0 a merged bf16 copy lost one of 20 PhoneBook
    # entries (bf16 logits near 20 are 0.125 apart). benchmarks/results/stop_on_em_20261203.md.
    em_margin: float = 0.5
    # `--engine hf` only: per step, one more forward of the batch with the adapter disabled, its
    # answer loss logged as `reference_loss` (the authors' loop runs it every step and only logs it,
    # MemFTModelTrainer.py:479-490): it changes no weight, it costs what their recipe pays.
    reference_forward: bool = False
    # Stop once the training loss has stopped falling (train/plateau.py): no step in the last
    # `plateau_patience` beat the best loss before them by more than `plateau_tol` nats per token.
    # 0: off. The memory law's cells are trained to this plateau, not to a fixed step count.
    plateau_patience: int = 0
    plateau_tol: float = 1e-3

    def validate(self) -> None:
        """Raise UsageError (a ValueError) naming the setting for anything that cannot train:
        a wrong type, a non-finite number, a value out of range, or a budget beyond MAX_STEPS
        (checked before anything is sized by it: the step plan, the model load)."""
        if self.objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.engine not in ENGINES:
            raise UsageError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.distributed not in DISTRIBUTED:
            raise UsageError(f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        if not _is_int(self.rank) or self.rank < 1:
            raise UsageError(f"rank must be an integer >= 1, got {self.rank!r}")
        for name in ("alpha", "lr", "dropout", "weight_decay", "max_grad_norm", "threshold", "eps", "sw_kappa",
                     "sw_tau", "sw_floor", "checkpoint_minutes"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value!r}")
        for name in ("alpha", "lr", "threshold"):
            if getattr(self, name) <= 0:
                extra = f" (a loss value; ln 2 = {L_CRIT:.4f})" if name == "threshold" else ""
                raise UsageError(f"{name} must be > 0{extra}, got {getattr(self, name)}")
        if self.lr > LR_MAX:
            raise UsageError(f"lr must be <= {LR_MAX:g} (AdamW's first step, lr / (1 - beta1), must stay within "
                             f"fp32), got {self.lr:g}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.modules, str) or not self.modules or any(not isinstance(m, str) or not m
                                                                    for m in self.modules):
            raise UsageError(f"modules must be a non-empty list of module names, got {self.modules!r}")
        if self.layers is not None and (isinstance(self.layers, (str, int)) or not self.layers
                                        or any(not _is_int(i) or i < 0 for i in self.layers)):
            raise UsageError(f"layers must be a non-empty list of indices >= 0, got {self.layers!r}")
        for name, low, high in (("batch_size", 1, MAX_STEPS), ("epochs", 1, MAX_STEPS), ("sw_window", 1, MAX_STEPS),
                                ("checkpoint_every", 0, MAX_STEPS), ("seed", 0, 2 ** 63 - 1)):
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= high:
                raise UsageError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.max_steps is not None and (not _is_int(self.max_steps) or not 1 <= self.max_steps <= MAX_STEPS):
            raise UsageError(f"max_steps must be an integer in [1, {MAX_STEPS}] (a billion steps is years of "
                             f"training), got {self.max_steps!r}")
        if len(self.curriculum_ratios) != len(self.curriculum_boundaries):
            raise UsageError("curriculum_ratios and curriculum_boundaries must have the same length")
        if self.curriculum:
            from fastmem.data.curriculum import TemporalCurriculum

            try:  # the curriculum's own checks, before any sample is read
                TemporalCurriculum(1, self.curriculum_ratios, self.curriculum_boundaries)
            except (ValueError, TypeError) as err:
                raise UsageError(f"curriculum_ratios / curriculum_boundaries: {err}") from None
        if self.checkpoint_minutes < 0:
            raise UsageError(f"checkpoint_minutes must be >= 0 (0: no timed checkpoints), got {self.checkpoint_minutes}")
        if self.context is not None and (not _is_int(self.context) or self.context < 2):
            raise UsageError(f"context must be a number of positions >= 2, got {self.context!r}")
        if isinstance(self.plateau_patience, bool) or not isinstance(self.plateau_patience, int) \
                or self.plateau_patience < 0:
            raise UsageError(f"plateau_patience must be an int >= 0 (0: off), got {self.plateau_patience!r}")
        if not self.plateau_tol >= 0:
            raise UsageError(f"plateau_tol must be >= 0 (nats per token), got {self.plateau_tol}")
        if self.reference_forward and self.engine != "hf":
            raise UsageError("reference_forward runs on engine 'hf' (the authors' loop it reproduces); "
                             f"got engine {self.engine!r}")
        if self.max_grad_norm < 0:
            raise UsageError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        for name, allowed in (("adapter", ADAPTERS), ("lr_schedule", LR_SCHEDULES),
                              ("curriculum_loader", CURRICULUM_LOADERS), ("stop_on", STOP_ON)):
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise UsageError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.curriculum_loader == "authors" and not self.curriculum:
            raise UsageError("curriculum_loader='authors' changes how the curriculum batches: it needs curriculum=True")
        if not self.em_margin >= 0.0 or self.em_margin == float("inf"):
            raise UsageError(f"em_margin must be a finite value >= 0 (logits), got {self.em_margin}")

    def to_dict(self) -> dict:
        return asdict(self)

    def loss_spec(self, objective: str | None = None) -> LossSpec:
        """The fused loss's LossSpec of this run (same field names); `objective` overrides the
        run's (the curriculum's SFT warm-up). The trainer reads no entropy: it is not computed
        (a pass per chunk saved on the CPU)."""
        return LossSpec(objective=objective or self.objective, threshold=self.threshold, eps=self.eps,
                        sw_kappa=self.sw_kappa, sw_tau=self.sw_tau, sw_window=self.sw_window,
                        sw_floor=self.sw_floor, entropy=False)


def saved_setting(saved: dict, key: str):
    """A setting as a run's checkpoint or run.json holds it; one saved before the setting
    existed ran with its default (so an older run still resumes)."""
    if key in saved:
        return saved[key]
    spec = next(f for f in fields(TrainConfig) if f.name == key)
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default
