"""`torch.ops.fastmem.linear_cross_entropy`: the fused loss as a custom op, so that
`torch.compile(fullgraph=True)` sees one opaque call (fake impl + registered autograd) instead
of tracing the data-dependent chunk loop."""

from __future__ import annotations

import torch

from fastmem.constants import L_CRIT, MEMFT_EPS, SW_FLOOR, SW_KAPPA, SW_TAU
from fastmem.ops.cross_entropy_checks import check_label_range
from fastmem.ops.cross_entropy_options import LogitOptions
from fastmem.ops.cross_entropy_pass import CallPlan, forward_pass, recompute_grads
from fastmem.ops.memft_weights import MemFTConfig
from fastmem.ops.token_stats import STAT_FIELDS


def _plan_from_args(objective, threshold, eps, kappa, tau, floor, softcap, label_smoothing, lse_square_scale,
                    ignore_index, reduction, seq_len, num_samples, chunk_rows, backend, weighted) -> CallPlan:
    return CallPlan(MemFTConfig(objective, threshold, eps, kappa, tau, floor),
                     LogitOptions(softcap, label_smoothing, lse_square_scale), reduction, ignore_index, seq_len,
                     num_samples, chunk_rows, backend, weighted)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op("fastmem::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
            token_weights: torch.Tensor | None, window: torch.Tensor, objective: str, threshold: float, eps: float,
            kappa: float, tau: float, floor: float, softcap: float, label_smoothing: float, lse_square_scale: float,
            ignore_index: int, reduction: str, seq_len: int, num_samples: int, chunk_rows: int, backend: str,
            weighted: bool, want_grad_hidden: bool, want_grad_weight: bool,
            want_grad_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor]:
    """(loss, *stats in STAT_FIELDS order, grad_hidden, grad_weight, grad_bias): with reduction
    mean / sum the gradients of the loss for grad_output 1, already in the parameters' dtypes
    (empty when not wanted or reduction="none"). The return annotation is the op's schema:
    1 + len(STAT_FIELDS) + 3 tensors, so a new stat field adds one there too."""
    plan = _plan_from_args(objective, threshold, eps, kappa, tau, floor, softcap, label_smoothing, lse_square_scale,
                           ignore_index, reduction, seq_len, num_samples, chunk_rows, backend, weighted)
    check_label_range(labels, weight.shape[0], ignore_index)  # skipped by the wrapper while compiling
    precompute = reduction != "none"
    loss, stats, norm, gh, gw, gb = forward_pass(hidden, weight, bias, labels, token_weights, window, plan,
                                                  want_grad_hidden and precompute, want_grad_weight and precompute,
                                                  want_grad_bias and precompute)
    inv = 1.0 / norm
    gh = _empty(hidden) if gh is None else gh.mul_(inv.to(gh.dtype))
    gw = _empty(weight) if gw is None else gw.mul_(inv).to(weight.dtype)
    gb = _empty(hidden) if gb is None else gb.mul_(inv).to(bias.dtype)
    return (loss, *stats, gh, gw, gb)


@_lce_op.register_fake
def _lce_op_fake(hidden, weight, bias, labels, token_weights, window, objective, threshold, eps, kappa, tau, floor,
                 softcap, label_smoothing, lse_square_scale, ignore_index, reduction, seq_len, num_samples,
                 chunk_rows, backend, weighted, want_grad_hidden, want_grad_weight, want_grad_bias):
    n_rows = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    per_token = lambda dtype: hidden.new_empty(n_rows, dtype=dtype)  # noqa: E731
    loss = per_token(acc) if reduction == "none" else hidden.new_empty((), dtype=acc)
    stats = (per_token(acc), per_token(acc), per_token(torch.bool), per_token(acc), per_token(acc),
             per_token(torch.bool), per_token(acc), hidden.new_empty(num_samples, dtype=torch.int64))
    precompute = reduction != "none"
    gh = torch.empty_like(hidden) if want_grad_hidden and precompute else _empty(hidden)
    gw = torch.empty_like(weight) if want_grad_weight and precompute else _empty(weight)
    gb = torch.empty_like(bias) if bias is not None and want_grad_bias and precompute else _empty(hidden)
    return (loss, *stats, gh, gw, gb)


