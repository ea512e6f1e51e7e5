"""Worker for ``test_multiprocess.py``: collective checkpoints under ``jax.distributed``.

One process per "host" (here: processes on 127.0.0.1, each with ``--local-devices`` emulated
CPU devices, gloo collectives):

    python tests/checkpoint/_multiprocess_worker.py --process-id I --num-processes 2 \\
        --coordinator 127.0.0.1:PORT --local-devices 4 --dir DIR --mode train|loop

* ``train``: ZeRO stage-1 sharded int8 AdamW with stochastic rounding over all devices; three
  steps, a synchronous save of step 3, two more steps and an asynchronous save of step 5.
  Process 0 writes ``DIR/expected.npz``: the bytes of every leaf at step 3 (``saved_<i>``) and
  at step 5 (``cont_<i>``), gathered.
* ``loop``: saves :func:`loop_state` (step) for steps 1, 2, ... (keep=3, ``--timeout``),
  printing ``committed N`` after each; on a :class:`CheckpointError` prints it on one line
  and exits with status 3 at once.

:func:`restore_and_continue` runs in a single process (any device count): it restores step 3
onto all its devices with stage-1 shardings and checks the bytes and the next two steps.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from tests import _distributed

SAVE_AT, STOP = 3, 5


def problem() -> tuple[dict[str, np.ndarray], Any]:
    """MLP parameters (two leaves big enough to be quantized) and the transform."""
    import optstate

    rng = np.random.default_rng(0)
    params = {"w1": (rng.standard_normal((64, 128)) / 8).astype(np.float32),
              "b1": np.zeros((128,), np.float32),
              "w2": (rng.standard_normal((128, 48)) / 11).astype(np.float32),
              "b2": np.zeros((48,), np.float32)}
    tx = optstate.quantize_state(optstate.adamw(1e-2, weight_decay=0.1), "int8",
                                 rounding="stochastic", seed=7)
    return params, tx


def batch(t: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + t)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    return x, np.sin(x[:, :48] * 2.0).astype(np.float32)


def _setup():
    """(mesh, param shardings, state shardings, replicated sharding, tx, params numpy, step)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import optstate
    from optstate import sharding

    params_np, tx = problem()
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    p_sh = sharding.param_shardings(params_np, mesh, stage=1)
    s_sh = sharding.state_shardings(tx, params_np, mesh, stage=1)
    rep = NamedSharding(mesh, PartitionSpec())

    def loss(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)

    # The gradient is computed replicated, in its own program (so that no sharding of the
    # state propagates into it): the same bits on any number of devices and processes.
    grad = jax.jit(jax.grad(loss), in_shardings=(rep, rep, rep), out_shardings=rep)

    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optstate.apply_updates(params, updates), state

    update = jax.jit(update, in_shardings=(p_sh, s_sh, rep), out_shardings=(p_sh, s_sh))

    def step(params, state, x, y):
        return update(params, state, grad(params, x, y))

    return mesh, p_sh, s_sh, rep, tx, params_np, step


def _global(x: np.ndarray, sh: Any):
    import jax

    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])


def run(params, state, start: int, stop: int, step, rep):
    for t in range(start, stop):
        x, y = batch(t)
        params, state = step(params, state, _global(x, rep), _global(y, rep))
    return params, state


def leaf_bytes(tree: Any) -> list[np.ndarray]:
    """Every leaf's bytes (keys as their key data), gathered from all processes."""
    import jax
    from jax.experimental import multihost_utils

    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        host = np.asarray(x)
        out.append(np.frombuffer(host.tobytes(), np.uint8).copy())
    return out


def train(directory: str) -> dict[str, np.ndarray]:
    import jax

    from optstate import checkpoint

    _, p_sh, s_sh, rep, tx, params_np, step = _setup()
    params = jax.tree.map(_global, params_np, p_sh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    params, state = run(params, state, 0, SAVE_AT, step, rep)
    saved = {"params": params, "opt": state}
    checkpoint.save(directory, SAVE_AT, saved, metadata={"step": SAVE_AT}, timeout=120)
    params, state = run(params, state, SAVE_AT, STOP, step, rep)
    cont = {"params": params, "opt": state}
    checkpoint.save(directory, STOP, cont, asynchronous=True, timeout=120)
    checkpoint.wait_until_finished(timeout=120)
    out = {f"saved_{i}": b for i, b in enumerate(leaf_bytes(saved))}
    out.update({f"cont_{i}": b for i, b in enumerate(leaf_bytes(cont))})
    return out


def restore_and_continue(directory: str) -> list[str]:
    """In one process: restores step 3 onto all local devices (stage 1), compares every leaf's
    bytes with the saved ones and, after two more steps, with the two-process run's. Returns
    the problems found (empty: all bit-identical)."""
    import jax

    from optstate import checkpoint

    _, p_sh, s_sh, rep, tx, params_np, step = _setup()
    abstract = jax.eval_shape(lambda: {"params": params_np, "opt": tx.init(params_np)})
    shardings = {"params": p_sh, "opt": s_sh}
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored = checkpoint.restore(directory, SAVE_AT, target=target)
    problems = []
    n = jax.device_count()
    for x in jax.tree.leaves(restored):
        sharded = x.ndim and x.shape[0] % n == 0 and x.sharding.spec and x.sharding.spec[0]
        if sharded and {s.data.shape[0] for s in x.addressable_shards} != {x.shape[0] // n}:
            problems.append(f"leaf of shape {x.shape} is not sharded over {n} devices")
    with np.load(os.path.join(directory, "expected.npz")) as expected:
        for i, got in enumerate(leaf_bytes(restored)):
            if not np.array_equal(got, expected[f"saved_{i}"]):
                problems.append(f"restored leaf {i} differs from the saved one")
        params, state = run(restored["params"], restored["opt"], SAVE_AT, STOP, step, rep)
        for i, got in enumerate(leaf_bytes({"params": params, "opt": state})):
            if not np.array_equal(got, expected[f"cont_{i}"]):
                problems.append(f"after two more steps, leaf {i} differs from the 2-process run")
    return problems


def loop_state(step: int, mesh: Any) -> dict[str, Any]:
    """The deterministic state saved as ``step`` by ``--mode loop``, sharded over ``mesh``."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    rng = np.random.default_rng(step)
    data = NamedSharding(mesh, PartitionSpec("data"))
    rep = NamedSharding(mesh, PartitionSpec())
    w = rng.standard_normal((512, 256), dtype=np.float32)
    nu = rng.random((512, 256), dtype=np.float32).astype(jnp.bfloat16)
    return {"w": _global(w, data), "nu": _global(np.asarray(nu), data),
            "count": _global(np.asarray(step, np.int32), rep)}


def loop(directory: str, timeout: float) -> int:
    import jax

    from optstate import checkpoint

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    step = 1
    while True:
        try:
            checkpoint.save(directory, step, loop_state(step, mesh), keep=3, timeout=timeout)
        except checkpoint.CheckpointError as e:
            print(f"{time.monotonic():.3f} CheckpointError: " + " ".join(str(e).split()),
                  flush=True)
            os._exit(3)  # the job cannot go on; no shutdown (it would wait for the peer)
        print(f"{time.monotonic():.3f} committed {step}", flush=True)
        step += 1


def main(argv: list[str] | None = None) -> int:
    parser = _distributed.worker_parser(__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--mode", choices=("train", "loop"), required=True)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)

    jax = _distributed.join(args)
    if args.mode == "loop":
        return loop(args.dir, args.timeout)
    try:
        result = train(args.dir)
        if args.process_id == 0:
            np.savez(os.path.join(args.dir, "expected.npz"), **result)
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
