"""Orbax, imported on first use, and kept quiet about the failures optstate reports itself.

``import optstate.checkpoint`` must not import Orbax (it is an optional dependency and slow to
import), so the module is reached through :func:`_ocp` and one shared ``StandardCheckpointer``
through :func:`_checkpointer`. When an Orbax read or write fails, optstate raises a
:class:`CheckpointError` naming the step and leaf; :class:`_QuietOrbax` keeps Orbax's own log
records and the clean-up noise of its abandoned coroutines from repeating that failure on
stderr. :func:`_restore_arrays` reads the array store and, when that fails, finds the first leaf
that cannot be read so that the error can name it.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from optstate.checkpoint.errors import CheckpointError, _show, _summary

_checkpointer_lock = threading.Lock()
_checkpointer_obj = None


def _ocp():
    """The ``orbax.checkpoint`` module, or a :class:`CheckpointError` saying how to install it."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "optstate.checkpoint needs Orbax: pip install 'optstate[checkpoint]' "
            f"(orbax-checkpoint). Import failed: {e}"
        ) from None
    return ocp


def _checkpointer():
    """The process-wide ``StandardCheckpointer`` (created on first use)."""
    global _checkpointer_obj
    with _checkpointer_lock:
        if _checkpointer_obj is None:
            _checkpointer_obj = _ocp().StandardCheckpointer()
        return _checkpointer_obj


# -------------------------------------------------------------------------------------------
# Quieting Orbax's own failure reports
# -------------------------------------------------------------------------------------------


def _from_orbax(text: str) -> bool:
    return "orbax" in text or "tensorstore" in text


class _OrbaxRecordFilter(logging.Filter):
    """Drops Orbax's log records (and asyncio's about Orbax tasks) while an optstate
    checkpoint operation that re-raises failures as :class:`CheckpointError` is active."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _QuietOrbax.depth == 0:
            return True
        if _from_orbax(record.pathname):
            return False
        try:
            message = record.getMessage()
        except Exception:  # pragma: no cover - malformed record
            return True
        return not _from_orbax(message)


class _QuietOrbax:
    """While active, Orbax's own reports of failures that optstate re-raises as
    :class:`CheckpointError` are silenced: its log records (absl and asyncio loggers; other
    records pass) and the "unraisable" clean-up errors of the coroutines and TensorStore
    callbacks a failed read leaves behind. Re-entrant and thread-safe."""

    depth = 0
    _guard = threading.Lock()
    _installed = False
    _previous_hook: Any = None

    def __enter__(self):
        cls = _QuietOrbax
        with cls._guard:
            if not cls._installed:
                record_filter = _OrbaxRecordFilter()
                for name in ("absl", "asyncio"):
                    logging.getLogger(name).addFilter(record_filter)
                cls._installed = True
            if cls.depth == 0:
                cls._previous_hook = sys.unraisablehook
                sys.unraisablehook = cls._unraisable
            cls.depth += 1
        return self

    @staticmethod
    def _unraisable(info: Any) -> None:
        obj = getattr(info, "object", None)
        code = getattr(obj, "cr_code", None)
        if (code is not None and _from_orbax(code.co_filename)) or \
                "Event loop is closed" in str(getattr(info, "exc_value", "")):
            return
        hook = _QuietOrbax._previous_hook or sys.__unraisablehook__
        hook(info)

    def __exit__(self, *exc):
        if exc[0] is not None:
            # A failed Orbax read leaves TensorStore reads in flight whose callbacks hit the
            # closed event loop; let them land, and flush the orphaned coroutines, while
            # still silenced (error path only).
            time.sleep(0.2)
            gc.collect()
        cls = _QuietOrbax
        with cls._guard:
            cls.depth -= 1
            if cls.depth == 0:
                if sys.unraisablehook is cls._unraisable:
                    sys.unraisablehook = cls._previous_hook or sys.__unraisablehook__
                cls._previous_hook = None
        return False


# -------------------------------------------------------------------------------------------
# Reading the array store
# -------------------------------------------------------------------------------------------


def _restore_arrays(where: str, path: Path, saved: dict, abstract: dict) -> dict:
    """Reads the stored arrays named by ``abstract`` (``leaf_<index>`` -> ShapeDtypeStruct with
    sharding) from the array store at ``path``. On failure, reads them one at a time to name
    the first leaf that cannot be read (its path from the sidecar ``saved``)."""
    ocp = _ocp()
    ckptr = _checkpointer()
    with _QuietOrbax():
        try:
            return ckptr.restore(os.path.abspath(path), abstract)
        except Exception as whole_error:
            error = whole_error
        # Find the first leaf that cannot be read, to name it.
        pytree = ocp.PyTreeCheckpointer()
        for key in sorted(abstract):
            single = {key: abstract[key]}
            try:
                pytree.restore(
                    os.path.abspath(path),
                    args=ocp.args.PyTreeRestore(
                        item=single,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(single),
                        partial_restore=True,
                    ),
                )
            except Exception as leaf_error:
                leaf_path = saved["leaves"][int(key.split("_")[1])]["path"]
                raise CheckpointError(
                    f"{where}: cannot read leaf {_show(leaf_path)} "
                    f"(shape {tuple(abstract[key].shape)}, {abstract[key].dtype}, sharding "
                    f"{abstract[key].sharding}): {_summary(leaf_error)}. Unless that sharding "
                    "is invalid, the checkpoint's array files are damaged or truncated."
                ) from None
        raise CheckpointError(f"{where}: cannot read the arrays ({_summary(error)}); the "
                              "checkpoint's array files are damaged or truncated.")