_OP_ARG_NAMES = ("objective", "threshold", "eps", "kappa", "tau", "floor", "softcap", "label_smoothing",
                 "lse_square_scale", "ignore_index", "reduction", "seq_len", "num_samples", "chunk_rows", "backend",
                 "weighted")


@torch.library.custom_op("fastmem::linear_cross_entropy_grads", mutates_args=())
def _lce_grads_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  row_scale: torch.Tensor, softcap: float, label_smoothing: float, lse_square_scale: float,
                  ignore_index: int, chunk_rows: int, backend: str, want_grad_hidden: bool, want_grad_weight: bool,
                  want_grad_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of sum_t row_scale_t * loss_t (reduction="none"'s backward)."""
    plan = _plan_from_args("sft", L_CRIT, MEMFT_EPS, SW_KAPPA, SW_TAU, SW_FLOOR, softcap, label_smoothing,
                           lse_square_scale, ignore_index, "none", 1, 1, chunk_rows, backend, False)
    gh, gw, gb = recompute_grads(hidden, weight, bias, labels, row_scale, plan, want_grad_hidden,
                                  want_grad_weight, want_grad_bias)
    return (_empty(hidden) if gh is None else gh, _empty(weight) if gw is None else gw.to(weight.dtype),
            _empty(hidden) if gb is None else gb.to(bias.dtype))


@_lce_grads_op.register_fake
def _lce_grads_op_fake(hidden, weight, bias, labels, row_scale, softcap, label_smoothing, lse_square_scale,
                       ignore_index, chunk_rows, backend, want_grad_hidden, want_grad_weight, want_grad_bias):
    return (torch.empty_like(hidden) if want_grad_hidden else _empty(hidden),
            torch.empty_like(weight) if want_grad_weight else _empty(weight),
            torch.empty_like(bias) if bias is not None and want_grad_bias else _empty(hidden))


def _lce_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels = inputs[:4]
    args = dict(zip(_OP_ARG_NAMES, inputs[6:6 + len(_OP_ARG_NAMES)]))
    ctx.args = args
    ctx.has = (inputs[-3], inputs[-2], inputs[-1] and bias is not None)
    if args["reduction"] == "none":
        ctx.save_for_backward(hidden, weight, bias, labels, output[1 + STAT_FIELDS.index("weight")])
    else:
        ctx.save_for_backward(*output[-3:])


def _lce_backward(ctx, grad_loss, *unused):
    args = ctx.args
    if args["reduction"] == "none":
        hidden, weight, bias, labels, weight_tok = ctx.saved_tensors
        gh, gw, gb = _lce_grads_op(hidden, weight, bias, labels, grad_loss.to(weight_tok.dtype) * weight_tok,
                                   args["softcap"], args["label_smoothing"], args["lse_square_scale"],
                                   args["ignore_index"], args["chunk_rows"], args["backend"], *ctx.has)
    else:
        gh, gw, gb = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    grads = [g if want else None for g, want in zip((gh, gw, gb), ctx.has)]
    return (*grads, *([None] * (len(_OP_ARG_NAMES) + 6)))


torch.library.register_autograd("fastmem::linear_cross_entropy", _lce_backward, setup_context=_lce_setup_context)


def _wants_grad(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad and torch.is_grad_enabled()


def call_custom_op(hidden, weight, bias, labels, token_weights, window, plan: CallPlan):
    cfg, opt = plan.config, plan.options
    outputs = torch.ops.fastmem.linear_cross_entropy(
        hidden, weight, bias, labels, token_weights, window, cfg.objective, cfg.threshold, cfg.eps, cfg.kappa,
        cfg.tau, cfg.floor, opt.softcap, opt.label_smoothing, opt.lse_square_scale, plan.ignore_index,
        plan.reduction, plan.seq_len, plan.num_samples, plan.chunk_rows, plan.backend, plan.weighted,
        _wants_grad(hidden), _wants_grad(weight), _wants_grad(bias))
    return outputs[:1 + len(STAT_FIELDS)]
