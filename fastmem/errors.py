"""The project's own exception types.

A command (`fastmem.cli`) maps exactly these to one line on stderr: `UsageError` and its kin
with exit 2 (the input is wrong; nothing was created), `RunFailed` with exit 1 (the job ran
and did not succeed, e.g. the loss went non-finite). Any other exception is a bug and keeps
its traceback. The library raises them too, so a caller can tell bad input from a bug
without parsing messages; `UsageError` is also a `ValueError` for callers that catch that.
"""

from __future__ import annotations


class FastmemError(Exception):
    """Base of every error fastmem raises on purpose."""


class UsageError(FastmemError, ValueError):
    """Bad input from the user (a flag, a file, a setting): one line, exit code 2."""


class RunFailed(FastmemError, RuntimeError):
    """The job ran and failed in a way the user must hear about (e.g. a non-finite loss):
    one line, exit code 1."""


class MissingInput(UsageError, FileNotFoundError):
    """A file or directory the user named does not exist: a `UsageError` that callers catching
    `FileNotFoundError` still see."""


class WrongInputType(UsageError, TypeError):
    """A value of the wrong type from the user: a `UsageError` that callers catching
    `TypeError` still see."""


class Unsupported(UsageError, NotImplementedError):
    """A model, adapter or setting fastmem's integrations do not handle (e.g. a MoE router loss
    it cannot find, DoRA on the lm_head): refused before anything is changed. A `UsageError`
    (one line, exit 2) that callers catching `NotImplementedError` still see."""
