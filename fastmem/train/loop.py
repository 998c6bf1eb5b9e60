"""The trainer: one plain loop with named steps.

    set up     LoRA on the named modules/layers; frozen-prefix cache + base loss (once)
    each step  1. forward the batch: cached prefix -> adapted span -> fused loss on answer rows
               2. decide from the stats, BEFORE any update: stop / skip / train (stop_rule.py)
               3. update: backward + AdamW step (only when step 2 says so); LR decays every step
               4. bookkeeping: SW windows, metrics line, progress bar, checkpoint
    finish     the evaluator: one eval-mode teacher-forced pass gives loss, recall, exact match
               and i* (near ties decoded to confirm); adapter + summary.json

With dropout on, a stop is decided from noisy stats: at a stop candidate one eval-mode
teacher-forced pass (the evaluator's) must confirm every recalled sample, or training goes on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fastmem.constants import L_CRIT
from fastmem.data.sample import MemorySample, check_samples
from fastmem.eval.evaluator import evaluate
from fastmem.eval.teacher_forcing import teacher_forced_scores
from fastmem.nn.cpu_linear import use_onednn_linears
from fastmem.train.adapters import adapter_parameters, attach_lora, model_parts
from fastmem.train.checkpoint import (latest_checkpoint, load_checkpoint, save_adapter_atomic, save_checkpoint,
                                      set_rng_state)
from fastmem.train.config import RESUME_MUST_MATCH, TrainConfig
from fastmem.train.distributed import (DistInfo, any_rank, barrier, full_adapter_state, gather_first_errors,
                                       init_distributed, reduce_signal, unsharded, wrap_span)
from fastmem.train.engine_fast import FastEngine, stats_summary
from fastmem.train.engine_hf import HFEngine
from fastmem.train.interrupt import stop_requested
from fastmem.train.prefix_cache import PrefixCache
from fastmem.train.run_log import MetricsLog, RunFigures, peak_mem_bytes, write_json_atomic
from fastmem.train.schedule import build_schedule, rank_slice
from fastmem.train.stop_rule import BatchSignal, StopRule
from fastmem.train.sw_window import SWWindowState

log = logging.getLogger(__name__)




@dataclass
class TrainResult:
    """What a run returns: `summary` (the summary.json fields), the trained PEFT model, the
    per-step metric rows, and where the adapter was written (None without `config.out`).
    The model is returned in eval mode (no LoRA dropout); `model.unload()` gives the base back."""

    summary: dict
    model: torch.nn.Module
    metrics: list[dict] = field(default_factory=list)
    adapter_dir: Path | None = None


def _make_optimizer(params, config: TrainConfig, total_steps: int):
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # The paper: linear decay to zero over the run, no warm-up.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total_steps))
    return optimizer, scheduler


def _curriculum(config: TrainConfig, num_samples: int):
    if not config.curriculum:
        return None
    from fastmem.data import TemporalCurriculum

    return TemporalCurriculum(num_samples, config.curriculum_ratios, config.curriculum_boundaries, config.seed)


class _Recrossings:
    """Count tokens that were recalled (p > 0.5) at a sample's previous visit and are not now:
    the drift docs/design.md (section 9) records with OT at exactly ln 2."""

    def __init__(self):
        self.last: dict[int, torch.Tensor] = {}

    def count(self, indices: list[int], stats) -> int:
        total = 0
        for row, index in enumerate(indices):
            recalled = (~stats.stubborn_mask()[row])[stats.valid[row]].cpu()
            if index in self.last:
                total += int((self.last[index] & ~recalled).sum())
            self.last[index] = recalled
        return total


def _final_pass(model, samples: list[MemorySample], config: TrainConfig) -> dict:
    """The evaluator on the trained model (eval mode, no grad): unweighted answer loss, recall,
    and exact match / i* from the same teacher-forced pass; a sample whose verdict hinges on a
    near tie is greedy-decoded to confirm (unless `verify_greedy` is off)."""
    report = evaluate(model, samples, decode="auto" if config.verify_greedy else "none",
                      batch_size=config.batch_size, progress=False)
    totals = report.totals()
    records = report.records
    return {"final_loss": totals["mean_loss"], "token_acc": totals["token_acc"],
            "stubborn_tokens": totals["n_stubborn"], "min_p": totals["min_prob"],
            "final_loss_per_sample": [r.mean_loss for r in records],
            "exact_match": totals["exact_match"], "exact_match_per_sample": [r.exact_match for r in records],
            "first_error_per_sample": [r.first_error for r in records], "min_margin": totals["min_margin"],
            "confirmed_by_decoding": [i for i, r in enumerate(records) if r.confirmed_by_decoding],
            "near_tie_unconfirmed": [i for i, r in enumerate(records) if r.near_ties and r.greedy is None],
            "final_pass_s": report.timing["teacher_forcing_s"] + report.timing["decoding_s"]}


def _has_dropout(model: nn.Module) -> bool:
    """Does a training-mode forward of `model` drop anything (LoRA dropout, or the model's own)?"""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _unconfirmed_recall(model, samples: list[MemorySample], indices: list[int], batch_size: int,
                        info: DistInfo) -> set[int]:
    """One eval-mode teacher-forced pass (the evaluator's) over `samples[indices]`: the indices
    with a token at p <= 0.5, i.e. whose recall the noisy training forward over-stated."""
    scores = teacher_forced_scores(model, [samples[i] for i in indices], batch_size=batch_size, progress=False)
    flags = any_rank([bool((score.loss >= L_CRIT).any()) for score in scores], info)
    return {i for i, flag in zip(indices, flags) if flag}


