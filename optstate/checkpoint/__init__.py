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
* **Versioning.** A sidecar of an older format version is migrated (``sidecar._MIGRATIONS``) or
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

# The package, one concern per module (each imports only those above it, _core, and the
# quantized-array type; Orbax is imported on first use, not by ``import optstate.checkpoint``):
#   errors     CheckpointError and how messages name leaves and underlying errors
#   files      directory layout, step listing, temporary directories, fsync, pruning
#   sidecar    the JSON description: schema, FORMAT_VERSION, migrations, seal; describe
#   encoding   per-leaf description and storage: dtypes, bit encoding, PRNG keys, weak
#              types, quantized groups, checksums
#   _orbax     the lazily imported Orbax checkpointer and the quieting of its logs
#   saving     save (synchronous or in the background) and wait_until_finished
#   restoring  restore into an abstract target, resharding as asked

from __future__ import annotations

from optstate.checkpoint.errors import CheckpointError
from optstate.checkpoint.files import all_steps, incomplete_saves, latest_step
from optstate.checkpoint.restoring import restore
from optstate.checkpoint.saving import save, wait_until_finished
from optstate.checkpoint.sidecar import FORMAT_VERSION, describe, read_metadata

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
