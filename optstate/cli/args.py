"""What the ``optstate`` commands share in reading arguments and reporting user errors.

The ``argparse`` types here reject a bad value while the command line is parsed, so the user
sees argparse's usage line and exit code 2 before anything runs. Errors found later (an
unknown configuration, an unwritable directory) are printed by :func:`fail` as one line on
stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A user error reported as one line and exit code 2."""


def positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    value = integer(text, expected="a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def integer(text: str, expected: str = "an integer") -> int:
    """argparse type: an integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def unit_interval(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (an EMA decay, for instance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def split_names(names: list[str]) -> list[str]:
    """Names given space- or comma-separated (``a b``, ``a,b``, ``a, b``), blanks dropped."""
    return [part.strip() for name in names for part in name.split(",") if part.strip()]


def fail(command: str, message: str, code: int) -> int:
    """Prints ``optstate COMMAND: error: MESSAGE`` on stderr and returns the exit ``code``."""
    print(f"optstate {command}: error: {message}", file=sys.stderr)
    return code
