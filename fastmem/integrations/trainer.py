"""HF Trainer / TRL callback: stop as soon as every answer token is recalled, before the update.

docs/design.md (section 9): decide from the stats of the current forward and stop
*before* the optimizer step. One more AdamW step on (near-)zero gradients still moves the
weights through its momentum, and on SmolLM2 that single step broke greedy exact match.

The Trainer calls `on_pre_optimizer_step` after the last micro-batch's backward (and after
gradient clipping) and right before `optimizer.step()`. There this callback reads the fused
loss's TokenStats of every micro-batch of the step (`last_stats`, collected at each
`on_substep_end`), and when every valid token has p > 0.5 it sets every parameter's `.grad` to
None — torch optimizers skip parameters without a gradient, so AdamW moves nothing, momentum and
weight decay included — and sets `control.should_training_stop`. A step whose MemFT weights are
all zero (no token above the weighting threshold, yet not all recalled) is skipped the same way
without stopping.

The training forward's stats carry dropout (LoRA dropout, or the model's own): "every token
recalled" there can be luck of the mask. So when dropout is on, a candidate step is confirmed
before stopping: the step's micro-batches (their inputs captured by a forward pre-hook) run
once more in eval mode without grad, and the stop holds only if those stats recall every token
too; otherwise training goes on with this step's update. The confirmation costs one forward
per micro-batch and runs only at candidate steps. Recall is read with the one definition the
trainer and the evaluator use (fastmem.constants.is_stubborn, through TokenStats.all_recalled).

Limits: a DeepSpeed / FSDP optimizer that keeps its own gradient copies is not covered; fp16
GradScaler without gradient clipping asserts on a step with no gradients (bf16, fp32, and fp16
with max_grad_norm > 0 are fine).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import TrainerCallback

from fastmem.constants import L_CRIT
from fastmem.integrations.transformers import is_patched, last_stats
from fastmem.nn.modes import eval_mode
from fastmem.ops.token_stats import TokenStats

log = logging.getLogger("fastmem")


class StopWhenMemorized(TrainerCallback):
    """End training at the first optimizer step whose forwards recall every answer token.

    Needs the model patched with `fastmem.integrations.transformers.apply_fastmem` (with TRL's
    SFTTrainer: after building the trainer, which installs its own LM head at init).

    Args:
        threshold: recall line on the per-token loss; L_t < ln 2 is p > 0.5 (greedy recall).
        skip_idle_steps: also skip (without stopping) a step whose MemFT weights are all zero.
        confirm: confirm a candidate stop with an eval-mode forward of the step's micro-batches:
            None (default) when the model has dropout with p > 0, True always, False never.

    After training: `memorized_at_step` (1-based index of the deciding step, None if never),
    `optimizer_steps_skipped` (the deciding step and any idle ones), `confirmations` (one
    `(step, confirmed)` pair per candidate step that was checked in eval mode).
    """

    def __init__(self, threshold: float = L_CRIT, *, skip_idle_steps: bool = True, confirm: bool | None = None):
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if confirm not in (None, True, False):
            raise ValueError(f"confirm must be None, True or False, got {confirm!r}")
        self.threshold = float(threshold)
        self.skip_idle_steps = skip_idle_steps
        self.confirm = confirm
        self.memorized_at_step: int | None = None
        self.optimizer_steps_skipped = 0
        self.confirmations: list[tuple[int, bool]] = []
        self._step_stats: list[TokenStats] = []
        self._last_read: TokenStats | None = None
        self._step_inputs: list[tuple[tuple, dict]] = []
        self._hook = None
        self._replaying = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not is_patched(model):
            raise ValueError("StopWhenMemorized needs the model's loss to run through fastmem: call "
                             "fastmem.integrations.transformers.apply_fastmem(trainer.model, ...) after "
                             "building the trainer (TRL's SFTTrainer replaces model.forward at init)")
        self.memorized_at_step = None
        self.optimizer_steps_skipped = 0
        self.confirmations = []
        self._step_stats, self._last_read, self._step_inputs = [], None, []
        self._remove_hook()
        self._hook = model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()
        self._step_inputs = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_stats = []
        self._step_inputs = []

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._collect(model)
        recalled = self._agree(all(stats.all_recalled(self.threshold) for stats in self._step_stats))
        idle = self.skip_idle_steps and self._agree(all(not bool(stats.weight.any()) for stats in self._step_stats))
        step = state.global_step + 1
        if recalled and self._needs_confirmation(model):
            recalled = self._agree(self._recalled_in_eval_mode(model))
            self.confirmations.append((step, recalled))
            if not recalled:
                log.info("fastmem: step %d recalled every token under dropout but not in eval mode; training on", step)
        if recalled:
            self.memorized_at_step = step
            control.should_training_stop = True
            log.info("fastmem: every answer token has p > 0.5 at step %d; its optimizer step is skipped", step)
        if recalled or idle:
            _drop_gradients(model, optimizer)
            self.optimizer_steps_skipped += 1
        self._step_stats = []
        return control

    def _capture_inputs(self, module, args, kwargs):
        # References only (the batch tensors the Trainer holds anyway), dropped at the next step.
        if not self._replaying:
            self._step_inputs.append((args, dict(kwargs)))

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _needs_confirmation(self, model) -> bool:
        if self.confirm is not None:
            return self.confirm
        return model is not None and any(isinstance(m, nn.Dropout) and m.p > 0 and m.training
                                         for m in model.modules())

    def _recalled_in_eval_mode(self, model) -> bool:
        """Rerun the step's micro-batches in eval mode (no dropout, no grad; logits not built)
        and read their stats with the same recall rule."""
        if not self._step_inputs:
            raise RuntimeError("StopWhenMemorized: no captured inputs for this step's micro-batches; "
                               "cannot confirm the stop in eval mode")
        self._replaying = True
        try:
            with eval_mode(model), torch.no_grad():
                for args, kwargs in self._step_inputs:
                    model(*args, **{**kwargs, "return_logits": False})
                    if not last_stats(model).all_recalled(self.threshold):
                        return False
            return True
        finally:
            self._replaying = False

    def _collect(self, model) -> None:
        stats = last_stats(model)
        if stats is None or stats is self._last_read:
            raise RuntimeError("StopWhenMemorized: no fresh fastmem stats for this micro-batch; the forward did "
                               "not run through apply_fastmem's loss (was model.forward replaced after it, or "
                               "were labels missing?)")
        self._last_read = stats
        self._step_stats.append(stats)

    @staticmethod
    def _agree(flag: bool) -> bool:
        """All ranks must take the same decision (each sees only its own micro-batches)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return flag
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        value = torch.tensor(int(flag), device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())


def _drop_gradients(model, optimizer) -> None:
    """Set `.grad = None` on every parameter the optimizer (or the model) holds: torch optimizers
    skip such parameters entirely, so the step changes neither the weights nor the moments."""
    params = []
    if optimizer is not None:
        params += [p for group in optimizer.param_groups for p in group["params"]]
    if model is not None:
        params += list(model.parameters())
    for param in params:
        param.grad = None
