"""`fastmem <command>`: a thin layer over the Python API.

Each command lives beside the code it drives, in a module with
`register(subparsers) -> None` that adds its parser and sets `func=run`, where
`run(args) -> int` returns the exit code. Exit codes: 0 success, 1 the job failed (one line:
fastmem.errors.RunFailed, e.g. a non-finite loss, or not memorized in budget where a command
says so) or a bug (any other exception: its traceback), 2 bad input (a one-line reason on
stderr: fastmem.errors.UsageError and the file errors below), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM, `fastmem train`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sqlite3
import sys

from fastmem.errors import RunFailed, UsageError

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

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# Exceptions that mean "the input is wrong": one line, exit 2. The project's own UsageError, and
# what the operating system or SQLite say about a path the user gave. A ValueError or TypeError
# is not among them: raised anywhere else it is a bug and keeps its traceback (exit 1).
BAD_INPUT_ERRORS = (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
                    PermissionError, sqlite3.DatabaseError)


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line too (argparse prints the whole usage block before it)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _module_exists(name: str) -> bool:
    parent = name.rpartition(".")[0]
    if parent != "fastmem" and importlib.util.find_spec(parent) is None:
        return False
    return importlib.util.find_spec(name) is not None


def _version() -> str:
    from fastmem import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastmem", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"fastmem {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        if _module_exists(name):
            importlib.import_module(name).register(subparsers)
    # `-v` is accepted after the command too (`fastmem train -v ...`); SUPPRESS keeps a
    # subcommand that was not given -v from resetting a -v given before it.
    for sub in subparsers.choices.values():
        if "-v" not in sub._option_string_actions:
            sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log at INFO level")
    return parser


def quiet_third_party(verbose: bool) -> None:
    """No hub access ever (nothing is downloaded: a missing file fails at once instead of five
    retries), and no GGUF-conversion bars or library FutureWarnings unless -v."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if verbose:
        return
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, sqlite3.DatabaseError):
        text = f"database error: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (already printed)
        return done.code if isinstance(done.code, int) else 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # e.g. to print the command that resumes
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party(verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except BAD_INPUT_ERRORS as err:
        print(f"fastmem {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as err:
        print(f"fastmem {args.command}: failed: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"fastmem {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
