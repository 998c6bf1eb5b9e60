"""LoRA on the named modules of the named layers (PEFT), and the model parts the trainer drives."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import nn

from fastmem.errors import UsageError
from fastmem.integrations.heads import causal_lm_of, plain_head
from fastmem.nn.mlp_block_adapter import PARALLEL_NAME, wrap_mlp_blocks
from fastmem.train.config import TrainConfig, default_layers

log = logging.getLogger(__name__)

FUSED_LORA_MODULE = "fastmem.integrations.peft"


@dataclass
class ModelParts:
    """Where the trainer reaches into a causal LM (llama-style: decoder.layers, decoder.norm)."""

    causal_lm: nn.Module     # the transformers *ForCausalLM inside the PEFT wrapper
    decoder: nn.Module       # causal_lm.get_decoder(): embeddings, layers, final norm
    layers: nn.ModuleList
    norm: nn.Module
    head_weight: torch.Tensor  # [V, H] output embedding (frozen)
    head_bias: torch.Tensor | None
    first_adapted: int       # index of the lowest adapted layer: the prefix cache ends here
    max_positions: int | None


def _decoder_layers(causal_lm: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if not isinstance(layers, nn.ModuleList) or norm is None:
        raise UsageError(f"{type(causal_lm).__name__} has no decoder.layers / decoder.norm: the fast "
                         "engine supports llama-style decoders (use --engine hf)")
    return decoder, layers, norm


def resolve_layers(config: TrainConfig, num_layers: int) -> list[int]:
    layers = sorted(set(config.layers)) if config.layers else default_layers(num_layers)
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise UsageError(f"layers {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    return layers


def check_modules(layers: nn.ModuleList, layer_ids: list[int], modules: list[str], rank: int | None = None) -> None:
    """Every requested module name must name a Linear in every adapted layer, at least `rank`
    wide: a LoRA update B A of a [out, in] weight has rank at most min(in, out), so a larger
    rank only adds parameters that cannot learn anything."""
    for i in layer_ids:
        linears = {name.rsplit(".", 1)[-1]: mod for name, mod in layers[i].named_modules()
                   if isinstance(mod, nn.Linear)}
        unknown = [m for m in modules if m not in linears]
        if unknown:
            raise UsageError(f"unknown module name(s) {unknown} in layer {i}; "
                             f"its linear modules are {sorted(linears)}")
        for name in modules:
            linear = linears[name]
            width = min(linear.in_features, linear.out_features)
            if rank is not None and rank > width:
                raise UsageError(f"rank {rank} is larger than {name} of layer {i} allows ({linear.in_features} -> "
                                 f"{linear.out_features}): a LoRA update has rank at most {width}")


def check_targets(layers: nn.ModuleList, layer_ids: list[int], config: TrainConfig) -> None:
    """What `config` adapts exists in every adapted layer: its linear `modules`, or (adapter
    "mlp_block") an `.mlp` block."""
    if config.adapter == "mlp_block":
        missing = [i for i in layer_ids if getattr(layers[i], "mlp", None) is None]
        if missing:
            raise UsageError(f"adapter 'mlp_block' needs an .mlp block in every adapted layer; layers {missing} have none")
        hidden = getattr(layers[layer_ids[0]].mlp, "down_proj", None)
        width = getattr(hidden, "out_features", None)
        if width is not None and config.rank > width:
            raise UsageError(f"rank {config.rank} is larger than the MLP block's width {width} allows")
        return
    check_modules(layers, layer_ids, config.modules, config.rank)


def adapter_targets(config: TrainConfig) -> list[str]:
    """What the adapter sits on, as the run's summary names it."""
    return ["mlp_block"] if config.adapter == "mlp_block" else list(config.modules)


def attach_lora(model: nn.Module, config: TrainConfig):
    """Wrap a frozen causal LM in a PEFT LoRA model on `config.modules` of the resolved layers
    (adapter "mlp_block": on a zero linear parallel to each of their MLP blocks, in place).

    The adapter's A matrices are drawn from torch's RNG, seeded here with `config.seed`, so a
    run is reproducible from its config. Returns `(peft_model, layer_ids)`.
    """
    from peft import LoraConfig, get_peft_model

    _, layers, _ = _decoder_layers(model)
    layer_ids = resolve_layers(config, len(layers))
    check_targets(layers, layer_ids, config)
    targets = list(config.modules)
    if config.adapter == "mlp_block":  # PEFT's LoRA on a zero linear beside each MLP block
        wrap_mlp_blocks(layers, layer_ids, model.config.hidden_size)
        targets = [PARALLEL_NAME]
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=targets, layers_to_transform=layer_ids,
                      bias="none", task_type="CAUSAL_LM")
    model.requires_grad_(False)
    # SDPA (flash / memory-efficient kernels on a GPU): eager attention builds [S, S] scores
    # per head, which long answers cannot afford.
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora)
    if config.fused_lora:
        if importlib.util.find_spec(FUSED_LORA_MODULE) is not None:
            patched = importlib.import_module(FUSED_LORA_MODULE).patch_peft_model(peft_model)
            log.info("fused LoRA: %d layers patched", patched)
        else:
            log.warning("fused_lora requested but %s is not available: using PEFT's LoRA", FUSED_LORA_MODULE)
    return peft_model, layer_ids


def model_parts(peft_model: nn.Module, layer_ids: list[int]) -> ModelParts:
    causal_lm = causal_lm_of(peft_model)
    decoder, layers, norm = _decoder_layers(causal_lm)
    cfg = causal_lm.config
    head_weight, head_bias = plain_head(causal_lm)  # the one head resolver (refuses rescaled logits)
    return ModelParts(causal_lm=causal_lm, decoder=decoder, layers=layers, norm=norm,
                      head_weight=head_weight.detach(), head_bias=None if head_bias is None else head_bias.detach(),
                      first_adapted=min(layer_ids),
                      max_positions=getattr(cfg, "max_position_embeddings", None))


def adapter_parameters(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters by name, in a fixed order."""
    return {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
