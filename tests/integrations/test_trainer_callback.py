"""StopWhenMemorized: stop at the first step whose forwards recall every answer token, and skip
that step's optimizer update (docs/design.md, section 9: one AdamW step on zero gradients broke exact match)."""

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from tests.conftest import tiny_llama_config
from fastmem.integrations.trainer import StopWhenMemorized
from fastmem.integrations.transformers import apply_fastmem, last_stats

PROMPT_LEN, ANSWER_LEN = 3, 8


def lora_model(seed: int = 0, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # A wide init: with the default 0.02 the frozen head's logits are ~uniform and rank-8 LoRA
    # needs hundreds of steps to memorize; at 0.3 it takes about ten.
    base = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2, initializer_range=0.3))
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                           target_modules=["q_proj", "v_proj", "down_proj"]))


def samples(n: int):
    gen = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 97, (PROMPT_LEN + ANSWER_LEN,), generator=gen)
        labels = ids.clone()
        labels[:PROMPT_LEN] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class Recorder(TrainerCallback):
    """Adapter values before each optimizer step, and whether that step's last forward recalled all."""

    def __init__(self):
        self.before_step, self.recalled = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before_step.append(lora_state(model))
        self.recalled.append(last_stats(model).all_recalled())


class StopAfterTheStep(TrainerCallback):
    """The naive rule: stop once recalled, but only after the optimizer has stepped."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if last_stats(model).all_recalled():
            control.should_training_stop = True


def train(tmp_path, stopper, *, objective="ot", accumulation=1, n_samples=1, max_steps=150, make_model=None):
    model = (make_model or lora_model)()
    apply_fastmem(model, objective=objective, threshold=0.3)
    recorder = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, learning_rate=3e-2,
                             per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
                             lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=samples(n_samples), callbacks=[recorder, stopper])
    trainer.train()
    return model, trainer, recorder


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stops_before_the_optimizer_step_of_the_deciding_step(tmp_path, accumulation):
    stopper = StopWhenMemorized()
    model, trainer, recorder = train(tmp_path, stopper, accumulation=accumulation, n_samples=accumulation)
    steps = trainer.state.global_step
    assert stopper.memorized_at_step == steps < 150
    assert recorder.recalled[-1] and not any(recorder.recalled[:-1])
    assert stopper.optimizer_steps_skipped == 1
    # The deciding step left the adapter exactly as its forward saw it...
    final = lora_state(model)
    assert all(torch.equal(final[n], recorder.before_step[-1][n]) for n in final)
    # ...while every earlier step did move it.
    assert not all(torch.equal(recorder.before_step[-2][n], recorder.before_step[-1][n]) for n in final)
    model.eval()
    with torch.no_grad():  # and the recall the callback saw still holds on every sample
        for row in samples(accumulation):
            model(input_ids=row["input_ids"][None], labels=row["labels"][None])
            assert last_stats(model).all_recalled()


def test_the_naive_stop_would_have_moved_the_adapter(tmp_path):
    """The check above can fail: stopping after the update changes the memorized adapter."""
    model, trainer, recorder = train(tmp_path, StopAfterTheStep())
    final = lora_state(model)
    assert recorder.recalled[-1]
    assert not all(torch.equal(final[n], recorder.before_step[-1][n]) for n in final)


def test_idle_step_is_skipped_without_stopping():
    """OT with every weight zero but tokens not yet recalled: AdamW's momentum must not move."""
    model = lora_model()
    labels = samples(1)[0]["labels"][None]
    input_ids = samples(1)[0]["input_ids"][None]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    apply_fastmem(model, objective="sft")
    model(input_ids=input_ids, labels=labels).loss.backward()
    optimizer.step()  # momentum is now non-zero
    optimizer.zero_grad()
    apply_fastmem(model, objective="ot", threshold=50.0)  # no token is above 50 nats: all weights 0
    model(input_ids=input_ids, labels=labels).loss.backward()
    stats = last_stats(model)
    assert not stats.all_recalled() and not bool(stats.weight.any())
    before = lora_state(model)

    class State:
        global_step = 1

    class Control:
        should_training_stop = False

    stopper, control = StopWhenMemorized(), Control()
    stopper.on_step_begin(None, State, control)
    stopper.on_pre_optimizer_step(None, State, control, model=model, optimizer=optimizer)
    optimizer.step()
    assert not control.should_training_stop and stopper.optimizer_steps_skipped == 1
    assert all(torch.equal(p, before[n]) for n, p in lora_state(model).items())


def test_unpatched_model_is_a_clear_error(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=lora_model(), args=args, train_dataset=samples(1), callbacks=[StopWhenMemorized()])
    with pytest.raises(ValueError, match="apply_fastmem"):
        trainer.train()
    with pytest.raises(ValueError, match="threshold"):
        StopWhenMemorized(threshold=0)


class TrainOnlyBoost(torch.nn.Dropout):
    """Dropout noise made deterministic: doubles its input in training mode (the LoRA term
    counts twice), the identity in eval mode. Training forwards recall before the model does."""

    def forward(self, x):
        return x * 2.0 if self.training else x


def boosted(model):
    for module in model.modules():
        for name in list(getattr(module, "lora_dropout", {})):
            module.lora_dropout[name] = TrainOnlyBoost(p=0.1)
    return model


def test_stop_under_dropout_is_confirmed_in_eval_mode(tmp_path):
    def make_model():
        return boosted(lora_model(dropout=0.1))

    stopper = StopWhenMemorized()
    model, trainer, recorder = train(tmp_path, stopper, objective="sft", max_steps=300, make_model=make_model)
    steps = trainer.state.global_step
    # Candidates the training forward called recalled but eval mode did not were trained on...
    rejected = [step for step, ok in stopper.confirmations if not ok]
    assert rejected and stopper.confirmations[-1] == (steps, True) and stopper.memorized_at_step == steps
    for step in rejected:  # ...their optimizer step ran: the adapter moved after them
        after = recorder.before_step[step] if step < len(recorder.before_step) else lora_state(model)
        assert not all(torch.equal(after[n], recorder.before_step[step - 1][n]) for n in after)
    assert stopper.optimizer_steps_skipped == 1
    final = lora_state(model)  # the confirmed step skipped its update
    assert all(torch.equal(final[n], recorder.before_step[-1][n]) for n in final)
    model.eval()
    with torch.no_grad():  # and the eval-mode model recalls every token
        row = samples(1)[0]
        model(input_ids=row["input_ids"][None], labels=row["labels"][None])
        assert last_stats(model).all_recalled()
    # Unconfirmed (confirm=False), the same run stops at the first noisy candidate, wrongly.
    naive = StopWhenMemorized(confirm=False)
    model, trainer, _ = train(tmp_path / "naive", naive, objective="sft", max_steps=300, make_model=make_model)
    assert naive.memorized_at_step == rejected[0] and not naive.confirmations
    model.eval()
    with torch.no_grad():
        model(input_ids=row["input_ids"][None], labels=row["labels"][None])
        assert not last_stats(model).all_recalled()
