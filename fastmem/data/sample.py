"""The unit every workflow passes around: one (prompt, answer) pair, tokenized."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastmem.errors import UsageError, WrongInputType


@dataclass(frozen=True)
class MemorySample:
    """A key (prompt) and the answer to store verbatim.

    `prompt_ids` is the chat-templated prompt up to and including the assistant header;
    `answer_ids` the answer tokens (with the end-of-turn token when the template has one).
    Loss and metrics are taken on `answer_ids` only.
    """

    name: str
    prompt: str
    answer: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.answer_ids

    @property
    def answer_len(self) -> int:
        return len(self.answer_ids)


def check_samples(samples, vocab_size: int | None = None, max_positions: int | None = None) -> None:
    """The one input check of every workflow (train, eval, sweep): refuse, naming the sample,
    what the model cannot score before any forward runs.

    Args:
        vocab_size: token ids must lie in [0, vocab_size) (None: not checked).
        max_positions: prompt + answer must fit the model's context (None: not checked).
    """
    if not samples:
        raise UsageError("samples is empty: nothing to train on or evaluate")
    for index, sample in enumerate(samples):
        if not isinstance(sample, MemorySample):
            raise WrongInputType(f"samples[{index}] must be a MemorySample, got {type(sample).__name__}")
        label = f"samples[{index}] ({sample.name!r})"
        if not sample.prompt_ids:
            raise UsageError(f"{label} has an empty prompt: the first answer token needs at least one "
                             "token before it")
        if not sample.answer_ids:
            raise UsageError(f"{label} has an empty answer (nothing to memorize or score)")
        if max_positions is not None and len(sample.input_ids) > max_positions:
            raise UsageError(f"{label}: prompt + answer = {len(sample.input_ids)} tokens, longer than the "
                             f"model's context ({max_positions} positions)")
        if vocab_size is not None:
            bad = next((t for t in sample.input_ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise UsageError(f"{label} holds token id {bad}, outside the vocabulary [0, {vocab_size}) "
                                 "of the model (tokenized for another model?)")
