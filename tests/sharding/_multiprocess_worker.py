"""Worker for ``test_sharding_multiprocess.py``: ZeRO-sharded AdamW steps under ``jax.distributed``.

Run as a script, one process per host (here: several processes on 127.0.0.1, each with
``--local-devices`` emulated CPU devices, talking through gloo). The same :func:`train` runs
in a single process over all its local devices to give the reference.

    python tests/_multiprocess_worker.py --process-id I --num-processes 2 \\
        --coordinator 127.0.0.1:PORT --local-devices 4 --out result.npz
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from tests import _distributed

STEPS = 5
STAGES = (1, 3)
RUNS = (("fp32", "all-reduce"), ("int8", "fixed-order"))
"""(state format, gradient reduction) of the runs compared between the topologies."""


def make_problem(seed: int = 0) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Parameters of a 2-layer MLP (big enough leaves for quantized state) and the batches."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": (rng.standard_normal((64, 128)) / 8).astype(np.float32),
        "b1": np.zeros((128,), np.float32),
        "w2": (rng.standard_normal((128, 48)) / 11).astype(np.float32),
        "b2": np.zeros((48,), np.float32),
    }
    batches = []
    for _ in range(STEPS):
        x = rng.standard_normal((32, 64)).astype(np.float32)
        batches.append((x, np.sin(x[:, :48] * 2.0).astype(np.float32)))
    return params, batches


def loss_fn(params: Any, batch: Any) -> Any:
    import jax.numpy as jnp

    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def make_tx(fmt: str) -> Any:
    """AdamW with its state stored in ``fmt`` (``"fp32"``: plain Optax-equal AdamW)."""
    import optstate

    tx = optstate.adamw(1e-2, weight_decay=0.1)
    if fmt == "fp32":
        return tx
    return optstate.quantize_state(tx, fmt)


def fixed_order_grads(mesh: Any) -> Any:
    """``grads(params, batch)``: the data-parallel mean gradient, summed in a fixed order.

    Each device differentiates the loss of its batch shard; the per-device gradients are
    all-gathered (exact) and added in device order on every device. The default all-reduce
    adds them in an order that depends on the topology (in-process CPU collectives vs gloo
    between processes), and int8 state turns such a last-bit difference into a different
    code now and then; with a fixed order both topologies add the same numbers the same way.
    """
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    n = mesh.shape["data"]

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data")),
                       out_specs=PartitionSpec())
    def grads(params: Any, batch: Any) -> Any:
        local = jax.grad(loss_fn)(jax.lax.pcast(params, "data", to="varying"), batch)
        stacked = jax.lax.all_gather(local, "data", to="invarying")
        return jax.tree.map(lambda g: jnp.sum(g, axis=0) / n, stacked)

    return grads


def train(fmt: str, stage: int, reduction: str = "all-reduce"
          ) -> tuple[dict[str, np.ndarray], int, int]:
    """Five ZeRO-``stage`` AdamW steps over all devices of all processes (mesh axis "data").

    ``reduction``: ``"all-reduce"`` (XLA's, from the sharded batch) or ``"fixed-order"``
    (:func:`fixed_order_grads`). Returns the final parameters (gathered to every process, as
    NumPy), the state bytes on this process's first device, and the bytes of the whole state.
    """
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    import optstate
    from optstate import sharding

    params_np, batches = make_problem()
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    tx = make_tx(fmt)
    p_sh = sharding.param_shardings(params_np, mesh, stage=stage)
    s_sh = sharding.state_shardings(tx, params_np, mesh, stage=stage)
    g_sh = sharding.grad_shardings(params_np, mesh, stage=stage)
    batch_sh = NamedSharding(mesh, PartitionSpec("data"))
    grad_fn = fixed_order_grads(mesh) if reduction == "fixed-order" else jax.grad(loss_fn)

    def global_array(x: np.ndarray, sh: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

    params = jax.tree.map(global_array, params_np, p_sh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)

    def step(params: Any, state: Any, batch: Any) -> Any:
        grads = sharding.reduce_scatter_gradients(grad_fn(params, batch), g_sh)
        updates, state = tx.update(grads, state, params)
        return optstate.apply_updates(params, updates), state

    step = jax.jit(step, in_shardings=(p_sh, s_sh, (batch_sh, batch_sh)),
                   out_shardings=(p_sh, s_sh), donate_argnums=(0, 1))
    for x, y in batches:
        batch = (global_array(x, batch_sh), global_array(y, batch_sh))
        params, state = step(params, state, batch)
    local_state_bytes = sharding.bytes_on_device(state, jax.local_devices()[0])
    global_state_bytes = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize
                             for leaf in jax.tree.leaves(state))
    gathered = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(np.asarray, gathered), local_state_bytes, global_state_bytes


def run_all() -> dict[str, np.ndarray]:
    """:func:`train` for every run in :data:`RUNS` and stage in :data:`STAGES`, flattened into
    one dict of arrays keyed ``"{fmt}/stage{stage}/{name}"``."""
    out: dict[str, np.ndarray] = {}
    for fmt, reduction in RUNS:
        for stage in STAGES:
            params, local_bytes, global_bytes = train(fmt, stage, reduction)
            prefix = f"{fmt}/stage{stage}"
            for name, value in params.items():
                out[f"{prefix}/{name}"] = value
            out[f"{prefix}/state_bytes_device0"] = np.asarray(local_bytes)
            out[f"{prefix}/state_bytes_total"] = np.asarray(global_bytes)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = _distributed.worker_parser(__doc__)
    parser.add_argument("--out", required=True, help=".npz written by process 0")
    args = parser.parse_args(argv)

    jax = _distributed.join(args)
    try:
        expected = args.num_processes * args.local_devices
        if jax.device_count() != expected or jax.local_device_count() != args.local_devices:
            print(f"worker {args.process_id}: expected {expected} devices "
                  f"({args.local_devices} local); got {jax.device_count()} "
                  f"({jax.local_device_count()} local)", file=sys.stderr)
            return 2
        result = run_all()
        if args.process_id == 0:
            np.savez(args.out, **result)
        else:
            np.savez(args.out.replace(".npz", f".p{args.process_id}.npz"), **result)
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
