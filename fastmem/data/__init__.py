"""Memorization data: (prompt, answer) pairs tokenized with the model's chat template.

- `encode_pair`: one pair → `MemorySample` (loss on the answer tokens only).
- `phonebook`: unique name → phone-number memories sized by total answer tokens.
- `stress_test`: real text of ℓ tokens with a fraction ρ replaced by random tokens.
- `TemporalCurriculum`: the paper's inter-batch curriculum (which samples train each epoch).
- `load_jsonl` / `save_jsonl`: user data as {"prompt", "answer"} records.
"""

from .chat import encode_pair
from .curriculum import TemporalCurriculum
from .jsonl import load_jsonl, save_jsonl
from .phone_book import phonebook
from .sample import MemorySample
from .stress import stress_test

__all__ = ["MemorySample", "encode_pair", "phonebook", "stress_test", "TemporalCurriculum",
           "load_jsonl", "save_jsonl"]
