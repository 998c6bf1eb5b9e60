"""The fused causal-LM forward that `apply_fastmem` installs on a transformers model.

It replaces only the tail of a `*ForCausalLM.forward` whose body is "decoder -> last hidden
state -> lm_head -> ForCausalLMLoss":

    hidden = decoder(...)[0][:, kept positions]            as the original
    loss   = fastmem.linear_cross_entropy(hidden, W_head, shifted labels)   no [B, S, V]

Without labels the original forward runs unchanged (generation, plain inference). With
labels the logits are built only when the caller asks (`return_logits=True`), or by default
when autograd is off (an evaluation loop that wants predictions); in a training forward they
are `None`.

Loss semantics follow transformers' `ForCausalLMLoss` (loss/loss_utils.py): labels are
shifted left with `ignore_index` padding (or `shift_labels` is used as given), and with
`num_items_in_batch` the SFT loss is `sum(L_t) / num_items_in_batch` (gradient accumulation).
MemFT objectives ("ot", "sw") normalise by their weights, `sum w L / (sum w + eps)`; with
`num_items_in_batch` that mean is scaled by `n_valid / num_items_in_batch`, i.e. the
micro-batches of one optimizer step are combined in proportion to their token counts (with
one micro-batch per step this is exactly the paper's loss).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from fastmem.errors import Unsupported
from fastmem.integrations import families
from fastmem.integrations.heads import head_weight_and_bias  # noqa: F401 (re-exported)
from fastmem.ops.cross_entropy import LossSpec, linear_cross_entropy

CONFIG_ATTR = "_fastmem_config"
STATS_ATTR = "_fastmem_last_stats"
ORIGINAL_ATTR = "__fastmem_original__"


@dataclass(frozen=True)
class FusedLossConfig:
    """What the patched forward passes to `linear_cross_entropy`: the LossSpec (its reduction
    and softcap are set per call from num_items_in_batch and the model), the backend."""

    spec: LossSpec = field(default_factory=LossSpec)
    backend: str = "auto"
    return_logits: bool | None = None

    @property
    def objective(self) -> str:
        return self.spec.objective

    @property
    def ignore_index(self) -> int:
        return self.spec.ignore_index


def slice_kept_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """`hidden [B, S, H]` restricted to the positions whose logits the caller keeps."""
    try:  # transformers >= 5 has the helper (2-D position / mask tensors included)
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None)
        return hidden[:, logits_to_keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _output_class(original):
    """The ModelOutput class the original forward returns (CausalLMOutputWithPast by default)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    annotation = inspect.signature(original).return_annotation
    if isinstance(annotation, str):
        annotation = getattr(sys.modules.get(inspect.unwrap(original).__module__), annotation, None)
    if isinstance(annotation, type) and issubclass(annotation, ModelOutput):
        names = {f.name for f in dataclasses.fields(annotation)}
        if {"loss", "logits"} <= names:
            return annotation
    return CausalLMOutputWithPast


def _return_dict(model, kwargs: dict) -> bool:
    # Mirrors transformers.utils.generic.can_return_tuple.
    default = getattr(getattr(model, "config", None), "return_dict", True)
    passed = kwargs.pop("return_dict", default)
    return default if passed is None else bool(passed)


def check_softcap_supported(model) -> None:
    """Raise unless the fused loss can reproduce this model's final-logit soft cap."""
    cap = families.softcap(model)
    if cap is None:
        return
    family = families.family_of(model)
    name = type(model).__name__
    if family is None or family.softcap is None:
        raise Unsupported(
            f"fastmem: {name} has final_logit_softcapping={cap} but is not a family whose capped head "
            f"apply_fastmem knows ({sorted(k for k, f in families.FAMILIES.items() if f.softcap)}); "
            "leave the model unpatched")


