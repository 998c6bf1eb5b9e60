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


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_scalars(*, threshold, eps, kappa, tau, floor, softcap, label_smoothing, lse_square_scale,
                  chunk_size=None, max_chunk_bytes=None) -> None:
    """Every scalar option finite and in range (a NaN threshold would silently weigh every token 0)."""
    if _finite_number("threshold", threshold) <= 0:
        raise ValueError(f"threshold must be > 0 (a loss level; ln 2 = p 0.5), got {threshold}")
    if _finite_number("eps", eps) <= 0:
        raise ValueError(f"eps must be > 0 (it keeps sum(w) + eps away from 0 when no token is active), got {eps}")
    if _finite_number("kappa", kappa) <= 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    if _finite_number("tau", tau) <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= _finite_number("floor", floor) <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    if _finite_number("softcap", softcap) < 0:
        raise ValueError(f"softcap must be > 0 (or None / 0 for off), got {softcap}")
    if not 0.0 <= _finite_number("label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if _finite_number("lse_square_scale", lse_square_scale) < 0:
        raise ValueError(f"lse_square_scale must be >= 0, got {lse_square_scale}")
    for name, value in (("chunk_size", chunk_size), ("max_chunk_bytes", max_chunk_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def check_inputs(hidden, weight, labels, bias, *, objective, reduction, token_weights, window,
                 eps, kappa, tau, floor, ignore_index, threshold, softcap=0.0, label_smoothing=0.0,
                 lse_square_scale=0.0, chunk_size=None, max_chunk_bytes=None,
                 check_tensor_values: bool = True) -> None:
    """Shapes, dtypes, devices and options; with `check_tensor_values` also the label range and
    a per-sample window tensor's values (host syncs, so skipped while torch.compile traces;
    the op itself checks the labels before its first kernel)."""
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
        if check_tensor_values and window.numel() and not bool(((window > 0) & ~window.isnan()).all()):
            raise ValueError("window must be > 0 (or inf) for every sample")
    elif isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0:
        raise ValueError(f"window must be a positive number or a per-sample tensor, got {window!r}")
    check_scalars(threshold=threshold, eps=eps, kappa=kappa, tau=tau, floor=floor, softcap=softcap,
                  label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, chunk_size=chunk_size,
                  max_chunk_bytes=max_chunk_bytes)
    if check_tensor_values:
        check_label_range(labels, weight.shape[0], ignore_index)


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if labels.numel() == 0:
        return
    kept = labels[labels != ignore_index]
    if kept.numel() and bool(((kept < 0) | (kept >= vocab)).any()):
        bad = kept[(kept < 0) | (kept >= vocab)][0].item()
        raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}; "
                         f"found {bad}")
