"""One-call patch: the fused MemFT loss inside a transformers causal LM, never building logits.

    from fastmem.integrations.transformers import apply_fastmem, last_stats
    apply_fastmem(model, objective="ot", threshold=0.3)   # model: HF causal LM or PEFT-wrapped
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.logits is None in training
    stats = last_stats(model)   # TokenStats of that forward: prob, correct, first_error, ...

`apply_fastmem_to("llama", ...)` patches the class instead, for models loaded later. The loss
semantics (label shift, ignore_index, num_items_in_batch, logits_to_keep, return_dict) are
those of transformers' ForCausalLMLoss; see hf_forward.py for the details and how MemFT
objectives combine with gradient accumulation.

Families (fastmem/integrations/families.py, found from `config.model_type`): llama (SmolLM2,
Llama 2/3), mistral, mixtral, qwen2, qwen3, qwen2_moe, qwen3_moe, olmoe, gpt_oss, phi3, gemma,
gemma2 and gemma3 (text; final logit soft-capping), olmo2, olmo3, granite (logit scaling), smollm3,
glm4; MoE families add the router loss as the original does. Any other `*ForCausalLM` is accepted when its forward is checked to
be "decoder -> last hidden state -> lm_head" (one tiny no-grad probe forward at apply time).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from fastmem.errors import Unsupported
from fastmem.integrations import families
from fastmem.integrations.families import ALIASES, FAMILIES
from fastmem.integrations.heads import causal_lm_of
from fastmem.integrations.hf_forward import (CONFIG_ATTR, ORIGINAL_ATTR, STATS_ATTR, FusedLossConfig,
                                             check_softcap_supported, head_weight_and_bias, is_fused_forward,
                                             make_fused_forward, unknown_router_loss_message)
from fastmem.nn.modes import eval_mode
from fastmem.ops.cross_entropy import LossSpec, linear_cross_entropy
from fastmem.ops.token_stats import TokenStats

# config.model_type -> the transformers class whose forward the family patch is tested on.
FAMILY_CLASSES = {model_type: family.class_name for model_type, family in FAMILIES.items()}
# Names accepted by apply_fastmem_to besides the model_types.
FAMILY_ALIASES = ALIASES
# LossSpec fields a patch may fix (reduction follows num_items_in_batch, softcap the model's config).
LOSS_OPTIONS = ("threshold", "eps", "sw_kappa", "sw_tau", "sw_window", "sw_floor", "ignore_index", "chunk_size",
                "label_smoothing", "lse_square_scale", "max_chunk_bytes")
PREVIOUS_FORWARD_ATTR = "_fastmem_previous_forward"


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    from transformers import PreTrainedModel

    inner = causal_lm_of(model)
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (or a PEFT model around one), "
                        f"got {type(model).__name__}")
    return inner


def _loss_config(spec: LossSpec | None, backend: str, return_logits, options: dict, device) -> FusedLossConfig:
    unknown = sorted(set(options) - set(LOSS_OPTIONS) - {"objective"})
    if unknown:
        raise TypeError(f"unknown loss option(s) {unknown}; apply_fastmem accepts objective, {LOSS_OPTIONS}")
    if return_logits not in (None, True, False):
        raise ValueError(f"return_logits must be None, True or False, got {return_logits!r}")
    spec = LossSpec.from_options(spec, **options)  # validates every option
    # One tiny call checks the backend on this device with the op's own checks.
    probe = torch.zeros(1, 2, dtype=torch.float32, device=device)
    linear_cross_entropy(probe, torch.zeros(3, 2, device=device), torch.zeros(1, dtype=torch.long, device=device),
                         spec=spec, backend=backend)
    return FusedLossConfig(spec=spec, backend=backend, return_logits=return_logits)


def _check_family(model) -> None:
    """Raise unless `model` is a known family's causal LM or passes the generic checks."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model_type = getattr(model.config, "model_type", None)
    name = type(model).__name__
    expected = FAMILY_CLASSES.get(model_type)
    if expected is not None and name != expected:
        raise Unsupported(f"fastmem: {name} (model_type={model_type!r}) is not a causal LM head; "
                                  f"apply_fastmem supports {expected} for this family")
    if expected is None and not name.endswith(("ForCausalLM", "LMHeadModel")):
        raise Unsupported(f"fastmem: {name} (model_type={model_type!r}) is not a causal LM; apply_fastmem "
                                  f"supports {sorted(FAMILY_CLASSES)} and *ForCausalLM models whose forward is "
                                  "decoder -> hidden states -> lm_head")
    if model.loss_function is not ForCausalLMLoss:
        raise Unsupported(f"fastmem: {name} computes its loss with {model.loss_function!r}, not "
                                  "transformers' ForCausalLMLoss; the fused loss would replace it")
    check_softcap_supported(model)
    head_weight_and_bias(model)  # raises for a head the fused op cannot read
    if expected is None:
        if families.router_logits_requested(model, None):
            raise Unsupported(unknown_router_loss_message(model))
        _probe_generic_forward(model, model_type)


