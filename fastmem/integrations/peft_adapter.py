"""Load a fastmem adapter directory (PEFT format) onto a base model, whichever adapter it holds.

A LoRA on linear modules loads with PEFT alone. The MLP-block adapter (fastmem.nn.
mlp_block_adapter) targets a linear that exists only once its MLP blocks are wrapped: its
adapter_config.json names `PARALLEL_NAME` in target_modules and the layers in
layers_to_transform, and those blocks are wrapped here before PEFT loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from fastmem.nn.mlp_block_adapter import is_mlp_block_adapter, wrap_mlp_blocks


def _decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder.layers: an MLP-block adapter cannot be placed on it")
    return layers


def prepare_for_adapter(model: nn.Module, adapter_dir: str | Path) -> bool:
    """Wrap the MLP blocks an MLP-block adapter in `adapter_dir` sits on (no-op for a plain
    LoRA). Returns whether it did."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    if not is_mlp_block_adapter(config.get("target_modules")):
        return False
    layers = _decoder_layer_list(model)
    layer_ids = config.get("layers_to_transform")
    if isinstance(layer_ids, int):
        layer_ids = [layer_ids]
    if not layer_ids:
        raise ValueError(f"{adapter_dir}: an MLP-block adapter names its layers in layers_to_transform; none given")
    bad = [i for i in layer_ids if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"{adapter_dir}: MLP-block adapter on layers {bad}, the model has {len(layers)} layers")
    wrap_mlp_blocks(layers, list(layer_ids), model.config.hidden_size)
    return True


def load_adapter(model: nn.Module, adapter_dir: str | Path, **kwargs):
    """`PeftModel.from_pretrained(model, adapter_dir, local_files_only=True, **kwargs)`, after
    `prepare_for_adapter` (an adapter directory is a path, never a hub id)."""
    from peft import PeftModel

    prepare_for_adapter(model, adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), local_files_only=True, **kwargs)
