"""`torch.ops.fastmem.linear_cross_entropy`: the fused loss as one custom op, and its autograd.

This is the op's only autograd definition: eager calls and torch.compile both go through the
custom op (a fake impl for tracing, `register_autograd` for the backward), the way
flash-attention registers its kernels. Under compile the op is one opaque node, so a
`fullgraph=True` compile never traces the data-dependent chunk loop.

The gradient is formed in the forward (the chunk loop has the softmax at hand; a backward
would have to rebuild it with another GEMM pass) and returned as extra outputs, divided by
the normaliser Z. Backward multiplies them by grad_output: in place in eager mode (no second
`[N, H]` buffer; `.data` because the multiplication is bookkept by `applied_scale`, not by
autograd's version counter, which would otherwise reject a retained second backward), out of
place while compiling (functional graphs). With reduction="none" the per-token grad_output
is only known in backward, so there the gradient is recomputed chunk by chunk
(`fastmem::linear_cross_entropy_grads`).
"""

from __future__ import annotations

import torch

from fastmem.ops.cross_entropy.forward import forward_pass, recompute_grads
from fastmem.ops.cross_entropy.spec import spec_from_op_arg
from fastmem.ops.token_stats import STAT_FIELDS

_WEIGHT_STAT = STAT_FIELDS.index("weight")
# STAT_FIELDS' dtypes: the bool ones, and first_error (per sample, int64); the rest are floats.
_BOOL_STATS = ("correct", "valid")
_N_OUTPUTS = 1 + len(STAT_FIELDS) + 3  # must equal the tuple in _lce_op's return annotation


def _accum_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op("fastmem::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
            token_weights: torch.Tensor | None, window: torch.Tensor, spec: str, backend: str,
            wants: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, *stats in STAT_FIELDS order, grad_hidden, grad_weight, grad_bias).

    hidden `[N, H]`, labels `[num_samples, seq_len]` (N = num_samples * seq_len), window
    `[num_samples]` fp32, spec a LossSpec.op_arg, wants (grad_hidden, grad_weight, grad_bias).
    With reduction mean / sum the gradients are those of the loss for grad_output 1, in the
    parameters' dtypes (empty when not wanted, and always with reduction="none"). The return
    annotation is the schema: 1 + len(STAT_FIELDS) + 3 tensors.
    """
    loss_spec = spec_from_op_arg(spec)
    precompute = loss_spec.reduction != "none"
    wanted = tuple(w and precompute for w in wants)
    loss, stats, norm, gh, gw, gb = forward_pass(hidden, weight, bias, labels, token_weights, window, loss_spec,
                                                 backend, wanted)
    scale = 1.0 / norm
    gh = _empty(hidden) if gh is None else gh.mul_(scale.to(gh.dtype))
    gw = _empty(weight) if gw is None else gw.mul_(scale).to(weight.dtype)
    gb = _empty(hidden) if gb is None else gb.mul_(scale).to(bias.dtype)
    return (loss, *stats, gh, gw, gb)


@_lce_op.register_fake
def _lce_op_fake(hidden, weight, bias, labels, token_weights, window, spec, backend, wants):
    loss_spec = spec_from_op_arg(spec)
    acc = _accum_dtype(hidden)
    n_rows = hidden.shape[0]
    loss = hidden.new_empty((n_rows,) if loss_spec.reduction == "none" else (), dtype=acc)
    stats = [hidden.new_empty(n_rows, dtype=torch.bool if name in _BOOL_STATS else acc)
             for name in STAT_FIELDS[:-1]]
    first_error = hidden.new_empty(labels.shape[0], dtype=torch.int64)
    precompute = loss_spec.reduction != "none"
    gh = torch.empty_like(hidden) if wants[0] and precompute else _empty(hidden)
    gw = torch.empty_like(weight) if wants[1] and precompute else _empty(weight)
    gb = torch.empty_like(bias) if bias is not None and wants[2] and precompute else _empty(hidden)
    return (loss, *stats, first_error, gh, gw, gb)


@torch.library.custom_op("fastmem::linear_cross_entropy_grads", mutates_args=())
def _lce_grads_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  row_scale: torch.Tensor, spec: str, backend: str,
                  wants: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of sum_t row_scale_t * loss_t (reduction="none"'s backward)."""
    gh, gw, gb = recompute_grads(hidden, weight, bias, labels, row_scale, spec_from_op_arg(spec), backend,
                                 tuple(wants))
    return (_empty(hidden) if gh is None else gh, _empty(weight) if gw is None else gw.to(weight.dtype),
            _empty(hidden) if gb is None else gb.to(bias.dtype))


