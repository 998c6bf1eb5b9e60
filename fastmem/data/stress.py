"""The paper's long-context memorization stress test: real text with random-token corruption.

Answer = the first `length` tokens of one real English text, in which a fraction `random_ratio`
of the positions (chosen with the seed) holds a uniformly random vocabulary token instead. The
paper used a LongBench document; here the text is the standard library's docstrings
(`stdlib_text.py`) or a text the caller supplies — never generated filler.

The answer is built token by token, so `answer_ids` is authoritative: random tokens need not
survive a decode → encode round trip. `answer` is their decoded text, for display. The answer has
exactly `length` tokens and no end-of-turn token: ℓ in the memory law counts stored tokens, and
every one of them is a corruption candidate.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from fastmem.errors import MissingInput, UsageError, WrongInputType

from .chat import check_length, template_prompt_ids
from .sample import MemorySample
from .stdlib_text import corpus_python_version, stdlib_corpus

DEFAULT_PROMPT = "Recite the memorized passage."


def _text_token_ids(tokenizer, text: str, length: int) -> list[int]:
    """The first `length` tokens of `text`, tokenizing only as much of it as needed."""
    chars = max(64, 8 * length)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        # One token more than needed: the last token of a cut may be a fragment of a word.
        if len(ids) > length or chars >= len(text):
            break
        chars *= 2
    if len(ids) < length:
        raise UsageError(f"length={length} tokens is longer than the text ({len(ids)} tokens); "
                         "give a longer text")
    return [int(i) for i in ids[:length]]


def random_token_pool(tokenizer) -> list[int]:
    """Ids a random replacement may take: the whole vocabulary except special/added tokens."""
    excluded = set(int(i) for i in tokenizer.all_special_ids)
    excluded.update(int(i) for i in tokenizer.get_added_vocab().values())
    return [i for i in range(len(tokenizer)) if i not in excluded]


def stress_test(tokenizer, length: int, random_ratio: float, seed: int = 42,
                text: str | os.PathLike | None = None, *, prompt: str = DEFAULT_PROMPT,
                max_length: int | None = None) -> MemorySample:
    """One stress-test memory of exactly `length` answer tokens.

    Args:
        tokenizer: Hugging Face tokenizer; the prompt is wrapped by its chat template.
        length: answer length ℓ in tokens (paper: 50 … 10,000).
        random_ratio: fraction ρ in [0, 1] of positions replaced by uniformly random vocabulary
            tokens (special tokens excluded); round(ρ·ℓ) positions are replaced.
        seed: chooses the positions and the random tokens (paper: 42).
        text: the real text as a `str`, or a path (`pathlib.Path` / `os.PathLike`) to a UTF-8
            text file; default the standard library's docstrings.
        prompt: the key the answer is stored under.
        max_length: the model's context; prompt + answer longer than it raises ValueError.

    Returns:
        `MemorySample` with `answer_len == length`; `meta` holds `kind="stress"`, `length`,
        `random_ratio`, `seed`, `source`, the sorted `random_positions`, and `token_level=True`
        (the ids are not the tokenization of `answer`).
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise UsageError(f"length must be a positive int, got {length!r}")
    if not isinstance(random_ratio, (int, float)) or not 0.0 <= random_ratio <= 1.0:
        raise UsageError(f"random_ratio must be in [0, 1], got {random_ratio!r}")
    if text is None:
        source, text = f"python{'.'.join(map(str, corpus_python_version()))}-docstrings", \
            stdlib_corpus()
    elif isinstance(text, os.PathLike):
        path = Path(text)
        if not path.is_file():
            raise MissingInput(f"text file {path} does not exist")
        source, text = str(path), path.read_text(encoding="utf-8")
    elif isinstance(text, str):
        source = "text"
    else:
        raise WrongInputType(f"text must be a str, a path or None, got {type(text).__name__}")
    if not text.strip():
        raise UsageError("text is empty")

    answer_ids = _text_token_ids(tokenizer, text, length)
    rng = random.Random(seed)
    positions = sorted(rng.sample(range(length), round(random_ratio * length)))
    pool = random_token_pool(tokenizer)
    for position in positions:
        answer_ids[position] = pool[rng.randrange(len(pool))]

    prompt_ids, _ = template_prompt_ids(tokenizer, prompt)
    check_length(len(prompt_ids), length, max_length)
    return MemorySample(
        name=f"stress-{length}-r{random_ratio:g}-s{seed}", prompt=prompt,
        answer=tokenizer.decode(answer_ids), prompt_ids=tuple(prompt_ids),
        answer_ids=tuple(answer_ids),
        meta=dict(kind="stress", length=length, random_ratio=float(random_ratio), seed=seed,
                  source=source, random_positions=positions, token_level=True))
