"""Optax's catalogue in every storage format: final least-squares loss beside the unwrapped run.

For each optimizer of Optax's catalogue and each format, ``quantize_state(opt, fmt)`` trains
mini-batch least squares (a 512 x 64 weight, 300 steps, the same batches for every run) and
the table shows the final full-data loss and the *shortfall*: how much of the way from the
starting loss to the unwrapped optimizer's loss the quantized run fails to cover,
``(L_fmt - L_ref) / (L_start - L_ref)``. Limits (issue 12): 10% for 8-bit and bf16, 30% for
int4. Each format runs with ``quantize_state``'s defaults (stall-prone state rounded
stochastically, rank-1 normalised int4 second moments); a ``-sr`` suffix rounds everything
stochastically. About 15 minutes on 2 busy CPU cores; the last line lists any run over its
limit (none on 2026-11-29).

    python bench/catalogue.py [--formats int8 int4 fp8_e4m3 bf16 bf16-sr] [--only adam sm3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib

import optstate

LIMITS = {"int8": 0.10, "fp8_e4m3": 0.10, "fp8_e5m2": 0.10, "bf16": 0.10, "bf16-sr": 0.10,
          "int4-sr": 0.30, "int8-sr": 0.10,
          "int4": 0.30}


def catalogue() -> dict[str, optax.GradientTransformation]:
    """Optax's optimizers, each with a learning rate that trains this problem."""
    return {
        "adam": optax.adam(3e-2), "adamw": optax.adamw(3e-2), "nadam": optax.nadam(3e-2),
        "nadamw": optax.nadamw(3e-2), "radam": optax.radam(0.1), "adamax": optax.adamax(0.1),
        "amsgrad": optax.amsgrad(0.1), "adabelief": optax.adabelief(3e-2),
        "yogi": optax.yogi(0.3), "lamb": optax.lamb(3e-2), "lion": optax.lion(1e-2),
        "sgd_momentum": optax.sgd(10.0, momentum=0.9),
        "sgd_nesterov": optax.sgd(10.0, momentum=0.9, nesterov=True),
        "rmsprop": optax.rmsprop(3e-2), "adagrad": optax.adagrad(10.0),
        "adadelta": optax.adadelta(100.0), "adafactor": optax.adafactor(0.1),
        "novograd": optax.novograd(0.3), "sm3": optax.sm3(0.3), "adan": optax.adan(3e-2),
        "lars": optax.lars(10.0), "sign_sgd": optax.sign_sgd(1e-2),
        "muon": contrib.muon(0.3),
        "schedule_free_adamw": contrib.schedule_free_adamw(3e-2, warmup_steps=20),
    }


def problem(n: int = 4096, d_in: int = 512, d_out: int = 64, batch: int = 64,
            steps: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d_in)) / np.sqrt(d_in), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32)
    y = x @ w_true + 0.1 * jnp.asarray(rng.standard_normal((n, d_out)), jnp.float32)
    batches = jnp.asarray(rng.integers(0, n, (steps, batch)))
    return x, y, batches


def final_loss(tx, x, y, batches) -> float:
    """Full-data loss after training on ``batches`` (one ``lax.scan``)."""
    loss = lambda w, xb, yb: jnp.mean((xb @ w - yb) ** 2)  # noqa: E731
    w0 = {"w": jnp.zeros((x.shape[1], y.shape[1]), jnp.float32)}

    def step(carry, idx):
        w, state = carry
        grads = jax.grad(lambda p: loss(p["w"], x[idx], y[idx]))(w)
        updates, state = tx.update(grads, state, w)
        return (optax.apply_updates(w, updates), state), None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (w, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, batches))((w0, tx.init(w0)))
    return float(loss(w["w"], x, y))


def wrap(opt, fmt: str):
    if fmt == "fp32":
        return opt
    name, _, sr = fmt.partition("-")
    return optstate.quantize_state(opt, name, rounding="stochastic" if sr else "nearest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["int8", "int4", "fp8_e4m3", "bf16",
                                                          "bf16-sr"])
    parser.add_argument("--only", nargs="+", default=None)
    args = parser.parse_args()
    x, y, batches = problem()
    start = float(jnp.mean(y ** 2))
    opts = catalogue()
    names = args.only or list(opts)
    print(f"least squares 512x64, 300 steps; start loss {start:.4f}; "
          f"shortfall = (L - L_ref) / (L_start - L_ref), limits 10% (8-bit, bf16), 30% (int4)")
    header = f"{'optimizer':20s} {'fp32':>8s}" + "".join(f" {f:>16s}" for f in args.formats)
    print(header)
    failures = []
    for name in names:
        t0 = time.perf_counter()
        ref = final_loss(opts[name], x, y, batches)
        row = f"{name:20s} {ref:8.4f}"
        for fmt in args.formats:
            loss = final_loss(wrap(opts[name], fmt), x, y, batches)
            short = (loss - ref) / (start - ref)
            flag = "" if short <= LIMITS[fmt.split("-")[0] if fmt != "bf16-sr" else fmt] else "!"
            if flag:
                failures.append((name, fmt, short))
            row += f" {loss:8.4f} {100 * short:5.1f}%{flag:1s}"
        print(row + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"{len(failures)} over the limit: {failures}")


if __name__ == "__main__":
    main()
