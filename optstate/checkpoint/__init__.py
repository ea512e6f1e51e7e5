"""Checkpoints of optimizer state: exact resume, versioned, crash-safe, reshardable.

A checkpoint stores any pytree of arrays (typically ``{"params": ..., "opt": ...}``), sharded or
not, with Orbax. Restoring it with an abstract ``target`` (``jax.ShapeDtypeStruct`` leaves, as
from ``jax.eval_shape``, optionally carrying shardings) gives back, bit for bit, the arrays that
were saved, laid out with the target's shardings — on the same devices or on another mesh or
device count (Orbax reads only the slices each device needs).

On disk, ``directory/step_<N>/`` holds:

* ``arrays/`` — an Orbax (OCDBT) array store, one entry per array leaf;
* ``optstate.json`` — the sidecar: the optstate version, the state-format version
  (:data:`FORMAT_VERSION`), the tree description (per leaf path: shape, dtype, and for quantized
  leaves their format), a SHA-256 checksum of every array's bytes, and the user's metadata.

Guarantees:

* **Crash safety.** A save writes into a hidden temporary directory
  ``directory/.tmp-step_<N>.<host>.<pid>.<nonce>`` and renames it to ``step_<N>`` in one atomic
  ``rename`` once everything (arrays, then sidecar, all fsync'ed) is written. Only ``step_<N>``
  directories holding a sidecar count as checkpoints, so a process killed at any moment (SIGKILL
  included) leaves earlier checkpoints untouched and the half-written one invisible; the next
  save on the same host removes such leftovers of dead processes.
* **Integrity.** Restore recomputes every leaf's checksum and compares it with the sidecar
  (which carries a checksum of its own, so edited metadata is caught too), and compares the
  target's tree (paths, shapes, dtypes, PRNG key types, quantization formats) with the saved
  one; any difference raises :class:`CheckpointError` naming the step and the leaf path.
* **Versioning.** A sidecar of an older format version is migrated (``_MIGRATIONS``) or
  refused with a message saying which optstate wrote it; a newer one asks for an upgrade.
* **No code execution on load.** The sidecar is JSON and the arrays are raw tensor data: nothing
  is unpickled.
* **Nothing is overwritten.** Saving to an existing step raises; only ``keep=`` removes old
  steps, and only after the new one is complete.

Usage::

    from optstate import checkpoint

    checkpoint.save(ckpt_dir, step, {"params": params, "opt": opt_state}, keep=3)
    target = jax.eval_shape(lambda: {"params": params, "opt": opt_state})  # or with shardings
    state = checkpoint.restore(ckpt_dir, target=target)  # latest complete step

Limits: directories must be on a local or POSIX-mounted filesystem (no ``gs://``), and
multi-process (``jax.distributed``) saving is not supported yet: all arrays must be addressable
from the saving process (any number of local devices is fine).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import hashlib
import json
import logging
import operator
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "all_steps",
    "describe",
    "incomplete_saves",
    "latest_step",
    "read_metadata",
    "restore",
    "save",
    "wait_until_finished",
]

PyTree = Any

#: Version of the on-disk layout and sidecar schema written by this module. Restoring a
#: checkpoint with an older version goes through the migrations in ``_MIGRATIONS``; a newer
#: version, or an older one without a migration path, raises :class:`CheckpointError`.
FORMAT_VERSION = 1

_FORMAT_NAME = "optstate.checkpoint"
_SIDECAR = "optstate.json"
_ARRAYS = "arrays"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-step_(\d+)\.([A-Za-z0-9_-]+)\.(\d+)\.([0-9a-f]+)$")
_DEL_RE = re.compile(r"^\.del-step_(\d+)\.([0-9a-f]+)$")

# Dtypes that Orbax/TensorStore store natively. Any other dtype (e.g. uint4, float8_e4m3) is
# stored bit-exactly as unsigned integers of the same width (widened to uint8 below 8 bits).
_NATIVE_DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "float8_e3m4", "float8_e8m0fnu", "float4_e2m1fn", "int4", "int2",
})

_FORMAT_NAMES = {
    "float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
    "float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2",
}


class CheckpointError(Exception):
    """A checkpoint cannot be written or read as asked: missing step, damaged files, checksum
    mismatch, a target that does not match what was saved, or an unsupported format version.

    The message names the checkpoint directory and step and, where it applies, the leaf path,
    what was expected and what was found.
    """


# -------------------------------------------------------------------------------------------
# Directory layout
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
# Tree description
# -------------------------------------------------------------------------------------------


def _show(path: str) -> str:
    return path if path else "<root>"


def _dtype_name(dtype: Any) -> str:
    return str(jnp.dtype(dtype)) if not _is_key_dtype(dtype) else str(dtype)


def _is_key_dtype(dtype: Any) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _format_name(dtype_name: str) -> str:
    return _FORMAT_NAMES.get(dtype_name, dtype_name)


def _bit_width(dtype: Any) -> int:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return int(jnp.finfo(dtype).bits)
    if jnp.issubdtype(dtype, jnp.integer):
        return int(jnp.iinfo(dtype).bits)
    return 8 * dtype.itemsize


_UINT_OF_WIDTH = {2: "uint2", 4: "uint4", 8: "uint8", 16: "uint16", 32: "uint32", 64: "uint64"}


def _storage_dtype(dtype_name: str) -> str | None:
    """The dtype an array of ``dtype_name`` is stored as, or None when stored natively."""
    if dtype_name in _NATIVE_DTYPES:
        return None
    width = _bit_width(dtype_name)
    if width not in _UINT_OF_WIDTH:
        raise CheckpointError(f"dtype {dtype_name} ({width} bits) cannot be stored.")
    return "uint8" if width < 8 else _UINT_OF_WIDTH[width]


def _encode_bits(x: jax.Array) -> jax.Array:
    width = _bit_width(x.dtype)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(_UINT_OF_WIDTH[width]))
    return bits.astype(jnp.uint8) if width < 8 else bits


def _decode_bits(bits: jax.Array, dtype_name: str) -> jax.Array:
    width = _bit_width(dtype_name)
    if width < 8:
        bits = bits.astype(jnp.dtype(_UINT_OF_WIDTH[width]))
    return jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype_name))


def _quantized_groups(tree: PyTree) -> list[dict[str, Any]]:
    """Per quantized leaf (``optstate.quantization.array.QuantizedArray``): its path, format, logical
    shape and dtype, and the indices of its array children among the flattened leaves."""
    try:
        from optstate.quantization.array import is_quantized
    except ImportError:
        return []
    items, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    groups, index = [], 0
    for path, item in items:
        n = len(jax.tree.leaves(item))
        if is_quantized(item):
            shape = getattr(item, "shape", None)
            dtype = getattr(item, "dtype", None)
            block_size = getattr(item, "block_size", None)
            nonneg = getattr(item, "nonneg", None)
            groups.append({
                "path": jax.tree_util.keystr(path),
                "fmt": str(getattr(item, "fmt", "?")),
                "shape": None if shape is None else [int(d) for d in shape],
                "dtype": None if dtype is None else _dtype_name(dtype),
                "block_size": None if block_size is None else int(block_size),
                "nonneg": None if nonneg is None else bool(nonneg),
                "leaves": list(range(index, index + n)),
            })
        index += n
    return groups


def _leaf_meta(leaf: Any) -> tuple[tuple[int, ...], str, bool, str | None]:
    """(shape, dtype name, weak_type, PRNG key implementation or None) of an array-like."""
    if not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        leaf = jnp.asarray(leaf)  # numpy arrays and Python numbers as JAX would hold them
    dtype = leaf.dtype
    key_impl = None
    if _is_key_dtype(dtype):
        impl = getattr(dtype, "_impl", None)
        if impl is not None and hasattr(impl, "name"):
            key_impl = str(impl.name)
        else:  # pragma: no cover - private attribute moved
            key_impl = str(jax.random.key_impl(leaf))
    return (tuple(int(d) for d in leaf.shape), _dtype_name(dtype),
            bool(getattr(leaf, "weak_type", False)), key_impl)


def _sharding_note(x: Any) -> dict[str, Any] | None:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return {
            "mesh": {str(k): int(v) for k, v in sharding.mesh.shape.items()},
            "spec": [None if p is None else (list(p) if isinstance(p, tuple) else str(p))
                     for p in sharding.spec],
        }
    if sharding is not None:
        return {"devices": len(sharding.device_set)}
    return None


# -------------------------------------------------------------------------------------------
# Orbax plumbing
# -------------------------------------------------------------------------------------------

_lock = threading.RLock()
_checkpointer_obj = None


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "optstate.checkpoint needs Orbax: pip install 'optstate[checkpoint]' "
            f"(orbax-checkpoint). Import failed: {e}"
        ) from None
    return ocp


def _checkpointer():
    global _checkpointer_obj
    with _lock:
        if _checkpointer_obj is None:
            _checkpointer_obj = _ocp().StandardCheckpointer()
        return _checkpointer_obj


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


def _summary(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = re.sub(r"(\[tensorstore_spec|See full TensorStore details).*", "", text).strip()
    if len(text) > 240:
        text = text[:240] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -------------------------------------------------------------------------------------------
# Save
# -------------------------------------------------------------------------------------------


class _Pending:
    def __init__(self, directory: Path, step: int):
        self.directory, self.step = directory, step
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None


_pending: _Pending | None = None


def _sha256(host: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order (no copy when already contiguous)."""
    raw = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
    return hashlib.sha256(raw).hexdigest()


