"""A run killed mid-way and resumed from its checkpoint ends with the same adapter, bit for bit,
as an uninterrupted run (LoRA dropout on, SW windows, two samples in shuffled order)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastmem.train import train
from fastmem.train.checkpoint import latest_checkpoint
from tests.train.tiny import make_samples, tiny_config, tiny_model

STEPS = 6


def _config(out, **overrides):
    return tiny_config(objective="sw", sw_window=2, dropout=0.1, max_steps=STEPS, checkpoint_every=2,
                       out=str(out), verify_greedy=True, **overrides)


def test_killed_run_resumes_to_the_same_adapter(tmp_path):
    samples = make_samples(2)
    straight = train(_config(tmp_path / "straight"), samples, model=tiny_model())
    assert straight.summary["steps"] == STEPS and not straight.summary["stopped_on_recall"]

    # "Kill" after 3 steps: the checkpoint at step 2 survives, step 3 is lost.
    killed = train(_config(tmp_path / "resumed"), samples, model=tiny_model(), halt_after_steps=3)
    assert killed.summary["halted"] and killed.adapter_dir is None
    checkpoint = latest_checkpoint(tmp_path / "resumed" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step-0000002"
    assert not list((tmp_path / "resumed" / "checkpoints").glob(".step-*"))  # no half-written checkpoint

    with pytest.raises(ValueError, match="another run"):  # a checkpoint of other settings is refused
        train(_config(tmp_path / "resumed", lr=5e-3), samples, model=tiny_model())

    torch.manual_seed(12345)  # a fresh trainer with a different global RNG: the checkpoint must restore it
    resumed = train(_config(tmp_path / "resumed"), samples, model=tiny_model())
    assert resumed.summary["steps"] == STEPS

    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 4  # A and B of down_proj in layers 2 and 3
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(t.abs().sum() > 0 for name, t in a.items() if "lora_B" in name)

    rows_a = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    for key in ("final_loss", "token_acc", "exact_match", "base_loss"):
        assert straight.summary[key] == resumed.summary[key], key


def test_adapter_is_peft_loadable(tmp_path):
    from peft import PeftModel

    samples = make_samples(1)
    result = train(tiny_config(max_steps=3, out=str(tmp_path)), samples, model=tiny_model())
    trained = {n: p.detach() for n, p in result.model.named_parameters() if "lora_" in n}
    loaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "adapter"))
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p.detach(), trained[name]), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("steps", "base_loss", "final_loss", "delta_loss", "token_acc", "exact_match",
                "stubborn_tokens", "wall_s", "peak_mem_bytes"):
        assert key in summary, key
    assert summary["delta_loss"] == summary["base_loss"] - summary["final_loss"]


def test_finished_run_is_not_overwritten_by_the_library_call(tmp_path):
    samples = make_samples(1)
    train(tiny_config(max_steps=2, out=str(tmp_path)), samples, model=tiny_model())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match="finished run"):  # the same budget: nothing to continue
        train(tiny_config(max_steps=2, out=str(tmp_path)), samples, model=tiny_model())
    with pytest.raises(FileExistsError, match="finished run"):  # a larger budget, but not resuming
        train(tiny_config(max_steps=3, out=str(tmp_path)), samples, model=tiny_model(), resume=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    again = train(tiny_config(max_steps=3, out=str(tmp_path)), samples, model=tiny_model(), overwrite=True)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == again.summary["steps"]
