"""Tokenized pairs, PhoneBook and stress-test data on the real SmolLM2 tokenizer."""

import copy
import re

import pytest

from fastmem.data import MemorySample, encode_pair, phonebook, stress_test
from fastmem.data import phone_book as phonebook_module
from fastmem.data.stdlib_text import stdlib_corpus
from fastmem.data.stress import random_token_pool

IM_END = 2  # SmolLM2's end-of-turn token <|im_end|>


def ids_of(encoding):
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5."""
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)  # the fixture is session-wide: never mutate it
    tok.chat_template = template
    return tok


# ---------------------------------------------------------------- encode_pair

@pytest.mark.parametrize("answer", ["555-123-4567", "héllo wörld 😀 done.",
                                    "line one\nline two", " leading space", "\nleading newline",
                                    "trailing  "])
def test_encode_pair_matches_whole_conversation(smollm2_tokenizer, answer):
    tok = smollm2_tokenizer
    prompt = "What is the phone number of Ann Lee?"
    sample = encode_pair(tok, prompt, answer, name="x")
    user = [{"role": "user", "content": prompt}]
    assert list(sample.prompt_ids) == ids_of(tok.apply_chat_template(
        user, add_generation_prompt=True, tokenize=True))
    full = ids_of(tok.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                          tokenize=True))
    # The template closes the turn with "<|im_end|>\n": ours stops at the end-of-turn token.
    assert list(sample.input_ids) == full[:len(sample.input_ids)]
    assert tok.decode(full[len(sample.input_ids):]) == "\n"
    assert sample.answer_ids[-1] == IM_END
    assert tok.decode(sample.answer_ids[:-1]) == answer
    assert tok.decode(sample.prompt_ids).endswith("<|im_start|>assistant\n")
    assert sample.answer_len == len(sample.answer_ids) and sample.meta["template"] == "chat"
    assert all(isinstance(i, int) for i in sample.input_ids)


def test_encode_pair_without_chat_template_uses_plain_prompt(smollm2_tokenizer):
    tok = with_template(smollm2_tokenizer, None)
    sample = encode_pair(tok, "Key?", "value 42")
    assert tok.decode(sample.prompt_ids) == tok.bos_token + "Key?\n"
    assert sample.answer_ids[-1] == tok.eos_token_id
    assert tok.decode(sample.answer_ids[:-1]) == "value 42"
    assert sample.meta["template"] == "plain"


def test_encode_pair_finds_another_templates_end_token(smollm2_tokenizer):
    # No trailing newline, and <|endoftext|> (id 0) closes a turn instead of <|im_end|>.
    tok = with_template(smollm2_tokenizer,
                        "{% for m in messages %}<|im_start|>{{ m.role }}<|im_start|>{{ m.content }}"
                        "<|endoftext|>{% endfor %}{% if add_generation_prompt %}"
                        "<|im_start|>assistant<|im_start|>{% endif %}")
    sample = encode_pair(tok, "Q", "the answer")
    assert sample.answer_ids[-1] == 0 and sample.meta["template"] == "chat"
    full = ids_of(tok.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "the answer"}],
        tokenize=True))
    assert list(sample.input_ids) == full


def test_encode_pair_template_that_rewrites_the_assistant_turn(smollm2_tokenizer):
    # Like reasoning-model templates: past assistant turns get tags the generation prompt lacks.
    tok = with_template(smollm2_tokenizer,
                        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
                        "{% if m.role == 'assistant' %}<think></think>{% endif %}{{ m.content }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                        "<|im_start|>assistant\n{% endif %}")
    sample = encode_pair(tok, "Q", "the answer")
    assert sample.meta["template"] == "chat-unchecked"
    assert tok.decode(sample.answer_ids) == "the answer<|im_end|>"


@pytest.mark.parametrize("header,answer", [("Answer", "ing well"), ("Answer: ", "the answer")])
def test_encode_pair_answer_merging_with_the_header(smollm2_tokenizer, header, answer):
    # The header's end and the answer's start tokenize as one piece ("Answering", " the"): no
    # clean split of the whole conversation exists, so the answer is tokenized alone.
    tok = with_template(smollm2_tokenizer,
                        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}\n"
                        + header + "{% else %}{{ m.content }}<|im_end|>{% endif %}{% endfor %}")
    sample = encode_pair(tok, "Q", answer)
    assert sample.meta["template"] == "chat-split"
    assert tok.decode(sample.prompt_ids) == "Q\n" + header
    assert list(sample.answer_ids) == tok(answer, add_special_tokens=False)["input_ids"] + [IM_END]


def test_encode_pair_bad_input(smollm2_tokenizer):
    tok = smollm2_tokenizer
    with pytest.raises(ValueError, match="answer is empty"):
        encode_pair(tok, "Q", "")
    with pytest.raises(TypeError, match="answer must be a str"):
        encode_pair(tok, "Q", 5)
    with pytest.raises(TypeError, match="prompt must be a str"):
        encode_pair(tok, None, "a")
    sample = encode_pair(tok, "Q", "word " * 40)
    encode_pair(tok, "Q", "word " * 40, max_length=len(sample.input_ids))  # exactly fits
    with pytest.raises(ValueError, match=r"exceeds max_length=\d+ \(the model's context\)"):
        encode_pair(tok, "Q", "word " * 40, max_length=len(sample.input_ids) - 1)
    with pytest.raises(ValueError, match="max_length must be an int"):
        encode_pair(tok, "Q", "a", max_length=0)


# ---------------------------------------------------------------- phonebook

PHONE = re.compile(r"^[2-9]\d\d-[2-9]\d\d-\d{4}$")


def test_phonebook_entries_format_and_size(smollm2_tokenizer):
    target = 600
    book = phonebook(smollm2_tokenizer, target, seed=3)
    total = sum(s.answer_len for s in book)
    longest = max(s.answer_len for s in book)
    assert target <= total < target + longest  # stopped at the first entry reaching the target
    assert total - book[-1].answer_len < target
    people = [s.meta["person"] for s in book]
    phones = [s.answer for s in book]
    assert len({p.casefold() for p in people}) == len(people)
    assert len(set(phones)) == len(phones)
    for index, sample in enumerate(book):
        assert isinstance(sample, MemorySample) and sample.meta["index"] == index
        assert sample.prompt == f"What is the phone number of {sample.meta['person']}?"
        assert PHONE.match(sample.answer) and sample.answer == sample.meta["phone"]
        assert smollm2_tokenizer.decode(sample.answer_ids) == sample.answer + "<|im_end|>"
    assert len({s.name for s in book}) == len(book)


def test_phonebook_is_deterministic_in_the_seed(smollm2_tokenizer):
    tok = smollm2_tokenizer
    first, again = phonebook(tok, 300, seed=7), phonebook(tok, 300, seed=7)
    assert first == again
    other = phonebook(tok, 300, seed=8)
    assert [s.prompt for s in other] != [s.prompt for s in first]
    assert [s.answer for s in other] != [s.answer for s in first]
    # A bigger book with the same seed extends the smaller one.
    bigger = phonebook(tok, 900, seed=7)
    assert bigger[:len(first)] == first and len(bigger) > len(first)


def test_phonebook_book_layout(smollm2_tokenizer):
    tok = smollm2_tokenizer
    target = 400
    (book,) = phonebook(tok, target, seed=1, layout="book")
    lines = book.answer.split("\n")
    assert [line.split(": ") for line in lines] == book.meta["entries"]
    assert all(PHONE.match(phone) for _, phone in book.meta["entries"])
    assert book.answer_len >= target
    shorter = encode_pair(tok, book.prompt, "\n".join(lines[:-1]))
    assert shorter.answer_len < target  # no line more than needed
    entries = phonebook(tok, target, seed=1)
    assert [[s.meta["person"], s.answer] for s in entries][:len(lines) - 5] == \
        book.meta["entries"][:len(lines) - 5]  # the same seeded stream of entries


def test_phonebook_bad_input(smollm2_tokenizer, monkeypatch):
    tok = smollm2_tokenizer
    with pytest.raises(ValueError, match="total_answer_tokens"):
        phonebook(tok, 0)
    with pytest.raises(ValueError, match="layout"):
        phonebook(tok, 10, layout="table")
    with pytest.raises(ValueError, match="question"):
        phonebook(tok, 10, question="Who?")
    monkeypatch.setattr(phonebook_module, "FIRST_NAMES", ("Ann", "Bob"))
    monkeypatch.setattr(phonebook_module, "LAST_NAMES", ("Lee",))
    with pytest.raises(ValueError, match="more entries than the 2 distinct names"):
        phonebook(tok, 1000)
    with pytest.raises(ValueError, match="exceeds max_length"):
        phonebook(tok, 10, max_length=8)


# ---------------------------------------------------------------- stress test

@pytest.mark.parametrize("length", [1, 50, 777])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_stress_test_length_and_ratio(smollm2_tokenizer, length, ratio):
    tok = smollm2_tokenizer
    sample = stress_test(tok, length, ratio, seed=42)
    assert sample.answer_len == length
    positions = sample.meta["random_positions"]
    assert len(positions) == round(ratio * length) and len(set(positions)) == len(positions)
    text_ids = tok(stdlib_corpus(), add_special_tokens=False)["input_ids"][:length]
    kept = [i for i in range(length) if i not in set(positions)]
    assert [sample.answer_ids[i] for i in kept] == [text_ids[i] for i in kept]
    # Replaced positions almost always differ from the text (a 1-in-49k coincidence allowed).
    changed = sum(sample.answer_ids[i] != text_ids[i] for i in positions)
    assert changed >= len(positions) - 1
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    assert not special & set(sample.answer_ids)
    assert sample.answer == tok.decode(sample.answer_ids)
    assert tok.decode(sample.prompt_ids).endswith("<|im_start|>assistant\n")


def test_stress_test_zero_ratio_is_the_real_text(smollm2_tokenizer):
    sample = stress_test(smollm2_tokenizer, 300, 0.0)
    assert stdlib_corpus().startswith(sample.answer[:-20])  # the last token may cut a word
    words = sample.answer.split()
    assert sum(w.strip(".,:;()'\"`").isalpha() for w in words) > 0.7 * len(words)


def test_stress_test_random_tokens_are_uniform_over_the_vocabulary(smollm2_tokenizer):
    tok = smollm2_tokenizer
    sample = stress_test(tok, 4000, 1.0, seed=0)
    pool = random_token_pool(tok)
    assert len(pool) == len(tok) - len(tok.get_added_vocab())
    # 4000 uniform draws from ~49k ids: ~3840 distinct expected, mean id near the pool's mean.
    assert len(set(sample.answer_ids)) > 3700
    mean = sum(sample.answer_ids) / len(sample.answer_ids)
    assert abs(mean - sum(pool) / len(pool)) < 0.05 * len(pool)


def test_stress_test_is_deterministic_in_the_seed(smollm2_tokenizer):
    tok = smollm2_tokenizer
    a, b = stress_test(tok, 200, 0.5, seed=1), stress_test(tok, 200, 0.5, seed=1)
    assert a == b and a.meta["random_positions"] == b.meta["random_positions"]
    c = stress_test(tok, 200, 0.5, seed=2)
    assert c.answer_ids != a.answer_ids
    assert c.meta["random_positions"] != a.meta["random_positions"]


def test_stress_test_user_text_and_file(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 5
    from_str = stress_test(tok, 60, 0.0, text=text)
    assert from_str.answer_ids == tuple(tok(text, add_special_tokens=False)["input_ids"][:60])
    path = tmp_path / "passage.txt"
    path.write_text(text, encoding="utf-8")
    assert stress_test(tok, 60, 0.0, text=path).answer_ids == from_str.answer_ids
    with pytest.raises(ValueError, match="longer than the text"):
        stress_test(tok, 10_000, 0.0, text=text)
    with pytest.raises(FileNotFoundError):
        stress_test(tok, 10, 0.0, text=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="text is empty"):
        stress_test(tok, 10, 0.0, text="  \n")


def test_stress_test_bad_input(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for length in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="length must be a positive int"):
            stress_test(tok, length, 0.5)
    for ratio in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="random_ratio"):
            stress_test(tok, 10, ratio)
    with pytest.raises(ValueError, match="exceeds max_length"):
        stress_test(tok, 100, 0.5, max_length=100)


def test_stdlib_corpus_covers_the_papers_lengths(smollm2_tokenizer):
    # The paper's longest stress answer is 10,000 tokens.
    assert len(smollm2_tokenizer(stdlib_corpus(), add_special_tokens=False)["input_ids"]) > 10_000
    assert stdlib_corpus() == stdlib_corpus.__wrapped__()  # gathered the same way every time
