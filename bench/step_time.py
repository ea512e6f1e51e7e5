"""Step time of optstate's AdamW against Optax's AdamW, interleaved in one process.

A 32M-parameter tree of 8 leaves (2048 x 2048 float32 each); both updates are jitted with
the parameters and the state donated, and timed round-robin so that machine noise hits both
alike. Prints the median per-step times and their ratio (optstate / optax).

    python bench/step_time.py [--repeats 30] [--leaves 8] [--side 2048]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import optax

import optstate
from optstate.tasks.timing import median_ratio, time_interleaved


def make_tree(leaves: int, side: int, seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), leaves)
    return {f"w{i}": jax.random.normal(k, (side, side), jnp.float32) for i, k in enumerate(keys)}


def donated_step(tx):
    """``(params, state, grads) -> (params, state)``, jitted with params and state donated."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(jnp.add, params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


class Runner:
    """Holds one optimizer's live buffers so that each call runs one donated step."""

    def __init__(self, tx, params, grads):
        self.step_fn = donated_step(tx)
        self.params = jax.tree.map(jnp.copy, params)
        self.state = tx.init(self.params)
        self.grads = grads

    def __call__(self) -> None:
        self.params, self.state = self.step_fn(self.params, self.state, self.grads)
        jax.block_until_ready(self.params)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--leaves", type=int, default=8)
    parser.add_argument("--side", type=int, default=2048)
    args = parser.parse_args(argv)

    params = make_tree(args.leaves, args.side)
    grads = make_tree(args.leaves, args.side, seed=1)
    n = sum(p.size for p in jax.tree.leaves(params))
    runners = {
        "optax.adamw": Runner(optax.adamw(1e-3, weight_decay=1e-4), params, grads),
        "optstate.adamw": Runner(optstate.adamw(1e-3, weight_decay=1e-4), params, grads),
    }
    timings = time_interleaved(runners, repeats=args.repeats, warmup=3)
    print(f"AdamW step on {n / 1e6:.1f}M parameters ({args.leaves} leaves), "
          f"{args.repeats} interleaved repeats, device {jax.devices()[0].platform}")
    for name, ts in timings.items():
        print(f"  {name:<16} median {statistics.median(ts) * 1e3:8.2f} ms")
    ratio = median_ratio(timings, "optstate.adamw", "optax.adamw")
    print(f"median ratio optstate/optax: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
