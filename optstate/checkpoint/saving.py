"""Saving: :func:`save`, its asynchronous form, and :func:`wait_until_finished`.

A save flattens the state into stored arrays plus their descriptions (:func:`_prepare`, which
also copies every array to host memory and hashes it), hands the arrays to Orbax, and commits
with :func:`_finalize`: wait for Orbax, write the sealed sidecar, fsync everything, rename the
temporary directory into place, then prune old steps. An asynchronous save runs the commit in a
background thread; at most one is in flight (``_pending``), and the next save or restore, or
:func:`wait_until_finished`, or interpreter exit waits for it and surfaces its error.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.types import PyTree
from optstate.checkpoint._orbax import _checkpointer, _QuietOrbax
from optstate.checkpoint.encoding import (
    _encode_bits,
    _format_name,
    _host_copy,
    _leaf_meta,
    _quantized_groups,
    _sha256,
    _sharding_note,
    _storage_dtype,
)
from optstate.checkpoint.errors import CheckpointError, _show, _summary
from optstate.checkpoint.files import (
    _ARRAYS,
    _SIDECAR,
    _check_step,
    _fsync_dir,
    _fsync_tree,
    _local_dir,
    _make_tmp_dir,
    _prune,
    _remove_leftovers,
    _step_dir,
)
from optstate.checkpoint.sidecar import _build_sidecar, _seal


class _Pending:
    """An asynchronous save in flight: its commit thread and, once done, its error."""

    def __init__(self, directory: Path, step: int):
        self.directory, self.step = directory, step
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None


_pending_lock = threading.Lock()
_pending: _Pending | None = None


def _prepare(state: PyTree, where: str) -> tuple[dict[str, jax.Array], list[dict], list[dict]]:
    """Flattens ``state`` into Orbax's flat dict of stored arrays plus the leaf descriptions."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    arrays: dict[str, jax.Array] = {}
    leaves: list[dict[str, Any]] = []
    for index, (path, leaf) in enumerate(flat):
        path_str = jax.tree_util.keystr(path)
        here = f"{where}, leaf {_show(path_str)}"
        if isinstance(leaf, (str, bytes)) or not (
            isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex, bool))
        ):
            raise CheckpointError(
                f"{here}: expected an array (jax.Array, numpy array or Python number), got "
                f"{type(leaf).__name__}."
            )
        try:
            x = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
            shape, dtype_name, weak_type, key_impl = _leaf_meta(x)
            stored = jax.random.key_data(x) if key_impl is not None else x
            encoding = None
            if key_impl is None and _storage_dtype(dtype_name) is not None:
                stored, encoding = _encode_bits(stored), "bits"
            host = _host_copy(stored, here)
        except CheckpointError:
            raise
        except Exception as e:  # e.g. a deleted (donated) buffer
            raise CheckpointError(f"{here}: cannot read the array ({_summary(e)}).") from None
        entry: dict[str, Any] = {
            "path": path_str,
            "shape": list(shape),
            "dtype": dtype_name,
            "format": _format_name(dtype_name),
            "nbytes": int(host.nbytes),
            "sha256": _sha256(host),
        }
        if weak_type:
            entry["weak_type"] = True
        if key_impl is not None:
            entry["key_impl"] = key_impl
            entry["format"] = f"key({key_impl})"
        if encoding is not None or key_impl is not None:
            entry["stored_shape"] = list(host.shape)
            entry["stored_dtype"] = str(host.dtype)
            if encoding is not None:
                entry["encoding"] = encoding
        note = _sharding_note(leaf)
        if note is not None:
            entry["sharding"] = note
        if host.size == 0:
            entry["empty"] = True  # Orbax cannot store empty arrays; shape and dtype suffice
        else:
            arrays[f"leaf_{index:05d}"] = stored
        leaves.append(entry)
    return arrays, leaves, _quantized_groups(state)


def _finalize(tmp: Path, final: Path, sidecar: dict, has_arrays: bool, keep: int | None,
              where: str) -> None:
    """Commits the save written into ``tmp`` as ``final`` (or removes ``tmp`` on failure)."""
    try:
        if has_arrays:
            with _QuietOrbax():
                try:
                    _checkpointer().wait_until_finished()
                except Exception as e:
                    raise CheckpointError(f"{where}: writing the arrays failed ({_summary(e)}).") \
                        from None
            if not (tmp / _ARRAYS).is_dir():
                raise CheckpointError(f"{where}: Orbax did not produce {tmp / _ARRAYS}.")
        with open(tmp / _SIDECAR, "w", encoding="utf-8") as f:
            json.dump(_seal(sidecar), f, indent=1)
            f.write("\n")
        _fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError as e:
            raise CheckpointError(
                f"{where}: cannot commit the checkpoint ({e.strerror}); "
                f"{str(final)!r} may already exist."
            ) from None
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        _prune(final.parent, keep)


