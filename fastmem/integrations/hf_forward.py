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

from fastmem.integrations.heads import head_weight_and_bias  # noqa: F401 (re-exported)
from fastmem.ops.linear_cross_entropy import linear_cross_entropy

CONFIG_ATTR = "_fastmem_config"
STATS_ATTR = "_fastmem_last_stats"
ORIGINAL_ATTR = "__fastmem_original__"


@dataclass(frozen=True)
class FusedLossConfig:
    """What the patched forward passes to `linear_cross_entropy` (objective, backend, options)."""

    objective: str = "sft"
    backend: str = "auto"
    options: dict = field(default_factory=dict)
    return_logits: bool | None = None

    @property
    def ignore_index(self) -> int:
        return self.options.get("ignore_index", -100)


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


def fused_loss(model, hidden: torch.Tensor, labels: torch.Tensor, config: FusedLossConfig, *,
               shift_labels: torch.Tensor | None = None, num_items_in_batch=None):
    """Loss of `hidden [B, S, H]` against `labels [B, S]` through the fused op, and its TokenStats.

    The stats are shaped like the shifted labels: position t scores token t + 1.
    """
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap is not None:
        raise NotImplementedError(
            f"fastmem: {type(model).__name__} has final_logit_softcapping={softcap}; "
            "fastmem.linear_cross_entropy has no soft-capping, so the fused loss would differ from "
            "the model's. Set model.config.final_logit_softcapping = None (this changes the model) "
            "or train without apply_fastmem")
    ignore_index = config.ignore_index
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"fastmem: labels of shape {tuple(shift_labels.shape)} do not match the "
                         f"{tuple(hidden.shape[:-1])} hidden positions kept for the loss "
                         "(logits_to_keep with labels must keep every position)")
    weight, bias = head_weight_and_bias(model)
    if hidden.dtype != weight.dtype:
        # Under autocast the original lm_head would run in the autocast dtype; the fused op needs
        # one dtype and accumulates in fp32 either way.
        hidden = hidden.to(weight.dtype)
    sum_then_divide = num_items_in_batch is not None and config.objective == "sft"
    # The op picks its own precisions (fp32 accumulation); autocast (Accelerate wraps the forward
    # in it under bf16/fp16 training) would recast its inner matmuls behind its back.
    with torch.autocast(hidden.device.type, enabled=False):
        loss, stats = linear_cross_entropy(hidden, weight, shift_labels, bias, objective=config.objective,
                                           reduction="sum" if sum_then_divide else "mean",
                                           return_stats=True, backend=config.backend, **config.options)
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
    MemFT, which are not). `entropy` is not computed by the fused op and is NaN (an honest metric).
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
    fields = dict(log_probs=-per_token, entropy=torch.full_like(share, float("nan")), is_top1=stats.correct,
                  label_mask=valid)
    if not shifted:  # TRL's own head scores positions [:, :-1] against labels[:, 1:]
        fields = {name: value[..., :-1] for name, value in fields.items()}
    return TRLFusedOutput(loss=loss, **fields)


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
        # As in the original, every remaining kwarg (num_items_in_batch too) reaches the decoder.
        outputs = decoder(**arguments, **extra)
        last_hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        hidden = slice_kept_positions(last_hidden, logits_to_keep)
        loss, stats = fused_loss(self, hidden, labels, config, shift_labels=extra.get("shift_labels"),
                                 num_items_in_batch=extra.get("num_items_in_batch"))
        self.__dict__[STATS_ATTR] = stats
        if trl_protocol:
            return trl_fused_output(loss, stats, num_items_in_batch=extra.get("num_items_in_batch"),
                                    shifted="shift_labels" in extra and extra["shift_labels"] is not None)
        if return_logits is None:
            return_logits = config.return_logits
        if return_logits is None:
            return_logits = not torch.is_grad_enabled()
        logits = self.get_output_embeddings()(hidden) if return_logits else None

        names = {f.name for f in dataclasses.fields(output_class)} - {"loss", "logits"}
        result = output_class(loss=loss, logits=logits,
                              **{name: getattr(outputs, name) for name in names if hasattr(outputs, name)})
        return result if return_dict else result.to_tuple()

    setattr(forward, ORIGINAL_ATTR, original)
    return forward


def is_fused_forward(function) -> bool:
    return hasattr(function, ORIGINAL_ATTR)
