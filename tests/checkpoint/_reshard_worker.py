"""Worker for tests/test_checkpoint_reshard.py, run with a different number of CPU devices.

Usage: python _reshard_worker.py DIR N_DEVICES (XLA_FLAGS must already force
N_DEVICES host devices). Restores step 1 of DIR (saved on 8 devices with stage-1 shardings)
onto an N-device "data" mesh with stage-1 shardings, checks every value against DIR/expected.npz
and the placement, then saves the restored state as step 2 from the N devices. Prints ``OK``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def example():
    """The parameters and the transform (Adam with an injected learning rate) of the test."""
    import optstate

    params = {"w": jnp.linspace(-1, 1, 16 * 6, dtype=jnp.float32).reshape(16, 6),
              "b": jnp.linspace(0, 1, 8, dtype=jnp.float32),
              "odd": jnp.linspace(2, 3, 5, dtype=jnp.float32)}
    tx = optstate.inject_hyperparams(optstate.adam)(learning_rate=1e-2)
    return params, tx


def stage1(tree, mesh):
    """ZeRO stage 1: a leaf's first dimension is sharded over "data" when it divides evenly;
    everything else (scalars, odd sizes) is replicated."""
    n = mesh.shape["data"]
    return jax.tree.map(lambda x: NamedSharding(
        mesh, P("data") if len(x.shape) and x.shape[0] % n == 0 else P()), tree)


def abstract_state():
    params, tx = example()
    return jax.eval_shape(lambda: {"params": params, "opt": tx.init(params)})


def main(directory: str, n_devices: int) -> int:
    from optstate import checkpoint

    assert jax.device_count() == n_devices, jax.device_count()
    mesh = jax.make_mesh((n_devices,), ("data",))
    abstract = abstract_state()
    shardings = stage1(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored = checkpoint.restore(directory, 1, target=target)

    with np.load(Path(directory) / "expected.npz", allow_pickle=False) as expected:
        paths = [jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(restored)[0]]
        for i, (path, x) in enumerate(zip(paths, jax.tree.leaves(restored))):
            want = expected[f"leaf_{i}"]
            got = np.asarray(x)
            if got.dtype != want.dtype or got.tobytes() != want.tobytes():
                print(f"value mismatch at {path}: {got} != {want}", flush=True)
                return 1
            sharding = x.sharding
            if not (isinstance(sharding, NamedSharding) and sharding.mesh == mesh):
                print(f"{path}: restored onto {sharding}, expected the {n_devices}-device mesh")
                return 1
            if x.ndim and x.shape[0] % n_devices == 0:
                rows = {s.data.shape[0] for s in x.addressable_shards}
                if rows != {x.shape[0] // n_devices} or len(x.addressable_shards) != n_devices:
                    print(f"{path}: shards of {rows} rows, expected {x.shape[0] // n_devices}")
                    return 1
    checkpoint.save(directory, 2, restored)
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
