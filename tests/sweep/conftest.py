"""Sweep fixtures: a tiny local checkpoint that every executor can load by path."""

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A random 4-layer llama with SmolLM2's tokenizer, saved like a local checkpoint."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_smol")
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(smollm2_tokenizer), max_position_embeddings=512))
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
