"""Restoring: :func:`restore` a checkpoint into the layout of an abstract target.

The target's tree (paths, shapes, dtypes, PRNG key types, quantization formats) is first
compared with the sidecar's description (:func:`_check_target`). Each leaf's sharding is then
made concrete (:func:`_placement`: an abstract mesh from ``jax.eval_shape`` is laid out on the
current or a new mesh), Orbax reads only the slices each device needs, every array's checksum is
recomputed on its devices and compared with the sidecar's, and each is turned back into the
saved dtype, key type and weak type. :func:`verify` does the same for a whole checkpoint on
one device, for ``optstate inspect --verify``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.types import PyTree
from optstate.checkpoint._orbax import (
    _bounded,
    _peer_hint,
    _reader,
    _restore_arrays,
    _timeout,
)
from optstate.checkpoint.encoding import (
    _decode_bits,
    _leaf_meta,
    _quantized_groups,
    _with_weak_type,
)
from optstate.checkpoint.errors import CheckpointError, _show, _summary
from optstate.checkpoint.files import _local_dir, _os_error, _resolve_step
from optstate.checkpoint.integrity import checksums
from optstate.checkpoint.saving import wait_until_finished
from optstate.checkpoint.sidecar import _read_sidecar


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


def _stored_struct(entry: dict, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(entry.get("stored_shape", entry["shape"])),
                                jnp.dtype(entry.get("stored_dtype", entry["dtype"])),
                                sharding=sharding)


def _empty(struct: jax.ShapeDtypeStruct) -> jax.Array:
    make = jax.jit(lambda: jnp.zeros(struct.shape, struct.dtype), out_shardings=struct.sharding)
    return make()


def _read_checked(root, step: int, where: str, saved: dict, shardings: list, verify: bool,
                  bound: float) -> list[jax.Array]:
    """The stored arrays of every leaf (empty ones made up), laid out with ``shardings``,
    checked against their recorded shapes, dtypes and (if ``verify``) checksums. Collective."""
    entries = saved["leaves"]
    structs = [_stored_struct(e, s) for e, s in zip(entries, shardings)]
    abstract = {f"leaf_{i:05d}": st for i, (e, st) in enumerate(zip(entries, structs))
                if not e.get("empty")}

    def collective() -> list[jax.Array]:
        restored = {}
        if abstract:
            restored = _restore_arrays(_reader(root, bound), step, where, saved, abstract)
        out = []
        for index, (entry, struct) in enumerate(zip(entries, structs)):
            here = f"{where}, leaf {_show(entry['path'])}"
            x = _empty(struct) if entry.get("empty") else restored.get(f"leaf_{index:05d}")
            if x is None:
                raise CheckpointError(f"{here}: the array store has no entry for this leaf.")
            if tuple(x.shape) != struct.shape or x.dtype != struct.dtype:
                raise CheckpointError(
                    f"{here}: read an array of shape {tuple(x.shape)} and dtype {x.dtype}; "
                    f"expected {struct.shape} and {struct.dtype}.")
            out.append(x)
        if verify:
            for entry, x, digest in zip(entries, out, checksums(out)):
                if digest != entry["checksum"]:
                    raise CheckpointError(
                        f"{where}, leaf {_show(entry['path'])}: checksum mismatch: saved "
                        f"{entry['checksum']}, the stored data gives {digest} (the checkpoint "
                        "files are damaged).")
        return out

    try:
        return _bounded(collective, bound, where, "the restore")
    except CheckpointError:
        raise
    except OSError as e:
        raise _os_error(f"{where}: reading failed", e) from None
    except Exception as e:
        raise CheckpointError(f"{where}: reading failed ({_summary(e)}).{_peer_hint()}") \
            from None


def restore(
    directory: str | os.PathLike,
    step: int | None = None,
    *,
    target: PyTree,
    verify: bool = True,
    timeout: float | None = None,
) -> PyTree:
    """Restores checkpoint ``step`` (default: the latest complete one) into ``target``'s layout.

    Collective: in a multi-process run every process calls it with the same target (leaves
    with shardings over the global mesh); each process reads only the slices its devices need.

    Args:
      directory: the checkpoint directory.
      step: the step to restore; ``None`` for :func:`latest_step`.
      target: a pytree with the structure of the saved state whose leaves are
        ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``) or arrays. A leaf's
        ``sharding``, if any, places the restored array (another mesh or device count
        reshards); leaves without one go to the first local device.
      verify: recompute every array's checksum on its devices and compare it with the one
        recorded at save (default True).
      timeout: in a multi-process run, the bound in seconds on the collective restore
        (default ``$OPTSTATE_CHECKPOINT_TIMEOUT`` or 60).

    Example:
      >>> import tempfile
      >>> import jax, jax.numpy as jnp
      >>> import optstate
      >>> tx = optstate.quantize_state(optstate.adamw(1e-3), "int8")
      >>> params = {"w": jnp.ones((64, 128))}
      >>> state = tx.init(params)
      >>> directory = tempfile.mkdtemp()
      >>> _ = optstate.checkpoint.save(directory, 1, state)
      >>> target = jax.eval_shape(tx.init, params)  # shapes, dtypes (and shardings) only
      >>> restored = optstate.checkpoint.restore(directory, target=target)
      >>> jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), restored, state))
      True

    Returns:
      The saved state with ``target``'s tree structure: every leaf bit-identical to what was
      saved (dtype, weak type and PRNG key type included), with the target's shardings.

    Raises:
      CheckpointError: no such step; the sidecar is unreadable or from an unsupported format
        version; the target's paths, shapes, dtypes or quantization formats differ (naming the
        first differing leaf); an array file is damaged or truncated, or a checksum differs
        (naming the step and the leaf); a peer process did not answer in time; a weakly typed
        leaf cannot be made weakly typed on this JAX version (naming the leaf).
    """
    bound = _timeout(timeout)
    wait_until_finished(timeout=bound)
    root = _local_dir(directory)
    step = _resolve_step(root, step)
    where = f"checkpoint {str(root)!r}, step {step}"
    saved = _read_sidecar(root, step)
    flat = _check_target(where, saved, target)
    treedef = jax.tree.structure(target)

    shardings = []
    for (_, leaf), entry in zip(flat, saved["leaves"]):
        sharding = _placement(leaf, f"{where}, leaf {_show(entry['path'])}")
        shardings.append(sharding if sharding is not None else _default_sharding())
    stored = _read_checked(root, step, where, saved, shardings, verify, bound)

    out = []
    for x, entry in zip(stored, saved["leaves"]):
        if entry.get("encoding") == "bits":
            x = _decode_bits(x, entry["dtype"])
        if "key_impl" in entry:
            x = jax.random.wrap_key_data(x, impl=entry["key_impl"])
        if entry.get("weak_type", False) and not x.weak_type:
            x = _with_weak_type(x, f"{where}, leaf {_show(entry['path'])}")
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def verify(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Reads every array of checkpoint ``step`` (default: the latest) onto this process's
    first device and compares its checksum with the sidecar's. One process only (an offline
    check, e.g. ``optstate inspect DIR --verify``); needs the memory of the whole state.

    Returns:
      The checkpoint's description (as :func:`describe`), once every leaf checks out.

    Raises:
      CheckpointError: the sidecar or an array cannot be read, or a checksum differs (naming
        the step and the leaf).
    """
    root = _local_dir(directory)
    step = _resolve_step(root, step)
    saved = _read_sidecar(root, step)
    where = f"checkpoint {str(root)!r}, step {step}"
    shardings = [_default_sharding()] * len(saved["leaves"])
    _read_checked(root, step, where, saved, shardings, True, _timeout(None))
    return saved
