"""Evaluator: EM / token accuracy / i* / ranks on hand-made cases against a full-logits oracle."""

import json

import pytest
import torch
from tests.eval.eval_fixtures import greedy_continuation, make_confident, make_sample, oracle_scores

from fastmem.eval import evaluate, greedy_check, plot_probability_grid, plot_training_curves, target_ranks
from fastmem.eval.plots import read_metrics

PROMPT = [5, 9, 11, 20]


@pytest.fixture
def model(tiny_llama):
    return make_confident(tiny_llama)


@pytest.fixture
def own_answer(model):
    return greedy_continuation(model, PROMPT, 12)


def corrupted(model, answer, position):
    """The answer with its token at `position` replaced by the least likely one there."""
    sample = make_sample("x", PROMPT, answer)
    with torch.no_grad():
        logits = model(torch.tensor([sample.input_ids])).logits[0, len(PROMPT) - 1 + position]
    out = list(answer)
    out[position] = int(logits.argmin())
    return out


def test_own_greedy_answer_is_an_exact_match(model, own_answer):
    sample = make_sample("own", PROMPT, own_answer)
    record = evaluate(model, [sample], decode="all", progress=False).records[0]
    prob, correct, rank = oracle_scores(model, sample)
    assert bool(correct.all())
    assert record.exact_match is True and record.greedy.first_divergence == -1
    assert record.greedy.generated == own_answer
    assert record.token_acc == 1.0 and record.first_error == -1
    assert record.scores.target_rank.tolist() == [0] * len(own_answer)
    torch.testing.assert_close(record.scores.prob.double(), prob, atol=1e-5, rtol=1e-4)
    assert record.min_prob == pytest.approx(float(prob.min()), abs=1e-5)
    # Greedy succeeds even where p <= 0.5: p > 0.5 is sufficient, not necessary. The stubborn
    # list is exactly the oracle's p <= 0.5 positions.
    assert [s["position"] for s in record.stubborn] == (prob <= 0.5).nonzero().flatten().tolist()
    assert record.stubborn, "the fixture should leave some tokens below p = 0.5"


@pytest.mark.parametrize("position", [0, 4, 11])
def test_corrupted_token_sets_first_error_and_breaks_em(model, own_answer, position):
    answer = corrupted(model, own_answer, position)
    sample = make_sample("bad", PROMPT, answer)
    record = evaluate(model, [sample], decode="all", progress=False).records[0]
    prob, correct, rank = oracle_scores(model, sample)
    assert record.exact_match is False and record.decode_agrees is True
    assert (record.scores.exact_match, record.scores.first_error) == (False, position)
    assert record.greedy.first_divergence == position
    assert record.first_error == position
    # fast fail: decoding stopped right after the wrong token.
    assert record.greedy.generated == own_answer[:position + 1]
    assert record.token_acc == pytest.approx(float(correct.double().mean()))
    assert record.scores.correct.tolist() == correct.tolist()
    assert record.scores.target_rank.tolist() == rank.tolist()
    assert record.scores.target_rank[position] == 96  # the least likely of V = 97
    bad = next(s for s in record.stubborn if s["position"] == position)
    assert bad["token_id"] == answer[position] and bad["token"] == f"<{answer[position]}>"


def test_without_fast_fail_every_token_is_decoded(model, own_answer):
    sample = make_sample("bad", PROMPT, corrupted(model, own_answer, 3))
    result = greedy_check(model, [sample], fast_fail=False, progress=False)[0]
    assert result.first_divergence == 3 and not result.exact_match
    # Free-running greedy decoding ignores the wrong target: it is the model's own answer.
    assert result.generated == own_answer


