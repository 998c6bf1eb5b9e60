"""`fastmem eval` through fastmem.cli.main on a saved tiny llama + word-level tokenizer."""

import json

import pytest
import torch
from tests.eval.eval_fixtures import greedy_continuation, make_confident

from fastmem.cli import main

SPECIALS = ["<pad>", "<s>", "</s>"]


def word_tokenizer():
    """Words t3 … t96 map to ids 3 … 96 of the tiny llama's 97-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(3, 97)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def words(ids):
    return " ".join(f"t{i}" for i in ids)


@pytest.fixture
def model(tiny_llama):
    return make_confident(tiny_llama)


@pytest.fixture
def model_dir(model, tmp_path):
    path = tmp_path / "tiny_model"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_file(model, tmp_path):
    records = []
    for i, prompt in enumerate([[5, 9, 11], [40, 41, 42, 43, 44], [70]]):
        answer = greedy_continuation(model, [1] + prompt, 6 + 2 * i)  # [1]: the plain-format BOS
        if i == 1:
            answer[2] = 3 if answer[2] != 3 else 4
        records.append({"name": f"r{i}", "prompt": words(prompt), "answer": words(answer)})
    path = tmp_path / "book.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path



def test_eval_cli_writes_report_that_matches_the_api(model_dir, data_file, tmp_path, capsys):
    from fastmem.data import load_jsonl
    from fastmem.eval import evaluate
    from fastmem.models import load_model

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 2.0 / (s + 1), "token_acc": s / 5}) + "\n"
                               for s in range(5)))
    out = tmp_path / "out"
    code = main(["eval", "--data", str(data_file), "--model", str(model_dir), "--out", str(out),
                 "--batch-size", "2", "--metrics", str(metrics), "--grids", "2"])
    assert code == 0
    printed = capsys.readouterr()
    assert "3 records" in printed.out and "wrote" in printed.out and "confirmed by decoding: none" in printed.out
    assert "teacher forcing" in printed.err and "sample" in printed.err  # the per-sample progress bar
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["records"]] == ["r0", "r1", "r2"]
    assert report["records"][1]["first_error"] == 2 and report["records"][1]["exact_match"] is False
    assert all(r["decided_by"] == "teacher_forcing" and r["confirmed_by_decoding"] is False
               for r in report["records"])
    assert report["totals"]["confirmed_by_decoding"] == [] and report["totals"]["decoded"] == 0

    # --decode: every sample decoded as an independent check; same verdicts.
    decoded_out = tmp_path / "decoded"
    assert main(["eval", "--data", str(data_file), "--model", str(model_dir), "--out", str(decoded_out),
                 "--decode", "--grids", "0"]) == 0
    decoded = json.loads((decoded_out / "report.json").read_text())
    assert decoded["totals"]["decoded"] == 3 and decoded["totals"]["decode_disagreements"] == []
    assert [(r["exact_match"], r["first_error"]) for r in decoded["records"]] == \
        [(r["exact_match"], r["first_error"]) for r in report["records"]]
    assert all(r["decided_by"] == "decoding" and r["decode_reason"] == "requested" for r in decoded["records"])
    assert "greedy decoding" in capsys.readouterr().err
    assert all(isinstance(r["stubborn"], list) for r in report["records"])
    assert (out / report["records"][0]["prob_grid"]).stat().st_size > 5_000
    assert "prob_grid" not in report["records"][2]
    assert (out / "training_curves.png").stat().st_size > 10_000

    model, tokenizer = load_model(str(model_dir))
    expected = evaluate(model, load_jsonl(data_file, tokenizer), tokenizer, progress=False).to_dict()
    for got, want in zip(report["records"], expected["records"]):
        for key in ("exact_match", "first_error", "token_acc", "n_stubborn", "answer_len"):
            assert got[key] == want[key], key
        assert got["min_prob"] == pytest.approx(want["min_prob"], abs=1e-6)
        # stubborn tokens carry their decoded text
        assert [s["token"] for s in got["stubborn"]] == [tokenizer.decode([s["token_id"]]) for s in want["stubborn"]]


def test_eval_cli_applies_a_peft_adapter(model, model_dir, data_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    adapter_dir = tmp_path / "adapter"
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"],
                                                              init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    base_out, adapted_out = tmp_path / "base", tmp_path / "adapted"
    common = ["eval", "--data", str(data_file), "--model", str(model_dir), "--no-decode", "--grids", "0"]
    assert main(common + ["--out", str(base_out)]) == 0
    assert main(common + ["--out", str(adapted_out), "--adapter", str(adapter_dir)]) == 0
    base = json.loads((base_out / "report.json").read_text())
    adapted = json.loads((adapted_out / "report.json").read_text())
    assert base["totals"]["decoded"] == 0 and base["records"][0]["decided_by"] == "teacher_forcing"
    assert base["totals"]["mean_loss"] != pytest.approx(adapted["totals"]["mean_loss"], abs=1e-4)


def test_eval_cli_bad_input_exits_2(model_dir, data_file, tmp_path, capsys):
    assert main(["eval", "--data", str(tmp_path / "missing.jsonl"), "--model", str(model_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--data", str(data_file), "--model", str(model_dir), "--adapter",
                 str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert main(["eval", "--data", str(data_file), "--model", str(tmp_path / "no_model"),
                 "--out", str(tmp_path / "o")]) == 2


def test_eval_cli_no_progress_draws_no_bars(model_dir, data_file, tmp_path, capsys):
    code = main(["eval", "--data", str(data_file), "--model", str(model_dir), "--out", str(tmp_path / "out"),
                 "--grids", "0", "--no-progress"])
    assert code == 0
    assert "teacher forcing" not in capsys.readouterr().err


def test_an_adapter_whose_rank_differs_from_its_weights_is_one_line(model, model_dir, data_file, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    adapter_dir = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"])).save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # says 4, holds rank 2
    code = main(["eval", "--data", str(data_file), "--model", str(model_dir), "--adapter", str(adapter_dir),
                 "--out", str(tmp_path / "o"), "--no-decode"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("fastmem eval: error: --adapter") and "different adapters" in err[0]  # checked before the model loads
    assert not (tmp_path / "o").exists()
