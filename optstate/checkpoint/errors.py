"""The one exception of :mod:`optstate.checkpoint`, and how its messages name things.

Every failure a caller can act on (a missing step, damaged files, a target that does not match,
an unsupported format version) surfaces as :class:`CheckpointError`. Its message names the
directory and step and, where it applies, the leaf path; the two helpers below keep the leaf
paths and the underlying errors worded the same way in every module of the package.
"""

from __future__ import annotations

import re


class CheckpointError(Exception):
    """A checkpoint cannot be written or read as asked: missing step, damaged files, checksum
    mismatch, a target that does not match what was saved, or an unsupported format version.

    The message names the checkpoint directory and step and, where it applies, the leaf path,
    what was expected and what was found.
    """


def _show(path: str) -> str:
    """A leaf path as printed in messages (a state that is a single array has the empty path)."""
    return path if path else "<root>"


def _summary(error: BaseException) -> str:
    """One line for an underlying error: its type and message, without the TensorStore spec
    dumps that Orbax errors carry (they run to kilobytes), cut at 240 characters."""
    text = " ".join(str(error).split())
    text = re.sub(r"(\[tensorstore_spec|See full TensorStore details).*", "", text).strip()
    if len(text) > 240:
        text = text[:240] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
