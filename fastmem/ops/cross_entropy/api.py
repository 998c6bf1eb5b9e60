"""fastmem.linear_cross_entropy: fused lm_head + cross-entropy with MemFT weighting.

The public entry: checks the tensors, builds (or takes) the call's LossSpec, picks the
backend and calls the custom op (custom_op.py), which runs the chunk loop (chunk_loop.py)
with the backend's chunk kernel (backend_torch / backend_triton / backend_cuda). The math and
numerics are in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fastmem.backends import choose_backend
from fastmem.ops.cross_entropy.checks import check_tensors, check_window_values
from fastmem.ops.cross_entropy.custom_op import call_op
from fastmem.ops.cross_entropy.forward import OP_NAME
from fastmem.ops.cross_entropy.spec import LossSpec
from fastmem.ops.cross_entropy.syncs import host_sync_is_free
from fastmem.ops.token_stats import STAT_FIELDS, TokenStats


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, *, spec: LossSpec | None = None,
                         token_weights: torch.Tensor | None = None, window: torch.Tensor | None = None,
                         return_stats: bool = False, backend: str = "auto", **options):
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, never building `[N, V]`.

    Args:
        hidden: `[..., H]` fp16 / bf16 / fp32 (fp64 on the torch backend). NaN / Inf in a row
            that carries a label makes the loss NaN (never a finite wrong number, whatever
            the objective); rows with `ignore_index` never change the loss.
        weight: `[V, H]` lm_head, same dtype and device. Its gradient is formed only when it
            requires grad (a frozen head costs no grad_W work).
        labels: `[...]` = hidden.shape[:-1], integer; `ignore_index` marks tokens without
            loss. A 2-D `[B, S]` tensor is B samples in position order (for "sw" each row is
            one sample; more leading dims are flattened into samples, 1-D is one sample).
            On the CPU a label outside [0, V) raises ValueError; on a GPU (no host sync) it
            makes the loss NaN: call `check_label_range` once beforehand for the error.
        bias: optional `[V]`.
        spec: the loss options as a LossSpec (default LossSpec()). `**options` replace
            single fields, by the same names (`objective="ot", threshold=0.3`):
            objective: "sft" (w_t = 1), "ot" (w_t = 1[L_t > threshold]) or "sw"
                (w_t = sigmoid(sw_kappa (L_t - threshold)) times the spatial factor of the
                sample's first greedy error a: exp(-max(t - a, 0) / sw_tau) while t - a <
                sw_window, sw_floor beyond; no error: factor 1). L_t is the token's plain
                cross-entropy -log p_y (of the soft-capped logits), whatever the options below.
            reduction: "mean" (SFT: the mean over valid tokens, exactly F.cross_entropy's;
                weighted: sum w l / (sum w + eps), w detached), "sum" (sum w l) or "none"
                (w_t l_t shaped like labels), l_t the per-token loss with the options below.
            softcap: logits -> softcap * tanh(logits / softcap) (Gemma 2: 30.0); 0: off.
            label_smoothing: in [0, 1], as F.cross_entropy: l_t = (1 - e) L_t + e (lse_t - mean_c z_tc).
            lse_square_scale: z-loss, >= 0: l_t += s lse_t^2.
            chunk_size: token rows per chunk (default: chunk_loop.chunk_rows_for; on a GPU at
                least the GEMM's ridge point, 512 rows for bf16). max_chunk_bytes: cap on the
                chunk's logits buffer (its own dtype, plus the fp32 working copy the torch
                backend takes of 16-bit logits).
            See LossSpec for every field and its range.
        token_weights: optional float tensor shaped like labels multiplying w_t.
        window: optional `[num_samples]` tensor of per-sample SW windows (the trainer widens
            it per sample); default spec.sw_window for every sample.
        return_stats: also return a TokenStats of the same pass (entropy included).
        backend: "auto" | "torch" | "triton" | "cuda".

    Returns:
        the loss in fp32 (fp64 for fp64 inputs) (a scalar, or shaped like labels for "none"),
        and with `return_stats=True` a `(loss, TokenStats)` pair.

    Saved for backward: the gradient of hidden `[N, H]` (formed during the forward), the
    gradients of weight / bias if they require grad; with reduction="none" the inputs instead.
    Host syncs: none on a GPU for any objective; on the CPU, where a sync costs no stall, the
    op spends a few to skip work (see syncs.py and the counts in README.md).
    """
    spec = LossSpec.from_options(spec, **options) if options or spec is None else spec
    if not isinstance(spec, LossSpec):
        raise TypeError(f"spec must be a LossSpec, got {type(spec).__name__}")
    check_tensors(hidden, weight, labels, bias, token_weights, window)
    if host_sync_is_free(hidden.device) and not torch.compiler.is_compiling():
        check_window_values(window)  # the label range is checked inside the op (forward.RowPlan)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32; float64 runs on backend='torch'")
    chosen = choose_backend(OP_NAME, backend, hidden.device,
                            exclude=("triton",) if hidden.dtype == torch.float64 else ())

    label_shape = labels.shape
    num_samples = math.prod(label_shape[:-1]) if labels.dim() >= 2 else 1
    samples = labels.reshape(num_samples, label_shape[-1] if labels.dim() else 1).to(torch.int64).contiguous()
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    tw_1d = None if token_weights is None else token_weights.reshape(-1).to(torch.float32)
    if window is None:
        window = torch.full((samples.shape[0],), spec.sw_window, dtype=torch.float32, device=hidden.device)
    window = window.reshape(-1).to(torch.float32)
    if return_stats and not spec.greedy_stats:
        raise ValueError("return_stats=True needs greedy_stats=True (TokenStats.correct and .margin come from it)")
    # Entropy, correctness and margin are stats: without return_stats nobody reads them (the
    # torch backend saves a pass over each chunk per stat it skips).
    op_spec = spec if return_stats else dataclasses.replace(spec, entropy=False, greedy_stats=False)

    # The op sets its own precision (fp32 accumulation, GEMMs in the input dtype): an enclosing
    # autocast region must not recast its GEMMs or in-place buffers.
    with torch.autocast(hidden.device.type, enabled=False):
        loss, *stat_tensors = call_op(hidden_2d, weight, bias, samples, tw_1d, window, op_spec.op_arg, chosen)
    if spec.reduction == "none":
        loss = loss.reshape(label_shape)
    if not return_stats:
        return loss
    named = dict(zip(STAT_FIELDS, stat_tensors))
    first_error = named.pop("first_error")
    entropy = named.pop("entropy")
    per_token = {name: t.reshape(label_shape) for name, t in named.items()}
    first_error = first_error.reshape(label_shape[:-1]) if labels.dim() >= 2 else first_error.reshape(())
    entropy = entropy.reshape(label_shape) if spec.entropy else None
    return loss, TokenStats(**per_token, entropy=entropy, first_error=first_error)
