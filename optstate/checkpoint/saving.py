"""Saving: :func:`save` (synchronous or asynchronous) and :func:`wait_until_finished`.

A save flattens the state into stored arrays plus their descriptions (:func:`_prepare`),
computes every stored array's checksum on its devices (:mod:`~optstate.checkpoint.integrity`),
and hands the arrays (item ``state``) and the sealed sidecar (item ``optstate``) to the
directory's Orbax ``CheckpointManager``, which writes each process's shards, commits the step
atomically and applies ``keep=``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.types import PyTree
from optstate.checkpoint._orbax import (
    _bounded,
    _manager,
    _peer_hint,
    _pending_managers,
    _save,
    _timeout,
)
from optstate.checkpoint.encoding import (
    _encode_bits,
    _format_name,
    _leaf_meta,
    _quantized_groups,
    _sharding_note,
    _storage_dtype,
)
from optstate.checkpoint.errors import CheckpointError, _show, _summary
from optstate.checkpoint.files import (
    _check_step,
    _local_dir,
    _os_error,
    _step_dir,
    all_steps,
)
from optstate.checkpoint.integrity import checksums
from optstate.checkpoint.sidecar import _build_sidecar, _seal


def _global(x: jax.Array) -> jax.Array:
    """In a multi-process run, a process-local array (a NumPy leaf, a Python number, an array
    on this process's devices only) as the same value replicated over all devices, so that
    Orbax stores one copy of it; other arrays unchanged."""
    if jax.process_count() == 1 or not x.is_fully_addressable:
        return x
    host = np.asarray(x)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _prepare(state: PyTree, where: str) -> tuple[dict[str, jax.Array], list[dict], list[dict]]:
    """Flattens ``state`` into Orbax's flat dict of stored arrays plus the leaf descriptions
    (checksums not yet filled in)."""
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
            if isinstance(x, jax.Array) and x.is_deleted():
                raise RuntimeError("the array has been deleted (donated?)")
            shape, dtype_name, weak_type, key_impl = _leaf_meta(x)
            stored = jax.random.key_data(x) if key_impl is not None else x
            encoding = None
            if key_impl is None and _storage_dtype(dtype_name) is not None:
                stored, encoding = _encode_bits(stored), "bits"
            stored = _global(stored)
        except CheckpointError:
            raise
        except Exception as e:  # e.g. a deleted (donated) buffer
            raise CheckpointError(f"{here}: cannot read the array ({_summary(e)}).") from None
        entry: dict[str, Any] = {
            "path": path_str,
            "shape": list(shape),
            "dtype": dtype_name,
            "format": _format_name(dtype_name),
            "nbytes": int(stored.size * stored.dtype.itemsize),
        }
        if weak_type:
            entry["weak_type"] = True
        if key_impl is not None:
            entry["key_impl"] = key_impl
            entry["format"] = f"key({key_impl})"
        if encoding is not None or key_impl is not None:
            entry["stored_shape"] = list(stored.shape)
            entry["stored_dtype"] = str(stored.dtype)
            if encoding is not None:
                entry["encoding"] = encoding
        note = _sharding_note(leaf)
        if note is not None:
            entry["sharding"] = note
        if stored.size == 0:
            entry["empty"] = True  # Orbax cannot store empty arrays; shape and dtype suffice
            entry["checksum"] = "0" * 16
        else:
            arrays[f"leaf_{index:05d}"] = stored
        leaves.append(entry)
    return arrays, leaves, _quantized_groups(state)


def _clean_metadata(metadata: Any, where: str) -> dict[str, Any]:
    """``metadata`` as the JSON object it will read back as, or a :class:`CheckpointError`."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{where}: metadata must be a mapping (a dict of JSON values), "
                              f"got {type(metadata).__name__}.")

    def check_keys(value: Any, path: str) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise CheckpointError(
                        f"{where}: metadata keys must be strings (JSON would turn {key!r} into "
                        f"{json.dumps(str(key))} silently); got {type(key).__name__} key "
                        f"{key!r} at metadata{path}.")
                check_keys(item, f"{path}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                check_keys(item, f"{path}[{i}]")

    check_keys(metadata, "")
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=True))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: metadata must be JSON-serializable ({e}).") from None


def wait_until_finished(*, timeout: float | None = None) -> None:
    """Blocks until every asynchronous save of this process is committed.

    Collective in a multi-process run (every process calls it).

    Raises:
      CheckpointError: a save failed or a peer process did not finish within ``timeout``
        (nothing was committed for its step; earlier checkpoints are untouched).
    """
    bound = _timeout(timeout)
    for root, manager in _pending_managers():
        try:
            _bounded(manager.wait_until_finished, bound, f"checkpoint {str(root)!r}",
                     "committing the asynchronous save")
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"asynchronous save to {str(root)!r} failed "
                                  f"({_summary(e)}).{_peer_hint()}") from None


