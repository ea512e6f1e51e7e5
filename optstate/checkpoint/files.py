"""The checkpoint directory on disk: its layout, which steps it holds, and the file operations
that make saving crash-safe.

``directory/step_<N>/`` is a complete checkpoint once it holds the sidecar (``optstate.json``)
next to the array store (``arrays/``). A save writes into a hidden
``.tmp-step_<N>.<host>.<pid>.<nonce>`` directory, fsyncs it, and renames it into place; an old
step removed by ``keep=`` is first renamed to a hidden ``.del-step_<N>.<nonce>``. Both kinds of
hidden directory are never read as checkpoints, and the next save on the same host removes
those left by processes that died.
"""

from __future__ import annotations

import operator
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

from optstate.checkpoint.errors import CheckpointError

_SIDECAR = "optstate.json"
_ARRAYS = "arrays"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-step_(\d+)\.([A-Za-z0-9_-]+)\.(\d+)\.([0-9a-f]+)$")
_DEL_RE = re.compile(r"^\.del-step_(\d+)\.([0-9a-f]+)$")


# -------------------------------------------------------------------------------------------
# Layout and steps
# -------------------------------------------------------------------------------------------


def _local_dir(directory: str | os.PathLike) -> Path:
    """``directory`` as a local path; URLs (``gs://``...) are refused: the commit relies on
    an atomic directory rename, which object stores do not offer."""
    text = os.fspath(directory)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise CheckpointError(
            f"checkpoint directory {text!r}: only local or POSIX-mounted filesystems are "
            "supported (the commit is an atomic directory rename)."
        )
    return Path(text)


def _step_dir(directory: Path, step: int) -> Path:
    return directory / f"step_{step}"


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


def all_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, in increasing order.

    A checkpoint is complete once its ``step_<N>`` directory exists with its sidecar; saves in
    progress (or killed) live in hidden temporary directories and are not listed. A missing
    ``directory`` has no steps.
    """
    root = _local_dir(directory)
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise CheckpointError(f"checkpoint directory {str(root)!r} is not a directory.") from None
    steps = []
    for entry in entries:
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
    """Names of the hidden temporary directories in ``directory`` left by saves that are in
    progress or were interrupted (they are never restored from)."""
    try:
        names = os.listdir(_local_dir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if _TMP_RE.match(n) or _DEL_RE.match(n))


def _resolve_step(directory: Path, step: int | None) -> int:
    """``step`` checked against the complete checkpoints present (``None``: the latest)."""
    steps = all_steps(directory)
    if step is None:
        if not steps:
            raise CheckpointError(
                f"no complete checkpoint in {str(directory)!r} (expected step_<N> directories "
                f"holding {_SIDECAR})."
            )
        return steps[-1]
    step = _check_step(step)
    if step not in steps:
        raise CheckpointError(
            f"no complete checkpoint for step {step} in {str(directory)!r}; "
            f"steps present: {steps if steps else 'none'}."
        )
    return step


# -------------------------------------------------------------------------------------------
# Temporary directories, durability, clean-up
# -------------------------------------------------------------------------------------------


def _host_tag() -> str:
    """This host's name as it appears in temporary directory names (only ``[A-Za-z0-9_-]``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "host"


def _make_tmp_dir(directory: Path, step: int) -> Path:
    """Creates the hidden directory a save of ``step`` writes into. Its name records the host
    and process, so that :func:`_remove_leftovers` can tell whether its writer is gone."""
    tmp = directory / f".tmp-step_{step}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(6)}"
    tmp.mkdir()
    return tmp


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    # Best effort: some filesystems cannot open or fsync a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(directory: Path) -> None:
    """Removes temporary directories of saves by dead processes on this host, and directories
    whose deletion (``keep=``) was interrupted. Never touches ``step_<N>`` directories."""
    host = _host_tag()
    for name in incomplete_saves(directory):
        tmp = _TMP_RE.match(name)
        if tmp and (tmp.group(2) != host or int(tmp.group(3)) == os.getpid()
                    or _pid_alive(int(tmp.group(3)))):
            continue
        shutil.rmtree(directory / name, ignore_errors=True)


def _prune(directory: Path, keep: int) -> None:
    """Removes all but the ``keep`` highest complete steps."""
    steps = all_steps(directory)
    for step in steps[: max(0, len(steps) - keep)]:
        doomed = directory / f".del-step_{step}.{secrets.token_hex(4)}"
        try:
            os.rename(_step_dir(directory, step), doomed)  # invisible first, then removed
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
