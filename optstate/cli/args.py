"""What the ``optstate`` commands share in reading arguments and reporting user errors.

The ``argparse`` types here reject a bad value while the command line is parsed, so the user
sees argparse's usage line and exit code 2 before anything runs. Errors found later (an
unknown configuration, an unwritable directory) are printed by :func:`fail` as one line on
stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


class UsageError(Exception):
    """A user error reported as one line and exit code 2."""


def positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    value = integer(text, expected="a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a step number, for instance)."""
    value = integer(text, expected="a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def integer(text: str, expected: str = "an integer") -> int:
    """argparse type: an integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def integer_in(low: int, high: int, high_note: str = "") -> Callable[[str], int]:
    """An argparse type: an integer with ``low <= value <= high``; ``high_note`` (why there
    is an upper end) is appended to the error message for a value above ``high``."""
    expected = f"an integer in {low} .. {high}"

    def parse(text: str) -> int:
        value = integer(text, expected=expected)
        if not low <= value <= high:
            note = high_note if value > high else ""
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}{note}")
        return value

    parse.__name__ = expected  # what argparse names in its own messages
    return parse


def number_in(low: float, high: float, *, include_low: bool = False,
              include_high: bool = False, high_note: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number between ``low`` and ``high``, each end excluded
    unless ``include_low`` / ``include_high``. NaN and infinities are refused with a message
    that gives the interval, e.g. ``expected a number in [0, 1), got 1.5``; ``high_note``
    (why there is an upper end) is appended to it for a finite value at or above ``high``."""
    interval = (f"{'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number in {interval}, got {text!r}") from None
        above = value >= low if include_low else value > low
        below = value <= high if include_high else value < high
        if not (math.isfinite(value) and above and below):
            note = high_note if math.isfinite(value) and not below else ""
            raise argparse.ArgumentTypeError(
                f"expected a number in {interval}, got {text.strip()}{note}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


unit_interval = number_in(0.0, 1.0)
"""argparse type: a number strictly between 0 and 1 (an EMA decay, for instance)."""

probability = number_in(0.0, 1.0, include_low=True, include_high=True)
"""argparse type: a number in [0, 1]."""

tolerance = number_in(0.0, 1.0, include_low=True)
"""argparse type: a number in [0, 1) (a tolerance or floor that must stay below 1)."""


def split_names(names: list[str]) -> list[str]:
    """Names given space- or comma-separated (``a b``, ``a,b``, ``a, b``), blanks dropped."""
    return [part.strip() for name in names for part in name.split(",") if part.strip()]


def fail(command: str, message: str, code: int) -> int:
    """Prints ``optstate COMMAND: error: MESSAGE`` on stderr and returns the exit ``code``."""
    print(f"optstate {command}: error: {message}", file=sys.stderr)
    return code