def save(
    directory: str | os.PathLike,
    step: int,
    state: PyTree,
    *,
    metadata: Mapping[str, Any] | None = None,
    keep: int | None = None,
    asynchronous: bool = False,
    timeout: float | None = None,
) -> Path:
    """Saves ``state`` as the checkpoint ``directory/step_<step>``, with Orbax.

    Collective: in a multi-process (``jax.distributed``) run every process calls it with the
    same arguments and its part of the same global arrays; each process writes only its own
    shards and the primary host (process 0) writes the sidecar and commits the step. The
    checkpoint becomes visible to :func:`latest_step` atomically, once complete; a crash at
    any point leaves earlier checkpoints intact.

    Args:
      directory: the checkpoint directory (created if missing; local or POSIX filesystem).
      step: a non-negative integer above every step already in ``directory``: an existing
        step is never overwritten, and a lower one (e.g. a new run beside an old one) is
        refused, so that ``keep=`` can never delete the step just written.
      state: any pytree of arrays (``jax.Array``, sharded or not, numpy arrays, Python
        numbers, typed PRNG keys, quantized state), e.g. ``{"params": p, "opt": opt_state}``.
      metadata: a mapping with string keys and JSON values stored with the checkpoint (read it
        back with :func:`read_metadata`); JSON turns tuples into lists.
      keep: if given, keep only the ``keep`` highest steps, removing older complete
        checkpoints once this one is committed (never this one).
      asynchronous: if True, return once the arrays are copied to host memory; Orbax writes
        and commits in the background. Call :func:`wait_until_finished` to wait and to surface
        errors; the next ``save`` or ``restore`` waits too. Call it before the process exits.
      timeout: in a multi-process run, the bound in seconds on each collective part of the
        save (default ``$OPTSTATE_CHECKPOINT_TIMEOUT`` or 60): if another process died, this
        one raises :class:`CheckpointError` after that time instead of hanging.

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
      CheckpointError: the step exists, is below the latest or is invalid; a leaf is not an
        array; metadata is not a mapping of JSON values; the directory cannot be written
        (read-only, a file in the way, a symlink loop, a name too long...); writing failed or
        a peer process did not answer in time — naming the step and, where it applies, the
        leaf.
    """
    bound = _timeout(timeout)
    wait_until_finished(timeout=bound)
    root = _local_dir(directory)
    step = _check_step(step)
    where = f"checkpoint {str(root)!r}, step {step}"
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise CheckpointError(f"{where}: keep must be a positive integer or None, got {keep!r}.")
    metadata_json = _clean_metadata(metadata, where)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(13, "the directory is not writable", str(root))
    except FileExistsError:
        what = ("is a symbolic link that does not resolve (a loop or a dangling link)"
                if os.path.islink(root) and not os.path.exists(root)
                else "exists and is not a directory")
        raise CheckpointError(f"{where}: {str(root)!r} {what}.") from None
    except OSError as e:
        raise _os_error(f"{where}: cannot create or write the checkpoint directory", e) from None
    steps = all_steps(root)
    if step in steps or _step_dir(root, step).exists():
        raise CheckpointError(f"{where}: {str(_step_dir(root, step))!r} already exists; "
                              "checkpoints are never overwritten (choose another step or "
                              "remove it yourself).")
    if steps and step < steps[-1]:
        raise CheckpointError(
            f"{where}: the directory already holds step {steps[-1]}, above {step}; steps of "
            "one directory must increase (keep= removes the lowest steps, so it would delete "
            "this one). Save a new run into a new directory, or remove the higher steps.")

    arrays, leaves, groups = _prepare(state, where)

    def collective() -> None:
        sums = iter(checksums(list(arrays.values())))
        for entry in leaves:
            if "checksum" not in entry:
                entry["checksum"] = next(sums)
        sidecar = _seal(_build_sidecar(step, state, leaves, groups, metadata_json))
        manager = _manager(root, keep, bool(asynchronous), bound)
        _save(manager, step, arrays, sidecar)

    try:
        _bounded(collective, bound, where, "the save")
    except CheckpointError:
        raise
    except OSError as e:
        raise _os_error(f"{where}: writing failed", e) from None
    except Exception as e:
        raise CheckpointError(f"{where}: writing failed ({_summary(e)}).{_peer_hint()}") \
            from None
    return _step_dir(root, step)
