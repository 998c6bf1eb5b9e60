"""The evaluator on the embedded SmolLM2 (tied head, chat template, real token texts)."""

import copy
import dataclasses

import pytest
import torch

from fastmem.eval import evaluate, greedy_check
from tests.eval.eval_fixtures import oracle_scores

MIDWAY = 12  # the position where the "midway" samples are made to fail


@pytest.fixture(scope="module")
def smollm2():
    from fastmem.models import load_model

    return load_model("smollm2")


@pytest.mark.slow
def test_smollm2_own_greedy_answer_is_exact_and_scores_match_hf_logits(smollm2):
    from fastmem.data import encode_pair

    model, tokenizer = smollm2
    probe = encode_pair(tokenizer, "Name three colours.", "Red, green and blue are three colours.", name="probe")
    # Free-running greedy decoding gives the model's own answer; as the target it must be an
    # exact match with no error, while the original answer is not.
    own = greedy_check(model, [probe], fast_fail=False, progress=False)[0].generated
    sample = dataclasses.replace(probe, name="own", answer=tokenizer.decode(own), answer_ids=tuple(own))
    report = evaluate(model, [probe, sample], tokenizer, batch_size=2, decode="all", progress=False)
    probe_rec, own_rec = report.records
    assert own_rec.exact_match is True and own_rec.first_error == -1 and own_rec.token_acc == 1.0
    assert probe_rec.exact_match is False and probe_rec.first_error == probe_rec.greedy.first_divergence
    assert all(r.decode_agrees for r in report.records)

    prob, correct, _ = oracle_scores(model, probe)
    torch.testing.assert_close(probe_rec.scores.prob.double(), prob, atol=2e-4, rtol=1e-3)
    assert probe_rec.scores.correct.tolist() == correct.tolist()
    stubborn = {s["position"]: s["token"] for s in probe_rec.stubborn}
    assert stubborn and all(stubborn[p] == tokenizer.decode([probe.answer_ids[p]]) for p in stubborn)


def _own_and_midway(model, tokenizer, name):
    """The model's own 32-token greedy answer (an exact match by construction) and the same
    answer with its token at MIDWAY swapped for another (greedy decoding must diverge there)."""
    from fastmem.data import encode_pair

    probe = encode_pair(tokenizer, f"Tell me about {name}.", "x", name="probe")
    own = greedy_check(model, [dataclasses.replace(probe, answer_ids=(0,) * 32)], fast_fail=False,
                       progress=False)[0].generated
    bad = list(own)
    zebra, quartz = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (" zebra", " quartz"))
    bad[MIDWAY] = zebra if own[MIDWAY] != zebra else quartz
    return (dataclasses.replace(probe, name=f"own-{name}", answer_ids=tuple(own)),
            dataclasses.replace(probe, name=f"midway-{name}", answer_ids=tuple(bad)))


def _assert_teacher_forcing_equals_decoding(model, tokenizer, samples):
    tf = evaluate(model, samples, tokenizer, decode="none", progress=False)
    decoded = evaluate(model, samples, tokenizer, decode="all", progress=False)
    for t, d in zip(tf.records, decoded.records):
        assert t.greedy is None and d.greedy is not None
        assert (t.exact_match, t.first_error) == (d.greedy.exact_match, d.greedy.first_divergence), t.name
        assert d.decode_agrees, t.name
    assert decoded.totals()["decode_disagreements"] == []
    return {r.name: r for r in tf.records}


@pytest.mark.slow
def test_smollm2_teacher_forced_em_and_istar_equal_decoded_untrained_and_trained(smollm2):
    from fastmem.data import stress_test
    from fastmem.train import TrainConfig, train

    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    text = stress_test(tokenizer, 40, 0.0, prompt="Recite the passage.")  # real text, 40 tokens
    config = TrainConfig(rank=8, lr=1e-2, dropout=0.0, max_steps=120, progress=False, verify_greedy=True)
    result = train(config, [text], model=model)
    peft_model = result.model
    assert result.summary["stopped_on_recall"] and result.summary["exact_match"] == 1.0

    # Untrained: the adapter switched off is a fresh LoRA (B = 0), i.e. the base model.
    with peft_model.disable_adapter():
        own, midway = _own_and_midway(peft_model, tokenizer, "tides")
        records = _assert_teacher_forcing_equals_decoding(peft_model, tokenizer, [own, midway, text])
    assert records[own.name].exact_match and records[own.name].first_error == -1
    assert not records[midway.name].exact_match and records[midway.name].first_error == MIDWAY
    assert not records[text.name].exact_match  # the base model does not know the passage

    # Trained: the memorized passage is an exact match; a sample still fails midway.
    own, midway = _own_and_midway(peft_model, tokenizer, "glaciers")
    records = _assert_teacher_forcing_equals_decoding(peft_model, tokenizer, [text, own, midway])
    assert records[text.name].exact_match and records[text.name].first_error == -1
    assert records[own.name].exact_match
    assert not records[midway.name].exact_match and records[midway.name].first_error == MIDWAY
