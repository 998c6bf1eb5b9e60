"""Config files (issue 25): every value checked against its setting's type before anything
loads, naming the setting and the file; what a reader would mean is accepted."""

from __future__ import annotations

import pytest

from fastmem.config_file import load_settings
from fastmem.errors import MissingInput, UsageError
from fastmem.sweep.spec import SweepSpec
from fastmem.train.config import TrainConfig


def _load(tmp_path, text: str, schema=TrainConfig, suffix=".yaml"):
    path = tmp_path / f"c{suffix}"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, schema, "train"), str(path)


@pytest.mark.parametrize("text,expected", [
    ("lr: 1e-2\n", {"lr": 0.01}),  # YAML reads 1e-2 as a string
    ("lr: 5\n", {"lr": 5.0}),
    ("layers: 20\n", {"layers": [20]}),  # one value where a list is expected
    ("layers: 20,24\n", {"layers": [20, 24]}),  # as on the command line
    ("layers: [20, 24]\n", {"layers": [20, 24]}),
    ("layers: null\n", {"layers": None}),
    ("modules: down_proj\n", {"modules": ["down_proj"]}),  # never split into characters
    ("modules: q_proj,v_proj\n", {"modules": ["q_proj", "v_proj"]}),
    ("epochs: 300\nmax_steps: '40'\n", {"epochs": 300, "max_steps": 40}),
    ("curriculum: true\n", {"curriculum": True}),
])
def test_values_a_reader_would_mean_are_accepted(tmp_path, text, expected):
    values, _ = _load(tmp_path, text)
    assert values == expected
    TrainConfig(**values).validate()


@pytest.mark.parametrize("text,message", [
    ("epochs: many\n", "epochs must be an integer, got 'many'"),
    ("rank: 4.5\n", "rank must be an integer, got 4.5"),
    ("rank: true\n", "rank must be an integer, got True"),
    ("lr: fast\n", "lr must be a finite number, got 'fast'"),
    ("lr: .inf\n", "lr must be a finite number, got inf"),
    ("layers: [20, x]\n", "layers[1] must be an integer, got 'x'"),
    ("modules: [down_proj, 3]\n", "modules[1] must be a string, got 3"),
    ("curriculum: 'yes please'\n", "curriculum must be true or false, got 'yes please'"),
    ("model: 7\n", "model must be a string, got 7"),
])
def test_wrong_values_name_the_setting_and_the_file(tmp_path, text, message):
    with pytest.raises(UsageError) as caught:
        _load(tmp_path, text)
    assert message in str(caught.value) and "c.yaml" in str(caught.value) and "train config" in str(caught.value)


def test_toml_and_the_sweep_spec(tmp_path):
    values, _ = _load(tmp_path, 'ranks = 4\nlengths = [32, 64]\nlr = "1e-3"\n', SweepSpec, ".toml")
    assert values == {"ranks": [4], "lengths": [32, 64], "lr": 0.001}
    path = tmp_path / "s.yaml"
    path.write_text("ranks: 4\nlengths: 64\nobjectives: sft,ot\n")
    spec = SweepSpec.from_file(path, seeds=[1])
    assert (spec.ranks, spec.lengths, spec.objectives, spec.seeds) == ([4], [64], ["sft", "ot"], [1])
    path.write_text("lengths: many\n")
    with pytest.raises(UsageError, match=r"sweep config .*s\.yaml: lengths\[0\] must be an integer, got 'many'"):
        SweepSpec.from_file(path)


def test_sweep_spec_from_the_api_checks_types():
    with pytest.raises(UsageError, match="sweep ranks must be a list of ints, got 4"):
        SweepSpec(ranks=4).cells()
    with pytest.raises(UsageError, match=r"sweep lengths must be a list of ints, got \['64'\]"):
        SweepSpec(lengths=["64"]).cells()
    with pytest.raises(UsageError, match="sweep max_steps must be an int"):
        SweepSpec(max_steps="100").cells()


def test_names_still_checked_and_missing_file(tmp_path):
    with pytest.raises(UsageError, match=r"unknown train setting\(s\) \['rnak'\]"):
        _load(tmp_path, "rnak: 4\n")
    with pytest.raises(MissingInput):
        load_settings(tmp_path / "none.yaml", TrainConfig, "train")
    assert issubclass(MissingInput, FileNotFoundError)  # callers catching that still do
    assert load_settings(_load(tmp_path, "rank: 4\n")[1], {"rank"}, "train") == {"rank": 4}  # names only
