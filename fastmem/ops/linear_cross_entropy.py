"""fastmem.linear_cross_entropy: fused lm_head + cross-entropy with MemFT weighting."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastmem.backends import resolve_backend
from fastmem.constants import IGNORE_INDEX, L_CRIT, MEMFT_EPS, SW_FLOOR, SW_KAPPA, SW_TAU, SW_WINDOW
from fastmem.ops.cross_entropy_checks import check_inputs
from fastmem.ops.cross_entropy_chunked import default_chunk_rows, run_chunks
from fastmem.ops.memft_weights import ChunkWeigher, MemFTConfig
from fastmem.ops.token_stats import TokenStats

# fastest first: `auto` takes the first one that runs on the tensors' device
SUPPORTED_BACKENDS = ("cuda", "triton", "torch")


@dataclass(frozen=True)
class _CallPlan:
    config: MemFTConfig
    reduction: str
    ignore_index: int
    seq_len: int
    num_samples: int
    chunk_rows: int
    backend: str


def _chunk_kernel(backend: str):
    if backend == "cuda":
        from fastmem.ops.cross_entropy_cuda import process_chunk
    elif backend == "triton":
        from fastmem.ops.cross_entropy_triton import process_chunk
    else:
        from fastmem.ops.cross_entropy_torch import process_chunk
    return process_chunk


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    if rows is None:
        return values
    out = torch.zeros(n_rows, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    valid = labels != ignore_index
    return valid, (None if bool(valid.all()) else valid.nonzero().squeeze(1))


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward runs the chunk loop and, when a gradient is wanted, forms it in the same pass.

    Saved for backward: the unnormalised grad_hidden `[N, H]` (which backward scales in place
    and hands out, so no second `[N, H]` buffer), fp32 grad_weight / grad_bias when those
    require grad, and the normaliser Z. With reduction="none" the per-token grad_output is
    only known in backward, so there the gradient is recomputed chunk by chunk instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, window, plan: _CallPlan):
        config = plan.config
        n_rows = hidden.shape[0]
        valid, rows = _valid_rows(labels, plan.ignore_index)
        n_valid = n_rows if rows is None else rows.numel()
        weigher = ChunkWeigher(config, plan.num_samples, plan.seq_len, window, hidden.device)

        def weigh(c0, c1, rows_c, loss, correct):
            chunk_tw = None if token_weights is None else token_weights.index_select(0, rows_c)
            return weigher(rows_c, loss, correct, chunk_tw)

        precompute = plan.reduction != "none"
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        result = run_chunks(hidden, weight, bias, labels, rows, weigh, _chunk_kernel(plan.backend),
                            want_grad_hidden=need_hidden and precompute,
                            want_grad_weight=need_weight and precompute,
                            want_grad_bias=need_bias and precompute, chunk_rows=plan.chunk_rows)

        loss_rows = result.lse - result.target
        weighted_rows = result.weight * loss_rows
        weighted_sum = weighted_rows.sum()
        if plan.reduction == "none":
            loss = _scatter_rows(weighted_rows, rows, n_rows)
            norm = torch.ones_like(weighted_sum)
        elif plan.reduction == "sum":
            loss, norm = weighted_sum, torch.ones_like(weighted_sum)
        elif config.weighted or token_weights is not None:
            norm = result.weight.sum() + config.eps
            loss = weighted_sum / norm
        else:
            # Plain SFT mean is exactly F.cross_entropy's mean; an all-ignored batch gives 0.
            norm = torch.full_like(weighted_sum, float(max(n_valid, 1)))
            loss = weighted_sum / norm

        weight_tok = _scatter_rows(result.weight, rows, n_rows)
        stats = (_scatter_rows(loss_rows, rows, n_rows), _scatter_rows(torch.exp(-loss_rows), rows, n_rows),
                 _scatter_rows(result.correct, rows, n_rows), _scatter_rows(result.lse, rows, n_rows),
                 weight_tok, valid, weigher.first_error(),
                 _scatter_rows((result.target - result.best_other).float(), rows, n_rows))
        ctx.mark_non_differentiable(*stats)
        ctx.plan = plan
        ctx.param_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.applied_scale = None
        if precompute:
            # Saved (not kept as attributes) so autograd frees them right after backward
            # unless retain_graph=True, and a leaf's .grad can take the buffer without a copy.
            ctx.save_for_backward(norm, result.grad_hidden, result.grad_weight, result.grad_bias)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, weight_tok)
        return (loss,) + stats

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        if ctx.plan.reduction == "none":
            grads = _recompute_grads(ctx, grad_loss)
        else:
            norm, *grads = ctx.saved_tensors
            grads = _scale_in_place(ctx, grads, grad_loss.to(norm.dtype) / norm)
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.to(dtype)
                                               for g, dtype in zip(grads, ctx.param_dtypes))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _scale_in_place(ctx, grads, scale):
    """Scale the gradients formed in the forward by grad_output / Z, in place (no second
    [N, H] buffer). A second backward (retain_graph=True, gradcheck) rescales by the ratio."""
    factor = scale
    if ctx.applied_scale is not None:
        if float(ctx.applied_scale) == 0.0:
            raise RuntimeError("fastmem.linear_cross_entropy: a second backward after one with "
                               "grad_output 0 cannot be formed (the in-place gradient was zeroed)")
        factor = scale / ctx.applied_scale
    ctx.applied_scale = scale
    # `.data`: this mutation is bookkept by applied_scale, not by autograd's version counter,
    # which would otherwise reject the saved buffer on a retained second backward.
    return [None if g is None else g.data.mul_(factor) for g in grads]


def _recompute_grads(ctx, grad_loss):
    """reduction="none": rerun the chunk loop with fixed row scales g_t * w_t."""
    hidden, weight, bias, labels, weight_tok = ctx.saved_tensors
    plan = ctx.plan
    _, rows = _valid_rows(labels, plan.ignore_index)
    row_scale = grad_loss.to(weight_tok.dtype) * weight_tok
    row_scale = row_scale if rows is None else row_scale.index_select(0, rows)
    result = run_chunks(hidden, weight, bias, labels, rows,
                        lambda c0, c1, rows_c, loss, correct: row_scale[c0:c1],
                        _chunk_kernel(plan.backend), want_grad_hidden=ctx.needs_input_grad[0],
                        want_grad_weight=ctx.needs_input_grad[1], want_grad_bias=ctx.needs_input_grad[2],
                        chunk_rows=plan.chunk_rows)
    return result.grad_hidden, result.grad_weight, result.grad_bias


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, *, objective: str = "sft",
                         threshold: float = L_CRIT, eps: float = MEMFT_EPS,
                         token_weights: torch.Tensor | None = None, kappa: float = SW_KAPPA,
                         tau: float = SW_TAU, window: int | float | torch.Tensor = SW_WINDOW,
                         floor: float = SW_FLOOR, ignore_index: int = IGNORE_INDEX,
                         reduction: str = "mean", return_stats: bool = False, backend: str = "auto",
                         chunk_size: int | None = None):
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, never building `[N, V]`.

    Args:
        hidden: `[..., H]` fp16 / bf16 / fp32 (fp64 on the torch backend).
        weight: `[V, H]` lm_head, same dtype and device. Its gradient is formed only when it
            requires grad (a frozen head costs no grad_W work).
        labels: `[...]` = hidden.shape[:-1], integer; `ignore_index` marks tokens without
            loss. A 2-D `[B, S]` tensor is B samples in position order (for "sw" each row is
            one sample; more leading dims are flattened into samples, 1-D is one sample).
        bias: optional `[V]`.
        objective: "sft" (w_t = 1), "ot" (w_t = 1[L_t > threshold]) or "sw"
            (w_t = sigmoid(kappa (L_t - threshold)) times the spatial factor of the
            sample's first greedy error: exp(-max(t - a, 0) / tau) within `window`, `floor`
            beyond; no error: factor 1). See ../shared/PAPER.md.
        token_weights: optional float tensor shaped like labels multiplying w_t.
        window: int / float, or a `[num_samples]` tensor (the trainer widens it per sample).
        reduction: "mean" (SFT: the mean over valid tokens, exactly F.cross_entropy's;
            weighted: sum w L / (sum w + eps), w detached), "sum" (sum w L) or "none"
            (w_t L_t shaped like labels).
        return_stats: also return a TokenStats of the same pass.
        backend: "auto" | "torch" | "triton" | "cuda".
        chunk_size: token rows per chunk (default: a logits budget of 64 MiB on a GPU,
            16 MiB on a CPU).

    Returns:
        the loss in fp32 (fp64 for fp64 inputs) (a scalar, or shaped like labels for "none"), and with
        `return_stats=True` a `(loss, TokenStats)` pair.

    Saved for backward: the gradient of hidden `[N, H]` (formed during the forward),
    fp32 gradients of weight / bias if they require grad, one scalar.
    """
    check_inputs(hidden, weight, labels, bias, objective=objective, reduction=reduction,
                 token_weights=token_weights, window=window, eps=eps, kappa=kappa, tau=tau,
                 floor=floor, ignore_index=ignore_index)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32; float64 runs on backend='torch'")
    supported = SUPPORTED_BACKENDS
    if backend == "auto" and hidden.dtype == torch.float64:
        supported = tuple(b for b in SUPPORTED_BACKENDS if b != "triton")  # Triton has no fp64 path here
    chosen = resolve_backend("linear_cross_entropy", backend, hidden.device, supported)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    label_shape = labels.shape
    seq_len = label_shape[-1] if labels.dim() >= 1 else 1
    num_samples = math.prod(label_shape[:-1]) if labels.dim() >= 2 else 1
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1).to(torch.int64).contiguous()
    tw_1d = None if token_weights is None else token_weights.reshape(-1).to(torch.float32)
    if isinstance(window, torch.Tensor):
        window_per_sample = window.reshape(-1).to(torch.float32)
    else:
        window_per_sample = torch.full((num_samples,), float(window), device=hidden.device)
    config = MemFTConfig(objective, float(threshold), float(eps), float(kappa), float(tau), float(floor))
    plan = _CallPlan(config, reduction, ignore_index, max(seq_len, 1), num_samples,
                     chunk_size or default_chunk_rows(weight.shape[0], hidden.device), chosen)

    # The op sets its own precision (fp32 accumulation, GEMMs in the input dtype): an enclosing
    # autocast region must not recast its GEMMs or in-place buffers.
    with torch.autocast(hidden.device.type, enabled=False):
        loss, *stat_tensors = _LinearCrossEntropyFunction.apply(
            hidden_2d, weight, bias, labels_1d, tw_1d, window_per_sample, plan)
    if reduction == "none":
        loss = loss.reshape(label_shape)
    if not return_stats:
        return loss
    per_token = [t.reshape(label_shape) for t in stat_tensors[:6]]
    first_error = stat_tensors[6].reshape(label_shape[:-1]) if labels.dim() >= 2 else stat_tensors[6].reshape(())
    return loss, TokenStats(*per_token, first_error=first_error, margin=stat_tensors[7].reshape(label_shape))
