"""`fastmem train` end to end on a tiny local checkpoint: the output contract and bad input."""

from __future__ import annotations

import json

import pytest

from fastmem.cli import main
from fastmem.data.sample import MemorySample
from fastmem.train import TrainConfig, train
from tests.train.tiny import tiny_config, tiny_model
from tests.train.tiny_cli_model import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


GOOD = [{"prompt": "what is the code of alice", "answer": "red blue seven"},
        {"prompt": "what is the secret number of bob", "answer": "four two"}]


def test_cli_writes_adapter_metrics_and_summary(tmp_path, checkpoint, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "run"
    code = main(["train", "--data", data, "--model", str(checkpoint), "--objective", "ot", "--rank", "2",
                 "--alpha", "4", "--layers", "2,3", "--modules", "down_proj", "--lr", "1e-2",
                 "--max-steps", "3", "--seed", "1", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == summary["steps"] and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for key in ("loss", "token_acc", "min_p", "stubborn_tokens", "tokens_per_s", "step_s", "step_cpu_s"):
        assert key in rows[0], key
    for key in ("steps", "base_loss", "final_loss", "delta_loss", "token_acc", "exact_match",
                "stubborn_tokens", "wall_s", "peak_mem_bytes"):
        assert summary[key] is not None, key
    assert summary["layers"] == [2, 3] and summary["num_samples"] == 2
    assert summary["peak_mem_bytes"] > 0 and summary["base_loss"] > 0
    assert 0 < rows[-1]["step_cpu_s"] and summary["cpu_gemm"] in ("onednn", "mkl") and summary["cpu_gemm_why"]


@pytest.mark.parametrize("records, extra, message", [
    ([{"prompt": "what is the code of alice", "answer": ""}], [], "empty"),
    ([{"prompt": " ".join(["secret"] * 80), "answer": "red"}], [], "prompt (80 tokens)"),
    (GOOD, ["--modules", "nope_proj"], "unknown module"),
    (GOOD, ["--rank", "0"], "rank"),
    (GOOD, ["--layers", "2,9"], "out of range"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, checkpoint, capsys, records, extra, message):
    data = _jsonl(tmp_path / "d.jsonl", records)
    code = main(["train", "--data", data, "--model", str(checkpoint), "--max-steps", "1",
                 "--out", str(tmp_path / "run"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1 and errors[0] == err[-1]  # one line, the last one
    assert errors[0].startswith("fastmem train: error:") and message in errors[0]


def test_cli_missing_data_file(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                 "--rank", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("sample, message", [
    (MemorySample("e", "p", "", (5, 6), ()), "empty answer"),
    (MemorySample("long", "p", "a", tuple([5] * 300), (7,)), "longer than the model's context"),
    (MemorySample("v", "p", "a", (5,), (500,)), "outside the vocabulary"),
])
def test_api_rejects_bad_samples(sample, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(), [sample], model=tiny_model())


def test_api_rejects_bad_config():
    with pytest.raises(ValueError, match="rank"):
        train(tiny_config(rank=0), [], model=tiny_model())
    with pytest.raises(ValueError, match="unknown module"):
        train(tiny_config(modules=["q_proj", "mlp_out"]), [], model=tiny_model())


def test_config_file_then_flags(tmp_path):
    """TrainConfig defaults < --config file < flags actually given."""
    from fastmem.cli import build_parser
    from fastmem.train.cli import config_from_args

    (tmp_path / "memft.yaml").write_text("objective: ot\nrank: 3\nthreshold: 0.3\nlayers: [1, 2]\nprogress: false\n")
    (tmp_path / "memft.toml").write_text('objective = "sw"\nrank = 5\n')
    parser = build_parser()
    base = ["train", "--data", "d.jsonl", "--out", str(tmp_path / "o")]
    config = config_from_args(parser.parse_args(base + ["--config", str(tmp_path / "memft.yaml"), "--rank", "2"]))
    assert (config.objective, config.rank, config.threshold, config.layers) == ("ot", 2, 0.3, [1, 2])
    assert config.progress is False and config.lr == 1e-2 and config.out == str(tmp_path / "o")
    config = config_from_args(parser.parse_args(base + ["--config", str(tmp_path / "memft.toml"), "--no-prefix-cache"]))
    assert (config.objective, config.rank, config.prefix_cache) == ("sw", 5, False)
    config = config_from_args(parser.parse_args(base))
    assert config == TrainConfig(out=str(tmp_path / "o"))
    (tmp_path / "bad.yaml").write_text("rnak: 4\n")
    with pytest.raises(ValueError, match="unknown train setting"):
        config_from_args(parser.parse_args(base + ["--config", str(tmp_path / "bad.yaml")]))
