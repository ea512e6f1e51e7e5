"""Worker for ``test_compensated.py``: ZeRO-3 steps of bf16 parameters with ``compensated_params``
under ``jax.distributed`` (processes on 127.0.0.1, gloo). The same :func:`train` run in one
process over 8 devices gives the reference.

    python tests/wrappers/_compensated_worker.py --process-id I --num-processes 2 \\
        --coordinator 127.0.0.1:PORT --local-devices 4 --out result.npz
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

from tests import _distributed

STEPS = 3


def make_problem(seed: int = 0) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, ...]]]:
    """A bf16 linear layer (one leaf large enough for int8 moments) and its batches."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    params = {"w": (rng.standard_normal((64, 128)) / 8).astype(ml_dtypes.bfloat16),
              "b": np.zeros((128,), ml_dtypes.bfloat16)}
    batches = []
    for _ in range(STEPS):
        x = rng.standard_normal((32, 64)).astype(np.float32)
        batches.append((x, np.sin(x @ rng.standard_normal((64, 128)).astype(np.float32) / 8)))
    return params, batches


def loss_fn(params: Any, batch: Any) -> Any:
    import jax.numpy as jnp

    x, y = batch
    out = x @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)
    return jnp.mean((out - y) ** 2)


def train() -> dict[str, np.ndarray]:
    """``STEPS`` ZeRO-3 steps of ``compensated_params(quantize_state(adamw, "int8"), "int8")``
    over every device of every process; gradients summed in device order (the same numbers
    added the same way in both topologies). Returns the final parameters and residual,
    gathered to every process as float32 NumPy arrays."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    import optstate
    from optstate import sharding

    params_np, batches = make_problem()
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    n = mesh.shape["data"]
    tx = optstate.compensated_params(
        optstate.quantize_state(optstate.adamw(1e-3, weight_decay=0.1), "int8"), "int8")
    p_sh = sharding.param_shardings(params_np, mesh, stage=3)
    s_sh = sharding.state_shardings(tx, params_np, mesh, stage=3)
    batch_sh = NamedSharding(mesh, PartitionSpec("data"))

    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(PartitionSpec(), PartitionSpec("data")),
                       out_specs=PartitionSpec())
    def grads(params: Any, batch: Any) -> Any:
        local = jax.grad(loss_fn)(jax.lax.pcast(params, "data", to="varying"), batch)
        stacked = jax.lax.all_gather(local, "data", to="invarying")
        return jax.tree.map(lambda g: (jnp.sum(g.astype(jnp.float32), axis=0) / n), stacked)

    def global_array(x: np.ndarray, sh: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

    params = jax.tree.map(global_array, params_np, p_sh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)

    def step(params: Any, state: Any, batch: Any) -> Any:
        updates, state = tx.update(grads(params, batch), state, params)
        return optstate.apply_updates(params, updates), state

    step = jax.jit(step, in_shardings=(p_sh, s_sh, (batch_sh, batch_sh)),
                   out_shardings=(p_sh, s_sh), donate_argnums=(0, 1))
    for x, y in batches:
        params, state = step(params, state, (global_array(x, batch_sh),
                                             global_array(y, batch_sh)))
    out = {"w": params["w"], "b": params["b"], "residual_w": state.residual["w"]}
    gathered = multihost_utils.process_allgather(out, tiled=True)
    return {k: np.asarray(v).astype(np.float32) for k, v in gathered.items()}


def main(argv: list[str] | None = None) -> int:
    parser = _distributed.worker_parser(__doc__)
    parser.add_argument("--out", required=True, help=".npz, one per process (suffix .pN)")
    args = parser.parse_args(argv)

    jax = _distributed.join(args)
    try:
        result = train()
        np.savez(args.out.replace(".npz", f".p{args.process_id}.npz"), **result)
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
