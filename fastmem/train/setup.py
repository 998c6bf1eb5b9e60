"""Setting up a training run: everything the loop reads, built once and held in a TrainingRun.

    set_up(config, samples, model)
        refusals first (bad settings, a finished run, `<out>` locked by another writer), then
        `<out>`'s lock; LoRA on the named modules/layers; the frozen-prefix cache and the base
        model's answer loss (once per sample); the engine (fast or hf); the lazy step plan;
        AdamW with the paper's linear decay; SW windows, stop rule and re-crossing counter;
        then, when `<out>` holds a checkpoint, all of that restored from the newest readable
        one (TrainingRun.resume).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastmem import locks
from fastmem.data.curriculum_authors import AuthorsCurriculum
from fastmem.data.sample import MemorySample, check_samples
from fastmem.errors import UsageError
from fastmem.files import read_json
from fastmem.nn.cpu_linear import use_onednn_linears
from fastmem.train.adapters import ModelParts, adapter_parameters, attach_lora, model_parts
from fastmem.train.checkpoint import (CheckpointUnreadable, checkpoint_candidates, data_fingerprint,
                                      load_checkpoint, save_checkpoint, set_rng_state)
from fastmem.train.config import BUDGET_SETTINGS, RESUME_MUST_MATCH, TrainConfig, saved_setting
from fastmem.train.distributed import DistInfo, barrier, init_distributed, wrap_span
from fastmem.train.engine_fast import FastEngine
from fastmem.train.engine_hf import HFEngine
from fastmem.train.lr_schedule import lr_factor
from fastmem.train.prefix_cache import PrefixCache
from fastmem.train.run_log import MetricsLog, Recrossings, RunFigures
from fastmem.train.schedule import build_schedule
from fastmem.train.plateau import PlateauRule
from fastmem.train.stop_rule import StopRule
from fastmem.train.sw_window import SWWindowState

log = logging.getLogger(__name__)


def _make_optimizer(params, config: TrainConfig, total_steps: int):
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # The paper: linear decay to zero over the run, no warm-up (lr_schedule.py: the options).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.lr_schedule, total_steps, config.warmup_steps))
    return optimizer, scheduler


def _curriculum(config: TrainConfig, num_samples: int):
    if not config.curriculum:
        return None
    from fastmem.data import TemporalCurriculum

    if config.curriculum_loader == "authors":
        return AuthorsCurriculum(num_samples, config.batch_size, config.curriculum_ratios,
                                 config.curriculum_boundaries, config.seed)
    return TemporalCurriculum(num_samples, config.curriculum_ratios, config.curriculum_boundaries, config.seed)


def _has_dropout(model: nn.Module) -> bool:
    """Does a training-mode forward of `model` drop anything (LoRA dropout, or the model's own)?"""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


@dataclass
class TrainingRun:
    """The state of one run: what set_up built, what the loop advances, what finish reports.

    `step` counts the steps done (a resumed run starts at its checkpoint's); `stopped`: the
    stop rule ended the run; `halted`: the process ended its work early (halt_after_steps or
    Ctrl-C), with `interrupted` for Ctrl-C.
    """

    config: TrainConfig
    samples: list[MemorySample]
    info: DistInfo
    model: nn.Module  # the PEFT model being trained
    layer_ids: list[int]
    engine: FastEngine | HFEngine
    base_loss_sums: list[float]  # the base model's summed answer loss per sample
    schedule: list
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sw_state: SWWindowState
    stop_rule: StopRule
    plateau: PlateauRule
    recrossings: Recrossings
    curriculum: object | None
    out: Path | None
    confirm_stop: bool  # training-forward stats are noisy (dropout): confirm a stop in eval mode
    wall_start: float
    metrics: MetricsLog | None = None
    figures: RunFigures | None = None
    step: int = 0
    start_step: int = 0
    stopped: bool = False
    plateaued: bool = False  # stopped by the plateau rule (not by recall)
    halted: bool = False
    interrupted: bool = False
    stop_signal: int = 0  # the signal (SIGINT, SIGTERM) that interrupted the run
    last_checkpoint_time: float = 0.0  # time.monotonic() of the last checkpoint (or the start)

    @property
    def total_steps(self) -> int:
        return len(self.schedule)

    @property
    def checkpoints(self) -> Path | None:
        return self.out / "checkpoints" if self.out is not None else None

    @property
    def span(self) -> nn.Module | None:
        """The fast engine's adapted span (DDP / FSDP-wrapped under torchrun), else None."""
        return getattr(self.engine, "span", None)

    def trainer_state(self) -> dict:
        """Everything but the adapter that a resumed run needs to continue bit for bit."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sw_window": self.sw_state.state_dict(), "stop_rule": self.stop_rule.state_dict(),
                "plateau": self.plateau.state_dict(),
                "recrossings": self.recrossings.last, "total_steps": self.total_steps,
                "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
                "config": self.config.to_dict(), "data_fingerprint": self.fingerprint}

    @functools.cached_property
    def fingerprint(self) -> str:
        """The samples' data_fingerprint (hashed once per run)."""
        return data_fingerprint(self.samples)

    @property
    def can_checkpoint(self) -> bool:
        # FSDP2 shards the optimizer state: no checkpoint of it yet (set_up refuses checkpoint_every)
        return self.checkpoints is not None and not (self.info.enabled and self.config.distributed == "fsdp2")

    def save_checkpoint(self) -> None:
        if not self.can_checkpoint:
            return
        if self.info.is_main:
            save_checkpoint(self.checkpoints, self.step, self.model, self.trainer_state())
        barrier(self.info)
        self.last_checkpoint_time = time.monotonic()

    def resume(self) -> None:
        """Continue from `<out>/checkpoints` when a checkpoint is there: the newest readable one,
        with a line for each damaged one passed over (UsageError when it belongs to another run,
        or when none is readable)."""
        candidates = checkpoint_candidates(self.checkpoints) if self.checkpoints is not None else []
        pointer = self.checkpoints / "latest" if self.checkpoints is not None else None
        if candidates and pointer.is_file() and candidates[0].name != pointer.read_text().strip():
            log.warning("%s names %s, which is not there: resuming from %s instead", pointer,
                        pointer.read_text().strip(), candidates[0].name)
        for checkpoint in candidates:
            try:
                state = load_checkpoint(checkpoint, self.model)
                break
            except CheckpointUnreadable as err:
                log.warning("checkpoint %s is damaged (%s): passing over it to the one before", checkpoint, err)
        else:
            if candidates:
                raise UsageError(f"no readable checkpoint in {self.checkpoints} ({len(candidates)} damaged): "
                                 "start over with --overwrite (or move the run away)")
            return
        self._check_same_run(checkpoint, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sw_state.load_state_dict(state["sw_window"])
        self.stop_rule.load_state_dict(state["stop_rule"])
        self.plateau.load_state_dict(state.get("plateau"))  # checkpoints from before the rule have none
        self.recrossings.last = state["recrossings"]
        if self.curriculum is not None:  # the saved order wins; the plan follows from it
            self.curriculum.load_state_dict(state["curriculum"])
            self.schedule = _schedule(self.config, len(self.samples), self.info, self.curriculum)
        set_rng_state(state["rng"])
        self.step = self.start_step = state["step"]
        if state["total_steps"] != self.total_steps:  # a new budget: the LR decays over it from here
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        log.info("resumed from %s at step %d of %d", checkpoint, self.step, self.total_steps)

    def _check_same_run(self, checkpoint: Path, state: dict) -> None:
        """The checkpoint was trained under these settings, on these samples, and the plan
        (perhaps with a larger budget) has steps left after it."""
        config = self.config.to_dict()
        changed = [k for k in RESUME_MUST_MATCH if k not in BUDGET_SETTINGS and saved_setting(state["config"], k) != config[k]]
        if changed:
            raise UsageError(f"checkpoint {checkpoint} belongs to another run (differs in {changed}); use a "
                             "new --out or --no-resume")
        saved = state.get("data_fingerprint")
        if saved is not None and saved != self.fingerprint:
            raise UsageError(f"checkpoint {checkpoint} was trained on other data ({len(self.samples)} samples "
                             "here with another fingerprint): use a new out, or overwrite")
        if state["total_steps"] != self.total_steps and state["step"] >= self.total_steps:
            raise UsageError(f"checkpoint {checkpoint} has trained {state['step']} steps already, as many as "
                             f"the budget here ({self.total_steps}): give a larger max_steps (or epochs) to "
                             "continue it")


def _schedule(config: TrainConfig, num_samples: int, info: DistInfo, curriculum) -> list:
    return build_schedule(num_samples, config.batch_size, config.epochs, config.max_steps, config.seed,
                          info.world_size, curriculum)


def _check_settings(config: TrainConfig, info: DistInfo) -> None:
    if config.engine == "hf" and info.enabled:
        raise UsageError("engine 'hf' runs in one process; use the fast engine under torchrun")
    if info.enabled and config.distributed == "fsdp2" and config.checkpoint_every:
        raise UsageError("checkpoint_every is not supported with distributed='fsdp2' yet (sharded "
                         "optimizer state); use ddp or checkpoint_every=0")


def _engine(config: TrainConfig, peft_model: nn.Module, parts: ModelParts, samples: list[MemorySample],
            info: DistInfo) -> tuple[FastEngine | HFEngine, list[float]]:
    """The engine, and the base model's answer loss per sample (summed over its tokens, once)."""
    if config.engine == "fast":
        # frozen fp32 CPU linears through oneDNN (~2x MKL here); the hf engine stays plain HF
        rerouted = use_onednn_linears(peft_model)
        if rerouted:
            log.info("oneDNN GEMMs for %d frozen fp32 linear layers (FASTMEM_CPU_GEMM=mkl to turn off)", rerouted)
    # The hf engine never reads the cache: there the forward only yields the base loss.
    cache = PrefixCache(peft_model, parts, samples, info.device,
                        enabled=config.prefix_cache and config.engine == "fast")
    base_loss_sums = cache.build_all()
    if config.engine == "hf":
        return HFEngine(config, peft_model, samples, info.device), base_loss_sums
    engine = FastEngine(config, parts, cache)
    engine.span = wrap_span(engine.span, config.distributed, info)
    return engine, base_loss_sums


def set_up(config: TrainConfig, samples: list[MemorySample], model=None, *, resume: bool = True,
           overwrite: bool = False) -> TrainingRun:
    """Build a TrainingRun (see the module docstring); refusals come before the model loads."""
    config.validate()
    wall_start = time.perf_counter()
    info = init_distributed()
    out = Path(config.out) if config.out else None
    if out is not None and not overwrite and (out / "summary.json").is_file():
        planned = len(_schedule(config, len(samples), info, _curriculum(config, len(samples))))
        if not (resume and budget_continues(out, planned)):
            raise FileExistsError(f"{config.out} holds a finished run (summary.json): pass overwrite=True to "
                                  "replace it, or choose another out (a run that used its whole step budget "
                                  "is continued by a larger max_steps)")
    if out is not None and info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        locks.acquire(out, "out")  # one writer per run directory; released by finish (or a failure)
    try:
        return _build_run(config, samples, model, info, out, wall_start, resume)
    except BaseException:
        release_lock(out, info)
        raise


def budget_continues(out: Path, planned_steps: int) -> bool:
    """`out` holds a run that ended by using its whole step budget (not by recall, not halted)
    and `planned_steps` is a larger budget: it continues from the run's final checkpoint."""
    summary = read_json(out / "summary.json") or {}
    steps = summary.get("steps")
    return (summary.get("stopped_on_recall") is False and not summary.get("halted")
            and steps == summary.get("total_steps") and isinstance(steps, int) and planned_steps > steps)


def release_lock(out: Path | None, info: DistInfo) -> None:
    if out is not None and info.is_main:
        locks.release(out)


def _build_run(config: TrainConfig, samples: list[MemorySample], model, info: DistInfo, out: Path | None,
               wall_start: float, resume: bool) -> TrainingRun:
    if model is None:
        from fastmem.models import load_model

        model, _ = load_model(config.model, device=info.device, context=config.context)
    _check_settings(config, info)
    peft_model, layer_ids = attach_lora(model, config)
    parts = model_parts(peft_model, layer_ids)
    check_samples(samples, parts.head_weight.shape[0], parts.max_positions)
    peft_model.to(info.device).train()
    engine, base_loss_sums = _engine(config, peft_model, parts, samples, info)
    curriculum = _curriculum(config, len(samples))
    schedule = _schedule(config, len(samples), info, curriculum)
    params = list(adapter_parameters(peft_model).values())
    optimizer, scheduler = _make_optimizer(params, config, len(schedule))
    run = TrainingRun(config=config, samples=samples, info=info, model=peft_model, layer_ids=layer_ids,
                      engine=engine, base_loss_sums=base_loss_sums, schedule=schedule, params=params,
                      optimizer=optimizer, scheduler=scheduler,
                      sw_state=SWWindowState(len(samples), config.sw_window),
                      stop_rule=StopRule(len(samples), config.objective, config.stop_on_recall, config.stop_on),
                      plateau=PlateauRule(config.plateau_patience, config.plateau_tol),
                      recrossings=Recrossings(), curriculum=curriculum, out=out,
                      confirm_stop=_has_dropout(peft_model), wall_start=wall_start,
                      last_checkpoint_time=time.monotonic())
    if resume:
        run.resume()
    run.metrics = MetricsLog(out, run.step, enabled=info.is_main)
    run.figures = RunFigures(len(samples))  # the progress bar shows the run, not the last batch
    return run