def _canonical(sidecar: dict) -> bytes:
    body = {k: v for k, v in sidecar.items() if k != "sidecar_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _seal(sidecar: dict) -> dict:
    """Returns ``sidecar`` with ``sidecar_sha256``: the SHA-256 of its canonical JSON (all other
    fields), so that any change to the description or the metadata is detected."""
    return dict(sidecar, sidecar_sha256=hashlib.sha256(_canonical(sidecar)).hexdigest())


def _host_copy(x: jax.Array, where: str) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise CheckpointError(
            f"{where}: the array is not fully addressable from this process (multi-process "
            "runs are not supported by optstate.checkpoint yet)."
        )
    return np.asarray(x)


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


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "host"


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
    steps = all_steps(directory)
    for step in steps[: max(0, len(steps) - keep)]:
        doomed = directory / f".del-step_{step}.{secrets.token_hex(4)}"
        try:
            os.rename(_step_dir(directory, step), doomed)  # invisible first, then removed
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


def _finalize(tmp: Path, final: Path, sidecar: dict, has_arrays: bool, keep: int | None,
              where: str) -> None:
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
    global _pending
    with _lock:
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
    from optstate import __version__

    sidecar = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "optstate_version": __version__,
        "jax_version": jax.__version__,
        "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checksum": "sha256",
        "treedef": str(jax.tree.structure(state)),
        "leaves": leaves,
        "quantized": groups,
        "total_bytes": int(sum(entry["nbytes"] for entry in leaves)),
        "metadata": metadata_json,
    }

    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    tmp = root / f".tmp-step_{step}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(6)}"
    tmp.mkdir()
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
    with _lock:
        _pending = pending
    pending.thread.start()
    return final