@_lce_grads_op.register_fake
def _lce_grads_op_fake(hidden, weight, bias, labels, row_scale, spec, backend, wants):
    return (torch.empty_like(hidden) if wants[0] else _empty(hidden),
            torch.empty_like(weight) if wants[1] else _empty(weight),
            torch.empty_like(bias) if bias is not None and wants[2] else _empty(hidden))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, _, _, spec, backend, wants = inputs
    ctx.spec, ctx.backend = spec, backend
    ctx.wants = (wants[0], wants[1], wants[2] and bias is not None)
    ctx.applied_scale = None
    ctx.mark_non_differentiable(*output[1:])
    if spec_from_op_arg(spec).reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, labels, output[1 + _WEIGHT_STAT])
    else:
        # Saved (not kept as attributes) so autograd frees them right after backward unless
        # retain_graph=True.
        ctx.save_for_backward(*output[-3:])


def _scale_in_place(ctx, grads, grad_loss):
    """grads * grad_output without a second buffer; a retained second backward rescales by
    the ratio of the two grad_outputs."""
    factor = grad_loss
    if ctx.applied_scale is not None:
        if float(ctx.applied_scale) == 0.0:
            raise RuntimeError("fastmem.linear_cross_entropy: a second backward after one with grad_output 0 "
                               "cannot be formed (the in-place gradient was zeroed)")
        factor = grad_loss / ctx.applied_scale
    ctx.applied_scale = grad_loss
    return [g.data.mul_(factor.to(g.dtype)) for g in grads]


def _backward(ctx, grad_loss, *unused_stat_grads):
    # The saved gradients are non-differentiable outputs: under create_graph=True the result
    # carries no graph, and a double backward raises instead of being silently wrong.
    if spec_from_op_arg(ctx.spec).reduction == "none":
        hidden, weight, bias, labels, weight_tok = ctx.saved_tensors
        row_scale = grad_loss.to(weight_tok.dtype) * weight_tok
        with torch.no_grad():  # no graph under create_graph=True either (see above)
            grads = _lce_grads_op(hidden, weight, bias, labels, row_scale, ctx.spec, ctx.backend, list(ctx.wants))
    elif torch.compiler.is_compiling() or not all(type(g) is torch.Tensor for g in ctx.saved_tensors):
        # traced (compile, AOT dispatch): a functional graph, no mutation of a saved tensor
        grads = [g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
    else:
        grads = _scale_in_place(ctx, ctx.saved_tensors, grad_loss)
    grads = [g if want else None for g, want in zip(grads, ctx.wants)]
    return (*grads, None, None, None, None, None, None)


assert len(_lce_op._opoverload._schema.returns) == _N_OUTPUTS, "a new stat field needs one more Tensor in the schema"
torch.library.register_autograd("fastmem::linear_cross_entropy", _backward, setup_context=_setup_context)


def _wants_grad(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad and torch.is_grad_enabled()


def call_op(hidden, weight, bias, labels, token_weights, window, spec_arg: str, backend: str):
    """Run the op; returns (loss, *stats in STAT_FIELDS order)."""
    outputs = torch.ops.fastmem.linear_cross_entropy(
        hidden, weight, bias, labels, token_weights, window, spec_arg, backend,
        [_wants_grad(hidden), _wants_grad(weight), _wants_grad(bias)])
    return outputs[:1 + len(STAT_FIELDS)]
