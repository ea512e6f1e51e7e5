"""The checkpoint directory: its layout, which steps it holds, and OS errors worded as ours.

Orbax's ``CheckpointManager`` owns the directory: ``directory/step_<N>/`` holds the arrays
(item ``state``, an OCDBT array store) and the sidecar (item ``optstate``, one JSON file,
:data:`_SIDECAR`). A save is written into ``step_<N>.orbax-checkpoint-tmp-<n>`` and renamed
into place by Orbax once every process has written its shards, so a step is listed here only
once complete. Listing reads the directory and never removes anything (not even temporary
directories of dead processes: on a shared filesystem they may belong to a live save of
another host).
"""

from __future__ import annotations

import operator
import os
import re
from pathlib import Path
from typing import Any

from optstate.checkpoint.errors import CheckpointError, _summary

_STATE = "state"  # Orbax item holding the arrays
_META = "optstate"  # Orbax item holding the sidecar (JSON)
_SIDECAR = f"{_META}/metadata"  # the sidecar file, relative to step_<N>/
_PREFIX = "step"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_(\d+)\.orbax-checkpoint-tmp")


def _local_dir(directory: str | os.PathLike) -> Path:
    """``directory`` as an absolute local path. URLs (``gs://``...) are refused: Orbax could
    write them, but this module lists, describes and checks steps with local file reads."""
    try:
        text = os.fspath(directory)
    except TypeError:
        raise CheckpointError(f"checkpoint directory: expected a path (str or os.PathLike), "
                              f"got {type(directory).__name__}.") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise CheckpointError(
            f"checkpoint directory {text!r}: only local or POSIX-mounted filesystems are "
            "supported (see the README's Checkpoints section for remote paths)."
        )
    return Path(os.path.abspath(text))


def _step_dir(directory: Path, step: int) -> Path:
    return directory / f"{_PREFIX}_{step}"


def _check_step(step: Any) -> int:
    if isinstance(step, bool):
        raise CheckpointError(f"step must be a non-negative integer, got {step!r}.")
    try:
        value = operator.index(step)
    except TypeError:
        raise CheckpointError(
            f"step must be a non-negative integer, got {step!r} ({type(step).__name__})."
        ) from None
    if value < 0:
        raise CheckpointError(f"step must be a non-negative integer, got {value}.")
    return value


def _os_error(where: str, error: OSError) -> CheckpointError:
    """An OS error (read-only filesystem, a file in the way, a symlink loop, a name too long,
    permissions...) as a :class:`CheckpointError` saying what failed and where."""
    name = f" ({error.filename!s})" if getattr(error, "filename", None) else ""
    reason = error.strerror or _summary(error)
    return CheckpointError(f"{where}: {reason}{name}.")


def _scan(root: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(root))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise CheckpointError(f"checkpoint directory {str(root)!r} is not a directory.") from None
    except OSError as e:
        raise _os_error(f"checkpoint directory {str(root)!r}", e) from None


def all_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, in increasing order.

    A checkpoint is complete once Orbax has committed its ``step_<N>`` directory (every
    process's shards and the sidecar written, then renamed into place). Saves in progress or
    killed live in ``step_<N>.orbax-checkpoint-tmp-*`` directories and are not listed. A
    missing ``directory`` has no steps. Reading only: safe to call from any process, at any
    time, also while another job saves.
    """
    root = _local_dir(directory)
    steps = []
    for entry in _scan(root):
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir() and os.path.isfile(os.path.join(entry.path, _SIDECAR)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The largest step with a complete checkpoint in ``directory``, or ``None`` if there is
    none (see :func:`all_steps`)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def incomplete_saves(directory: str | os.PathLike) -> list[str]:
    """Names of the temporary directories in ``directory`` of saves that are in progress or
    were interrupted (they are never restored from, and never removed by optstate)."""
    return sorted(e.name for e in _scan(_local_dir(directory)) if _TMP_RE.match(e.name))


def _legacy(directory: Path, step: int | None) -> str:
    """A hint when ``directory`` holds checkpoints of format version 1 (optstate before the
    move to Orbax's CheckpointManager: ``step_<N>/optstate.json`` beside ``arrays/``)."""
    names = [f"{_PREFIX}_{step}"] if step is not None else \
        [e.name for e in _scan(directory) if _STEP_RE.match(e.name)]
    if any(os.path.isfile(directory / name / "optstate.json") for name in names):
        return (" It holds checkpoints of format version 1 (step_<N>/optstate.json), which this "
                "optstate does not read: restore them with the optstate version that wrote "
                "them and save them again.")
    return ""


def _resolve_step(directory: Path, step: int | None) -> int:
    """``step`` checked against the complete checkpoints present (``None``: the latest)."""
    steps = all_steps(directory)
    if step is None:
        if not steps:
            raise CheckpointError(
                f"no complete checkpoint in {str(directory)!r} (expected step_<N> directories "
                f"holding {_SIDECAR})." + _legacy(directory, None)
            )
        return steps[-1]
    step = _check_step(step)
    if step not in steps:
        raise CheckpointError(
            f"no complete checkpoint for step {step} in {str(directory)!r}; "
            f"steps present: {steps if steps else 'none'}." + _legacy(directory, step)
        )
    return step
