"""Past the model's context on purpose: RoPE scaling for answers longer than the model saw.

An answer is memorized by teacher forcing over prompt + answer, so every position of it must
be one the model can encode. Past `max_position_embeddings` the rotary frequencies are
stretched with YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large
Language Models"): the long wavelengths are interpolated by `factor = context / own`, the short
ones kept, and attention is sharpened by 0.1·ln(factor) + 1 — so the positions the model
already knew move little, which is why an adapter can learn the rest. transformers implements
it for every family whose config holds one flat, unscaled RoPE (llama, mistral, qwen2/3, ...);
a model that already scales its RoPE (Llama 3.1's "llama3", a YaRN model) or keeps a RoPE per
layer type is refused: stacking two scalings is untested here.

The scaling is part of the model an adapter was trained on: `context_record` is written beside
every saved adapter (`CONTEXT_RECORD`) and into run.json and the eval report, and
`check_adapter_context` refuses to evaluate an adapter on a model scaled otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastmem.errors import UsageError

log = logging.getLogger("fastmem")

CONTEXT_RECORD = "fastmem_context.json"
ROPE_TYPE = "yarn"


def _own_rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or any(isinstance(value, dict) for value in rope.values()):
        raise UsageError(f"--context: {type(config).__name__} keeps no single RoPE in its config, "
                         "so its positions cannot be stretched here")
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise UsageError(f"--context: the model already scales its RoPE ({kind!r}); stretching it "
                         "again is not supported")
    return rope


def extend_context(config, context: int) -> dict | None:
    """Stretch `config` (a transformers config, changed in place) to `context` positions.

    Returns the scaling applied (see `context_record`), or None when `context` fits the
    model's own `max_position_embeddings` (the config is left as it is).
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise UsageError(f"--context must be a positive number of positions, got {context!r}")
    own = getattr(config, "max_position_embeddings", None)
    if not isinstance(own, int) or own < 1:
        raise UsageError(f"--context: {type(config).__name__} states no max_position_embeddings")
    if context <= own:
        return None
    rope = _own_rope(config)
    factor = context / own
    config.rope_parameters = dict(rope, rope_type=ROPE_TYPE, factor=factor,
                                  original_max_position_embeddings=own)
    config.max_position_embeddings = context
    log.warning("context %d > the model's %d positions: RoPE scaled with YaRN, factor %.4g "
                "(recorded with the run and its adapter)", context, own, factor)
    return context_record(config)


def context_record(config) -> dict:
    """What an adapter trained on this model must be evaluated with: the context and the RoPE
    scaling (None: the model's own positions)."""
    rope = getattr(config, "rope_parameters", None) or {}
    scaled = isinstance(rope, dict) and rope.get("rope_type") == ROPE_TYPE
    return {
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "rope_scaling": ({key: rope[key] for key in ("rope_type", "factor", "original_max_position_embeddings")}
                         if scaled else None),
    }


def check_rope_applied(model) -> None:
    """After loading with a stretched config: every rotary embedding took the scaling (a family
    whose rotary class ignores `rope_parameters` would silently train past its context)."""
    rotaries = [module for module in model.modules() if hasattr(module, "rope_type")]
    if not rotaries or any(module.rope_type != ROPE_TYPE for module in rotaries):
        raise UsageError(f"--context: {type(model).__name__} did not take the YaRN RoPE scaling; "
                         "this family cannot run past its context here")


def write_context_record(directory: Path, config) -> None:
    """`directory/CONTEXT_RECORD` (the caller writes into a temp dir it swaps in atomically)."""
    (Path(directory) / CONTEXT_RECORD).write_text(json.dumps(context_record(config), indent=2) + "\n")


def read_context_record(adapter_dir: str | Path) -> dict | None:
    """The record saved with an adapter; None for an adapter saved before fastmem kept one."""
    path = Path(adapter_dir) / CONTEXT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"--adapter {adapter_dir}: {CONTEXT_RECORD} is unreadable ({err})") from None
    if not isinstance(record, dict):
        raise UsageError(f"--adapter {adapter_dir}: {CONTEXT_RECORD} is not a JSON object")
    return record


def check_adapter_context(adapter_dir: str | Path, config, context: int | None) -> None:
    """Refuse an adapter trained under another RoPE scaling than `config` (already stretched to
    `context`, if given) carries: its weights were fitted to those positions' encodings."""
    saved = read_context_record(adapter_dir)
    if saved is None:
        return
    trained = saved.get("rope_scaling")
    here = context_record(config)["rope_scaling"]
    if trained == here:
        return
    if trained:
        raise UsageError(f"--adapter {adapter_dir} was trained with RoPE scaled to "
                         f"{saved.get('max_position_embeddings')} positions (YaRN factor "
                         f"{trained.get('factor'):.4g}); evaluate with --context "
                         f"{saved.get('max_position_embeddings')}")
    raise UsageError(f"--adapter {adapter_dir} was trained on the model's own "
                     f"{saved.get('max_position_embeddings')} positions; evaluate without --context "
                     f"{context} (it would rescale the positions the adapter was fitted to)")
