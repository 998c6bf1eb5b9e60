"""A tiny llama + word-level tokenizer saved as a local HF checkpoint, so `fastmem train
--model DIR` runs end to end in seconds (no download, no SmolLM2)."""

from __future__ import annotations

from pathlib import Path

WORDS = ["what", "is", "the", "code", "of", "alice", "bob", "secret", "number", "red", "blue",
         "green", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero"]


def save_tiny_checkpoint(directory: Path, max_positions: int = 64) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.train.tiny import tiny_model

    vocab = {"<unk>": 0, "<eos>": 1}
    for word in WORDS:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                        pad_token="<eos>")
    model = tiny_model(max_position_embeddings=max_positions, eos_token_id=1, pad_token_id=1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