# -------------------------------------------------------------------------------------------
# Read
# -------------------------------------------------------------------------------------------

# Migrations of the sidecar (and, through it, of how arrays are read): _MIGRATIONS[v] takes a
# sidecar of format version v and returns one of version v + 1.
_MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def _read_sidecar(directory: Path, step: int) -> dict:
    where = f"checkpoint {str(directory)!r}, step {step}"
    path = _step_dir(directory, step) / _SIDECAR
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: cannot read {_SIDECAR} ({_summary(e)}).") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != _FORMAT_NAME:
        raise CheckpointError(f"{where}: {_SIDECAR} is not an optstate checkpoint description.")
    seal = sidecar.get("sidecar_sha256")
    if seal is not None and seal != hashlib.sha256(_canonical(sidecar)).hexdigest():
        raise CheckpointError(
            f"{where}: {_SIDECAR} does not match its own checksum (sidecar_sha256): the "
            "checkpoint's description or metadata was altered or damaged."
        )
    version = sidecar.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: {_SIDECAR} has no valid format_version (got {version!r}).")
    if version >= 1 and seal is None:
        raise CheckpointError(f"{where}: {_SIDECAR} has no sidecar_sha256 (required since "
                              "format version 1).")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: written with checkpoint format version {version} (optstate "
            f"{sidecar.get('optstate_version', '?')}); this optstate reads versions up to "
            f"{FORMAT_VERSION}. Upgrade optstate to restore it."
        )
    while version < FORMAT_VERSION:
        migrate = _MIGRATIONS.get(version)
        if migrate is None:
            raise CheckpointError(
                f"{where}: written with checkpoint format version {version} (optstate "
                f"{sidecar.get('optstate_version', '?')}); this optstate reads version "
                f"{FORMAT_VERSION} and has no migration from version {version}. Restore it with "
                f"the optstate version that wrote it and save it again."
            )
        try:
            sidecar = migrate(sidecar)
        except Exception as e:
            raise CheckpointError(
                f"{where}: migrating from format version {version} failed ({_summary(e)})."
            ) from None
        if sidecar.get("format_version") != version + 1:
            raise CheckpointError(
                f"{where}: the migration from format version {version} did not produce version "
                f"{version + 1}."
            )
        version += 1
    if sidecar.get("step") != step:
        raise CheckpointError(
            f"{where}: the directory step_{step} holds a checkpoint saved as step "
            f"{sidecar.get('step')!r} (was it renamed?)."
        )
    _check_schema(where, sidecar)
    return sidecar


