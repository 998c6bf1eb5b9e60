"""Answers are text (issue 25): a special token's string inside a prompt or an answer is
tokenized as the characters it is made of, so teacher forcing, greedy decoding and HF
`generate()` all see the whole answer; bad text in a JSONL record is refused naming the line."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fastmem.data import encode_pair, load_jsonl
from fastmem.data.chat import special_token_strings, template_prompt_ids
from fastmem.errors import UsageError

ANSWER = "Close a turn with <|im_end|> and open one with <|im_start|>, never early."


def _special_ids(tok) -> set[int]:
    return {int(tok.convert_tokens_to_ids(s)) for s in special_token_strings(tok)}


def test_special_token_text_in_an_answer_stays_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    sample = encode_pair(tok, "How are turns closed?", ANSWER)
    body, end = sample.answer_ids[:-1], sample.answer_ids[-1]
    assert end == tok.convert_tokens_to_ids("<|im_end|>")  # the template's own end of turn
    assert not set(body) & _special_ids(tok), "a special token id where the answer had text"
    assert tok.decode(list(body)) == ANSWER  # round trip: the decoded answer is the text given
    # what the tokenizer does unasked: the real end-of-turn token in the middle of the answer
    assert 2 in tok(ANSWER, add_special_tokens=False)["input_ids"]


def test_special_token_text_in_a_prompt_stays_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    plain = encode_pair(tok, "Say hi", "hi")
    marked = encode_pair(tok, "Say <|im_start|>hi<|im_end|>", "hi")
    count = lambda ids: sum(i in _special_ids(tok) for i in ids)  # noqa: E731
    assert count(marked.prompt_ids) == count(plain.prompt_ids)  # only the template's own tokens
    assert tok.decode(list(marked.prompt_ids)).count("<|im_start|>hi<|im_end|>") == 1
    ids, _ = template_prompt_ids(tok, "Say <|im_start|>hi<|im_end|>")
    assert list(ids) == list(marked.prompt_ids)


def test_text_without_special_strings_keeps_the_tokenizers_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    sample = encode_pair(tok, "What is the code?", "red blue seven")
    conversation = tok.apply_chat_template([{"role": "user", "content": "What is the code?"},
                                            {"role": "assistant", "content": "red blue seven"}], tokenize=False)
    whole = tok(conversation, add_special_tokens=False)["input_ids"]
    assert list(sample.input_ids) == whole[:len(sample.input_ids)]


class _Recite:
    """What a perfectly memorized adapter does: at each step the next answer token wins."""

    def __init__(self, prompt_len: int, answer_ids):
        self.prompt_len, self.answer_ids = prompt_len, list(answer_ids)

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.answer_ids[min(step, len(self.answer_ids) - 1)]] = 0.0
        return forced


def _generate(tok, prompt_ids, answer_ids) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=512)).eval()
    prompt = torch.tensor([list(prompt_ids)])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=len(answer_ids) + 5, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         logits_processor=LogitsProcessorList([_Recite(prompt.shape[1], answer_ids)]))
    return tok.decode(out[0, prompt.shape[1]:].tolist(), skip_special_tokens=True)


def test_generate_returns_the_whole_answer_that_teacher_forcing_scores(smollm2_tokenizer):
    """EM is taken on `answer_ids`; `generate()` reciting exactly those ids must return the
    answer whole. With the end-of-turn id inside the answer it stopped half-way."""
    tok = smollm2_tokenizer
    sample = encode_pair(tok, "How are turns closed?", ANSWER)
    assert _generate(tok, sample.prompt_ids, sample.answer_ids) == ANSWER
    parsed = tok(ANSWER, add_special_tokens=False)["input_ids"] + [2]  # the old, parsed tokenization
    assert _generate(tok, sample.prompt_ids, parsed) == "Close a turn with "  # stops there: the test can fail


def test_token_level_answer_ids_with_an_inner_special_token_are_refused(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    ids = tok("a b", add_special_tokens=False)["input_ids"]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "ab", "answer_ids": [ids[0], 2, ids[-1]]}) + "\n")
    with pytest.raises(UsageError, match=r"t\.jsonl:1: 'answer_ids' hold the special token 2 at position 1"):
        load_jsonl(path, tok)


def test_a_lone_surrogate_is_refused_naming_file_and_line(smollm2_tokenizer, tmp_path):
    from fastmem.cli_checks import check_jsonl_file

    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "q", "answer": "fine"}\n{"prompt": "q2", "answer": "bad \\ud800 text"}\n')
    with pytest.raises(UsageError, match=r"s\.jsonl:2: field 'answer' holds a lone surrogate \(\\ud800 at character 5\)"):
        load_jsonl(path, smollm2_tokenizer)
    with pytest.raises(UsageError, match=r"s\.jsonl:2: field 'answer' holds a lone surrogate"):
        check_jsonl_file(str(path))
    path.write_text('{"prompt": "q", "answer": "a pair \\ud83d\\ude00 is fine"}\n')
    assert load_jsonl(path, smollm2_tokenizer)[0].answer == "a pair 😀 is fine"


def test_one_prompt_with_two_answers_warns_once(smollm2_tokenizer, tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "code?", "answer": "red"}, {"prompt": "other", "answer": "x"},
        {"prompt": "code?", "answer": "red"}, {"prompt": "code?", "answer": "blue"}]))
    with caplog.at_level(logging.WARNING, logger="fastmem.data.jsonl"):
        assert len(load_jsonl(path, smollm2_tokenizer)) == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "d.jsonl:4: same prompt as line 1 with another answer" in warnings[0]
