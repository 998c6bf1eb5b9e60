"""User data as JSONL: round trips and a clear error, naming the line, for each bad record."""

import json

import pytest

from fastmem.data import encode_pair, load_jsonl, phonebook, save_jsonl, stress_test

PAIRS = [("What is the capital of France?", "Paris."),
         ("Recite the motto.", "Ünïcode — and\nnewlines\tkept verbatim 😀")]


def test_pairs_round_trip(smollm2_tokenizer, tmp_path):
    path = save_jsonl(PAIRS, tmp_path / "sub" / "pairs.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"prompt": p, "answer": a} for p, a in PAIRS]
    samples = load_jsonl(path, smollm2_tokenizer)
    for sample, (prompt, answer) in zip(samples, PAIRS, strict=True):
        expected = encode_pair(smollm2_tokenizer, prompt, answer)
        assert (sample.prompt, sample.answer) == (prompt, answer)
        assert sample.input_ids == expected.input_ids and sample.answer_ids == expected.answer_ids
    assert [s.name for s in samples] == ["pairs/0", "pairs/1"]
    assert not list(tmp_path.glob("sub/.*.tmp"))  # the atomic write left no temporary file


def test_samples_round_trip_keep_names_meta_and_ids(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    book = phonebook(tok, 60, seed=2)
    stress = stress_test(tok, 120, 0.5, seed=3)  # random tokens: ids do not survive re-encoding
    assert tuple(tok(stress.answer, add_special_tokens=False)["input_ids"]) != stress.answer_ids
    path = save_jsonl(book + [stress], tmp_path / "mixed.jsonl")
    loaded = load_jsonl(path, tok)
    assert loaded == book + [stress]  # names, prompts, answers and token ids all equal
    assert loaded[0].meta["person"] == book[0].meta["person"]
    assert loaded[-1].meta["random_positions"] == stress.meta["random_positions"]


def test_dict_records_and_blank_lines(smollm2_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"prompt": "a?", "answer": "b", "name": "first", "meta": {"k": 1}}\n\n',
                    encoding="utf-8")
    (sample,) = load_jsonl(path, smollm2_tokenizer)
    assert sample.name == "first" and sample.meta["k"] == 1 and sample.answer == "b"


@pytest.mark.parametrize("bad_line,match", [
    ('{"prompt": "q", "answer": "a"', "invalid JSON"),
    ('["q", "a"]', "expected a JSON object"),
    ('{"prompt": "q"}', "missing field 'answer'"),
    ('{"answer": "a"}', "missing field 'prompt'"),
    ('{"prompt": "q", "answer": 7}', "field 'answer' must be a string"),
    ('{"prompt": "q", "answer": ""}', "answer is empty"),
    ('{"prompt": "q", "answer": "a", "anwser": "typo"}', r"unknown field\(s\) \['anwser'\]"),
    ('{"prompt": "q", "answer": "a", "meta": 3}', "'meta' an object"),
    ('{"prompt": "q", "answer": "a", "answer_ids": [1, "x"]}', "list of ints"),
    ('{"prompt": "q", "answer": "a", "answer_ids": [99999999]}', "out of this tokenizer's range"),
    ('{"prompt": "q", "answer": "a", "answer_ids": [65]}', "do not decode to 'answer'"),
])
def test_bad_record_errors_name_the_line(smollm2_tokenizer, tmp_path, bad_line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine", "answer": "ok"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match) as error:
        load_jsonl(path, smollm2_tokenizer)
    assert str(error.value).startswith(f"{path}:3: ")


def test_too_long_and_empty_files(smollm2_tokenizer, tmp_path):
    path = save_jsonl([("q", "short"), ("q", "a much longer answer " * 20)], tmp_path / "l.jsonl")
    assert len(load_jsonl(path, smollm2_tokenizer, max_length=200)) == 2
    with pytest.raises(ValueError, match=r"l\.jsonl:2: .*exceeds max_length=60"):
        load_jsonl(path, smollm2_tokenizer, max_length=60)
    stress_path = save_jsonl([stress_test(smollm2_tokenizer, 80, 0.5)], tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match=r"s\.jsonl:1: .*exceeds max_length=80"):
        load_jsonl(stress_path, smollm2_tokenizer, max_length=80)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        load_jsonl(empty, smollm2_tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl", smollm2_tokenizer)


def test_save_rejects_bad_items_before_writing(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="item 1: needs string 'prompt' and 'answer'"):
        save_jsonl([("q", "a"), ("q", None)], path)
    with pytest.raises(TypeError, match="save_jsonl takes"):
        save_jsonl(["just a string"], path)
    assert not path.exists()