def _check_schema(where: str, sidecar: dict) -> None:
    leaves = sidecar.get("leaves")
    if not isinstance(leaves, list):
        raise CheckpointError(f"{where}: {_SIDECAR} has no leaf list.")
    for index, entry in enumerate(leaves):
        ok = (isinstance(entry, dict) and isinstance(entry.get("path"), str)
              and isinstance(entry.get("shape"), list)
              and all(isinstance(d, int) for d in entry["shape"])
              and isinstance(entry.get("dtype"), str) and isinstance(entry.get("sha256"), str)
              and isinstance(entry.get("nbytes"), int))
        if not ok:
            raise CheckpointError(f"{where}: {_SIDECAR} describes leaf #{index} incompletely "
                                  f"(expected path, shape, dtype, nbytes, sha256): {entry!r}.")
    if not isinstance(sidecar.get("quantized", []), list) or \
            not isinstance(sidecar.get("metadata", {}), dict):
        raise CheckpointError(f"{where}: {_SIDECAR} has malformed quantized/metadata entries.")


def describe(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The description of checkpoint ``step`` (default: the latest) as saved: versions,
    creation time, per leaf ``path``/``shape``/``dtype``/``format``/``nbytes``/``sha256``,
    quantized leaves (``quantized``: path, fmt, logical shape and dtype, leaf indices),
    ``total_bytes`` and ``metadata``. Reads only the JSON sidecar (no arrays)."""
    root = _local_dir(directory)
    return _read_sidecar(root, _resolve_step(root, step))


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The ``metadata`` mapping saved with checkpoint ``step`` (default: the latest)."""
    return describe(directory, step)["metadata"]


def _expect(where: str, path: str, what: str, saved: Any, given: Any) -> CheckpointError:
    return CheckpointError(
        f"{where}: the target does not match the checkpoint at leaf {_show(path)}: "
        f"{what} was saved as {saved}, the target has {given}."
    )


def _check_target(where: str, saved: dict, target: PyTree) -> list[tuple[str, Any]]:
    """Compares the target's leaves with the saved description; returns the target leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(target)
    leaves = saved["leaves"]
    for index in range(max(len(flat), len(leaves))):
        if index >= len(flat):
            raise CheckpointError(
                f"{where}: the target does not match the checkpoint: it has {len(flat)} leaves, "
                f"the checkpoint {len(leaves)}; first missing leaf in the target: "
                f"{_show(leaves[index]['path'])}."
            )
        path = jax.tree_util.keystr(flat[index][0])
        if index >= len(leaves):
            raise CheckpointError(
                f"{where}: the target does not match the checkpoint: it has {len(flat)} leaves, "
                f"the checkpoint {len(leaves)}; first extra leaf in the target: {_show(path)}."
            )
        entry = leaves[index]
        if path != entry["path"]:
            raise CheckpointError(
                f"{where}: the target does not match the checkpoint: leaf #{index} is "
                f"{_show(entry['path'])} in the checkpoint but {_show(path)} in the target."
            )
        leaf = flat[index][1]
        try:
            shape, dtype_name, _, key_impl = _leaf_meta(leaf)
        except Exception:
            raise CheckpointError(
                f"{where}: target leaf {_show(path)} is {type(leaf).__name__}; expected a "
                "jax.ShapeDtypeStruct or an array."
            ) from None
        if list(shape) != entry["shape"]:
            raise _expect(where, path, "shape", tuple(entry["shape"]), shape)
        if dtype_name != entry["dtype"]:
            raise _expect(where, path, "dtype", entry["dtype"], dtype_name)
        if key_impl != entry.get("key_impl"):
            raise _expect(where, path, "PRNG key implementation", entry.get("key_impl"), key_impl)
    given_groups = {g["path"]: g for g in _quantized_groups(target)}
    saved_groups = {g["path"]: g for g in saved.get("quantized", [])}
    for path in sorted(set(given_groups) | set(saved_groups)):
        s, g = saved_groups.get(path), given_groups.get(path)
        if s is None or g is None:
            raise _expect(where, path, "quantization",
                          f"QuantizedArray(fmt={s['fmt']!r})" if s else "a plain array",
                          f"QuantizedArray(fmt={g['fmt']!r})" if g else "a plain array")
        for key in ("fmt", "shape", "dtype", "block_size", "nonneg"):
            if s.get(key) != g.get(key):
                raise _expect(where, path, f"quantized {key}", s.get(key), g.get(key))
    return flat


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _placement(leaf: Any, here: str) -> jax.sharding.Sharding | None:
    """The concrete sharding a target leaf asks for, or None.

    ``jax.eval_shape`` gives ``NamedSharding``s over an ``AbstractMesh``; they are laid out on
    the mesh set with ``jax.set_mesh`` if it has the same axes, else on
    ``jax.make_mesh`` over all devices when the sizes agree.
    """
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    mesh = sharding.mesh
    if isinstance(mesh, jax.sharding.Mesh):
        return sharding
    sizes, names = tuple(mesh.axis_sizes), tuple(mesh.axis_names)
    try:
        current = jax.sharding.get_mesh()
    except Exception:  # pragma: no cover - no context mesh API
        current = None
    if isinstance(current, jax.sharding.Mesh) and not current.empty and \
            tuple(current.axis_names) == names and tuple(current.axis_sizes) == sizes:
        return jax.sharding.NamedSharding(current, sharding.spec)
    if int(np.prod(sizes)) == len(jax.devices()):
        concrete = jax.make_mesh(sizes, names, axis_types=tuple(mesh.axis_types))
        return jax.sharding.NamedSharding(concrete, sharding.spec)
    raise CheckpointError(
        f"{here}: the target's sharding uses an abstract mesh {dict(zip(names, sizes))} "
        f"({int(np.prod(sizes))} devices) but {len(jax.devices())} devices are present; give "
        "the target NamedShardings over a concrete jax.sharding.Mesh."
    )


def _with_weak_type(x: jax.Array) -> jax.Array:
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError:  # pragma: no cover - private JAX API moved
        return x
    return _convert_element_type(x, weak_type=True)


def _restore_arrays(where: str, path: Path, saved: dict, abstract: dict) -> dict:
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


def restore(
    directory: str | os.PathLike,
    step: int | None = None,
    *,
    target: PyTree,
    verify: bool = True,
) -> PyTree:
    """Restores checkpoint ``step`` (default: the latest complete one) into ``target``'s layout.

    Args:
      directory: the checkpoint directory.
      step: the step to restore; ``None`` for :func:`latest_step`.
      target: a pytree with the structure of the saved state whose leaves are
        ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``) or arrays. A leaf's
        ``sharding``, if any, places the restored array (another mesh or device count
        reshards); leaves without one go to the first local device.
      verify: recompute every array's SHA-256 and compare it with the one recorded at save
        (default True; turning it off saves one host copy of the state).

    Returns:
      The saved state with ``target``'s tree structure: every leaf bit-identical to what was
      saved (dtype, weak type and PRNG key type included), with the target's shardings.

    Raises:
      CheckpointError: no such step; the sidecar is unreadable or from an unsupported format
        version; the target's paths, shapes, dtypes or quantization formats differ (naming the
        first differing leaf); an array file is damaged or truncated, or a checksum differs
        (naming the step and the leaf).
    """
    _join_pending()
    root = _local_dir(directory)
    step = _resolve_step(root, step)
    where = f"checkpoint {str(root)!r}, step {step}"
    saved = _read_sidecar(root, step)
    flat = _check_target(where, saved, target)
    treedef = jax.tree.structure(target)

    placements = [_placement(leaf, f"{where}, leaf {_show(entry['path'])}")
                  for (_, leaf), entry in zip(flat, saved["leaves"])]
    abstract: dict[str, jax.ShapeDtypeStruct] = {}
    for index, entry in enumerate(saved["leaves"]):
        if entry.get("empty"):
            continue
        sharding = placements[index]
        if sharding is None or "key_impl" in entry:
            sharding = _default_sharding()  # key data is placed after wrapping
        stored_shape = tuple(entry.get("stored_shape", entry["shape"]))
        stored_dtype = jnp.dtype(entry.get("stored_dtype", entry["dtype"]))
        abstract[f"leaf_{index:05d}"] = jax.ShapeDtypeStruct(stored_shape, stored_dtype,
                                                             sharding=sharding)
    restored = _restore_arrays(where, _step_dir(root, step) / _ARRAYS, saved, abstract) \
        if abstract else {}

    out = []
    for index, ((_, leaf), entry) in enumerate(zip(flat, saved["leaves"])):
        here = f"{where}, leaf {_show(entry['path'])}"
        stored_dtype = jnp.dtype(entry.get("stored_dtype", entry["dtype"]))
        if entry.get("empty"):
            x = jnp.zeros(tuple(entry.get("stored_shape", entry["shape"])), stored_dtype)
        else:
            x = restored.get(f"leaf_{index:05d}")
            if x is None:
                raise CheckpointError(f"{here}: the array store has no entry for this leaf.")
        if tuple(x.shape) != tuple(entry.get("stored_shape", entry["shape"])) or \
                x.dtype != stored_dtype:
            raise CheckpointError(
                f"{here}: read an array of shape {tuple(x.shape)} and dtype {x.dtype}; expected "
                f"{tuple(entry.get('stored_shape', entry['shape']))} and {stored_dtype}."
            )
        if verify:
            digest = _sha256(_host_copy(x, here))
            if digest != entry["sha256"]:
                raise CheckpointError(
                    f"{here}: checksum mismatch: saved sha256 {entry['sha256'][:16]}..., the "
                    f"stored data hashes to {digest[:16]}... (the checkpoint files are damaged)."
                )
        if entry.get("encoding") == "bits":
            x = _decode_bits(x, entry["dtype"])
        sharding = placements[index]
        if "key_impl" in entry:
            x = jax.random.wrap_key_data(x, impl=entry["key_impl"])
        if entry.get("empty") or "key_impl" in entry:
            x = jax.device_put(x, sharding if sharding is not None else _default_sharding())
        if entry.get("weak_type", False) and not x.weak_type:
            x = _with_weak_type(x)
        out.append(x)
    return jax.tree.unflatten(treedef, out)
