"""fastmem.linear_cross_entropy: fused lm_head + cross-entropy with MemFT weighting.

Two entry points share one chunk loop (cross_entropy_chunked.run_chunks):
* eager calls run `_LinearCrossEntropyFunction`, which forms the gradient in the forward and
  scales it in place in backward (no second `[N, H]` buffer);
* under torch.compile the call becomes the custom op `torch.ops.fastmem.linear_cross_entropy`
  (opaque to the compiler, with a fake impl and a registered autograd formula), so a
  `fullgraph=True` compile never traces the data-dependent chunk loop. Its backward scales
  the saved gradient out of place (one transient `[N, H]` buffer while backward runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from fastmem.backends import choose_backend, implementation, register_op
from fastmem.constants import IGNORE_INDEX, L_CRIT, MEMFT_EPS, SW_FLOOR, SW_KAPPA, SW_TAU, SW_WINDOW
from fastmem.ops.cross_entropy_checks import check_inputs, check_label_range
from fastmem.ops.cross_entropy_chunked import chunk_rows_for, run_chunks
from fastmem.ops.cross_entropy_options import LogitOptions
from fastmem.ops.memft_weights import ChunkWeigher, MemFTConfig
from fastmem.ops.token_stats import STAT_FIELDS, TokenStats

OP_NAME = "linear_cross_entropy"
# Fastest first: `auto` takes the first one that runs on the tensors' device. Each module
# provides `process_chunk` (the contract is in cross_entropy_torch).
register_op(OP_NAME, {"cuda": "fastmem.ops.cross_entropy_cuda", "triton": "fastmem.ops.cross_entropy_triton",
                      "torch": "fastmem.ops.cross_entropy_torch"})


@dataclass(frozen=True)
class _CallPlan:
    config: MemFTConfig
    options: LogitOptions
    reduction: str
    ignore_index: int
    seq_len: int
    num_samples: int
    chunk_rows: int
    backend: str
    weighted: bool  # the normaliser is sum(w) + eps (MemFT or token weights), not the token count


def _chunk_kernel(backend: str):
    return implementation(OP_NAME, backend).process_chunk


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    if rows is None:
        return values
    out = torch.zeros(n_rows, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The call's one host sync outside the chunks: which rows carry a label."""
    valid = labels != ignore_index
    rows = valid.nonzero().squeeze(1)
    return valid, (None if rows.numel() == labels.numel() else rows)


def _forward_pass(hidden, weight, bias, labels, token_weights, window, plan: _CallPlan,
                  want_grad_hidden: bool, want_grad_weight: bool, want_grad_bias: bool):
    """The chunk loop and the reduction. Returns (loss, stats tuple in STAT_FIELDS order,
    norm, grad_hidden, grad_weight, grad_bias), the gradients not yet divided by norm."""
    config = plan.config
    n_rows = hidden.shape[0]
    valid, rows = _valid_rows(labels, plan.ignore_index)
    n_valid = n_rows if rows is None else rows.numel()
    weigher = ChunkWeigher(config, plan.num_samples, plan.seq_len, window, hidden.device)

    def weigh(c0, c1, rows_c, nll, correct):
        chunk_tw = None if token_weights is None else token_weights.index_select(0, rows_c)
        return weigher(rows_c, nll, correct, chunk_tw)

    result = run_chunks(hidden, weight, bias, labels, rows, weigh, _chunk_kernel(plan.backend),
                        want_grad_hidden=want_grad_hidden, want_grad_weight=want_grad_weight,
                        want_grad_bias=want_grad_bias, chunk_rows=plan.chunk_rows, options=plan.options,
                        dense_weights=not plan.weighted)

    # A NaN / Inf token loss reaches the sum even when its weight is 0 (0 * NaN = NaN): bad
    # hidden states give a NaN loss, never a finite wrong one.
    weighted_rows = result.weight * result.loss
    weighted_sum = weighted_rows.sum()
    if plan.reduction == "none":
        loss = _scatter_rows(weighted_rows, rows, n_rows)
        norm = torch.ones_like(weighted_sum)
    elif plan.reduction == "sum":
        loss, norm = weighted_sum, torch.ones_like(weighted_sum)
    elif plan.weighted:
        norm = result.weight.sum() + config.eps
        loss = weighted_sum / norm
    else:
        # Plain SFT mean is exactly F.cross_entropy's mean; an all-ignored batch gives 0.
        norm = torch.full_like(weighted_sum, float(max(n_valid, 1)))
        loss = weighted_sum / norm

    stats = (_scatter_rows(result.nll, rows, n_rows), _scatter_rows(torch.exp(-result.nll), rows, n_rows),
             _scatter_rows(result.correct, rows, n_rows), _scatter_rows(result.lse, rows, n_rows),
             _scatter_rows(result.weight, rows, n_rows), valid,
             _scatter_rows(result.target - result.best_other, rows, n_rows), weigher.first_error())
    return loss, stats, norm, result.grad_hidden, result.grad_weight, result.grad_bias


