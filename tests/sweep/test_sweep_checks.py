"""A sweep is checked against its model before the database exists (issue 25): ranks within
the width, stress answers within the context (the prompt measured with the tokenizer near the
limit), and every cell's trainer settings."""

from __future__ import annotations

import pytest

from fastmem.cli import main
from fastmem.cli_checks import check_sweep_fits_model, model_dimensions
from fastmem.errors import UsageError
from fastmem.sweep import SweepSpec
from tests.train.tiny_cli_model import save_tiny_checkpoint


def _check(**settings):
    spec = SweepSpec(**settings)
    check_sweep_fits_model(spec, spec.cells())


def test_smollm2_dimensions_and_the_exact_context_limit():
    assert model_dimensions("smollm2") == (576, 8192)
    _check(lengths=[8155], ranks=[576])  # the stress prompt is 37 tokens: 8155 + 37 = 8192 fits
    with pytest.raises(UsageError, match=r"sweep lengths \[8156\] do not fit the context of smollm2: 37 prompt "
                                         r"tokens \+ the answer must be <= 8192 tokens \(at most 8155"):
        _check(lengths=[64, 8156])
    _check(lengths=[9000], data=["phonebook"])  # a phone book's entries are separate samples


def test_a_local_checkpoint_and_cell_settings(tmp_path):
    model = str(save_tiny_checkpoint(tmp_path / "tiny", max_positions=64))
    assert model_dimensions(model) == (32, 64)
    with pytest.raises(UsageError, match=r"sweep ranks \[33\] exceed the width 32"):
        _check(model=model, ranks=[1, 33], lengths=[8])
    with pytest.raises(UsageError, match=r"sweep lengths \[64\] do not fit the context"):
        _check(model=model, lengths=[64])
    with pytest.raises(UsageError, match=r"sweep cell .*: lr must be > 0"):
        _check(model=model, lengths=[8], lr=-1.0)


def test_refused_before_the_database_is_created(tmp_path, capsys):
    db = tmp_path / "s.sqlite"
    assert main(["sweep", "--db", str(db), "--lengths", "8156", "--ranks", "1", "--no-progress"]) == 2
    assert "at most 8155 answer tokens" in capsys.readouterr().err
    assert not db.exists() and list(tmp_path.iterdir()) == []