def _probe_generic_forward(model, model_type) -> None:
    """Check on a 3-token input that logits == lm_head(decoder(x).last_hidden_state).

    Catches forwards that rescale or cap the logits (Granite's logits_scaling, Cohere's
    logit_scale, ...), which the fused loss would silently drop.
    """
    name = type(model).__name__
    decoder = getattr(model, model.base_model_prefix, None)
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise Unsupported(f"fastmem: {name} (model_type={model_type!r}) has no decoder at "
                                  f"model.{model.base_model_prefix}; unsupported architecture")
    device = model.get_output_embeddings().weight.device
    input_ids = torch.arange(1, 4, device=device).clamp(max=model.config.vocab_size - 1)[None]
    with eval_mode(model), torch.no_grad():
        reference = type(model).forward(model, input_ids=input_ids).logits
        hidden = decoder(input_ids=input_ids)[0]
        rebuilt = model.get_output_embeddings()(hidden)
    if reference.shape != rebuilt.shape or not torch.allclose(reference.float(), rebuilt.float(),
                                                              rtol=1e-5, atol=1e-6):
        raise Unsupported(f"fastmem: the forward of {name} (model_type={model_type!r}) is not "
                                  "decoder -> hidden states -> lm_head (its logits differ from lm_head(hidden)); "
                                  "unsupported architecture")


def apply_fastmem(model: nn.Module, *, spec: LossSpec | None = None, backend: str = "auto",
                  return_logits: bool | None = None, **loss_options) -> nn.Module:
    """Route the model's labelled forward through `fastmem.linear_cross_entropy`.

    Args:
        model: a transformers causal LM (a family in fastmem.integrations.families.FAMILIES, or a
            generic `*ForCausalLM` that passes the decoder -> lm_head probe), or a PEFT model around
            one. Patched in place (its instance `forward`); returned for chaining. Call it after
            building a TRL trainer: TRL's SFTTrainer installs its own fused LM head at init.
        spec: the loss as a LossSpec (default LossSpec(): SFT); `**loss_options` replace its
            fields by name: objective ("sft", "ot" or "sw"), threshold, eps, sw_kappa, sw_tau,
            sw_window, sw_floor, ignore_index, chunk_size, label_smoothing, lse_square_scale
            (z-loss), max_chunk_bytes (see fastmem.linear_cross_entropy). `softcap` is not one:
            it comes from the model's config (final_logit_softcapping), and the reduction from
            num_items_in_batch.
        backend: "auto" | "torch" | "triton" for the fused op.
        return_logits: with labels, build `[B, S, V]` logits too: True / False, or None (default)
            for "only when autograd is off" (evaluation loops that want predictions). A call can
            override it with `model(..., return_logits=...)`.

    After it, `model(input_ids, attention_mask=..., labels=labels [B, S] int64)` returns the
    fp32 loss, `logits=None` (in training), and `last_stats(model)` holds the TokenStats of
    that forward. Without labels the original forward runs unchanged.
    """
    inner = _unwrap(model)
    _check_family(inner)
    device = head_weight_and_bias(inner)[0].device
    config = _loss_config(spec, backend, return_logits, loss_options, device)
    current = inner.__dict__.get("forward")
    if current is not None and not is_fused_forward(current):
        # Someone else's instance forward (e.g. TRL's fused LM head): replaced, restored by unapply.
        inner.__dict__[PREVIOUS_FORWARD_ATTR] = current
        current = None
    # A class patched by apply_fastmem_to serves the instance, unless another forward sat on it.
    needs_own_forward = PREVIOUS_FORWARD_ATTR in inner.__dict__ or not is_fused_forward(type(inner).forward)
    if current is None and needs_own_forward:
        class_forward = type(inner).forward
        original = getattr(class_forward, ORIGINAL_ATTR, class_forward)
        inner.forward = types.MethodType(make_fused_forward(original), inner)
    inner.__dict__[CONFIG_ATTR] = config
    inner.__dict__.pop(STATS_ATTR, None)
    return model