def test_batched_equals_one_by_one(model):
    samples = []
    for i, (prompt_len, answer_len) in enumerate([(3, 9), (6, 4), (2, 14), (5, 7), (4, 1)]):
        prompt = [(7 * i + 3 * j) % 90 + 3 for j in range(prompt_len)]
        answer = greedy_continuation(model, prompt, answer_len)
        if i % 2:
            answer[answer_len // 2] = (answer[answer_len // 2] + 1) % 97
        samples.append(make_sample(f"s{i}", prompt, answer))
    batched = evaluate(model, samples, batch_size=3, decode="all", progress=False)
    single = evaluate(model, samples, batch_size=1, decode="all", progress=False)
    for a, b, sample in zip(batched.records, single.records, samples):
        assert a.name == sample.name == b.name
        torch.testing.assert_close(a.scores.prob, b.scores.prob, atol=1e-5, rtol=1e-4)
        assert (a.exact_match, a.first_error, a.token_acc) == (b.exact_match, b.first_error, b.token_acc)
        assert a.greedy.first_divergence == b.greedy.first_divergence
        _, correct, rank = oracle_scores(model, sample)
        assert a.scores.correct.tolist() == correct.tolist()
        assert a.scores.target_rank.tolist() == rank.tolist()
    assert [r.exact_match for r in batched.records] == [True, False, True, False, True]
    totals = batched.totals()
    assert totals["records"] == 5 and totals["n_exact_match"] == 3 and totals["exact_match"] == 0.6
    assert totals["decoded"] == 5 and totals["decode_disagreements"] == []
    # The default decides from the one teacher-forced pass alone: the same verdicts, no decoding.
    tf_only = evaluate(model, samples, batch_size=3, progress=False)
    assert [(r.exact_match, r.first_error) for r in tf_only.records] == \
        [(r.exact_match, r.first_error) for r in batched.records]
    assert all(r.greedy is None and r.decode_reason is None for r in tf_only.records)
    assert tf_only.totals()["decoded"] == 0
    n_tokens = sum(s.answer_len for s in samples)
    assert totals["tokens"] == n_tokens
    assert totals["token_acc"] == pytest.approx(sum(float(r.scores.correct.sum()) for r in batched.records) / n_tokens)


def test_margins_and_near_ties_against_the_oracle(model, own_answer, monkeypatch):
    import fastmem.eval.exact_match as em

    sample = make_sample("bad", PROMPT, corrupted(model, own_answer, 5))
    record = evaluate(model, [sample], progress=False).records[0]
    with torch.no_grad():
        logits = model(torch.tensor([sample.input_ids])).logits[0, len(PROMPT) - 1:-1].double()
    target = torch.tensor(sample.answer_ids)
    top = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.scatter(1, target[:, None], float("-inf")).amax(1)
    torch.testing.assert_close(record.scores.margin.double(), top - other, atol=1e-5, rtol=0)
    assert record.min_margin == pytest.approx(float((top - other)[:6].min()), abs=1e-5)
    assert record.near_ties == [] and record.greedy is None

    # With a noise tolerance wider than every margin, each deciding position is a near tie: the
    # sample is decoded to confirm, and the report says so.
    monkeypatch.setitem(em.MARGIN_NOISE_EPS, torch.float32, 1e12)
    confirmed = evaluate(model, [sample], progress=False)
    record = confirmed.records[0]
    assert record.near_ties == list(range(6))  # 0..i*: later positions decide nothing
    assert record.decode_reason == "near_tie" and record.confirmed_by_decoding and record.decode_agrees
    assert (record.exact_match, record.first_error) == (False, 5)
    assert confirmed.totals()["confirmed_by_decoding"] == ["bad"]
    unconfirmed = evaluate(model, [sample], decode="none", progress=False)
    assert unconfirmed.records[0].greedy is None and unconfirmed.totals()["near_tie_unconfirmed"] == ["bad"]


def test_near_tie_positions_cover_only_the_deciding_span():
    from fastmem.eval.exact_match import margin_tolerance, near_tie_positions

    lse = torch.full((6,), 20.0)
    tol = float(margin_tolerance(torch.float32, lse)[0])
    assert 0 < tol < 0.05
    margin = torch.tensor([3.0, tol / 2, 2.0, -1.0, tol / 4, 1.0])
    assert near_tie_positions(margin, lse, 3, torch.float32).tolist() == [1]
    assert near_tie_positions(margin, lse, -1, torch.float32).tolist() == [1, 4]
    assert near_tie_positions(margin, lse, 0, torch.float32).tolist() == []
    # bf16 rounds 2^16 times coarser than fp32: its tolerance is ~2^10 times wider
    assert float(margin_tolerance(torch.bfloat16, lse)[0]) == pytest.approx(1024 * tol)
    assert 2.0 < float(margin_tolerance(torch.bfloat16, lse)[0]) < 3.0


def test_target_ranks_chunked_matches_brute_force():
    torch.manual_seed(1)
    hidden, weight = torch.randn(37, 16), torch.randn(101, 16)
    labels = torch.randint(0, 101, (37,))
    bias = torch.randn(101)
    logits = hidden @ weight.T + bias
    expected = (logits > logits.gather(1, labels[:, None])).sum(1)
    # budget of 3 rows per chunk: 13 chunks with a ragged last one.
    assert torch.equal(target_ranks(hidden, weight, labels, bias, budget=3 * 101), expected)
    assert torch.equal(target_ranks(hidden, weight, labels, bias), expected)


def test_peft_adapter_is_evaluated_through_the_wrapper(model, own_answer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"], lora_dropout=0.5,
                                                  init_lora_weights=False))
    # Left in training mode (a trainer evaluating mid-run): the evaluator must switch LoRA
    # dropout off for its passes and hand the model back in training mode.
    peft_model.train()
    sample = make_sample("own", PROMPT, own_answer)
    record = evaluate(peft_model, [sample], progress=False).records[0]
    assert peft_model.training and all(m.training for m in peft_model.modules())
    peft_model.eval()
    prob, correct, rank = oracle_scores(peft_model, sample)
    torch.testing.assert_close(record.scores.prob.double(), prob, atol=1e-5, rtol=1e-4)
    assert record.scores.correct.tolist() == correct.tolist()
    expected_first = int(correct.logical_not().nonzero()[0]) if not bool(correct.all()) else -1
    assert record.first_error == expected_first
    assert record.exact_match == (expected_first == -1)
    with peft_model.disable_adapter():
        base_prob, _, _ = oracle_scores(peft_model, sample)
    assert not torch.allclose(base_prob, prob, atol=1e-3), "the adapter should change the scores"


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="samples is empty"):
        evaluate(model, [], progress=False)
    with pytest.raises(ValueError, match="empty prompt"):
        evaluate(model, [make_sample("e", [], [3, 4])], progress=False)
    with pytest.raises(ValueError, match="token id 97, outside"):
        evaluate(model, [make_sample("big", [3], [97])], progress=False)
    with pytest.raises(ValueError, match="outside"):
        greedy_check(model, [make_sample("big", [-1], [5])], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, [make_sample("e", [3], [3, 4])], batch_size=0, progress=False)


