"""Tokenize one (prompt, answer) pair with the model's chat template into a `MemorySample`.

The prompt is the user turn; the answer is the assistant turn. `prompt_ids` run up to and
including the assistant header (what a generation call would be given); `answer_ids` are the
answer's tokens followed by the template's end-of-turn token, so the adapter also learns to stop.

Answers are text: a special token's string written in a prompt or an answer (the literal text
`<|im_end|>`) is tokenized as the characters it is made of, never as that token. Read as the
token, an answer would hold an end-of-turn id in its middle: teacher forcing would score it, and
`generate()` would stop there and return half the answer.
"""

from __future__ import annotations

from fastmem.errors import UsageError, WrongInputType

from .sample import MemorySample

# Without a chat template the key is the bare prompt on its own line.
PLAIN_PROMPT_FORMAT = "{prompt}\n"
# Stands in for the prompt to find where a chat template puts the user's text.
_PROMPT_MARK = "FASTMEMPROMPTMARK7f3a"


def special_token_strings(tokenizer) -> list[str]:
    """The text of every special token of `tokenizer` (e.g. '<|im_end|>'), longest first."""
    found = {str(token) for token in getattr(tokenizer, "all_special_tokens", []) or []}
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", True) and str(token):
            found.add(str(token))
    return sorted((s for s in found if s), key=len, reverse=True)


