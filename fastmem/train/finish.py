"""Finishing a training run: the final evaluation, the summary, the adapter.

The final pass is the evaluator (eval mode, no grad): one teacher-forced pass gives the
unweighted answer loss, recall, exact match and i*; a sample whose verdict hinges on a near
tie is greedy-decoded to confirm. Its report travels with the result, so a caller (the sweep)
reads it instead of evaluating again.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastmem.eval.evaluator import EvalReport, evaluate
from fastmem.files import write_json_atomic
from fastmem.ops.cpu_gemm import cpu_gemm_route
from fastmem.train.adapters import adapter_targets
from fastmem.train.checkpoint import save_adapter_atomic
from fastmem.train.distributed import barrier, full_adapter_state, unsharded
from fastmem.train.run_log import peak_mem_bytes
from fastmem.train.setup import TrainingRun

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run returns: `summary` (the summary.json fields), the trained PEFT model, the
    per-step metric rows, where the adapter was written (None without `config.out`), and the
    final pass's EvalReport (None when the run halted before it).
    The model is returned in eval mode (no LoRA dropout); `model.unload()` gives the base back."""

    summary: dict
    model: torch.nn.Module
    metrics: list[dict] = field(default_factory=list)
    adapter_dir: Path | None = None
    report: EvalReport | None = None


def final_pass(run: TrainingRun, decode: str) -> EvalReport:
    """The evaluator on the trained model; `decode` as evaluate's ("auto", "all", "none")."""
    with unsharded(run.span, run.config.distributed, run.info):
        return evaluate(run.model, run.samples, decode=decode, batch_size=run.config.batch_size, progress=False)


def report_figures(report: EvalReport) -> dict:
    """The summary.json fields of the final pass."""
    totals, records = report.totals(), report.records
    return {"final_loss": totals["mean_loss"], "token_acc": totals["token_acc"],
            "stubborn_tokens": totals["n_stubborn"], "min_p": totals["min_prob"],
            "final_loss_per_sample": [r.mean_loss for r in records],
            "exact_match": totals["exact_match"], "exact_match_per_sample": [r.exact_match for r in records],
            "first_error_per_sample": [r.first_error for r in records], "min_margin": totals["min_margin"],
            "confirmed_by_decoding": [i for i, r in enumerate(records) if r.confirmed_by_decoding],
            "near_tie_unconfirmed": [i for i, r in enumerate(records) if r.near_ties and r.greedy is None],
            "final_pass_s": report.timing["teacher_forcing_s"] + report.timing["decoding_s"]}


def run_summary(run: TrainingRun) -> dict:
    """The summary fields every run has, finished or not."""
    answer_tokens = sum(s.answer_len for s in run.samples)
    config = run.config
    return {"steps": run.step, "total_steps": run.total_steps,
            "stopped_on_recall": run.stopped and not run.plateaued, "stopped_on_plateau": run.plateaued,
            "halted": run.halted, "interrupted": run.interrupted, "signal": run.stop_signal or None,
            "base_loss": sum(run.base_loss_sums) / answer_tokens, "answer_tokens": answer_tokens,
            "num_samples": len(run.samples),
            "base_loss_per_sample": [b / s.answer_len for b, s in zip(run.base_loss_sums, run.samples)],
            "objective": config.objective, "engine": config.engine, "rank": config.rank,
            "layers": run.layer_ids, "modules": adapter_targets(config), "world_size": run.info.world_size,
            # the adapter's size: two recipes' steps compare only beside their capacities
            "trainable_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
            **_cpu_gemm(run)}


def _cpu_gemm(run: TrainingRun) -> dict:
    """The fp32 GEMM route the fast engine took on CPU (fastmem.ops.cpu_gemm: measured per
    machine, or FASTMEM_CPU_GEMM): two machines' step times differ by it."""
    if run.config.engine != "fast" or run.info.device.type != "cpu":
        return {}
    route, why = cpu_gemm_route()
    return {"cpu_gemm": route, "cpu_gemm_why": why}


def finish(run: TrainingRun, decode: str | None = None) -> TrainResult:
    """Evaluate (unless halted), write the adapter and summary.json, return the TrainResult.
    `decode`: the final pass's decode mode; None follows `config.verify_greedy` (auto / none)."""
    summary, report = run_summary(run), None
    if not run.halted:
        report = final_pass(run, decode or ("auto" if run.config.verify_greedy else "none"))
        summary.update(report_figures(report))
        summary["delta_loss"] = summary["base_loss"] - summary["final_loss"]
    summary["wall_s"] = time.perf_counter() - run.wall_start
    summary["peak_mem_bytes"] = peak_mem_bytes(run.info.device)
    adapter_dir = None
    sharded = run.info.enabled and run.config.distributed == "fsdp2"
    save = run.out is not None and not run.halted
    full_state = full_adapter_state(run.model) if (sharded and save) else None  # a collective: every rank
    if save and run.info.is_main:
        adapter_dir = run.out / "adapter"
        save_adapter_atomic(run.model, adapter_dir, full_state)
        write_json_atomic(run.out / "summary.json", summary)
    barrier(run.info)
    run.model.eval()  # the result is for inference: no LoRA dropout from here on
    if math.isnan(summary["base_loss"]):
        log.warning("base loss is NaN: the base model's answer loss could not be computed")
    return TrainResult(summary=summary, model=run.model, metrics=run.metrics.rows, adapter_dir=adapter_dir,
                       report=report)
