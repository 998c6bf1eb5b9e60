"""Shared test set-up: Triton's CPU interpreter when there is no GPU, tiny model fixtures."""

import os

import torch

# The interpreter flag is read when a @triton.jit function is defined: set it before any
# fastmem kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def tiny_llama_config(**overrides):
    """A random 4-layer llama small enough for CPU unit tests."""
    from transformers import LlamaConfig

    values = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer alone (~4 s from the GGUF; no model weights)."""
    from transformers import AutoTokenizer

    from fastmem.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                         local_files_only=True)
