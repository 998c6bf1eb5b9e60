"""adapter="mlp_block": one LoRA-shaped adapter parallel to a whole MLP block, out = mlp(x) +
(alpha/r)·B A drop(x), trained, saved as PEFT safetensors and loaded back by `fastmem eval`."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from fastmem.cli import main
from fastmem.integrations.peft_adapter import load_adapter
from fastmem.nn.cpu_linear import use_onednn_linears
from fastmem.nn.mlp_block_adapter import PARALLEL_NAME, MLPBlockParallel
from fastmem.train import train
from fastmem.train.adapters import attach_lora
from tests.train.test_cli import GOOD, _jsonl, checkpoint  # noqa: F401  (fixture)
from tests.train.tiny import make_samples, tiny_config, tiny_model

INPUT = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(5))


def _config(**overrides):
    return tiny_config(**{"adapter": "mlp_block", "layers": [2], **overrides})


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def _block(peft_model, layer: int) -> MLPBlockParallel:
    return peft_model.get_base_model().model.layers[layer].mlp


def test_the_block_computes_mlp_plus_scaled_low_rank_term():
    base = tiny_model()
    before = _logits(base)
    peft_model, layer_ids = attach_lora(base, _config(rank=4, alpha=8.0))
    assert layer_ids == [2]
    assert torch.equal(_logits(peft_model), before)  # B = 0: a fresh adapter changes nothing
    block = _block(peft_model, 2)
    assert isinstance(block, MLPBlockParallel)
    assert not isinstance(_block(peft_model, 3), MLPBlockParallel)
    lora = getattr(block, PARALLEL_NAME)
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    assert a.shape == (4, 32) and b.shape == (32, 4)  # A: hidden -> r, B: r -> hidden
    with torch.no_grad():
        b.normal_()
    x = torch.randn(2, 7, 32)
    expected = block.mlp(x) + (8.0 / 4) * x @ a.T @ b.T
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(PARALLEL_NAME in n and ".layers.2." in n for n in trainable)


def test_dropout_acts_on_the_adapter_input_in_training_mode_only():
    peft_model, _ = attach_lora(tiny_model(), _config(dropout=0.5))
    lora = getattr(_block(peft_model, 2), PARALLEL_NAME)
    dropout = lora.lora_dropout["default"]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.5
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    x = torch.randn(1, 5, 32)
    seen = []
    dropout.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    peft_model.train()
    lora(x)
    assert seen and torch.equal(seen[0][0], x) and not torch.equal(seen[0][1], x)
    peft_model.eval()
    torch.testing.assert_close(lora(x), lora(x))


def test_train_save_load_gives_identical_logits(tmp_path):
    result = train(_config(lr=2e-2, max_steps=6, out=str(tmp_path / "run")), make_samples(2), model=tiny_model())
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["target_modules"] == [PARALLEL_NAME] and saved["layers_to_transform"] == [2]
    assert (adapter / "adapter_model.safetensors").is_file()
    assert result.summary["modules"] == ["mlp_block"] and result.summary["layers"] == [2]
    saved_tensors = safetensors.torch.load_file(adapter / "adapter_model.safetensors")
    assert result.summary["trainable_params"] == sum(t.numel() for t in saved_tensors.values()) > 0
    trained = _logits(result.model)
    assert not torch.equal(trained, _logits(tiny_model()))  # the adapter moved
    loaded = load_adapter(tiny_model(), adapter).eval()
    use_onednn_linears(loaded)  # as the trainer's fast engine and `fastmem eval` do
    assert torch.equal(_logits(loaded), trained)


def test_merging_folds_the_adapter_into_the_parallel_weight(tmp_path):
    result = train(_config(lr=2e-2, max_steps=6, out=str(tmp_path / "run")), make_samples(1), model=tiny_model())
    adapted = _logits(load_adapter(tiny_model(), tmp_path / "run" / "adapter").eval())
    merged = load_adapter(tiny_model(), tmp_path / "run" / "adapter").merge_and_unload().eval()
    block = merged.model.layers[2].mlp
    assert isinstance(getattr(block, PARALLEL_NAME), torch.nn.Linear)
    assert getattr(block, PARALLEL_NAME).weight.abs().sum() > 0
    torch.testing.assert_close(_logits(merged), adapted, rtol=1e-5, atol=1e-5)
    assert result.summary["steps"] == 6


def test_fused_lora_runs_the_block_adapter_through_the_fused_op():
    from fastmem.integrations.peft import is_patched

    fused, _ = attach_lora(tiny_model(), _config(fused_lora=True))
    plain, _ = attach_lora(tiny_model(), _config())
    lora = getattr(_block(fused, 2), PARALLEL_NAME)
    assert is_patched(lora)
    with torch.no_grad():
        for model in (fused, plain):
            getattr(_block(model, 2), PARALLEL_NAME).lora_B["default"].weight.copy_(
                torch.randn(32, 4, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(_logits(fused), _logits(plain), rtol=1e-4, atol=1e-4)


def test_bad_adapter_setting_is_refused():
    with pytest.raises(ValueError, match="adapter must be one of"):
        train(tiny_config(adapter="mlp"), make_samples(1), model=tiny_model())


def test_cli_trains_it_and_fastmem_eval_loads_it(tmp_path, checkpoint, capsys):  # noqa: F811
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "run"
    code = main(["train", "--data", data, "--model", str(checkpoint), "--adapter", "mlp_block", "--rank", "2",
                 "--alpha", "4", "--layers", "2", "--lr", "2e-2", "--max-steps", "8", "--dropout", "0",
                 "--max-grad-norm", "1.0", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    code = main(["eval", "--data", data, "--model", str(checkpoint), "--adapter", str(out / "adapter"),
                 "--out", str(tmp_path / "eval"), "--grids", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    losses = [record["mean_loss"] for record in report["records"]]
    assert losses == pytest.approx(summary["final_loss_per_sample"], rel=1e-5)
    # without the adapter the losses are the base model's
    assert summary["final_loss"] < summary["base_loss"]


def test_unload_and_unwrap_give_the_base_model_back():
    from fastmem.nn.mlp_block_adapter import unwrap_mlp_blocks

    base = tiny_model()
    before = _logits(base)
    peft_model, _ = attach_lora(base, _config(layers=[1, 2]))
    with torch.no_grad():
        getattr(_block(peft_model, 2), PARALLEL_NAME).lora_B["default"].weight.normal_()
    assert not torch.equal(_logits(peft_model), before)
    model = peft_model.unload()
    assert unwrap_mlp_blocks(model.get_decoder().layers) == 2
    assert not any(isinstance(m, MLPBlockParallel) for m in model.modules())
    assert torch.equal(_logits(model), before)


@pytest.mark.parametrize("settings", [dict(engine="hf"), dict(prefix_cache=False), dict(gradient_checkpointing=True)])
def test_every_engine_path_trains_the_block_adapter_alike(settings):
    samples = make_samples(2)
    reference = train(_config(lr=2e-2, max_steps=4, stop_on_recall=False), samples, model=tiny_model())
    other = train(_config(lr=2e-2, max_steps=4, stop_on_recall=False, **settings), samples, model=tiny_model())
    assert [r["loss"] for r in other.metrics] == pytest.approx([r["loss"] for r in reference.metrics], rel=1e-4)


def test_the_reference_forward_logs_the_base_models_loss_every_step_and_changes_nothing():
    samples = make_samples(2)
    settings = dict(engine="hf", lr=2e-2, max_steps=3, stop_on_recall=False, batch_size=2)  # one batch: both
    plain = train(_config(**settings), samples, model=tiny_model())
    with_ref = train(_config(**settings, reference_forward=True), samples, model=tiny_model())
    assert [r["loss"] for r in with_ref.metrics] == [r["loss"] for r in plain.metrics]  # no weight changed by it
    refs = [r["reference_loss"] for r in with_ref.metrics]
    # the adapter is disabled for it: the base model's loss, the same every step (B starts at 0:
    # step 1's training loss is the base loss too)
    assert refs == pytest.approx([with_ref.metrics[0]["loss"]] * 3, rel=1e-5)
    assert all(r["reference_s"] > 0 for r in with_ref.metrics) and "reference_loss" not in plain.metrics[0]


def test_the_reference_forward_is_refused_on_the_fast_engine():
    from fastmem.errors import UsageError

    with pytest.raises(UsageError, match="reference_forward runs on engine 'hf'"):
        _config(reference_forward=True).validate()
