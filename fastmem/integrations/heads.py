"""The one head resolver: a causal LM's output embedding as `(weight [V, H], bias [V] | None)`,
and the one PEFT unwrap (`causal_lm_of`: the trainer, the evaluator, greedy decoding and the
transformers patch all reach the causal LM inside a PEFT wrapper through it).

Shared by the fused-loss patch (hf_forward.py), the trainer (train/adapters.py) and the
evaluator (eval/teacher_forcing.py), so that every place that forms "the logits" from hidden
states reads the same head: a plain `nn.Linear` (tied or not), a PEFT LoRA head folded into
`W + sum_a s_a B_a A_a`, or a PEFT modules_to_save copy.
"""

from __future__ import annotations

import torch
from torch import nn

from fastmem.errors import Unsupported, UsageError

# Config attributes that make a model's logits something other than `hidden @ W.T (+ b)`.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_transform(model: nn.Module) -> str | None:
    """`"name=value"` of the first config setting that rescales or soft-caps the logits, else None."""
    config = getattr(causal_lm_of(model), "config", None)
    for attr in LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 0, 1, 0.0, 1.0):
            return f"{attr}={value}"
    return None


def plain_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`head_weight_and_bias` for callers that take the logits to be exactly `hidden @ W.T (+ b)`
    (the trainer's fast engine, the evaluator): a model whose config rescales or soft-caps its
    logits is refused with a ValueError rather than silently mis-scored."""
    transform = logit_transform(model)
    if transform is not None:
        raise UsageError(f"{type(causal_lm_of(model)).__name__} sets {transform}: its logits are not "
                         "hidden @ lm_head.weight.T, which the fused head (trainer fast engine, evaluator) "
                         "relies on")
    return head_weight_and_bias(causal_lm_of(model))


def head_weight_and_bias(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding as `(weight [V, H], bias [V] | None)`, differentiable where trainable.

    A plain `nn.Linear` head (tied or not) gives its own parameters. A PEFT LoRA head gives
    `W + sum_a s_a B_a A_a` over the active adapters (exact while its dropout is off); a PEFT
    modules_to_save head gives the active copy.
    """
    return _head_tensors(model.get_output_embeddings(), model)


def _head_tensors(head, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        if head.disable_adapters or not head.active_adapters:
            return _head_tensors(head.original_module, model)
        return _head_tensors(head.modules_to_save[head.active_adapters[0]], model)
    if isinstance(head, LoraLinear):
        return _lora_head_tensors(head, model)
    if type(head) is nn.Linear or (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward):
        return head.weight, head.bias
    raise TypeError(f"fastmem: the output embedding of {type(model).__name__} is a {type(head).__name__}; "
                    "the fused loss needs an nn.Linear head (or a PEFT LoRA / modules_to_save wrapper of one)")


def _lora_head_tensors(head, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = _head_tensors(head.get_base_layer(), model)
    if head.disable_adapters or head.merged:
        return weight, bias
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}):
            raise Unsupported(f"fastmem: the lm_head adapter {name!r} is a LoRA variant (e.g. DoRA); "
                                      "only plain LoRA on the head can be folded into the fused loss")
        dropout = head.lora_dropout[name]
        if head.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0.0) > 0:
            raise Unsupported(f"fastmem: lora_dropout={dropout.p} on the lm_head adapter {name!r}; "
                                      "set lora_dropout=0 (or leave lm_head out of target_modules)")
        weight = weight + head.get_delta_weight(name).to(weight.dtype)
    return weight, bias
