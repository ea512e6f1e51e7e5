"""Worker for tests/checkpoint/test_crash.py: saves checkpoints in a loop until killed.

Usage: python _crash_worker.py DIR MODE, MODE one of

* ``sync``: save steps 1, 2, ... (keep=3), printing ``committed N`` after each save returns;
* ``async``: the same with asynchronous saves; ``committed N`` is printed once the save of
  step N + 1 has started (which waits for step N to be committed);
* ``hang``: save steps 1 and 2, then for step 3 stop right before Orbax's atomic rename (arrays
  and sidecar written in the temporary directory), print ``about to commit 3`` and sleep until
  killed.

The state of step N is :func:`make_state` (N), so the parent can check restored values.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def make_state(step: int):
    """A deterministic ~1.5 MB state for ``step`` (parameters, moments, count, PRNG key)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(step)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal((256, 512), dtype=np.float32)),
                   "b": jnp.asarray(rng.standard_normal((512,), dtype=np.float32))},
        "opt": {"mu": jnp.asarray(rng.standard_normal((256, 512), dtype=np.float32)),
                "nu": jnp.asarray(rng.random((256, 512), dtype=np.float32)).astype(jnp.bfloat16),
                "count": jnp.asarray(step, jnp.int32)},
        "key": jax.random.fold_in(jax.random.key(0), step),
    }


def main(directory: str, mode: str) -> None:
    from optstate import checkpoint

    if mode == "hang":
        from orbax.checkpoint._src.path import atomicity

        real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *args, **kwargs):
            if self.get_final().name == "step_3":
                print("about to commit 3", flush=True)
                time.sleep(3600)
            return await real_finalize(self, *args, **kwargs)

        # Orbax's commit: the rename of the temporary directory into place
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    step = 1
    while True:
        checkpoint.save(directory, step, make_state(step), keep=None if mode == "hang" else 3,
                        asynchronous=(mode == "async"), metadata={"step": step})
        if mode == "async":
            if step > 1:
                print(f"committed {step - 1}", flush=True)
        else:
            print(f"committed {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
