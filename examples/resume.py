"""Train, kill, resume: a run restored from its checkpoint continues bit for bit.

1. Trains a small MLP regression for ``--steps`` steps without interruption: the reference.
2. Starts the same training in a child process that checkpoints every ``--save-every`` steps
   with ``optstate.checkpoint`` (asynchronous saves, ``keep=2``) and SIGKILLs it once it has
   passed step ``--kill-after`` — possibly in the middle of a save.
3. Restores the latest complete checkpoint in this process and trains on to the end.
4. Prints the loss trajectories side by side and checks that the resumed run's losses, final
   parameters and optimizer state (moments stored in ``--format`` with stochastic rounding,
   whose PRNG key lives in the state) are bit-identical to the reference.

The data of step ``t`` is drawn from ``fold_in(key, t)``, so the data position is the step
number, which the checkpoint holds. Runs in well under a minute on a CPU:

    python examples/resume.py [--steps 60] [--save-every 10] [--kill-after 33] [--format int8]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import optstate
from optstate import checkpoint

DATA_KEY = jax.random.key(2024)
IN, HIDDEN, BATCH = 16, 64, 32


def init_params() -> dict:
    """A two-layer MLP, deterministically initialised."""
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN), "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k2, (HIDDEN, 1)) / np.sqrt(HIDDEN), "b2": jnp.zeros(1)}


def make_tx(fmt: str, steps: int) -> optstate.GradientTransformation:
    """Clipped AdamW on a warm-up + cosine schedule, its moments stored in ``fmt``."""
    schedule = optstate.schedules.warmup_cosine_decay(0.0, 1e-2, steps // 10, steps)
    tx = optstate.chain(optstate.clip_by_global_norm(1.0),
                        optstate.adamw(schedule, weight_decay=1e-4))
    if fmt == "fp32":
        return tx
    return optstate.quantize_state(tx, fmt, rounding="stochastic", min_size=256, seed=0)


def make_step(tx: optstate.GradientTransformation):
    """The jitted train step ``(params, opt_state, t) -> (params, opt_state, loss)``."""

    def loss_fn(params, t):
        x = jax.random.normal(jax.random.fold_in(DATA_KEY, t), (BATCH, IN))
        y = jnp.sin(x.sum(axis=1, keepdims=True))
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)

    @jax.jit
    def step(params, opt_state, t):
        loss, grads = jax.value_and_grad(loss_fn)(params, t)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optstate.apply_updates(params, updates), opt_state, loss

    return step


def train(step, params, opt_state, start: int, stop: int, on_step=None):
    """Runs steps ``start .. stop - 1``; returns params, state and the losses."""
    losses = []
    for t in range(start, stop):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(t, jnp.int32))
        losses.append(float(loss))
        if on_step is not None:
            on_step(t + 1, params, opt_state, losses[-1])
    return params, opt_state, losses


def child(args: argparse.Namespace) -> None:
    """The run that gets killed: trains from scratch, checkpointing as it goes."""
    tx = make_tx(args.format, args.steps)
    params = init_params()

    def on_step(done, params, opt_state, loss):
        print(f"{done} {loss.hex()}", flush=True)
        if done % args.save_every == 0:
            checkpoint.save(args.dir, done, {"params": params, "opt": opt_state},
                            metadata={"loss": loss}, keep=2, asynchronous=True)
        time.sleep(args.step_time)  # stands in for a real step's compute

    train(make_step(tx), params, tx.init(params), 0, args.steps, on_step)
    checkpoint.wait_until_finished()


def bits(tree) -> list[bytes]:
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x).tobytes())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--kill-after", type=int, default=33)
    parser.add_argument("--format", default="int8",
                        help="moment storage: int8, int4, fp8_e4m3, bf16 or fp32")
    parser.add_argument("--step-time", type=float, default=0.02, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    tx = make_tx(args.format, args.steps)
    step = make_step(tx)
    params0 = init_params()

    # 1. the reference: never interrupted
    ref_params, ref_state, ref_losses = train(step, params0, tx.init(params0), 0, args.steps)

    # 2. the same run in a child process, killed with SIGKILL after step --kill-after
    directory = args.dir or tempfile.mkdtemp(prefix="optstate-resume-")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dir", directory,
           "--steps", str(args.steps), "--save-every", str(args.save_every),
           "--format", args.format, "--step-time", str(args.step_time)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    killed_losses: dict[int, float] = {}
    try:
        for line in proc.stdout:
            done, loss = line.split()
            killed_losses[int(done)] = float.fromhex(loss)
            if int(done) >= args.kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    last_seen = max(killed_losses, default=0)
    print(f"child killed (SIGKILL) after step {last_seen}; complete checkpoints: "
          f"{checkpoint.all_steps(directory)}; interrupted saves left behind: "
          f"{len(checkpoint.incomplete_saves(directory))}")

    # 3. resume from the latest complete checkpoint
    start = checkpoint.latest_step(directory)
    if start is None:
        print("no checkpoint was committed before the kill; raise --kill-after")
        return 1
    target = jax.eval_shape(lambda: {"params": params0, "opt": tx.init(params0)})
    restored = checkpoint.restore(directory, start, target=target)
    print(f"restored step {start} (saved loss {checkpoint.read_metadata(directory, start)['loss']:.6f})")
    params, opt_state, resumed = train(step, restored["params"], restored["opt"], start,
                                       args.steps)
    resumed_losses = dict(zip(range(start + 1, args.steps + 1), resumed))

    # 4. compare
    print(f"\n{'step':>5}  {'uninterrupted':>14}  {'killed run':>14}  {'resumed run':>14}")
    for t in range(args.save_every // 2, args.steps + 1, max(1, args.save_every // 2)):
        cells = [f"{ref_losses[t - 1]:14.8f}"]
        for losses in (killed_losses, resumed_losses):
            cells.append(f"{losses[t]:14.8f}" if t in losses else f"{'-':>14}")
        print(f"{t:>5}  " + "  ".join(cells))
    same_losses = all(resumed_losses[t] == ref_losses[t - 1] for t in resumed_losses) and all(
        killed_losses[t] == ref_losses[t - 1] for t in killed_losses)
    same_final = bits((params, opt_state)) == bits((ref_params, ref_state))
    print(f"\nlosses identical to the uninterrupted run: {same_losses}")
    print(f"final parameters and optimizer state bit-identical: {same_final}")
    if args.dir is None:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    return 0 if same_losses and same_final else 1


if __name__ == "__main__":
    sys.exit(main())
