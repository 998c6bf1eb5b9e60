"""The unit every workflow passes around: one (prompt, answer) pair, tokenized."""

from __future__ import annotations

from dataclasses import dataclass, field


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
