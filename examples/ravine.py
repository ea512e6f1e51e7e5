"""A ravine: least squares on two features whose gradients are two orders of magnitude apart.

The "delivery time" problem: predict hours from distance (hundreds of km, 0.5-5) and package
weight (kg, 0.2-20). The loss surface is a long, narrow valley, where plain SGD must use a
step small enough for the steep direction and then crawls along the flat one; momentum
and Adam's per-coordinate scaling cope better. SGD, momentum, Adam and AdamW (with warmup +
cosine decay) start from the same point.

    python examples/ravine.py [--steps 500] [--out ravine.png]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import optstate

THRESHOLD = 0.2
REPORT_STEPS = (20, 100, 500)


def make_data(seed: int = 0, n: int = 256) -> tuple[jax.Array, jax.Array]:
    """Features ``[distance, weight]`` and delivery hours ``1.2 d + 0.05 w + 2 + noise``.

    The 2-hour intercept (loading time) lies along the flattest direction of the loss.
    """
    rng = np.random.default_rng(seed)
    distance = rng.uniform(0.5, 5.0, n)
    weight = rng.uniform(0.2, 20.0, n)
    hours = 1.2 * distance + 0.05 * weight + 2.0 + rng.normal(0.0, 0.3, n)
    features = np.stack([distance, weight], axis=1)
    return jnp.asarray(features, jnp.float32), jnp.asarray(hours, jnp.float32)


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Half mean squared error of the linear model ``x @ w + b``."""
    prediction = x @ params["w"] + params["b"]
    return 0.5 * jnp.mean((prediction - y) ** 2)


def optimizers(steps: int) -> dict[str, optstate.GradientTransformation]:
    schedule = optstate.schedules.warmup_cosine_decay(
        init_value=0.0, peak_value=0.1, warmup_steps=steps // 20, decay_steps=steps, end_value=1e-3
    )
    return {
        "sgd": optstate.sgd(0.01),
        "momentum": optstate.sgd(0.01, momentum=0.9),
        "adam": optstate.adam(0.1),
        "adamw+warmup-cosine": optstate.adamw(schedule, weight_decay=1e-4),
    }


def train(tx: optstate.GradientTransformation, x: jax.Array, y: jax.Array, steps: int) -> np.ndarray:
    """The loss before each of ``steps`` steps and after the last, from ``w = 0, b = 0``."""
    params = {"w": jnp.zeros(2), "b": jnp.zeros(())}

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return (optstate.apply_updates(params, updates), state), loss

    (params, _), losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
        (params, tx.init(params))
    )
    return np.append(np.asarray(losses), float(loss_fn(params, x, y)))


def first_below(losses: np.ndarray, threshold: float) -> int | None:
    hits = np.flatnonzero(losses < threshold)
    return int(hits[0]) if hits.size else None


def print_table(curves: dict[str, np.ndarray]) -> None:
    header = f"{'optimizer':<22}{'first loss<0.2':>16}" + "".join(f"{'loss@' + str(s):>12}" for s in REPORT_STEPS)
    print(header)
    print("-" * len(header))
    for name, losses in curves.items():
        hit = first_below(losses, THRESHOLD)
        cells = "".join(
            f"{losses[s]:>12.4f}" if s < len(losses) else f"{'-':>12}" for s in REPORT_STEPS
        )
        print(f"{name:<22}{(str(hit) if hit is not None else 'never'):>16}{cells}")


def plot(curves: dict[str, np.ndarray], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, losses in curves.items():
        ax.plot(np.arange(len(losses)), losses, label=name)
    ax.axhline(THRESHOLD, color="gray", linestyle=":", label=f"loss {THRESHOLD}")
    ax.set(xlabel="step", ylabel="loss (half MSE)", yscale="log", title="Delivery-time ravine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ravine.png")
    args = parser.parse_args(argv)
    x, y = make_data(args.seed)
    curves = {name: train(tx, x, y, args.steps) for name, tx in optimizers(args.steps).items()}
    print_table(curves)
    plot(curves, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
