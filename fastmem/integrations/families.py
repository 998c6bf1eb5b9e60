"""The transformers model families apply_fastmem knows, and what their head does to the logits.

Every family here has a `*ForCausalLM.forward` whose tail is

    hidden = decoder(...).last_hidden_state[:, kept]
    logits = lm_head(hidden)                    (then, per family:)
    logits = logits / config.logits_scaling     granite
    logits = c * tanh(logits / c)               gemma2 / gemma3 with c = config.final_logit_softcapping
    loss   = ForCausalLMLoss(logits, labels)
    loss  += coef * load_balancing_loss(...)    MoE families, when output_router_logits

The patched forward (hf_forward.py) reproduces each step without the `[B, S, V]` logits:
logit scaling folds into the hidden states (`(h W^T + b) / s = (h / s) W^T + b / s`), the soft
cap is the fused op's `softcap=`, and the router loss is computed from the decoder's router
logits exactly as the original does. Families are matched on `config.model_type`; each is
covered by a parity test (loss and gradients equal to transformers' own path).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one family's causal-LM head turns hidden states into the loss."""

    class_name: str  # the transformers `*ForCausalLM` class the family patch is tested on
    logits_scaling: str | None = None  # config attribute s: logits = lm_head(h) / s
    softcap: str | None = None  # config attribute c: logits = c * tanh(logits / c) when c is set
    router_aux_loss: bool = False  # MoE: + router_aux_loss_coef * load_balancing_loss_func(...)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM"),
    "mixtral": Family("MixtralForCausalLM", router_aux_loss=True),
    "qwen2": Family("Qwen2ForCausalLM"),
    "qwen3": Family("Qwen3ForCausalLM"),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", router_aux_loss=True),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", router_aux_loss=True),
    "olmoe": Family("OlmoeForCausalLM", router_aux_loss=True),
    "gpt_oss": Family("GptOssForCausalLM", router_aux_loss=True),
    "phi3": Family("Phi3ForCausalLM"),
    "gemma": Family("GemmaForCausalLM"),
    "gemma2": Family("Gemma2ForCausalLM", softcap="final_logit_softcapping"),
    "gemma3_text": Family("Gemma3ForCausalLM", softcap="final_logit_softcapping"),
    "olmo2": Family("Olmo2ForCausalLM"),
    "olmo3": Family("Olmo3ForCausalLM"),
    "granite": Family("GraniteForCausalLM", logits_scaling="logits_scaling"),
    "smollm3": Family("SmolLM3ForCausalLM"),
    "glm4": Family("Glm4ForCausalLM"),
}
# Names accepted by apply_fastmem_to besides the model_types.
ALIASES = {"gemma3": "gemma3_text"}


def router_logits_requested(model, passed) -> bool:
    """Whether this forward returns router logits (and so adds the router loss), as MoE forwards
    decide it: the argument when given, else `config.output_router_logits`."""
    if passed is not None:
        return bool(passed)
    return bool(getattr(getattr(model, "config", None), "output_router_logits", False))


def family_of(model) -> Family | None:
    """The Family of a transformers model (None for a model outside the table)."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def logits_scaling(model) -> float | None:
    """The divisor the family applies to its logits (None when it applies none)."""
    family = family_of(model)
    if family is None or family.logits_scaling is None:
        return None
    value = getattr(model.config, family.logits_scaling, None)
    return None if value is None or float(value) == 1.0 else float(value)


def softcap(model) -> float | None:
    """The model's final-logit soft cap, whatever its family (None when it has none)."""
    value = getattr(model.config, "final_logit_softcapping", None)
    return None if value is None else float(value)
