"""The sidecar: what a checkpoint holds, described in JSON next to its arrays.

It is the ``optstate`` item of each Orbax checkpoint (``step_<N>/optstate/metadata``), written
by the primary host. It records the versions that wrote it (optstate, JAX and
:data:`FORMAT_VERSION`), the tree (per leaf path: shape, dtype, storage encoding, byte count and
the sharding-independent checksum of :mod:`~optstate.checkpoint.integrity`), the quantized
leaves, and the user's metadata. It is sealed with a SHA-256 of its own canonical JSON, so an
edited or damaged description is refused rather than trusted. Reading it checks format, seal, version and
schema, and brings an older format version up to date through ``_MIGRATIONS``. Only JSON is
parsed here: restoring a checkpoint never unpickles anything.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from optstate._core.types import PyTree
from optstate._core.version import __version__
from optstate.checkpoint.errors import CheckpointError, _summary
from optstate.checkpoint.files import _SIDECAR, _local_dir, _resolve_step, _step_dir
from optstate.checkpoint.integrity import ALGORITHM

#: Version of the on-disk layout and sidecar schema written by this module. Restoring a
#: checkpoint with an older version goes through the migrations in ``_MIGRATIONS``; a newer
#: version, or an older one without a migration path, raises :class:`CheckpointError`.
FORMAT_VERSION = 2

_FORMAT_NAME = "optstate.checkpoint"

# Migrations of the sidecar (and, through it, of how arrays are read): _MIGRATIONS[v] takes a
# sidecar of format version v and returns one of version v + 1.
_MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


# -------------------------------------------------------------------------------------------
# Writing
# -------------------------------------------------------------------------------------------


def _canonical(sidecar: dict) -> bytes:
    body = {k: v for k, v in sidecar.items() if k != "sidecar_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _seal(sidecar: dict) -> dict:
    """Returns ``sidecar`` with ``sidecar_sha256``: the SHA-256 of its canonical JSON (all other
    fields), so that any change to the description or the metadata is detected."""
    return dict(sidecar, sidecar_sha256=hashlib.sha256(_canonical(sidecar)).hexdigest())


def _build_sidecar(step: int, state: PyTree, leaves: list[dict], groups: list[dict],
                   metadata: dict[str, Any]) -> dict[str, Any]:
    """The (unsealed) sidecar of a save of ``state`` as ``step``, from its leaf descriptions,
    quantized groups and JSON-clean metadata."""
    return {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "optstate_version": __version__,
        "jax_version": jax.__version__,
        "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checksum": ALGORITHM,
        "treedef": str(jax.tree.structure(state)),
        "leaves": leaves,
        "quantized": groups,
        "total_bytes": int(sum(entry["nbytes"] for entry in leaves)),
        "metadata": metadata,
    }


# -------------------------------------------------------------------------------------------
# Reading
# -------------------------------------------------------------------------------------------


def _read_sidecar(directory: Path, step: int) -> dict:
    """The sidecar of ``step``, checked (format, seal, version, step, schema) and migrated to
    :data:`FORMAT_VERSION`."""
    where = f"checkpoint {str(directory)!r}, step {step}"
    path = _step_dir(directory, step) / _SIDECAR
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
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
              and isinstance(entry.get("dtype"), str) and isinstance(entry.get("checksum"), str)
              and isinstance(entry.get("nbytes"), int))
        if not ok:
            raise CheckpointError(f"{where}: {_SIDECAR} describes leaf #{index} incompletely "
                                  f"(expected path, shape, dtype, nbytes, checksum): {entry!r}.")
    if not isinstance(sidecar.get("quantized", []), list) or \
            not isinstance(sidecar.get("metadata", {}), dict):
        raise CheckpointError(f"{where}: {_SIDECAR} has malformed quantized/metadata entries.")


def describe(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The description of checkpoint ``step`` (default: the latest) as saved: versions,
    creation time, per leaf ``path``/``shape``/``dtype``/``format``/``nbytes``/``checksum``,
    quantized leaves (``quantized``: path, fmt, logical shape and dtype, leaf indices),
    ``total_bytes`` and ``metadata``. Reads only the JSON sidecar (no arrays)."""
    root = _local_dir(directory)
    return _read_sidecar(root, _resolve_step(root, step))


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The ``metadata`` mapping saved with checkpoint ``step`` (default: the latest)."""
    return describe(directory, step)["metadata"]
