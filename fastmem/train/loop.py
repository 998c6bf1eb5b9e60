"""The trainer: set up -> loop -> finish, each a named function.

    set up     LoRA on the named modules/layers; frozen-prefix cache + base loss (once)  (setup.py)
    each step  1. forward the batch: cached prefix -> adapted span -> fused loss on answer rows
               2. decide from the stats, BEFORE any update: stop / skip / train (stop_rule.py)
               3. update: backward + AdamW step (only when step 2 says so); LR decays every step
               4. bookkeeping: SW windows, metrics line, progress bar, checkpoint
    finish     the evaluator: one eval-mode teacher-forced pass gives loss, recall, exact match
               and i* (near ties decoded to confirm); adapter + summary.json    (finish.py)

With dropout on, a stop is decided from noisy stats: at a stop candidate one eval-mode
teacher-forced pass (the evaluator's) must confirm every recalled sample, or training goes on.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from fastmem.data.sample import MemorySample
from fastmem.errors import RunFailed
from fastmem.eval.teacher_forcing import teacher_forced_scores
from fastmem.train.config import TrainConfig
from fastmem.train.distributed import any_rank, gather_first_errors, mean_over_ranks, reduce_signal, unsharded
from fastmem.train.engine_fast import stats_summary
from fastmem.train.finish import TrainResult, finish
from fastmem.train.interrupt import stop_requested
from fastmem.train.schedule import ScheduledStep, rank_slice
from fastmem.train.setup import TrainingRun, release_lock, set_up
from fastmem.train.stop_rule import BatchSignal, StepDecision, fails_stop

__all__ = ["train", "TrainResult"]


def train(config: TrainConfig, samples: list[MemorySample], model=None, *, resume: bool = True,
          halt_after_steps: int | None = None, overwrite: bool = False,
          final_decode: str | None = None) -> TrainResult:
    """Memorize `samples` into a LoRA adapter on `model` (loaded from `config.model` if None).

    `samples`: tokenized MemorySample objects (fastmem.data).
    `resume`: continue from `<out>/checkpoints` when a checkpoint is there: the newest readable
    one (a damaged one is passed over with a warning), which must be of these settings and of
    these samples (their fingerprint), with steps left in the plan. A larger step budget
    continues a run that used its whole budget.
    `overwrite`: a finished run in `out` (its summary.json) is the user's result, so it is
    refused (FileExistsError, before the model loads) unless this is True or the run is
    continued as above; then its adapter, summary and metrics are rewritten in place.
    `fastmem train` adds the rest of the rules (unrelated files, atomic replacement:
    train/run_dir.py). One process writes `out` at a time: its lock (fastmem/locks.py) is
    held from set-up to finish, and a second writer gets a UsageError naming the first's pid.
    A loss, gradient or adapter weight that turns NaN or infinite raises RunFailed.
    `halt_after_steps`: end the process's work after that many steps of this call without a
    final checkpoint — exactly what a kill does (used to test resume; a time-boxed job can
    use it with `checkpoint_every`). Returns a TrainResult whose summary has `halted: true`.
    `final_decode`: the final pass's greedy decoding, as `evaluate(decode=...)`: None follows
    `config.verify_greedy` ("auto": near ties only, or "none"); "all" decodes every sample.
    """
    run = set_up(config, samples, model, resume=resume, overwrite=overwrite)
    try:
        run_loop(run, halt_after_steps)
        return finish(run, final_decode)
    finally:
        release_lock(run.out, run.info)


def run_loop(run: TrainingRun, halt_after_steps: int | None = None) -> None:
    """Train until the stop rule stops the run, the step plan ends, or the process must pause.
    A run that used its whole budget ends with a checkpoint: a larger budget continues it."""
    with _progress_bar(run) as bar:
        while run.step < run.total_steps and not run.stopped:
            train_step(run, run.schedule[run.step], bar)
            if _pause(run, halt_after_steps):
                break
    if run.step == run.total_steps and not (run.stopped or run.halted):
        run.save_checkpoint()


def _progress_bar(run: TrainingRun) -> tqdm:
    """Steps done and their rate. With the stop rule on, a run usually ends long before its
    budget, so the bar shows no total (an ETA to the budget would be false); the stubborn
    tokens in its figures are the progress toward the stop."""
    config = run.config
    total = None if config.stop_on_recall else run.total_steps
    desc = f"memorize {config.objective}" + (f" (budget {run.total_steps} steps)" if total is None else "")
    return tqdm(total=total, initial=run.step, unit="step", desc=desc, disable=not (config.progress and run.info.is_main))


def train_step(run: TrainingRun, scheduled: ScheduledStep, bar) -> None:
    """One step of the plan: forward, decide, update, bookkeeping."""
    config, info = run.config, run.info
    indices = rank_slice(scheduled, info.rank, config.batch_size)
    t0, cpu0 = time.perf_counter(), time.process_time()

    # 1. forward: cached prefix -> adapted span -> fused loss on the answer rows
    window = run.sw_state.window(indices)
    loss, stats = run.engine.forward(indices, window.to(info.device))
    _require_finite(run, "loss", bool(torch.isfinite(loss.detach())))

    # 2. decide before any update (every rank decides the same from the reduced signal)
    signal = reduce_signal(BatchSignal.from_stats(stats, run.config.em_margin), info)
    decision = run.stop_rule.decide(signal, list(scheduled.global_batch), scheduled.all_samples_active)
    confirmation, confirm_s = None, 0.0
    if decision.stop and run.confirm_stop:
        decision, confirmation, confirm_s = _confirm_stop(run, decision, scheduled)

    # 3. update
    lr = run.scheduler.get_last_lr()[0]
    if decision.update:
        loss.backward()
        _require_finite(run, "gradient", _all_finite(p.grad for p in run.params))
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        _require_finite(run, "adapter weight", _all_finite(run.params))
    run.scheduler.step()
    run.step += 1
    loss_value = float(loss.detach())
    if config.plateau_patience:  # every rank decides from the same (mean) loss
        run.plateaued = not decision.stop and run.plateau.update(mean_over_ranks(loss_value, info))
    run.stopped = decision.stop or run.plateaued

    # 4. bookkeeping (the hf engine's reference forward, when asked for, counts in the step's time)
    extra = run.engine.step_metrics(indices)
    run.sw_state.update(list(scheduled.global_batch), gather_first_errors(stats.first_error, info))
    step_s = time.perf_counter() - t0
    # the process's CPU seconds (all its threads): on a shared machine the work the step did,
    # where step_s also counts the time other jobs held the cores
    step_cpu_s = time.process_time() - cpu0
    row = {"step": run.step, "epoch": scheduled.epoch, "samples": list(scheduled.global_batch),
           "loss": loss_value, **stats_summary(stats),
           "stubborn_tokens_global": signal.stubborn_tokens, "active_tokens": signal.active_tokens,
           "recrossed": run.recrossings.count(indices, stats), "lr": lr, "update": decision.update,
           "decision": "plateau" if run.plateaued else decision.reason, "confirmation": confirmation,
           "confirm_s": confirm_s, "step_s": step_s, "step_cpu_s": step_cpu_s,
           "tokens_per_s": run.engine.sequence_tokens(indices) / max(step_s, 1e-9), **extra}
    if config.objective == "sw":
        row["sw_window_mean"] = float(window.mean())
    run.metrics.write(row)
    run.figures.update(indices, stats)
    bar.set_postfix(run.figures.postfix())
    bar.update(1)


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t is not None]
    return not flags or bool(torch.stack(flags).all())  # one device sync for all of them


def _require_finite(run: TrainingRun, what: str, finite: bool) -> None:
    """A NaN or inf is never "recalled" (the stop rule reads a NaN loss as not recalled) and
    never a result: the run fails here, before the value reaches the weights or a checkpoint."""
    if any_rank([not finite], run.info)[0]:
        raise RunFailed(f"step {run.step + 1}: the {what} is not finite (NaN or inf), so the run stops "
                        f"with nothing saved as its result; lower the learning rate (lr {run.config.lr:g}) "
                        "or check the model's weights")


def _confirm_stop(run: TrainingRun, decision: StepDecision, scheduled: ScheduledStep):
    """One eval-mode teacher-forced pass (the evaluator's) over the samples the stop rule counts
    as recalled: those with a token at p <= 0.5 (stop_on "em": a position short of the margin) were over-stated by the noisy training forward,
    and the stop is rejected. Returns (decision, "confirmed" | "rejected", seconds)."""
    start = time.perf_counter()
    indices = sorted(run.stop_rule.recalled)
    with unsharded(run.span, run.config.distributed, run.info):
        scores = teacher_forced_scores(run.model, [run.samples[i] for i in indices],
                                       batch_size=run.config.batch_size, progress=False)
    flags = any_rank([fails_stop(score, run.config.stop_on, run.config.em_margin) for score in scores], run.info)
    unconfirmed = {i for i, flag in zip(indices, flags) if flag}
    if unconfirmed:
        decision = run.stop_rule.reject(unconfirmed, list(scheduled.global_batch))
    return decision, "rejected" if unconfirmed else "confirmed", time.perf_counter() - start


def _pause(run: TrainingRun, halt_after_steps: int | None) -> bool:
    """Checkpoint when one is due; True when this process must end its work now."""
    going_on = not run.stopped and run.step < run.total_steps
    if going_on and _checkpoint_due(run):
        run.save_checkpoint()
    if halt_after_steps is not None and run.step - run.start_step >= halt_after_steps and not run.stopped:
        run.halted = True
        return True
    signum = stop_requested()
    if signum and going_on:  # Ctrl-C or SIGTERM: checkpoint, then stop
        run.save_checkpoint()
        run.halted = run.interrupted = True
        run.stop_signal = signum
        return True
    return False


def _checkpoint_due(run: TrainingRun) -> bool:
    """Every `checkpoint_every` steps, and every `checkpoint_minutes` of wall time (so that a
    crash loses minutes, not the run); one decision for all ranks (their clocks differ)."""
    every, minutes = run.config.checkpoint_every, run.config.checkpoint_minutes
    due = bool(every and run.step % every == 0) or bool(
        minutes and run.can_checkpoint and time.monotonic() - run.last_checkpoint_time >= minutes * 60)
    return any_rank([due], run.info)[0]
