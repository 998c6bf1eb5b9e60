"""User data as JSONL: one {"prompt": ..., "answer": ...} object per line.

Optional fields: "name" (the sample's name), "meta" (an object), and "answer_ids" (a list of
token ids). "answer_ids" is written only for token-level samples such as the stress test, whose
random tokens need not survive decode → encode; on load it is used as-is after checking that it
decodes to "answer" with this tokenizer (a file written with another tokenizer fails loudly).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fastmem.errors import MissingInput, UsageError, WrongInputType
from fastmem.files import write_jsonl_atomic

from .chat import check_length, encode_pair, template_prompt_ids
from .sample import MemorySample

_KNOWN_FIELDS = {"prompt", "answer", "name", "meta", "answer_ids"}
log = logging.getLogger(__name__)


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in `text` (JSON allows "\\ud800"; no tokenizer
    or UTF-8 file can hold it), or None when `text` is valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def check_text_fields(record: dict, where: str) -> None:
    """Refuse a string field of `record` that is not valid Unicode text, naming it."""
    for key in ("prompt", "answer", "name"):
        value = record.get(key)
        at = lone_surrogate(value) if isinstance(value, str) else None
        if at is not None:
            raise UsageError(f"{where}: field {key!r} holds a lone surrogate (\\u{ord(value[at]):04x} at "
                             f"character {at + 1}), which is not text; write the character itself or a "
                             "valid surrogate pair")


def _record_sample(record, tokenizer, max_length, where: str, default_name: str) -> MemorySample:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "answer"):
        if key not in record:
            raise UsageError(f"{where}: missing field {key!r} (records need 'prompt' and 'answer')")
        if not isinstance(record[key], str):
            raise UsageError(f"{where}: field {key!r} must be a string, got "
                             f"{type(record[key]).__name__}")
    unknown = set(record) - _KNOWN_FIELDS
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: "
                         f"{sorted(_KNOWN_FIELDS)}")
    name = record.get("name", default_name)
    meta = record.get("meta", {})
    if not isinstance(name, str) or not isinstance(meta, dict):
        raise UsageError(f"{where}: 'name' must be a string and 'meta' an object")
    if not record["answer"]:
        raise UsageError(f"{where}: answer is empty: there is nothing to memorize")
    check_text_fields(record, where)
    if "answer_ids" not in record:
        try:
            return encode_pair(tokenizer, record["prompt"], record["answer"], name=name,
                               meta=meta, max_length=max_length)
        except ValueError as error:
            raise UsageError(f"{where}: {error}") from None  # UsageError is a ValueError too

    answer_ids = record["answer_ids"]
    if (not isinstance(answer_ids, list) or not answer_ids
            or any(isinstance(i, bool) or not isinstance(i, int) for i in answer_ids)):
        raise UsageError(f"{where}: 'answer_ids' must be a non-empty list of ints")
    if min(answer_ids) < 0 or max(answer_ids) >= len(tokenizer):
        raise UsageError(f"{where}: 'answer_ids' out of this tokenizer's range "
                         f"[0, {len(tokenizer)})")
    stops = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    inner = next((at for at, i in enumerate(answer_ids[:-1]) if i in stops), None)
    if inner is not None:
        raise UsageError(f"{where}: 'answer_ids' hold the special token {answer_ids[inner]} at position {inner}, "
                         "before the end: generate() would stop there, so the answer could never be recalled whole")
    if tokenizer.decode(answer_ids, skip_special_tokens=True) != record["answer"]:
        raise UsageError(f"{where}: 'answer_ids' do not decode to 'answer' with this tokenizer "
                         "(written with another tokenizer?)")
    prompt_ids, _ = template_prompt_ids(tokenizer, record["prompt"])
    try:
        check_length(len(prompt_ids), len(answer_ids), max_length, f"{where}: ")
    except ValueError as error:
        raise UsageError(str(error)) from None
    return MemorySample(name=name, prompt=record["prompt"], answer=record["answer"],
                        prompt_ids=tuple(prompt_ids), answer_ids=tuple(answer_ids),
                        meta={**meta, "token_level": True})


def load_jsonl(path: str | os.PathLike, tokenizer, max_length: int | None = None
               ) -> list[MemorySample]:
    """Read and tokenize a JSONL file of {"prompt", "answer"} records (blank lines skipped).

    Errors name the file and line: invalid JSON, a missing/non-string field, an empty answer,
    prompt + answer longer than `max_length` (the model's context), a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"data file {path} does not exist")
    samples = []
    first_answer = {}  # prompt -> (line, answer): one prompt with two answers cannot both be recalled
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{where}: invalid JSON ({error.msg})") from None
            samples.append(_record_sample(record, tokenizer, max_length, where,
                                          default_name=f"{path.stem}/{len(samples)}"))
            warn_second_answer(first_answer, record, line_number, where)
    if not samples:
        raise UsageError(f"{path}: no records (expected one JSON object per line)")
    return samples


def warn_second_answer(first_answer: dict, record: dict, line_number: int, where: str) -> None:
    """One warning line when `record`'s prompt came before with another answer: greedy decoding
    gives one answer per prompt, so the run would train to its budget without recalling both."""
    prompt, answer = record["prompt"], record["answer"]
    if prompt not in first_answer:
        first_answer[prompt] = (line_number, answer)
    elif first_answer[prompt][1] != answer:
        log.warning("%s: same prompt as line %d with another answer: greedy decoding gives one answer per "
                    "prompt, so at most one of them can be recalled", where, first_answer[prompt][0])


def _to_record(item) -> dict:
    if isinstance(item, MemorySample):
        record = {"prompt": item.prompt, "answer": item.answer}
        if item.name:
            record["name"] = item.name
        if item.meta:
            record["meta"] = item.meta
        if item.meta.get("token_level"):
            record["answer_ids"] = list(item.answer_ids)
        return record
    if isinstance(item, dict):
        return dict(item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return {"prompt": item[0], "answer": item[1]}
    raise WrongInputType("save_jsonl takes MemorySample objects, (prompt, answer) pairs or dicts, got "
                    f"{type(item).__name__}")


def save_jsonl(samples_or_pairs, path: str | os.PathLike) -> Path:
    """Write samples, (prompt, answer) pairs or record dicts as JSONL, atomically.

    Each record is checked for string 'prompt'/'answer' fields before anything is written.
    Returns the path written.
    """
    records = [_to_record(item) for item in samples_or_pairs]
    for index, record in enumerate(records):
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("answer"), str):
            raise UsageError(f"item {index}: needs string 'prompt' and 'answer', got "
                             f"{record.get('prompt')!r}, {record.get('answer')!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl_atomic(path, records)  # a reader never sees half a file
