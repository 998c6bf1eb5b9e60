"""The import flow: a workflow module never imports the command line.

kernels/ -> ops/ -> nn/ -> integrations/ -> data/ train/ eval/ law/ audit/ -> cli.py: under
train/, eval/, sweep/, law/ only a subcommand's own cli.py (or demo, itself a subcommand) may
import `fastmem.cli` or the commands' input checks (`fastmem.cli_checks`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fastmem

PACKAGE = Path(fastmem.__file__).parent
WORKFLOWS = ("train", "eval", "sweep", "law")
COMMAND_LAYER = {"fastmem.cli", "fastmem.cli_checks"}
SUBCOMMANDS = {"cli.py", "demo.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_workflow_module_imports_the_command_line():
    offenders = {}
    for folder in WORKFLOWS:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            if path.name in SUBCOMMANDS:
                continue
            bad = sorted(_imports(path) & COMMAND_LAYER)
            if bad:
                offenders[str(path.relative_to(PACKAGE))] = bad
    assert not offenders, offenders


def test_the_check_sees_an_offender(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("from fastmem.cli import UsageError\nimport fastmem.cli_checks\n")
    assert _imports(module) & COMMAND_LAYER == COMMAND_LAYER
