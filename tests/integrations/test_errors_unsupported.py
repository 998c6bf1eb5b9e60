"""What fastmem's integrations refuse is one error type: `Unsupported`, a UsageError (one line,
exit 2 from a command) that callers catching NotImplementedError still see."""

from __future__ import annotations

import ast
from pathlib import Path

from fastmem.errors import Unsupported, UsageError

INTEGRATIONS = Path(__file__).resolve().parents[2] / "fastmem" / "integrations"


def test_unsupported_is_a_usage_error_and_a_not_implemented_error():
    assert issubclass(Unsupported, UsageError) and issubclass(Unsupported, NotImplementedError)


def test_no_integration_raises_a_bare_not_implemented_error():
    for path in INTEGRATIONS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                assert getattr(call, "id", None) != "NotImplementedError", f"{path.name}:{node.lineno}"
