"""Module-mode helpers shared by the evaluator, the trainer and the transformers integration."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore every module's own mode: a trainer may evaluate (or confirm
    a stop) mid-training, and LoRA dropout left on would score a noisy model."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
