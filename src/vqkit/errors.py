"""The project's own error type, and how the command line reports errors.

:class:`UserError` is bad input from whoever called vqkit: a flag, an option value, a
config file, a data set, a checkpoint, a run directory. ``vqkit`` prints its message on
one line (exit code 2). It is a ``ValueError``, so library callers that catch
``ValueError`` keep working. Anything else that escapes a command is a bug in vqkit:
the command line prints the traceback and a line asking for a report (exit code 1).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["USER_ERRORS", "UserError", "report_error", "user_values"]


class UserError(ValueError):
    """Bad input (a flag, an option, a file, a checkpoint); the message is one line that
    says what is wrong and what to do."""


@contextmanager
def user_values() -> Iterator[None]:
    """Inside: a ValueError is a check of values the user chose (a quantizer's options
    and constructor, given the config), re-raised as :class:`UserError` with the same
    message; e.g. ``with user_values(): options.build(dim)``."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from e


def _user_errors() -> tuple[type[BaseException], ...]:
    import torch

    # OSError: a missing, unreadable or locked file, a full disk (the environment, not
    # vqkit's code); FloatingPointError: a diverged run (the trainers stop on a
    # non-finite loss); out of memory: a batch or model too large for the machine
    return (UserError, OSError, FloatingPointError, MemoryError, torch.OutOfMemoryError)


USER_ERRORS = _user_errors()


def report_error(command: str, error: BaseException) -> int:
    """Print ``error`` for the command line and return the exit code: one line and 2 for
    :data:`USER_ERRORS`; the traceback, a "this is a bug" line and 1 for anything else."""
    if isinstance(error, USER_ERRORS):
        print(f"vqkit {command}: error: {error}", file=sys.stderr)
        return 2
    traceback.print_exception(error, file=sys.stderr)
    print(
        f"vqkit {command}: this is a bug in vqkit (the traceback above), please report it "
        "with the command you ran",
        file=sys.stderr,
    )
    return 1
