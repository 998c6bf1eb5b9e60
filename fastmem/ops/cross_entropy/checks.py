"""Tensor checks of linear_cross_entropy: a clear error naming the argument, before any kernel.

The scalar options are checked once, when their LossSpec is built (spec.py). Shapes, dtypes and
devices cost nothing and are always checked; tensor values (the label range, a per-sample
window) cost a host sync and are checked only where that is free (syncs.py), or on request
through `check_label_range`.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_tensors(hidden, weight, labels, bias, token_weights, window) -> None:
    """Shapes, dtypes and devices (no tensor value is read)."""
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
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias), ("token_weights", token_weights),
                         ("window", window)):
        if tensor is not None and _tensor(name, tensor).device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    if token_weights is not None:
        if not token_weights.dtype.is_floating_point:
            raise TypeError(f"token_weights must be a float tensor, got {token_weights.dtype}")
        if tuple(token_weights.shape) != tuple(labels.shape):
            raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal labels "
                             f"shape {tuple(labels.shape)}")
    num_samples = math.prod(labels.shape[:-1]) if labels.dim() >= 2 else 1
    if window is not None and (window.numel() != num_samples or window.dim() > 1):
        raise ValueError(f"window must be a number or a [num_samples] = [{num_samples}] tensor, "
                         f"got shape {tuple(window.shape)}")


def check_window_values(window: torch.Tensor | None) -> None:
    """A per-sample window's values (a host sync: see syncs.py)."""
    if window is not None and window.numel() and not bool(((window > 0) & ~window.isnan()).all()):
        raise ValueError("window must be > 0 (or inf) for every sample")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int = -100) -> None:
    """Raise ValueError unless every label is in [0, vocab) or equals ignore_index.

    Costs host syncs; on a GPU the op itself never calls it (an out-of-range label makes the
    loss NaN on the device instead), so call it once before a run when you want the error.
    """
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels.reshape(-1)[bad.reshape(-1).to(torch.uint8).argmax()].item()
        raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; found {first}")
