"""`fastmem <command>`: a thin layer over the Python API.

Each command lives beside the code it drives, in a module with
`register(subparsers) -> None` that adds its parser and sets `func=run`, where
`run(args) -> int` returns the exit code. Exit codes: 0 success, 1 the job failed (e.g. not
memorized in budget, where a command says so), 2 bad input (a one-line reason on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# command modules, in the order `--help` lists them
COMMAND_MODULES = (
    "fastmem.train.demo",
    "fastmem.train.cli",
    "fastmem.eval.cli",
    "fastmem.sweep.cli",
    "fastmem.law.cli",
    "fastmem.bench_cli",
    "fastmem.audit.cli",
)


class UsageError(Exception):
    """Bad input from the user: reported in one line with exit code 2."""


def _module_exists(name: str) -> bool:
    parent = name.rpartition(".")[0]
    if parent != "fastmem" and importlib.util.find_spec(parent) is None:
        return False
    return importlib.util.find_spec(name) is not None


def _version() -> str:
    from fastmem import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmem", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"fastmem {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if _module_exists(name):
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastmem {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
