"""Checkpoints of optimizer state: exact resume, versioned, crash-safe, reshardable.

A checkpoint stores any pytree of arrays (typically ``{"params": ..., "opt": ...}``), sharded or
not, with Orbax. Restoring it with an abstract ``target`` (``jax.ShapeDtypeStruct`` leaves, as
from ``jax.eval_shape``, optionally carrying shardings) gives back, bit for bit, the arrays that
were saved, laid out with the target's shardings — on the same devices or on another mesh or
device count (Orbax reads only the slices each device needs).

It runs on Orbax's ``CheckpointManager`` (one per directory), on one process or on every
process of a ``jax.distributed`` job: :func:`save` and :func:`restore` are *collective* there
(every process calls them with the same arguments); each process writes and reads only its
own shards, and the primary host writes the sidecar. On disk, ``directory/step_<N>/`` holds:

* ``state/`` — Orbax's (OCDBT) array store, one entry per stored array;
* ``optstate/metadata`` — the sidecar (JSON): the optstate version, the state-format version
  (:data:`FORMAT_VERSION`), the tree description (per leaf path: shape, dtype, and for
  quantized leaves their format), a checksum of every array, and the user's metadata.

Guarantees:

* **Crash safety.** Orbax writes a step into ``step_<N>.orbax-checkpoint-tmp-*`` and renames
  it into place once every process has written; only committed ``step_<N>`` directories count
  (for any observer, too), so a process killed at any moment leaves earlier checkpoints
  intact and the half-written one invisible. In a multi-process run, a process whose peer
  died raises :class:`CheckpointError` within a bounded time (``timeout=``,
  ``$OPTSTATE_CHECKPOINT_TIMEOUT``, default 60 s) instead of waiting at a barrier.
* **Integrity without gathering.** At save, a checksum of each global array is computed on its
  devices, independent of its sharding (:mod:`~optstate.checkpoint.integrity`); restore
  recomputes it on the restored arrays, and the sidecar carries a checksum of its own. The
  target's tree (paths, shapes, dtypes, PRNG key types, quantization formats) is compared
  with the saved one. Any difference raises :class:`CheckpointError` naming the step and leaf.
* **Versioning.** A sidecar of an older format version is migrated (``sidecar._MIGRATIONS``) or
  refused with a message saying which optstate wrote it; a newer one asks for an upgrade.
* **No code execution on load.** The sidecar is JSON and the arrays are raw tensor data: nothing
  is unpickled.
* **Nothing is overwritten or lost.** Saving to an existing step, or below the latest step of
  the directory, raises; ``keep=`` removes only older steps, after the new one is committed.
* What Orbax does not store natively is kept exactly: dtypes it refuses (``uint4``,
  ``float8_e4m3``...) as raw bits, empty leaves, weak types, typed PRNG keys.

Usage::

    from optstate import checkpoint

    checkpoint.save(ckpt_dir, step, {"params": params, "opt": opt_state}, keep=3)
    target = jax.eval_shape(lambda: {"params": params, "opt": opt_state})  # or with shardings
    state = checkpoint.restore(ckpt_dir, target=target)  # latest complete step

Limits: directories must be on a local or POSIX-mounted filesystem (no ``gs://``).
"""

# The package, one concern per module (each imports only those above it, _core, and the
# quantized-array type; Orbax is imported on first use, not by ``import optstate.checkpoint``):
#   errors     CheckpointError and how messages name leaves and underlying errors
#   files      directory layout, step listing, OS errors as CheckpointError
#   integrity  sharding-independent checksums computed on the devices
#   sidecar    the JSON description: schema, FORMAT_VERSION, migrations, seal; describe
#   encoding   per-leaf description and storage: dtypes, bit encoding, PRNG keys, weak
#              types, quantized groups
#   _orbax     the lazily imported Orbax, one CheckpointManager per directory, time bounds
#   saving     save (synchronous or asynchronous) and wait_until_finished
#   restoring  restore into an abstract target, resharding as asked; verify

from __future__ import annotations

from optstate.checkpoint.errors import CheckpointError
from optstate.checkpoint.files import all_steps, incomplete_saves, latest_step
from optstate.checkpoint.restoring import restore, verify
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
    "verify",
    "wait_until_finished",
]
