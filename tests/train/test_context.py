"""`--context`: training and evaluating past the model's positions with YaRN RoPE scaling."""

from __future__ import annotations

import json

import pytest
import torch

from fastmem.cli import main
from fastmem.errors import UsageError
from fastmem.rope_scaling import CONTEXT_RECORD, check_adapter_context, context_record, extend_context
from tests.conftest import tiny_llama_config as tiny_config
from tests.train.tiny_cli_model import save_tiny_checkpoint

OWN_POSITIONS = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ctx"), max_positions=OWN_POSITIONS)


@pytest.fixture
def long_data(tmp_path):
    # 6 + 18 words (+ end of turn): past the tiny model's 16 positions
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "what is the code of alice",
                                "answer": " ".join(["red", "blue", "seven"] * 6)}) + "\n")
    return str(path)


def test_extend_context_leaves_a_fitting_context_alone():
    config = tiny_config(max_position_embeddings=64)
    assert extend_context(config, 64) is None
    assert config.max_position_embeddings == 64 and context_record(config)["rope_scaling"] is None


def test_extend_context_applies_yarn_with_the_stretch_factor():
    config = tiny_config(max_position_embeddings=64)
    record = extend_context(config, 160)
    assert record == {"max_position_embeddings": 160,
                      "rope_scaling": {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 64}}
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary, plain = LlamaRotaryEmbedding(config), LlamaRotaryEmbedding(tiny_config(max_position_embeddings=64))
    assert rotary.rope_type == "yarn" and rotary.attention_scaling > 1
    # the fastest frequency is kept, the slowest is interpolated by the factor
    assert torch.allclose(rotary.inv_freq[0], plain.inv_freq[0])
    assert torch.allclose(rotary.inv_freq[-1], plain.inv_freq[-1] / 2.5)


@pytest.mark.parametrize("context", [0, -4, 2.5, True, "4096"])
def test_extend_context_refuses_a_bad_value(context):
    with pytest.raises(UsageError, match="--context"):
        extend_context(tiny_config(), context)


def test_extend_context_refuses_a_model_that_already_scales_its_rope():
    config = tiny_config(max_position_embeddings=64)
    extend_context(config, 128)
    with pytest.raises(UsageError, match="already scales"):
        extend_context(config, 512)


def test_over_long_sample_is_refused_naming_the_flag(tmp_path, checkpoint, long_data, capsys):
    code = main(["train", "--data", long_data, "--model", str(checkpoint), "--max-steps", "1",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--context" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_train_and_eval_past_the_context_then_refuse_eval_without_it(tmp_path, checkpoint, long_data, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", long_data, "--model", str(checkpoint), "--context", "32", "--rank", "2",
                 "--alpha", "4", "--layers", "2,3", "--lr", "1e-2", "--max-steps", "3", "--seed", "1",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    scaled = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": OWN_POSITIONS}
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["context"] == 32
    assert manifest["model"] == {"max_position_embeddings": 32, "rope_scaling": scaled}
    saved = json.loads((out / "adapter" / CONTEXT_RECORD).read_text())
    assert saved["rope_scaling"] == scaled

    capsys.readouterr()
    refused = main(["eval", "--data", long_data, "--model", str(checkpoint), "--adapter", str(out / "adapter"),
                    "--out", str(tmp_path / "eval_plain"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert refused == 2 and "--context 32" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "eval_plain").exists()

    code = main(["eval", "--data", long_data, "--model", str(checkpoint), "--adapter", str(out / "adapter"),
                 "--context", "32", "--out", str(tmp_path / "eval"), "--no-progress", "--grids", "0"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["model"]["rope_scaling"] == scaled and report["totals"]["tokens"] == 19  # 18 words + end of turn


def test_adapter_trained_unscaled_is_refused_under_a_stretched_model(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CONTEXT_RECORD).write_text(json.dumps(context_record(tiny_config(max_position_embeddings=64))))
    stretched = tiny_config(max_position_embeddings=64)
    extend_context(stretched, 256)
    with pytest.raises(UsageError, match="without --context"):
        check_adapter_context(adapter, stretched, 256)
    check_adapter_context(adapter, tiny_config(max_position_embeddings=64), None)  # same model: fine
