"""Who is timed. Each contender says which objectives and options it implements and, for this
device, why it cannot run (None when it can); the suite generates only the (case, contender)
pairs a contender implements and skips, with the reason, those this machine cannot run.

To add a contender: write `make(case, threshold) -> fn(hidden, weight, labels) -> scalar loss`
and append a `LossContender` to `loss_contenders()` (docs/benchmarks.md has an example).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.suite.cases import LossCase

ALL_OBJECTIVES = frozenset({"sft", "ot", "sw"})
SFT_ONLY = frozenset({"sft"})


@dataclass(frozen=True)
class LossContender:
    id: str
    objectives: frozenset
    options: frozenset  # keyword options (LossCase.options) it implements
    skip_reason: Callable[[torch.device], str | None]
    make: Callable[[LossCase, float], Callable]
    in_smoke: bool = True

    def implements(self, case: LossCase) -> bool:
        return case.objective in self.objectives and set(case.options) <= self.options


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _gpu_package(module: str, pip_name: str):
    def reason(device: torch.device) -> str | None:
        if not _installed(module):
            return f"{pip_name} is not installed (pip install {pip_name})"
        if device.type != "cuda":
            return f"{pip_name} runs on CUDA tensors only"
        return None
    return reason


# --- fastmem --------------------------------------------------------------------------------

def _fastmem_options() -> frozenset:
    import fastmem

    names = inspect.signature(fastmem.linear_cross_entropy).parameters
    return frozenset(names) - {"hidden", "weight", "labels", "bias", "objective", "threshold", "backend"}


def _fastmem_reason(backend: str):
    def reason(device: torch.device) -> str | None:
        from fastmem.backends import _unavailable_reason, available_backends

        if backend == "triton" and device.type == "cpu":
            return "Triton runs on the CPU only through its interpreter (a correctness tool, not timed)"
        if backend in available_backends(device):
            return None
        return _unavailable_reason(backend, device)
    return reason


def _fastmem_make(backend: str):
    def make(case: LossCase, threshold: float):
        import fastmem

        kwargs = dict(objective=case.objective, backend=backend, **case.options)
        if case.objective == "ot":
            kwargs["threshold"] = threshold
        return lambda h, w, y: fastmem.linear_cross_entropy(h, w, y, **kwargs)
    return make


# --- torch eager / torch.compile: full [N, V] logits, the same MemFT weights ------------------

def eager_loss(hidden, weight, labels, *, objective="sft", threshold=math.log(2), softcap=None,
               label_smoothing=0.0):
    """What a user writes without fastmem: full fp32 logits, F.cross_entropy per token, the
    MemFT weights of docs/design.md (section 1) from the detached per-token losses (one sample of N tokens)."""
    from fastmem.constants import MEMFT_EPS, SW_FLOOR, SW_KAPPA, SW_TAU, SW_WINDOW

    logits = F.linear(hidden, weight).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if objective == "sft":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    per_token = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    loss = per_token.detach()
    if objective == "ot":
        w = (loss > threshold).float()
    else:  # sw: sigmoid around the threshold times the spatial factor from the first error
        w = torch.sigmoid(SW_KAPPA * (loss - threshold))
        wrong = (logits.detach().argmax(-1) != labels).nonzero()
        if wrong.numel():
            d = torch.arange(labels.numel(), device=labels.device) - wrong[0, 0]
            spatial = torch.where(d < SW_WINDOW, torch.exp(-d.clamp(min=0) / SW_TAU), torch.full_like(w, SW_FLOOR))
            w = w * spatial
    return (w * per_token).sum() / (w.sum() + MEMFT_EPS)


def _eager_make(compiled: bool):
    def make(case: LossCase, threshold: float):
        fn = _compiled_eager() if compiled else eager_loss
        return lambda h, w, y: fn(h, w, y, objective=case.objective, threshold=threshold, **case.options)
    return make


@functools.cache
def _compiled_eager():
    return torch.compile(eager_loss)


# --- anchors with their own fused kernels (SFT only: they know nothing of MemFT weights) ------

def _native_reason(device: torch.device) -> str | None:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"
    return None


def _native_make(case: LossCase, threshold: float):
    return lambda h, w, y: F.linear_cross_entropy(h, w, y, **case.options)


def _liger_make(case: LossCase, threshold: float):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y, **case.options)


def _cce_make(case: LossCase, threshold: float):
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, y: linear_cross_entropy(h, w, y, **case.options)


def loss_contenders() -> list[LossContender]:
    always = lambda device: None  # noqa: E731
    fastmem_options = _fastmem_options()
    return [
        *[LossContender(f"fastmem-{b}", ALL_OBJECTIVES, fastmem_options, _fastmem_reason(b), _fastmem_make(b))
          for b in ("torch", "triton", "cuda")],
        LossContender("eager", ALL_OBJECTIVES, frozenset({"softcap", "label_smoothing"}), always, _eager_make(False)),
        # compiling takes tens of seconds on 2 CPU cores: not in the CI smoke subset
        LossContender("torch.compile", ALL_OBJECTIVES, frozenset({"softcap", "label_smoothing"}), always,
                      _eager_make(True), in_smoke=False),
        LossContender("torch-native", SFT_ONLY, frozenset({"label_smoothing"}), _native_reason, _native_make),
        LossContender("liger", SFT_ONLY, frozenset({"softcap", "label_smoothing", "lse_square_scale"}),
                      _gpu_package("liger_kernel", "liger-kernel"), _liger_make),
        LossContender("cut-ce", SFT_ONLY, frozenset({"softcap"}), _gpu_package("cut_cross_entropy", "cut-cross-entropy"),
                      _cce_make),
    ]


# --- LoRA linear --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraContender:
    id: str
    skip_reason: Callable[[torch.device], str | None]
    backend: str | None  # fastmem backend; None: PEFT's eager LoRA layer


def lora_contenders() -> list[LoraContender]:
    from fastmem.ops.lora_linear import SUPPORTED_BACKENDS

    peft_reason = lambda device: None if _installed("peft") else "peft is not installed"  # noqa: E731
    return [*[LoraContender(f"fastmem-{b}", _fastmem_reason(b), b) for b in SUPPORTED_BACKENDS],
            LoraContender("peft", peft_reason, None)]


# --- one training step ---------------------------------------------------------------------------

TRAIN_ENGINES = {
    "fastmem": "cached frozen prefix, adapted span, fused loss on the answer rows",
    "peft-hf": "HF + PEFT forward over prompt + answer, full logits, F.cross_entropy",
    "authors": "peft-hf plus a no-adapter reference forward every step (the paper's code)",
}