def test_report_json_schema_and_probability_grids(model, own_answer, tmp_path):
    samples = [make_sample("own/1", PROMPT, own_answer),
               make_sample("bad", PROMPT, corrupted(model, own_answer, 2))]
    report = evaluate(model, samples, progress=False)
    path = report.write(tmp_path / "out", grids=1, grid_width=5)
    data = json.loads(path.read_text())
    assert set(data) == {"records", "totals", "timing", "model"} and set(data["timing"]) == {"teacher_forcing_s", "decoding_s"}
    first, second = data["records"]
    for record in data["records"]:
        assert isinstance(record["exact_match"], bool)
        assert isinstance(record["token_acc"], float) and isinstance(record["first_error"], int)
        assert isinstance(record["min_prob"], float) and 0 <= record["min_prob"] <= 1
        assert all(set(s) >= {"position", "token"} for s in record["stubborn"])
        assert record["n_stubborn"] == len(record["stubborn"])
    assert (first["exact_match"], first["first_error"]) == (True, -1)
    assert (second["exact_match"], second["first_error"]) == (False, 2)
    assert data["totals"]["n_exact_match"] == 1 and data["totals"]["records"] == 2
    png = tmp_path / "out" / first["prob_grid"]
    assert first["prob_grid"] == "prob_grid_000_own_1.png" and "prob_grid" not in second
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_probability_grid_long_answer_and_errors(tmp_path):
    prob = torch.rand(5000)
    path = plot_probability_grid(prob, tmp_path / "long.png", width=100, first_error=17)
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="non-empty"):
        plot_probability_grid([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="width"):
        plot_probability_grid([0.5], tmp_path / "x.png", width=0)


def test_training_curves_from_metrics_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    # the trainer's row shape: numbers, plus a list and a string that are not curves
    lines = [json.dumps({"step": s, "epoch": s // 2, "samples": [0, 1], "mean_loss": 3.0 / (s + 1),
                         "token_acc": s / 20, "min_p": s / 25, "stubborn_tokens": 20 - s,
                         "objective": "ot"}) for s in range(20)]
    metrics.write_text("\n".join(lines) + "\n\n")
    assert len(read_metrics(metrics)) == 20
    path = plot_training_curves(metrics, tmp_path / "curves.png")
    assert path.stat().st_size > 10_000
    metrics.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match=":2: invalid JSON"):
        plot_training_curves(metrics, tmp_path / "bad.png")
    metrics.write_text('{"step": 1, "objective": "ot"}\n')
    with pytest.raises(ValueError, match="no numeric metric"):
        plot_training_curves(metrics, tmp_path / "bad.png")