def unapply_fastmem(model: nn.Module) -> nn.Module:
    """Undo apply_fastmem on this model: its forward is the original again (bit for bit).

    On an instance of a class patched with apply_fastmem_to, the instance is opted out.
    """
    inner = _unwrap(model)
    current = inner.__dict__.get("forward")
    if current is not None and is_fused_forward(current):
        del inner.__dict__["forward"]
        previous = inner.__dict__.pop(PREVIOUS_FORWARD_ATTR, None)
        if previous is not None:
            inner.forward = previous
    inner.__dict__.pop(STATS_ATTR, None)
    if is_fused_forward(type(inner).forward):
        inner.__dict__[CONFIG_ATTR] = None  # opt out of the class patch
    else:
        inner.__dict__.pop(CONFIG_ATTR, None)
    return model


def _family_class(family: str):
    import transformers

    model_type = FAMILY_ALIASES.get(family, family)
    if model_type not in FAMILY_CLASSES:
        raise Unsupported(f"apply_fastmem_to: unknown family {family!r}; supported: "
                                  f"{sorted(set(FAMILY_CLASSES) | set(FAMILY_ALIASES))} "
                                  "(other *ForCausalLM models: apply_fastmem(model) on the instance)")
    return getattr(transformers, FAMILY_CLASSES[model_type])


def apply_fastmem_to(family: str, *, spec: LossSpec | None = None, backend: str = "auto",
                     return_logits: bool | None = None, **loss_options) -> type:
    """Patch a family's `*ForCausalLM` class so that models loaded later use the fused loss.

    `family` is a model_type of FAMILIES ("llama", "mixtral", "gemma2", ...; "gemma3" for gemma3_text).
    Options as in apply_fastmem; an instance patched with apply_fastmem keeps its own options.
    Returns the patched class.
    """
    cls = _family_class(family)
    config = _loss_config(spec, backend, return_logits, loss_options, torch.device("cpu"))
    if not is_fused_forward(cls.__dict__.get("forward", cls.forward)):
        cls.forward = make_fused_forward(cls.forward)
    setattr(cls, CONFIG_ATTR, config)
    return cls


def unapply_fastmem_to(family: str) -> type:
    """Restore the class's original forward (undo apply_fastmem_to)."""
    cls = _family_class(family)
    patched = cls.__dict__.get("forward")
    if patched is not None and is_fused_forward(patched):
        cls.forward = getattr(patched, ORIGINAL_ATTR)
    if CONFIG_ATTR in cls.__dict__:
        delattr(cls, CONFIG_ATTR)
    return cls


def is_patched(model: nn.Module) -> bool:
    """True when the model's labelled forward goes through the fused loss."""
    inner = _unwrap(model)
    forward = inner.__dict__.get("forward", type(inner).forward)
    return is_fused_forward(forward) and getattr(inner, CONFIG_ATTR, None) is not None


def last_stats(model: nn.Module) -> TokenStats | None:
    """TokenStats of the model's last labelled forward (None before the first one).

    Shaped like the shifted labels `[B, S]`: position t scores token t + 1 (the last position
    and prompt tokens are invalid). `prob`, `correct`, `first_error` `[B]`, `weight`, `valid`...
    Detached; read them in a callback without another forward.
    """
    inner = _unwrap(model)
    if not is_patched(inner):
        raise ValueError(f"{type(inner).__name__} is not patched: call apply_fastmem(model) first")
    return inner.__dict__.get(STATS_ATTR)