def _head_operands(model, hidden: torch.Tensor):
    """`(hidden, weight, bias)` for the fused op: one dtype, the family's logit scaling folded in.

    Under autocast the original lm_head would run its GEMM in the autocast dtype (bf16 / fp16):
    so does the fused op (it still accumulates in fp32), instead of an fp32 `[N, V]` GEMM. Without
    autocast, hidden states follow the head's dtype.
    """
    weight, bias = head_weight_and_bias(model)
    device_type = hidden.device.type
    dtype = weight.dtype
    if torch.is_autocast_enabled(device_type) and weight.is_floating_point():
        dtype = torch.get_autocast_dtype(device_type)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    scale = families.logits_scaling(model)
    if scale is not None:  # (h W^T + b) / s == (h / s) W^T + b / s: the [N, V] division never happens
        hidden = hidden / scale
        bias = bias / scale if bias is not None else None
    return hidden, weight, bias


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the original forward returns for `hidden` (lm_head, then the family's scaling / cap)."""
    logits = model.get_output_embeddings()(hidden)
    scale = families.logits_scaling(model)
    if scale is not None:
        logits = logits / scale
    cap = families.softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def fused_loss(model, hidden: torch.Tensor, labels: torch.Tensor, config: FusedLossConfig, *,
               shift_labels: torch.Tensor | None = None, num_items_in_batch=None):
    """Loss of `hidden [B, S, H]` against `labels [B, S]` through the fused op, and its TokenStats.

    The stats are shaped like the shifted labels: position t scores token t + 1.
    """
    ignore_index = config.ignore_index
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"fastmem: labels of shape {tuple(shift_labels.shape)} do not match the "
                         f"{tuple(hidden.shape[:-1])} hidden positions kept for the loss "
                         "(logits_to_keep with labels must keep every position)")
    hidden, weight, bias = _head_operands(model, hidden)
    cap = families.softcap(model)
    if cap is not None:
        check_softcap_supported(model)
    sum_then_divide = num_items_in_batch is not None and config.objective == "sft"
    spec = dataclasses.replace(config.spec, softcap=cap or 0.0, reduction="sum" if sum_then_divide else "mean")
    # The operands are already in the autocast dtype (see _head_operands); inside, the op picks its
    # own precisions (fp32 accumulation), which autocast must not recast behind its back.
    with torch.autocast(hidden.device.type, enabled=False):
        loss, stats = linear_cross_entropy(hidden, weight, shift_labels, bias, spec=spec, return_stats=True,
                                           backend=config.backend)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        if config.objective != "sft":
            loss = loss * stats.valid.sum()
        loss = loss / num_items_in_batch
    return loss, stats