def _join_pending() -> _Pending | None:
    """Waits for the asynchronous save in flight, if any, and returns it (no longer pending)."""
    global _pending
    with _pending_lock:
        pending, _pending = _pending, None
    if pending is not None and pending.thread is not None:
        pending.thread.join()
    return pending


def wait_until_finished() -> None:
    """Blocks until the asynchronous save in flight (if any) is committed.

    Raises:
      CheckpointError: the save failed (nothing was committed for its step; earlier
        checkpoints are untouched).
    """
    pending = _join_pending()
    if pending is not None and pending.error is not None:
        error = pending.error
        if isinstance(error, CheckpointError):
            raise CheckpointError(str(error)) from None
        raise CheckpointError(
            f"asynchronous save of step {pending.step} to {str(pending.directory)!r} failed "
            f"({_summary(error)})."
        ) from None


@atexit.register
def _report_at_exit() -> None:  # pragma: no cover - exercised at interpreter exit
    try:
        wait_until_finished()
    except CheckpointError as e:
        print(f"optstate.checkpoint: {e}", file=sys.stderr)


def save(
    directory: str | os.PathLike,
    step: int,
    state: PyTree,
    *,
    metadata: Mapping[str, Any] | None = None,
    keep: int | None = None,
    asynchronous: bool = False,
) -> Path:
    """Saves ``state`` as the checkpoint ``directory/step_<step>``.

    The write goes to a temporary directory that is renamed into place only once arrays and
    sidecar are complete and fsync'ed, so the checkpoint becomes visible to
    :func:`latest_step` atomically, and a crash at any point leaves earlier checkpoints intact.

    Args:
      directory: the checkpoint directory (created if missing; local or POSIX filesystem).
      step: a non-negative integer; a step that already exists is never overwritten.
      state: any pytree of arrays (``jax.Array``, sharded or not, numpy arrays, Python
        numbers, typed PRNG keys, quantized state), e.g. ``{"params": p, "opt": opt_state}``.
      metadata: a JSON-serializable mapping stored with the checkpoint (read it back with
        :func:`read_metadata`); JSON turns tuples into lists.
      keep: if given, keep only the ``keep`` highest steps, removing older complete
        checkpoints after this one is committed.
      asynchronous: if True, return as soon as the arrays are copied to host memory and their
        checksums computed; the write and commit go on in the background (one at a time). Call
        :func:`wait_until_finished` to wait for it and to surface its errors; the next ``save``
        or ``restore`` waits for it too.

    Example:
      >>> import tempfile
      >>> import jax, jax.numpy as jnp
      >>> import optstate
      >>> tx = optstate.quantize_state(optstate.adamw(1e-3), "int8")
      >>> params = {"w": jnp.ones((64, 128))}
      >>> state = tx.init(params)
      >>> directory = tempfile.mkdtemp()
      >>> path = optstate.checkpoint.save(directory, 10, state, metadata={"lr": 1e-3})
      >>> optstate.checkpoint.latest_step(directory)
      10

    Returns:
      The final path ``directory/step_<step>`` (it exists once the save is committed).

    Raises:
      CheckpointError: the step exists or is invalid, a leaf is not an array, metadata is not
        JSON-serializable, or writing failed — naming the step and, where it applies, the leaf.
    """
    wait_until_finished()
    root = _local_dir(directory)
    step = _check_step(step)
    where = f"checkpoint {str(root)!r}, step {step}"
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise CheckpointError(f"{where}: keep must be a positive integer or None, got {keep!r}.")
    if jax.process_count() > 1:
        raise CheckpointError(
            f"{where}: multi-process runs (jax.process_count() = {jax.process_count()}) are not "
            "supported by optstate.checkpoint yet."
        )
    final = _step_dir(root, step)
    if final.exists():
        raise CheckpointError(f"{where}: {str(final)!r} already exists; checkpoints are never "
                              "overwritten (choose another step or remove it yourself).")
    try:
        metadata_json = json.loads(json.dumps(dict(metadata or {})))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: metadata must be JSON-serializable ({e}).") from None

    arrays, leaves, groups = _prepare(state, where)
    sidecar = _build_sidecar(step, state, leaves, groups, metadata_json)

    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    tmp = _make_tmp_dir(root, step)
    try:
        if arrays:
            with _QuietOrbax():
                _checkpointer().save(os.path.abspath(tmp / _ARRAYS), arrays)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{where}: writing the arrays failed ({_summary(e)}).") from None

    if not asynchronous:
        _finalize(tmp, final, sidecar, bool(arrays), keep, where)
        return final

    global _pending
    pending = _Pending(root, step)

    def run() -> None:
        try:
            _finalize(tmp, final, sidecar, bool(arrays), keep, where)
        except BaseException as e:  # surfaced by wait_until_finished
            pending.error = e

    pending.thread = threading.Thread(target=run, name=f"optstate-save-step-{step}")
    with _pending_lock:
        _pending = pending
    pending.thread.start()
    return final
