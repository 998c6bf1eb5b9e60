"""Input checks of linear_cross_entropy: a clear error naming the argument, before any kernel."""

from __future__ import annotations

import math

import torch

from fastmem.ops.memft_weights import OBJECTIVES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_inputs(hidden, weight, labels, bias, *, objective, reduction, token_weights, window,
                 eps, kappa, tau, floor, ignore_index) -> None:
    hidden, weight, labels = _tensor("hidden", hidden), _tensor("weight", weight), _tensor("labels", labels)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has H={weight.shape[1]} but hidden has H={hidden.shape[-1]} "
                         f"(weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] "
                         f"= {tuple(hidden.shape[:-1])}")
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias), ("token_weights", token_weights)):
        if tensor is not None and _tensor(name, tensor).device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if token_weights is not None:
        if not token_weights.dtype.is_floating_point:
            raise TypeError(f"token_weights must be a float tensor, got {token_weights.dtype}")
        if tuple(token_weights.shape) != tuple(labels.shape):
            raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal labels "
                             f"shape {tuple(labels.shape)}")
    num_samples = math.prod(labels.shape[:-1]) if labels.dim() >= 2 else 1
    if isinstance(window, torch.Tensor):
        if window.numel() != num_samples or window.dim() > 1:
            raise ValueError(f"window must be a number or a [num_samples] = [{num_samples}] tensor, "
                             f"got shape {tuple(window.shape)}")
        if window.device != hidden.device:
            raise ValueError(f"window is on {window.device} but hidden is on {hidden.device}")
    elif not isinstance(window, (int, float)) or window <= 0:
        raise ValueError(f"window must be a positive number or a per-sample tensor, got {window!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    if not isinstance(kappa, (int, float)):
        raise TypeError(f"kappa must be a number, got {type(kappa).__name__}")
    _check_label_range(labels, weight.shape[0], ignore_index)


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if labels.numel() == 0:
        return
    kept = labels[labels != ignore_index]
    if kept.numel() and bool(((kept < 0) | (kept >= vocab)).any()):
        bad = kept[(kept < 0) | (kept >= vocab)][0].item()
        raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; "
                         f"found {bad}")
