"""PhoneBook: unique name → phone-number memories, sized by their total answer tokens.

The paper's PhoneBook is "reduced to pure key-value pairs by dropping the context field and
deduplicating keys so each query maps to a unique phone number", with book sizes counted in
answer-only tokens (1k … 32k) and trained as many samples under a curriculum (its Tables 5/6
give the sample count per size). So the default here is one sample per entry: the prompt asks
for one person's number, the answer is the number. `layout="book"` instead stores the whole
book as one answer (one "Name: number" line per entry) for a single long-answer memory.
"""

from __future__ import annotations

import random

from fastmem.errors import UsageError

from .chat import encode_pair
from .names import FIRST_NAMES, LAST_NAMES
from .sample import MemorySample

DEFAULT_QUESTION = "What is the phone number of {name}?"
BOOK_PROMPT = "Recite the phone book."
LAYOUTS = ("entries", "book")


def _names(rng: random.Random):
    """Distinct "First Last" names in a seeded order (dedup by construction: no pair repeats)."""
    pairs = [(first, last) for first in FIRST_NAMES for last in LAST_NAMES if first != last]
    rng.shuffle(pairs)
    seen = set()
    for first, last in pairs:
        name = f"{first} {last}"
        if name.casefold() not in seen:
            seen.add(name.casefold())
            yield name


def _phone_numbers(rng: random.Random):
    """Distinct North-American-style numbers "NXX-NXX-XXXX" (N = 2..9), in a seeded order."""
    seen = set()
    while True:
        number = (f"{rng.randint(2, 9)}{rng.randint(0, 99):02d}-{rng.randint(2, 9)}"
                  f"{rng.randint(0, 99):02d}-{rng.randint(0, 9999):04d}")
        if number not in seen:
            seen.add(number)
            yield number


def phone_entries(seed: int = 0):
    """The endless seeded stream of unique (name, phone) entries a book is cut from.

    Books of different sizes with one seed share a prefix: a bigger book extends a smaller one.
    """
    # Two generators from one seed: names and numbers stay independent of each other's draws.
    names = _names(random.Random(f"phonebook-names-{seed}"))
    numbers = _phone_numbers(random.Random(f"phonebook-numbers-{seed}"))
    for name in names:
        yield name, next(numbers)


def phonebook(tokenizer, total_answer_tokens: int, seed: int = 0, *,
              question: str = DEFAULT_QUESTION, layout: str = "entries",
              max_length: int | None = None) -> list[MemorySample]:
    """Build a phone book whose answers total at least `total_answer_tokens` tokens.

    Entries are added until the sum of `answer_len` (answer tokens, end-of-turn token included:
    every token the loss is taken on) reaches the target, so the total overshoots by less than
    one entry (one line with `layout="book"`). Deterministic in `seed`.

    Args:
        tokenizer: Hugging Face tokenizer (its chat template wraps each prompt).
        total_answer_tokens: target size of the book in answer tokens (paper: 1k … 32k).
        seed: picks the names, their order and the numbers.
        question: prompt format with a `{name}` field (layout "entries").
        layout: "entries" — one sample per person (the paper's set-up); "book" — one sample
            whose answer is the whole book, one "Name: number" line per entry.
        max_length: the model's context; a sample that does not fit raises ValueError.

    Returns:
        list of `MemorySample`; `meta` holds `kind="phonebook"`, and per entry `index`, `person`
        and `phone` ("book": `entries`, a list of [name, phone]).
    """
    if not isinstance(total_answer_tokens, int) or total_answer_tokens < 1:
        raise UsageError(f"total_answer_tokens must be a positive int, got {total_answer_tokens!r}")
    if layout not in LAYOUTS:
        raise UsageError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "entries" and "{name}" not in question:
        raise UsageError(f"question must contain a '{{name}}' field, got {question!r}")
    entries = phone_entries(seed)
    if layout == "book":
        return [_book_sample(tokenizer, entries, total_answer_tokens, seed, max_length)]

    samples, total = [], 0
    for index, (person, phone) in enumerate(entries):
        if total >= total_answer_tokens:
            return samples
        sample = encode_pair(tokenizer, question.format(name=person), phone,
                             name=f"phonebook-{seed}/{index}", max_length=max_length,
                             meta=dict(kind="phonebook", index=index, person=person, phone=phone))
        samples.append(sample)
        total += sample.answer_len
    raise UsageError(f"total_answer_tokens={total_answer_tokens} needs more entries than the "
                     f"{len(samples)} distinct names available (reached {total} tokens)")


def _book_sample(tokenizer, entries, target: int, seed: int, max_length) -> MemorySample:
    """One sample holding the whole book; grown line by line, re-encoded to count exactly."""
    lines, estimate = [], 0
    chosen = []

    def encode():
        return encode_pair(tokenizer, BOOK_PROMPT, "\n".join(lines), name=f"phonebook-{seed}/book",
                           max_length=max_length,
                           meta=dict(kind="phonebook", entries=[list(e) for e in chosen]))

    for person, phone in entries:
        chosen.append((person, phone))
        lines.append(f"{person}: {phone}")
        # Per-line count (+1 for the newline) estimates the book; exact count is checked below
        # to avoid re-tokenizing the whole book after every line (quadratic in its size).
        estimate += len(tokenizer(lines[-1] + "\n", add_special_tokens=False)["input_ids"])
        if estimate >= target:
            sample = encode()
            if sample.answer_len >= target:
                # The estimate can run over the exact count: drop lines the target does not need.
                while len(lines) > 1:
                    last = lines.pop(), chosen.pop()
                    shorter = encode()
                    if shorter.answer_len < target:
                        lines.append(last[0])
                        chosen.append(last[1])
                        break
                    sample = shorter
                return sample
    raise UsageError(f"total_answer_tokens={target} needs more entries than the distinct names "
                     "available")