def _text_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` with every special token's string spelled out as text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _token_ids(tokenizer, text: str, user_spans: tuple[tuple[int, int], ...] = ()) -> list[int]:
    """Ids of templated `text` as written (the template already spells out any BOS it wants).

    The template's own special tokens stay tokens; inside `user_spans` (character ranges of the
    user's prompt and answer) a special token's string is text. Segments between the template's
    special tokens are tokenized whole, as the tokenizer itself splits at special tokens first,
    so text without special strings gets exactly the tokenizer's usual ids.
    """
    specials = special_token_strings(tokenizer)
    if not any(s in text[a:b] for a, b in user_spans for s in specials):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids, start, at = [], 0, 0
    while at < len(text):
        span_end = next((b for a, b in user_spans if a <= at < b), None)
        if span_end is not None:
            at = span_end
            continue
        next_span = min((a for a, _ in user_spans if a > at), default=len(text))
        match = next((s for s in specials if text.startswith(s, at) and at + len(s) <= next_span), None)
        if match is None:
            at += 1
            continue
        if start < at:
            ids += _text_ids(tokenizer, text[start:at])
        ids.append(int(tokenizer.convert_tokens_to_ids(match)))
        start = at = at + len(match)
    if start < len(text):
        ids += _text_ids(tokenizer, text[start:])
    return ids


def _prompt_span(tokenizer, prompt: str, prompt_text: str) -> tuple[int, int]:
    """Where the user's `prompt` lies in the templated `prompt_text` (character range).

    Found by rendering the template around a marker; a template that rewrites the prompt (trims
    it, escapes it) leaves no exact place, which matters only when the prompt holds a special
    token's string (then refused: it could not be kept as text)."""
    user = [{"role": "user", "content": _PROMPT_MARK}]
    marked = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    at = marked.find(_PROMPT_MARK)
    if at >= 0 and marked[:at] + prompt + marked[at + len(_PROMPT_MARK):] == prompt_text:
        return at, at + len(prompt)
    held = [s for s in special_token_strings(tokenizer) if s in prompt]
    if held:
        raise UsageError(f"prompt holds the special-token text {held[0]!r} and this chat template rewrites "
                         "the prompt, so it cannot be kept as text; remove it from the prompt")
    return 0, 0


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _added_token_at_start(tokenizer, text: str) -> tuple[str, int] | None:
    """The longest special added token that `text` starts with, e.g. '<|im_end|>'."""
    best = None
    for token_id, token in tokenizer.added_tokens_decoder.items():
        content = str(token)
        if (getattr(token, "special", True) and content and text.startswith(content)
                and (best is None or len(content) > len(best[0]))):
            best = (content, int(token_id))
    return best


def _template_parts(tokenizer, prompt: str, answer: str) -> tuple[str, str, int | None, bool]:
    """Return `(prompt_text, end_text, end_id, checkable)` for the tokenizer's chat template.

    `prompt_text` is the templated prompt with the generation header; `end_text`/`end_id` the
    end-of-turn token that closes the assistant turn. `checkable` is False when the full
    conversation is not `prompt_text + answer + ...` (some templates rewrite past assistant
    turns, e.g. adding or stripping reasoning tags), so token equality cannot be checked.
    """
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": answer}], tokenize=False)
    checkable = full_text.startswith(prompt_text + answer)
    if checkable:
        suffix = full_text[len(prompt_text) + len(answer):]
    else:
        at = full_text.rfind(answer)
        suffix = full_text[at + len(answer):] if at >= 0 else ""
    found = _added_token_at_start(tokenizer, suffix)
    if found is None and tokenizer.eos_token and suffix.startswith(tokenizer.eos_token):
        found = (tokenizer.eos_token, int(tokenizer.eos_token_id))
    end_text, end_id = found if found is not None else ("", None)
    return prompt_text, end_text, end_id, checkable


def template_prompt_ids(tokenizer, prompt: str) -> tuple[list[int], int | None]:
    """Token ids of the templated prompt (with the assistant header), and the end-of-turn id.

    Used where the answer ids are built token by token (the stress test) rather than from text.
    Without a chat template: BOS (if the tokenizer has one) + `prompt + "\\n"`, and EOS as the end.
    """
    if not isinstance(prompt, str):
        raise WrongInputType(f"prompt must be a str, got {type(prompt).__name__}")
    if _has_chat_template(tokenizer):
        prompt_text, _, end_id, _ = _template_parts(tokenizer, prompt, "x")
        return _token_ids(tokenizer, prompt_text, (_prompt_span(tokenizer, prompt, prompt_text),)), end_id
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    return bos + _text_ids(tokenizer, PLAIN_PROMPT_FORMAT.format(prompt=prompt)), \
        tokenizer.eos_token_id


def check_length(prompt_len: int, answer_len: int, max_length: int | None, where: str = "") -> None:
    """Raise when prompt + answer cannot fit in the model's context of `max_length` tokens."""
    if max_length is None:
        return
    if not isinstance(max_length, int) or max_length < 2:
        raise UsageError("max_length must be an int >= 2 (the model's context), "
                         f"got {max_length!r}")
    if prompt_len + answer_len > max_length:
        raise UsageError(f"{where}prompt ({prompt_len} tokens) + answer ({answer_len} tokens) = "
                         f"{prompt_len + answer_len} tokens exceeds max_length={max_length} "
                         f"(the model's context); pass --context {prompt_len + answer_len} (or more) to "
                         "train past it with RoPE scaling")


def encode_pair(tokenizer, prompt: str, answer: str, name: str = "", meta: dict | None = None,
                *, max_length: int | None = None) -> MemorySample:
    """Tokenize one memory: user turn `prompt`, assistant turn `answer`.

    Args:
        tokenizer: a Hugging Face tokenizer. With a chat template, `prompt_ids` is
            `apply_chat_template([user], add_generation_prompt=True)` and `answer_ids` the answer
            tokens plus the template's end-of-turn token (`<|im_end|>` for SmolLM2); the pair is
            checked to equal the tokenization of the whole templated conversation up to that token
            (`meta["template"] == "chat"`). Where no such check is possible the answer is
            tokenized alone: "chat-unchecked" (the template rewrites the assistant turn) or
            "chat-split" (the answer's first characters merge with the header's when tokenized
            together, e.g. a header ending in a space).
            Without a template the prompt is `BOS + prompt + "\\n"` and the answer ends with EOS.
        prompt: the key (may be empty: the template's header is then the key).
        answer: the text to store verbatim; must be non-empty.
        name, meta: carried into the sample.
        max_length: the model's context length; a longer prompt + answer raises ValueError.

    Returns:
        a `MemorySample` with int token-id tuples (`prompt_ids`, `answer_ids`).
    """
    if not isinstance(prompt, str):
        raise WrongInputType(f"prompt must be a str, got {type(prompt).__name__}")
    if not isinstance(answer, str):
        raise WrongInputType(f"answer must be a str, got {type(answer).__name__}")
    if not answer:
        raise UsageError(f"answer is empty{f' (sample {name!r})' if name else ''}: "
                         "there is nothing to memorize")
    if _has_chat_template(tokenizer):
        prompt_text, end_text, end_id, checkable = _template_parts(tokenizer, prompt, answer)
        # "chat-unchecked": the template rewrites the assistant turn, so the split is not
        # verified against the whole conversation's tokens.
        template = "chat" if checkable else "chat-unchecked"
        prompt_span = _prompt_span(tokenizer, prompt, prompt_text)
    else:
        prompt_text = PLAIN_PROMPT_FORMAT.format(prompt=prompt)
        end_text, end_id, checkable = "", tokenizer.eos_token_id, True
        template = "plain"
        prompt_span = (0, len(prompt))

    prompt_ids = _token_ids(tokenizer, prompt_text, (prompt_span,))
    answer_ids = None
    if checkable:
        # Tokenize the conversation as one string and split it after the prompt: these are the
        # ids the model sees when the whole turn is in context.
        answer_span = (len(prompt_text), len(prompt_text) + len(answer))
        full_ids = _token_ids(tokenizer, prompt_text + answer + end_text, (prompt_span, answer_span))
        if full_ids[:len(prompt_ids)] == prompt_ids:
            answer_ids = full_ids[len(prompt_ids):]
            if end_text == "" and end_id is not None:
                answer_ids.append(int(end_id))
        else:
            # The answer's first characters merge with the header's last ones (a header ending
            # in a space, "Answer" + "ing"): no clean split exists. Tokenize the answer alone —
            # exactly what greedy decoding must produce after being given `prompt_ids`.
            template = "chat-split" if template == "chat" else "plain-split"
    if answer_ids is None:
        answer_ids = _text_ids(tokenizer, answer) + ([] if end_id is None else [int(end_id)])
    if template.startswith("plain"):
        bos = tokenizer.bos_token_id
        prompt_ids = ([] if bos is None else [int(bos)]) + prompt_ids

    where = f"sample {name!r}: " if name else ""
    check_length(len(prompt_ids), len(answer_ids), max_length, where)
    meta = dict(meta or {})
    meta["template"] = template
    return MemorySample(name=name, prompt=prompt, answer=answer,
                        prompt_ids=tuple(int(i) for i in prompt_ids),
                        answer_ids=tuple(int(i) for i in answer_ids), meta=meta)
