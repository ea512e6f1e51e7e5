"""Save on 8 emulated devices with stage-1 shardings, restore on 4 in another process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import optstate
from optstate import checkpoint

from tests.checkpoint._reshard_worker import abstract_state, example, stage1

WORKER = Path(__file__).parent / "_reshard_worker.py"


def test_save_on_8_devices_restore_on_4_in_another_process(tmp_path):
    assert jax.device_count() == 8
    mesh8 = jax.make_mesh((8,), ("data",))
    params, tx = example()
    abstract = abstract_state()
    shardings = stage1(abstract, mesh8)
    state = jax.device_put({"params": params, "opt": tx.init(params)}, shardings)

    @jax.jit  # the step keeps stage-1 shardings (from its inputs, as users run it)
    def step(state, t):
        grads = jax.tree.map(lambda p: jnp.sin(p * (t + 1.0)), state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optstate.apply_updates(state["params"], updates), "opt": opt}

    for t in range(3):
        state = step(state, jnp.float32(t))
    # the state really is stage-1 sharded over 8 devices
    sharded = [x for x in jax.tree.leaves(state) if x.ndim and x.shape[0] % 8 == 0]
    assert sharded and all(len(x.addressable_shards) == 8 and
                           x.addressable_shards[0].data.shape[0] == x.shape[0] // 8
                           for x in sharded)

    checkpoint.save(tmp_path, 1, state)
    np.savez(tmp_path / "expected.npz",
             **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "4"], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), (
        result.stdout + result.stderr[-3000:])

    # and back: what the 4-device process saved restores onto the 8-device layout, equal
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    back = checkpoint.restore(tmp_path, 2, target=target)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        assert got.dtype == want.dtype and np.asarray(got).tobytes() == np.asarray(want).tobytes()
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    # the restored state trains on exactly as the original does
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(step(back, jnp.float32(3))),
                   jax.tree.leaves(step(state, jnp.float32(3)))))
