"""Orbax, imported on first use: one ``CheckpointManager`` per directory, and time bounds.

``import optstate.checkpoint`` must not import Orbax (optional and slow to import): the module
is reached through :func:`_ocp`. :func:`_manager` keeps one ``CheckpointManager`` per
directory (recreated when ``keep=`` or the asynchronous mode changes, after its pending save
is finished); it writes ``step_<N>`` directories holding the items ``state`` (arrays) and
``optstate`` (the sidecar, JSON, written by the primary host).

In a multi-process run every collective piece of work (manager creation, checksums, Orbax's
save and restore and their barriers) runs under :func:`_bounded`: if it does not finish within
the timeout (another process died or stopped calling), the caller gets a
:class:`CheckpointError` instead of waiting at a barrier for Orbax's 5 or 20 minutes. Orbax's
asynchronous commit gets the same timeout (``AsyncOptions.timeout_secs``). Nothing here touches
loggers or interpreter hooks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax

from optstate.checkpoint.errors import CheckpointError, _show, _summary
from optstate.checkpoint.files import _META, _PREFIX, _STATE

T = TypeVar("T")

#: Default bound, in seconds, on a collective checkpoint operation in a multi-process run
#: (environment variable ``OPTSTATE_CHECKPOINT_TIMEOUT`` or the ``timeout=`` argument).
DEFAULT_TIMEOUT = 60.0

_lock = threading.RLock()
_managers: dict[Path, tuple[tuple, Any]] = {}


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


def _timeout(value: float | None) -> float:
    """The time bound: ``value``, else ``$OPTSTATE_CHECKPOINT_TIMEOUT``, else 60 s."""
    if value is None:
        text = os.environ.get("OPTSTATE_CHECKPOINT_TIMEOUT")
        try:
            value = float(text) if text else DEFAULT_TIMEOUT
        except ValueError:
            raise CheckpointError(f"OPTSTATE_CHECKPOINT_TIMEOUT must be a number of seconds, "
                                  f"got {text!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CheckpointError(f"timeout must be a positive number of seconds, got {value!r}.")
    return float(value)


def _bounded(fn: Callable[[], T], timeout: float, where: str, what: str) -> T:
    """``fn()``; in a multi-process run, raises :class:`CheckpointError` if it takes longer than
    ``timeout`` seconds (the work is left to a daemon thread: the job cannot go on anyway)."""
    if jax.process_count() == 1:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="optstate-checkpoint", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CheckpointError(
            f"{where}: {what} did not finish within {timeout:g} s on process "
            f"{jax.process_index()} of {jax.process_count()}. Every process must call it (it is "
            "collective); another process has probably died or is stuck. A step counts only "
            "once all_steps lists it; earlier steps are intact. This process cannot continue "
            "the job: restart it from the latest step (raise the bound with timeout= or "
            "OPTSTATE_CHECKPOINT_TIMEOUT if the storage is merely slow)."
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _peer_hint() -> str:
    """Said after a failed collective operation in a multi-process run."""
    if jax.process_count() == 1:
        return ""
    return (f" On process {jax.process_index()} of {jax.process_count()}: if another process "
            "died, this job cannot continue; restart it from the latest step.")


def _manager(root: Path, keep: int | None, asynchronous: bool, timeout: float):
    """The ``CheckpointManager`` of ``root`` configured for ``keep``/``asynchronous``."""
    ocp = _ocp()
    config = (keep, asynchronous, timeout)
    with _lock:
        current = _managers.get(root)
        if current is not None and current[0] == config:
            manager = current[1]
            manager.reload()  # steps written or removed by others since
            return manager
        if current is not None:
            _managers.pop(root)
            current[1].wait_until_finished()
            current[1].close()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            step_prefix=_PREFIX,
            create=True,
            cleanup_tmp_directories=False,  # never remove another process's save in progress
            enable_async_checkpointing=asynchronous,
            async_options=ocp.AsyncOptions(timeout_secs=max(1, round(timeout))),
            save_root_metadata=False,
        )
        manager = ocp.CheckpointManager(
            root, item_names=(_STATE, _META), options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _META: ocp.JsonCheckpointHandler()})
        _managers[root] = (config, manager)
        return manager


def _pending_managers() -> list[tuple[Path, Any]]:
    with _lock:
        return [(root, entry[1]) for root, entry in _managers.items()]


def _save(manager, step: int, arrays: dict, sidecar: dict) -> None:
    ocp = _ocp()
    items = {_META: ocp.args.JsonSave(sidecar)}
    if arrays:  # (Orbax refuses an empty item: a state without arrays has only its sidecar)
        items[_STATE] = ocp.args.StandardSave(arrays)
    args = ocp.args.Composite(**items)
    manager.save(step, args=args, force=True)


def _restore_arrays(manager, step: int, where: str, saved: dict, abstract: dict) -> dict:
    """Reads the stored arrays named by ``abstract`` (``leaf_<index>`` -> ShapeDtypeStruct with
    sharding) of ``step``. On failure, reads them one at a time to name the first leaf that
    cannot be read (its path from the sidecar ``saved``)."""
    ocp = _ocp()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(abstract)}))
        return dict(restored[_STATE])
    except Exception as whole_error:
        error = whole_error
    if jax.process_count() == 1:  # (one leaf at a time is not collective-safe)
        directory = Path(manager.directory) / f"{_PREFIX}_{step}" / _STATE
        reader = ocp.StandardCheckpointer()
        for key in sorted(abstract):
            try:
                reader.restore(directory, {key: abstract[key]}, strict=False)
            except Exception as leaf_error:
                leaf_path = saved["leaves"][int(key.split("_")[1])]["path"]
                raise CheckpointError(
                    f"{where}, leaf {_show(leaf_path)}: cannot read the array (shape "
                    f"{tuple(abstract[key].shape)}, {abstract[key].dtype}): "
                    f"{_summary(leaf_error)}. The checkpoint's array files are damaged or "
                    "truncated."
                ) from None
    raise CheckpointError(f"{where}: cannot read the arrays ({_summary(error)}); the "
                          "checkpoint's array files are damaged or truncated.")


def _reader(root: Path, timeout: float):
    """The manager of ``root`` as it is (for reading), or a new synchronous one."""
    with _lock:
        current = _managers.get(root)
        if current is not None:
            return current[1]
    return _manager(root, None, False, timeout)