def _recompute_grads(hidden, weight, bias, labels, row_scale, plan: _CallPlan, want_hidden, want_weight, want_bias):
    """reduction="none": rerun the chunk loop with fixed row scales g_t * w_t ([N], 0 on ignored rows)."""
    _, rows = _valid_rows(labels, plan.ignore_index)
    row_scale = row_scale if rows is None else row_scale.index_select(0, rows)
    result = run_chunks(hidden, weight, bias, labels, rows,
                        lambda c0, c1, rows_c, nll, correct: row_scale[c0:c1], _chunk_kernel(plan.backend),
                        want_grad_hidden=want_hidden, want_grad_weight=want_weight, want_grad_bias=want_bias,
                        chunk_rows=plan.chunk_rows, options=plan.options)
    return result.grad_hidden, result.grad_weight, result.grad_bias


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward runs the chunk loop and, when a gradient is wanted, forms it in the same pass.

    Saved for backward: the unnormalised grad_hidden `[N, H]` (which backward scales in place
    and hands out, so no second `[N, H]` buffer), fp32 grad_weight / grad_bias when those
    require grad, and the normaliser Z. With reduction="none" the per-token grad_output is
    only known in backward, so there the gradient is recomputed chunk by chunk instead.
    Backward is once_differentiable: a double backward raises instead of being silently wrong.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, window, plan: _CallPlan):
        precompute = plan.reduction != "none"
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        loss, stats, norm, *grads = _forward_pass(hidden, weight, bias, labels, token_weights, window, plan,
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
            grads = _recompute_grads(hidden, weight, bias, labels, row_scale, ctx.plan, *ctx.needs_input_grad[:3])
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


# ---- the custom op torch.compile sees ----

def _plan_from_args(objective, threshold, eps, kappa, tau, floor, softcap, label_smoothing, lse_square_scale,
                    ignore_index, reduction, seq_len, num_samples, chunk_rows, backend, weighted) -> _CallPlan:
    return _CallPlan(MemFTConfig(objective, threshold, eps, kappa, tau, floor),
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
    loss, stats, norm, gh, gw, gb = _forward_pass(hidden, weight, bias, labels, token_weights, window, plan,
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
    gh, gw, gb = _recompute_grads(hidden, weight, bias, labels, row_scale, plan, want_grad_hidden,
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
    plan = _CallPlan(MemFTConfig(objective, float(threshold), float(eps), float(kappa), float(tau), float(floor)),
                     LogitOptions(float(softcap), float(label_smoothing), float(lse_square_scale)), reduction,
                     ignore_index, max(seq_len, 1), num_samples, rows, chosen,
                     objective != "sft" or token_weights is not None)

    # The op sets its own precision (fp32 accumulation, GEMMs in the input dtype): an enclosing
    # autocast region must not recast its GEMMs or in-place buffers.
    with torch.autocast(hidden.device.type, enabled=False):
        if compiling:
            loss, *stat_tensors = _call_custom_op(hidden_2d, weight, bias, labels_1d, tw_1d, window_per_sample, plan)
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


def _call_custom_op(hidden, weight, bias, labels, token_weights, window, plan: _CallPlan):
    cfg, opt = plan.config, plan.options
    outputs = torch.ops.fastmem.linear_cross_entropy(
        hidden, weight, bias, labels, token_weights, window, cfg.objective, cfg.threshold, cfg.eps, cfg.kappa,
        cfg.tau, cfg.floor, opt.softcap, opt.label_smoothing, opt.lse_square_scale, plan.ignore_index,
        plan.reduction, plan.seq_len, plan.num_samples, plan.chunk_rows, plan.backend, plan.weighted,
        _wants_grad(hidden), _wants_grad(weight), _wants_grad(bias))
    return outputs[:1 + len(STAT_FIELDS)]
