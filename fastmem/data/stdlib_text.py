"""Real English text that ships offline: the Python standard library's own docstrings.

The stress test needs a long natural-language text (the paper uses a ~29.7k-token LongBench
document). The standard library's documentation strings are real prose written by people and
are present on every Python install, so the corpus needs no download. They are gathered in a
fixed order (the modules below, then each module's public names sorted) and cleaned of code
examples, so the text is the same for one Python version; another version may word a docstring
differently (the corpus records `sys.version_info[:2]` for that reason).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import warnings

# Prose-heavy modules, importable on every platform, in a fixed order.
CORPUS_MODULES = (
    "textwrap", "string", "difflib", "functools", "itertools", "collections", "heapq", "bisect",
    "random", "statistics", "fractions", "decimal", "calendar", "datetime", "json", "csv",
    "argparse", "logging", "pathlib", "shutil", "tempfile", "threading", "queue", "contextlib",
    "dataclasses", "enum", "typing", "inspect", "pickle", "copy", "pprint", "reprlib", "unittest",
    "doctest", "tarfile", "zipfile", "gzip", "shlex", "configparser", "email.message",
    "http.client",
    "urllib.parse", "socket", "subprocess", "os", "io", "codecs", "locale", "gettext", "sched",
    "selectors", "asyncio.tasks", "asyncio.events", "concurrent.futures", "multiprocessing.pool",
)

_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.)|^\s{4,}\S")
_SPACES = re.compile(r"\s+")
# A paragraph worth keeping: mostly letters, several words, reads like a sentence.
_MIN_WORDS = 6


def _clean(doc: str) -> list[str]:
    """Paragraphs of prose from one docstring: code examples and indented blocks dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [line for line in block.splitlines() if not _CODE_LINE.match(line)]
        text = _SPACES.sub(" ", " ".join(lines)).strip()
        letters = sum(ch.isalpha() or ch == " " for ch in text)
        if len(text.split()) >= _MIN_WORDS and letters >= 0.85 * len(text) and text[-1] in ".:;)":
            paragraphs.append(text)
    return paragraphs


def _docstrings(module) -> list[str]:
    docs = [inspect.getdoc(module) or ""]
    for attr in sorted(name for name in vars(module) if not name.startswith("_")):
        obj = getattr(module, attr)
        # Only objects defined in this module: re-exports would repeat text across modules.
        if getattr(obj, "__module__", None) == module.__name__ and (
                inspect.isclass(obj) or inspect.isfunction(obj)):
            docs.append(inspect.getdoc(obj) or "")
    return docs


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> str:
    """The whole cleaned corpus, paragraphs separated by a newline, duplicates dropped.

    About 100k words on CPython 3.11; deterministic for a given Python version.
    """
    seen, paragraphs = set(), []
    for module_name in CORPUS_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a trimmed-down interpreter; the order of the rest is unchanged
            continue
        with warnings.catch_warnings():  # reading deprecated aliases (typing.io) warns
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = _docstrings(module)
        for doc in docs:
            for paragraph in _clean(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
    return "\n".join(paragraphs)


def corpus_python_version() -> tuple[int, int]:
    return tuple(sys.version_info[:2])
