"""fastmem.linear_cross_entropy: fused lm_head + cross-entropy with MemFT weighting.

Two entry points share one chunk loop (cross_entropy_chunked.run_chunks):
* eager calls run `_LinearCrossEntropyFunction`, which forms the gradient in the forward and
  scales it in place in backward (no second `[N, H]` buffer);
* under torch.compile the call becomes the custom op `torch.ops.fastmem.linear_cross_entropy`
  (opaque to the compiler, with a fake impl and a registered autograd formula), so a
  `fullgraph=True` compile never traces the data-dependent chunk loop. Its backward scales
  the saved gradient out of place (one transient `[N, H]` buffer while backward runs).
The call's plan and forward pass are in cross_entropy_pass, the op in cross_entropy_custom_op.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from fastmem.backends import choose_backend
from fastmem.constants import IGNORE_INDEX, L_CRIT, MEMFT_EPS, SW_FLOOR, SW_KAPPA, SW_TAU, SW_WINDOW
from fastmem.ops.cross_entropy_checks import check_inputs
from fastmem.ops.cross_entropy_chunked import chunk_rows_for
from fastmem.ops.cross_entropy_custom_op import call_custom_op
from fastmem.ops.cross_entropy_options import LogitOptions
from fastmem.ops.cross_entropy_pass import OP_NAME, CallPlan, forward_pass, recompute_grads
from fastmem.ops.memft_weights import MemFTConfig
from fastmem.ops.token_stats import STAT_FIELDS, TokenStats


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward runs the chunk loop and, when a gradient is wanted, forms it in the same pass.

    Saved for backward: the unnormalised grad_hidden `[N, H]` (which backward scales in place
    and hands out, so no second `[N, H]` buffer), fp32 grad_weight / grad_bias when those
    require grad, and the normaliser Z. With reduction="none" the per-token grad_output is
    only known in backward, so there the gradient is recomputed chunk by chunk instead.
    Backward is once_differentiable: a double backward raises instead of being silently wrong.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, window, plan: CallPlan):
        precompute = plan.reduction != "none"
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        loss, stats, norm, *grads = forward_pass(hidden, weight, bias, labels, token_weights, window, plan,
                                                  need_hidden and precompute, need_weight and precompute,
                                                  need_bias and precompute)
        ctx.mark_non_differentiable(*stats)
        ctx.plan = plan
        ctx.param_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.applied_scale = None
        if precompute:
            # Saved (not kept as attributes) so autograd frees them right after backward
            # unless retain_graph=True, and a leaf's .grad can take the buffer without a copy.
            ctx.save_for_backward(norm, *grads)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, stats[STAT_FIELDS.index("weight")])
        return (loss,) + stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused_stat_grads):
        if ctx.plan.reduction == "none":
            hidden, weight, bias, labels, weight_tok = ctx.saved_tensors
            row_scale = grad_loss.to(weight_tok.dtype) * weight_tok
            grads = recompute_grads(hidden, weight, bias, labels, row_scale, ctx.plan, *ctx.needs_input_grad[:3])
        else:
            norm, *grads = ctx.saved_tensors
            grads = _scale_in_place(ctx, grads, grad_loss.to(norm.dtype) / norm)
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.to(dtype)
                                               for g, dtype in zip(grads, ctx.param_dtypes))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _scale_in_place(ctx, grads, scale):
    """Scale the gradients formed in the forward by grad_output / Z, in place (no second
    [N, H] buffer). A second backward (retain_graph=True) rescales by the ratio."""
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


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, *, objective: str = "sft",
                         threshold: float = L_CRIT, eps: float = MEMFT_EPS,
                         token_weights: torch.Tensor | None = None, kappa: float = SW_KAPPA,
                         tau: float = SW_TAU, window: int | float | torch.Tensor = SW_WINDOW,
                         floor: float = SW_FLOOR, ignore_index: int = IGNORE_INDEX,
                         reduction: str = "mean", return_stats: bool = False, backend: str = "auto",
                         chunk_size: int | None = None, softcap: float | None = None,
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                         max_chunk_bytes: int | None = None):
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, never building `[N, V]`.

    Args:
        hidden: `[..., H]` fp16 / bf16 / fp32 (fp64 on the torch backend). NaN / Inf in a row
            that carries a label makes the loss NaN (never a finite wrong number, whatever
            the objective); rows with `ignore_index` are never read.
        weight: `[V, H]` lm_head, same dtype and device. Its gradient is formed only when it
            requires grad (a frozen head costs no grad_W work).
        labels: `[...]` = hidden.shape[:-1], integer; `ignore_index` marks tokens without
            loss. A 2-D `[B, S]` tensor is B samples in position order (for "sw" each row is
            one sample; more leading dims are flattened into samples, 1-D is one sample).
        bias: optional `[V]`.
        objective: "sft" (w_t = 1), "ot" (w_t = 1[L_t > threshold]) or "sw"
            (w_t = sigmoid(kappa (L_t - threshold)) times the spatial factor of the
            sample's first greedy error: exp(-max(t - a, 0) / tau) within `window`, `floor`
            beyond; no error: factor 1). See ../shared/PAPER.md. L_t is the token's plain
            cross-entropy -log p_y (of the soft-capped logits), whatever the options below.
        threshold: > 0, finite. eps: > 0, finite. kappa, tau: > 0, finite. floor: in [0, 1].
        token_weights: optional float tensor shaped like labels multiplying w_t.
        window: > 0: int / float, or a `[num_samples]` tensor (the trainer widens it per sample).
        reduction: "mean" (SFT: the mean over valid tokens, exactly F.cross_entropy's;
            weighted: sum w l / (sum w + eps), w detached), "sum" (sum w l) or "none"
            (w_t l_t shaped like labels), l_t the per-token loss with the options below.
        return_stats: also return a TokenStats of the same pass.
        backend: "auto" | "torch" | "triton" | "cuda".
        chunk_size: token rows per chunk (default: chunk_rows_for, see cross_entropy_chunked:
            on a GPU at least the GEMM's ridge point, 512 rows for bf16, or all rows when fewer).
        softcap: logits -> softcap * tanh(logits / softcap) (Gemma 2: 30.0); None / 0: off.
        label_smoothing: in [0, 1], as F.cross_entropy defines it:
            l_t = (1 - e) L_t + e (lse_t - mean_c z_tc).
        lse_square_scale: z-loss, >= 0: l_t += s lse_t^2 (lse in TokenStats).
        max_chunk_bytes: cap on the chunk's logits buffer (its own dtype, plus the fp32 working
            copy the torch backend takes of 16-bit logits); trades GEMM efficiency for memory.

    Returns:
        the loss in fp32 (fp64 for fp64 inputs) (a scalar, or shaped like labels for "none"), and with
        `return_stats=True` a `(loss, TokenStats)` pair.

    Saved for backward: the gradient of hidden `[N, H]` (formed during the forward),
    fp32 gradients of weight / bias if they require grad, one scalar. Host syncs: one per call
    (the valid-row index) and at most one per chunk (the count of rows with w != 0 that the
    gradient GEMM takes; none for SFT without token weights).
    """
    softcap = 0.0 if softcap is None else softcap
    compiling = torch.compiler.is_compiling()
    check_inputs(hidden, weight, labels, bias, objective=objective, reduction=reduction,
                 token_weights=token_weights, window=window, eps=eps, kappa=kappa, tau=tau,
                 floor=floor, ignore_index=ignore_index, threshold=threshold, softcap=softcap,
                 label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, chunk_size=chunk_size,
                 max_chunk_bytes=max_chunk_bytes, check_tensor_values=not compiling)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32; float64 runs on backend='torch'")
    # Triton has no fp64 path here
    chosen = choose_backend(OP_NAME, backend, hidden.device,
                            exclude=("triton",) if hidden.dtype == torch.float64 else ())

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
    rows = chunk_size or chunk_rows_for(hidden_2d.shape[0], weight.shape[0], hidden.dtype, hidden.device, chosen,
                                        max_chunk_bytes=max_chunk_bytes)
    plan = CallPlan(MemFTConfig(objective, float(threshold), float(eps), float(kappa), float(tau), float(floor)),
                     LogitOptions(float(softcap), float(label_smoothing), float(lse_square_scale)), reduction,
                     ignore_index, max(seq_len, 1), num_samples, rows, chosen,
                     objective != "sft" or token_weights is not None)

    # The op sets its own precision (fp32 accumulation, GEMMs in the input dtype): an enclosing
    # autocast region must not recast its GEMMs or in-place buffers.
    with torch.autocast(hidden.device.type, enabled=False):
        if compiling:
            loss, *stat_tensors = call_custom_op(hidden_2d, weight, bias, labels_1d, tw_1d, window_per_sample, plan)
        else:
            loss, *stat_tensors = _LinearCrossEntropyFunction.apply(
                hidden_2d, weight, bias, labels_1d, tw_1d, window_per_sample, plan)
    if reduction == "none":
        loss = loss.reshape(label_shape)
    if not return_stats:
        return loss
    named = dict(zip(STAT_FIELDS, stat_tensors))
    first_error = named.pop("first_error")
    per_token = {name: t.reshape(label_shape) for name, t in named.items()}
    first_error = first_error.reshape(label_shape[:-1]) if labels.dim() >= 2 else first_error.reshape(())
    return loss, TokenStats(**per_token, first_error=first_error)
