"""The evaluator on the embedded SmolLM2 (tied head, chat template, real token texts)."""

import dataclasses

import pytest
import torch

from fastmem.eval import evaluate, greedy_check
from tests.eval.eval_fixtures import oracle_scores


@pytest.mark.slow
def test_smollm2_own_greedy_answer_is_exact_and_scores_match_hf_logits():
    from fastmem.data import encode_pair
    from fastmem.models import load_model

    model, tokenizer = load_model("smollm2")
    probe = encode_pair(tokenizer, "Name three colours.", "Red, green and blue are three colours.", name="probe")
    # Free-running greedy decoding gives the model's own answer; as the target it must be an
    # exact match with no error, while the original answer is not.
    own = greedy_check(model, [probe], fast_fail=False, progress=False)[0].generated
    sample = dataclasses.replace(probe, name="own", answer=tokenizer.decode(own), answer_ids=tuple(own))
    report = evaluate(model, [probe, sample], tokenizer, batch_size=2, progress=False)
    probe_rec, own_rec = report.records
    assert own_rec.exact_match is True and own_rec.first_error == -1 and own_rec.token_acc == 1.0
    assert probe_rec.exact_match is False and probe_rec.first_error == probe_rec.greedy.first_divergence

    prob, correct, _ = oracle_scores(model, probe)
    torch.testing.assert_close(probe_rec.scores.prob.double(), prob, atol=2e-4, rtol=1e-3)
    assert probe_rec.scores.correct.tolist() == correct.tolist()
    stubborn = {s["position"]: s["token"] for s in probe_rec.stubborn}
    assert stubborn and all(stubborn[p] == tokenizer.decode([probe.answer_ids[p]]) for p in stubborn)