def train(config: TrainConfig, samples: list[MemorySample], model=None, tokenizer=None, *,
          resume: bool = True, halt_after_steps: int | None = None, overwrite: bool = False) -> TrainResult:
    """Memorize `samples` into a LoRA adapter on `model` (loaded from `config.model` if None).

    `samples`: tokenized MemorySample objects (fastmem.data); `tokenizer` is accepted for
    symmetry with `load_model` and not needed.
    `resume`: continue from `<out>/checkpoints` when a checkpoint is there.
    `overwrite`: a finished run in `out` (its summary.json) is the user's result, so it is
    refused (FileExistsError, before the model loads) unless this is True; then its adapter,
    summary and metrics are rewritten in place. `fastmem train` adds the rest of the rules
    (unrelated files, data fingerprint, atomic replacement: train/run_dir.py).
    `halt_after_steps`: end the process's work after that many steps of this call without a
    final checkpoint — exactly what a kill does (used to test resume; a time-boxed job can
    use it with `checkpoint_every`). Returns a TrainResult whose summary has `halted: true`.
    """
    config.validate()
    if config.out and not overwrite and (Path(config.out) / "summary.json").is_file():
        raise FileExistsError(f"{config.out} holds a finished run (summary.json): pass overwrite=True to replace "
                              "it, or choose another out")
    wall_start = time.perf_counter()
    info: DistInfo = init_distributed()
    device = info.device
    if model is None:
        from fastmem.models import load_model

        model, tokenizer = load_model(config.model, device=device)
    if config.engine == "hf" and info.enabled:
        raise ValueError("engine 'hf' runs in one process; use the fast engine under torchrun")
    if info.enabled and config.distributed == "fsdp2" and config.checkpoint_every:
        raise ValueError("checkpoint_every is not supported with distributed='fsdp2' yet (sharded "
                         "optimizer state); use ddp or checkpoint_every=0")
    out = Path(config.out) if config.out else None
    if out is not None and info.is_main:
        out.mkdir(parents=True, exist_ok=True)

    # --- set up: adapter, frozen-prefix cache, base loss -------------------------------------
    peft_model, layer_ids = attach_lora(model, config)
    parts = model_parts(peft_model, layer_ids)
    check_samples(samples, parts.head_weight.shape[0], parts.max_positions)
    peft_model.to(device).train()
    if config.engine == "fast":
        # frozen fp32 CPU linears through oneDNN (~2x MKL here); the hf engine stays plain HF
        rerouted = use_onednn_linears(peft_model)
        if rerouted:
            log.info("oneDNN GEMMs for %d frozen fp32 linear layers (FASTMEM_CPU_GEMM=mkl to turn off)", rerouted)
    confirm_stop = _has_dropout(peft_model)  # training-forward stats are noisy: confirm a stop
    # The hf engine never reads the cache: there the forward only yields the base loss.
    cache = PrefixCache(peft_model, parts, samples, device,
                        enabled=config.prefix_cache and config.engine == "fast")
    base_loss_sums = cache.build_all()  # the base model's answer loss, once per sample (for ΔL)
    answer_tokens = sum(s.answer_len for s in samples)
    base_loss = sum(base_loss_sums) / answer_tokens
    if config.engine == "fast":
        engine = FastEngine(config, parts, cache)
        engine.span = wrap_span(engine.span, config.distributed, info)
    else:
        engine = HFEngine(config, peft_model, samples, device)

    curriculum = _curriculum(config, len(samples))
    schedule = build_schedule(len(samples), config.batch_size, config.epochs, config.max_steps,
                              config.seed, info.world_size, curriculum)
    total_steps = len(schedule)
    params = list(adapter_parameters(peft_model).values())
    optimizer, scheduler = _make_optimizer(params, config, total_steps)
    sw_state = SWWindowState(len(samples), config.sw_window)
    stop_rule = StopRule(len(samples), config.objective, config.stop_on_recall)
    recrossings = _Recrossings()

    # --- resume -----------------------------------------------------------------------------
    start_step, ckpt_dir = 0, (out / "checkpoints" if out is not None else None)
    checkpoint = latest_checkpoint(ckpt_dir) if (resume and ckpt_dir is not None) else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, peft_model)
        changed = [k for k in RESUME_MUST_MATCH if state["config"].get(k) != config.to_dict()[k]]
        if changed or state["total_steps"] != total_steps:
            raise ValueError(f"checkpoint {checkpoint} belongs to another run (differs in "
                             f"{changed or ['data size / step plan']}); use a new --out or --no-resume")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sw_state.load_state_dict(state["sw_window"])
        stop_rule.load_state_dict(state["stop_rule"])
        recrossings.last = state["recrossings"]
        if curriculum is not None:  # the saved order wins; the plan follows from it
            curriculum.load_state_dict(state["curriculum"])
            schedule = build_schedule(len(samples), config.batch_size, config.epochs, config.max_steps,
                                      config.seed, info.world_size, curriculum)
        set_rng_state(state["rng"])
        start_step = state["step"]
        log.info("resumed from %s at step %d", checkpoint, start_step)
    metrics = MetricsLog(out, start_step, enabled=info.is_main)

    def trainer_state() -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sw_window": sw_state.state_dict(), "stop_rule": stop_rule.state_dict(),
                "recrossings": recrossings.last, "total_steps": total_steps,
                "curriculum": curriculum.state_dict() if curriculum is not None else None,
                "config": config.to_dict()}

    # --- the loop ---------------------------------------------------------------------------
    step, stopped, halted, interrupted = start_step, False, False, False
    figures = RunFigures(len(samples))  # the progress bar shows the run, not the last batch
    bar = tqdm(total=total_steps, initial=start_step, disable=not (config.progress and info.is_main),
               desc=f"memorize {config.objective}", unit="step")
    while step < total_steps and not stopped:
        scheduled = schedule[step]
        indices = rank_slice(scheduled, info.rank, config.batch_size)
        t0 = time.perf_counter()

        # 1. forward: cached prefix -> adapted span -> fused loss on the answer rows
        window = sw_state.window(indices)
        loss, stats = engine.forward(indices, window.to(device))

        # 2. decide before any update (every rank decides the same from the reduced signal)
        signal = reduce_signal(BatchSignal.from_stats(stats), info)
        decision = stop_rule.decide(signal, list(scheduled.global_batch), scheduled.all_samples_active)
        confirmation, confirm_s = None, 0.0
        if decision.stop and confirm_stop:
            t_confirm = time.perf_counter()
            with unsharded(getattr(engine, "span", None), config.distributed, info):
                unconfirmed = _unconfirmed_recall(peft_model, samples, sorted(stop_rule.recalled),
                                                  config.batch_size, info)
            confirm_s = time.perf_counter() - t_confirm
            confirmation = "rejected" if unconfirmed else "confirmed"
            if unconfirmed:
                decision = stop_rule.reject(unconfirmed, list(scheduled.global_batch))

        # 3. update
        if decision.update:
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1

        # 4. bookkeeping
        sw_state.update(list(scheduled.global_batch), gather_first_errors(stats.first_error, info))
        step_s = time.perf_counter() - t0
        row = {"step": step, "epoch": scheduled.epoch, "samples": list(scheduled.global_batch),
               "loss": float(loss.detach()),
               **stats_summary(stats), "stubborn_tokens_global": signal.stubborn_tokens,
               "active_tokens": signal.active_tokens, "recrossed": recrossings.count(indices, stats),
               "lr": lr, "update": decision.update, "decision": decision.reason, "confirmation": confirmation,
               "confirm_s": confirm_s, "step_s": step_s,
               "tokens_per_s": engine.sequence_tokens(indices) / max(step_s, 1e-9)}
        if config.objective == "sw":
            row["sw_window_mean"] = float(window.mean())
        metrics.write(row)
        figures.update(indices, stats)
        bar.set_postfix(figures.postfix())
        bar.update(1)
        del loss, stats
        stopped = decision.stop
        if config.checkpoint_every and step % config.checkpoint_every == 0 and ckpt_dir is not None \
                and not stopped and step < total_steps:
            if info.is_main:
                save_checkpoint(ckpt_dir, step, peft_model, trainer_state())
            barrier(info)
        if halt_after_steps is not None and step - start_step >= halt_after_steps and not stopped:
            halted = True
            break
        if stop_requested() and not stopped and step < total_steps:  # Ctrl-C: checkpoint, then stop
            if ckpt_dir is not None and info.is_main:
                save_checkpoint(ckpt_dir, step, peft_model, trainer_state())
            halted = interrupted = True
            break
    bar.close()

    # --- finish -----------------------------------------------------------------------------
    summary = {"steps": step, "total_steps": total_steps, "stopped_on_recall": stopped, "halted": halted,
               "interrupted": interrupted,
               "base_loss": base_loss, "answer_tokens": answer_tokens, "num_samples": len(samples),
               "base_loss_per_sample": [b / s.answer_len for b, s in zip(base_loss_sums, samples)],
               "objective": config.objective, "engine": config.engine, "rank": config.rank,
               "layers": layer_ids, "modules": list(config.modules), "world_size": info.world_size}
    if not halted:
        with unsharded(getattr(engine, "span", None), config.distributed, info):
            summary.update(_final_pass(peft_model, samples, config))
        summary["delta_loss"] = base_loss - summary["final_loss"]
    summary["wall_s"] = time.perf_counter() - wall_start
    summary["peak_mem_bytes"] = peak_mem_bytes(device)
    adapter_dir = None
    sharded = info.enabled and config.distributed == "fsdp2"
    full_state = full_adapter_state(peft_model) if (sharded and out is not None and not halted) else None
    if out is not None and info.is_main and not halted:
        adapter_dir = out / "adapter"
        save_adapter_atomic(peft_model, adapter_dir, full_state)
        write_json_atomic(out / "summary.json", summary)
    barrier(info)
    peft_model.eval()  # the result is for inference: no LoRA dropout from here on
    if math.isnan(base_loss):
        log.warning("base loss is NaN: the base model's answer loss could not be computed")
    return TrainResult(summary=summary, model=peft_model, metrics=metrics.rows, adapter_dir=adapter_dir)