@dataclass
class TRLFusedOutput(ModelOutput):
    """The fields TRL's trainers read from `model(..., fused_lm_head=True)` (trl.trainer.utils.FusedCausalLMOutput)."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def trl_fused_output(loss: torch.Tensor, stats, *, num_items_in_batch, shifted: bool) -> TRLFusedOutput:
    """Answer TRL's fused-LM-head protocol (TRL >= 1.x SFTTrainer calls `model(..., fused_lm_head=True)`
    and reduces `-log_probs.sum() / num_items_in_batch` itself, ignoring `loss`).

    `log_probs` is built so that TRL's reduction gives exactly the fastmem loss, value and gradient:
    `-log_probs_t = v_t + (L - L.detach())` on valid tokens, with `v_t` the detached per-token share
    of the loss (`L_t` for SFT, so there they are the true log-probabilities; `w_t L_t n / Z` for
    MemFT, which are not). `entropy` is the fused op's per-token entropy of the model's
    distribution (0 on positions without a label), from the same pass as the loss.
    """
    valid = stats.valid
    n_valid = valid.sum()
    normaliser = num_items_in_batch if num_items_in_batch is not None else n_valid.clamp(min=1)
    if torch.is_tensor(normaliser):
        normaliser = normaliser.to(loss.device)
    # Undo the micro-batch scaling fused_loss applied, to get the per-token share of the mean.
    mean_loss = loss * normaliser / n_valid.clamp(min=1)
    weighted = stats.weight * stats.loss
    share = weighted * (mean_loss.detach() * n_valid / weighted.sum().clamp(min=1e-30))
    per_token = torch.where(valid, share + (mean_loss - mean_loss.detach()), torch.zeros_like(share))
    fields = dict(log_probs=-per_token, entropy=stats.entropy, is_top1=stats.correct, label_mask=valid)
    if not shifted:  # TRL's own head scores positions [:, :-1] against labels[:, 1:]
        fields = {name: value[..., :-1] for name, value in fields.items()}
    return TRLFusedOutput(loss=loss, **fields)


def unknown_router_loss_message(model) -> str:
    return (f"fastmem: {type(model).__name__} (model_type={model.config.model_type!r}) returns router logits "
            "(output_router_logits=True), and its router loss is not one apply_fastmem knows how to add: the fused "
            f"loss would drop it. Families with a router loss: "
            f"{sorted(k for k, f in families.FAMILIES.items() if f.router_aux_loss)}; or set "
            "config.output_router_logits = False")


def router_load_balancing_loss(model, outputs, attention_mask) -> torch.Tensor:
    """The MoE router loss the original forward adds, from the module that defines the model."""
    for cls in type(model).__mro__:
        function = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if function is not None:
            break
    else:
        raise Unsupported(f"fastmem: no load_balancing_loss_func beside {type(model).__name__}")
    return function(outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def make_fused_forward(original):
    """Wrap the class's original `forward` function: labels go through the fused loss.

    `functools.wraps` keeps the original signature visible to inspect.signature, which the HF
    Trainer reads to keep dataset columns and to decide whether to pass num_items_in_batch.
    """
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    output_class = _output_class(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        config: FusedLossConfig | None = getattr(self, CONFIG_ATTR, None)
        return_logits = kwargs.pop("return_logits", None)
        trl_protocol = bool(kwargs.pop("fused_lm_head", False))
        if config is None:  # the class is patched but this instance was unapplied
            return original(self, *args, **kwargs)
        arguments = dict(signature.bind(self, *args, **kwargs).arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        if arguments.get("labels") is None:  # generation / inference: the original, untouched
            if trl_protocol:
                raise ValueError("fastmem: fused_lm_head=True needs labels")
            return original(self, *args, **kwargs)

        extra = arguments.pop(var_kw, {}) if var_kw else {}
        return_dict = _return_dict(self, arguments if "return_dict" in arguments else extra)
        labels = arguments.pop("labels")
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        decoder = getattr(self, self.base_model_prefix)
        family = families.family_of(self)
        router_aux = family is not None and family.router_aux_loss
        if router_aux:  # as the original: the argument, else the config, decides
            arguments["output_router_logits"] = families.router_logits_requested(
                self, arguments.get("output_router_logits"))
        elif families.router_logits_requested(self, arguments.get("output_router_logits")):
            raise Unsupported(unknown_router_loss_message(self))
        # As in the original, every remaining kwarg (num_items_in_batch too) reaches the decoder.
        outputs = decoder(**arguments, **extra)
        last_hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        hidden = slice_kept_positions(last_hidden, logits_to_keep)
        loss, stats = fused_loss(self, hidden, labels, config, shift_labels=extra.get("shift_labels"),
                                 num_items_in_batch=extra.get("num_items_in_batch"))
        aux_loss = None
        if router_aux and arguments["output_router_logits"]:
            aux_loss = router_load_balancing_loss(self, outputs, arguments.get("attention_mask"))
        self.__dict__[STATS_ATTR] = stats
        if trl_protocol:
            # TRL reduces -log_probs itself and adds coef * aux_loss on its own (as with its own
            # fused head): log_probs carry the token loss only.
            result = trl_fused_output(loss, stats, num_items_in_batch=extra.get("num_items_in_batch"),
                                      shifted="shift_labels" in extra and extra["shift_labels"] is not None)
            result.aux_loss = aux_loss
            return result
        if aux_loss is not None:  # as the original forward: loss += coef * router loss
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        if return_logits is None:
            return_logits = config.return_logits
        if return_logits is None:
            return_logits = not torch.is_grad_enabled()
        logits = head_logits(self, hidden) if return_logits else None

        names = {f.name for f in dataclasses.fields(output_class)} - {"loss", "logits"}
        fields = {name: getattr(outputs, name) for name in names if hasattr(outputs, name)}
        if "aux_loss" in names:
            fields["aux_loss"] = aux_loss
        result = output_class(loss=loss, logits=logits, **fields)
        return result if return_dict else result.to_tuple()

    setattr(forward, ORIGINAL_ATTR, original)
    return forward


def is_fused_forward(function) -> bool:
    return hasattr(function, ORIGINAL_ATTR)
