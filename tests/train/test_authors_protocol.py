"""The authors' protocol as trainer options: gradient clipping, the LR schedule, their
curriculum loader, and the flags that set them (benchmarks/reproduce/authors.toml uses them)."""

from __future__ import annotations

import pytest
import torch

from fastmem.data import TemporalCurriculum
from fastmem.data.curriculum_authors import AuthorsCurriculum
from fastmem.train import TrainConfig, train
from fastmem.train.lr_schedule import lr_factor
from fastmem.train.schedule import build_schedule
from tests.train.tiny import make_samples, tiny_config, tiny_model


@pytest.mark.parametrize("total, warmup", [(10, 0), (7, 3), (1, 0), (5, 5)])
def test_linear_schedule_is_hf_get_scheduler_linear(total, warmup):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)
    ours = lr_factor("linear", total, warmup)
    for step in range(total + 2):
        assert ours(step) == pytest.approx(hf.lr_lambdas[0](step), abs=1e-12), step


def test_constant_schedule_and_bad_values():
    assert [lr_factor("constant", 6, 2)(s) for s in range(6)] == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("cosine", 6)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="cosine").validate()
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1).validate()


def test_trainer_lr_follows_the_schedule():
    samples = make_samples(1)
    result = train(tiny_config(lr=1e-2, max_steps=6, warmup_steps=2, stop_on_recall=False), samples,
                   model=tiny_model())
    expected = [1e-2 * lr_factor("linear", 6, 2)(s) for s in range(6)]
    assert [row["lr"] for row in result.metrics] == pytest.approx(expected)
    result = train(tiny_config(lr=1e-2, max_steps=4, lr_schedule="constant", stop_on_recall=False), samples,
                   model=tiny_model())
    assert [row["lr"] for row in result.metrics] == pytest.approx([1e-2] * 4)


def test_gradient_is_clipped_before_every_optimizer_step(monkeypatch):
    events = []
    real_clip, real_step = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step

    def clip(params, max_norm, *args, **kwargs):
        norm = real_clip(params, max_norm, *args, **kwargs)
        params = list(params)
        clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        events.append(("clip", max_norm, float(norm), float(clipped)))
        return norm

    def step(self, *args, **kwargs):
        events.append(("step",))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(tiny_config(lr=1e-2, max_steps=4, max_grad_norm=1e-3, stop_on_recall=False), make_samples(1),
          model=tiny_model())
    assert [e[0] for e in events] == ["clip", "step"] * 4
    clips = [e for e in events if e[0] == "clip"]
    assert all(e[1] == 1e-3 and e[2] > 1e-3 and e[3] == pytest.approx(1e-3, rel=1e-3) for e in clips)
    events.clear()
    train(tiny_config(lr=1e-2, max_steps=2, stop_on_recall=False), make_samples(1), model=tiny_model())
    assert [e[0] for e in events] == ["step", "step"]  # 0: no clipping
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainConfig(max_grad_norm=-1.0).validate()


def test_authors_curriculum_counts_whole_batches_in_a_fixed_torch_order():
    curriculum = AuthorsCurriculum(23, batch_size=4, ratios=[0.2, 0.5, 1.0], boundaries=[2, 4, 6], seed=42)
    assert curriculum.order == torch.randperm(23, generator=torch.Generator().manual_seed(42)).tolist()
    # int(23 * ratio) rounded down to whole batches, >= one batch, <= the 5 whole batches (20)
    assert [curriculum.num_active(e) for e in range(7)] == [4, 4, 8, 8, 20, 20, 20]
    plan = build_schedule(23, 4, 6, None, seed=42, curriculum=curriculum)
    assert [step.global_batch for step in plan[:2]] == [tuple(curriculum.order[:4])] * 2  # no reshuffle
    assert [len(step.global_batch) for step in plan] == [4] * (1 + 1 + 2 + 2 + 5 + 5)
    assert not any(step.all_samples_active for step in plan)  # 3 samples are never trained, as theirs
    with pytest.raises(ValueError, match="full batch"):
        AuthorsCurriculum(3, batch_size=4)
    with pytest.raises(ValueError, match="one process"):
        build_schedule(8, 2, 6, None, seed=0, world_size=2, curriculum=AuthorsCurriculum(8, 2, seed=0))
    fastmem = TemporalCurriculum(23, [0.2, 0.5, 1.0], [2, 4, 6], seed=42)
    assert [fastmem.num_active(e) for e in (0, 2, 4)] == [5, 12, 23]  # the default loader: ceil, all


def test_authors_curriculum_in_the_trainer():
    samples = make_samples(6, answer_len=6)
    config = tiny_config(objective="ot", threshold=0.6931471805599453, curriculum=True, curriculum_loader="authors",
                         curriculum_ratios=[0.5, 1.0], curriculum_boundaries=[2, 4], batch_size=2, epochs=4,
                         max_steps=None, stop_on_recall=False)
    result = train(config, samples, model=tiny_model())
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0)).tolist()
    # epochs 0-1: int(6 * 0.5) = 3 -> one whole batch of 2; epochs 2-3: all three batches, in order
    assert [row["samples"] for row in result.metrics] == [order[0:2]] * 2 + [order[0:2], order[2:4], order[4:6]] * 2
    with pytest.raises(ValueError, match="needs curriculum=True"):
        TrainConfig(curriculum_loader="authors").validate()


def test_flags_set_the_new_fields():
    from fastmem.cli import build_parser
    from fastmem.train.cli import config_from_args

    args = build_parser().parse_args([
        "train", "--data", "d.jsonl", "--out", "o", "--max-grad-norm", "1.0", "--adapter", "mlp_block",
        "--lr-schedule", "constant", "--warmup-steps", "3", "--curriculum", "--curriculum-loader", "authors",
        "--stop-on", "em", "--em-margin", "0.5"])
    config = config_from_args(args)
    assert (config.max_grad_norm, config.adapter, config.lr_schedule, config.warmup_steps, config.curriculum_loader,
            config.stop_on, config.em_margin) == (1.0, "mlp_block", "constant", 3, "authors", "em", 0.5)
    for field in ("max_grad_norm", "adapter", "lr_schedule", "warmup_steps", "curriculum_loader", "stop_on",
                  "em_margin"):
        from fastmem.train.config import RESUME_MUST_MATCH

        assert field in RESUME_MUST_MATCH, field


def test_authors_toml_is_a_valid_train_config():
    from dataclasses import fields
    from pathlib import Path

    from fastmem.config_file import load_settings

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "reproduce" / "authors.toml"
    config = TrainConfig(**load_settings(path, {f.name for f in fields(TrainConfig)}, "train"))
    config.validate()
    assert (config.adapter, config.objective, config.curriculum_loader, config.max_grad_norm,
            config.lr_schedule, config.dropout) == ("mlp_block", "ot", "authors", 1.0, "linear", 0.1)
    assert config.alpha == config.rank  # their intervention applies no alpha / r factor


def test_a_run_saved_before_the_new_settings_reads_their_defaults():
    from fastmem.train.config import saved_setting

    assert saved_setting({}, "adapter") == "lora" and saved_setting({}, "stop_on") == "recall"
    assert saved_setting({}, "curriculum_ratios") == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert saved_setting({"adapter": "mlp_block"}, "adapter") == "mlp_block"
