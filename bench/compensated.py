"""bf16 parameters with ``compensated_params``: bytes, step memory, quality (issue 16).

Four measurements, each against float32 AdamW (Optax) on float32 parameters:

* ``bytes``: optimizer-side bytes per parameter (residual + moments) on one 1024 x 1024 leaf,
  from ``optstate.memory.state_bytes`` on abstract state; plus bf16 parameters and gradients.
  Limits: int8 residual + int8 moments <= 3.1; total <= 7.1 (against 16).
* ``memory``: XLA's memory analysis (arguments + outputs - aliased + temporaries) of the
  jitted, donated step ``(params, state, grads) -> update_and_apply(...)`` (``update`` then
  ``apply_updates`` for Optax) on 8 leaves of 1024 x 1024, bf16 parameters and gradients
  (compiled only, nothing runs). Limit: <= 0.45x Optax fp32 AdamW on float32 parameters.
* ``quality``: least squares with bf16 parameters, AdamW at lr 1e-3 from x0 in [1, 2) (half a
  bf16 step there is 3.9e-3: every update rounds away), final loss and the share of the
  plain-bf16 gap to float32 that each correction closes. Limits: int8 >= 90%, int16 and
  stochastic >= 80%.
* ``task``: the embedded transformer task (``optstate.tasks``) with bf16 parameters: float32
  parameters (two seeds, for the noise), plain bf16, bf16 + int8 residual (int8 moments).

    python bench/compensated.py [bytes|memory|quality|task|all] [--steps N]
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optstate
from optstate.memory import compiled_memory, state_bytes

CORRECTIONS = ("int8", "int16", "bf16", "stochastic")
MIB = 2**20


def _compensated(correction: str, moments: str | None = "int8", lr: float = 1e-3):
    inner = optstate.adamw(lr)
    if moments is not None:
        inner = optstate.quantize_state(inner, moments)
    return optstate.compensated_params(inner, correction)


def bench_bytes() -> None:
    params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)}
    n = 1024 * 1024
    base = state_bytes(jax.eval_shape(optax.adamw(1e-3).init,
                                      {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}))
    print("AdamW bytes per parameter, one 1024x1024 leaf (optimizer state = residual + "
          "moments; total adds bf16 parameters and gradients)")
    label = "optax adamw, fp32 params+grads"
    print(f"  {label:34s} state {base / n:5.3f}  total {base / n + 8:6.3f}")
    for moments in ("int8", None):
        for correction in CORRECTIONS:
            state = jax.eval_shape(_compensated(correction, moments).init, params)
            per = state_bytes(state) / n
            label = f"{correction} residual, {moments or 'fp32'} moments"
            print(f"  {label:34s} state {per:5.3f}  total {per + 4:6.3f}")


def _donated_step(tx):
    # update_and_apply: tx.update + apply_updates, fused where tx allows (any Optax transform
    # runs exactly those two)
    def step(params, state, grads):
        return optstate.update_and_apply(tx, grads, state, params)

    return step


def _peak(tx, dtype, leaves: int, side: int):
    params = {f"w{i}": jax.ShapeDtypeStruct((side, side), dtype) for i in range(leaves)}
    state = jax.eval_shape(tx.init, params)
    with warnings.catch_warnings():  # gradients' buffers that cannot be reused: expected
        warnings.simplefilter("ignore")
        jitted = jax.jit(_donated_step(tx), donate_argnums=(0, 1, 2))
        return compiled_memory(jitted, params, state, params)


def bench_memory(leaves: int = 8, side: int = 1024) -> None:
    n = leaves * side * side
    base = _peak(optax.adamw(1e-3), jnp.float32, leaves, side)
    print(f"Peak memory of the donated step, {leaves} leaves of {side}x{side}; bf16 parameters "
          f"and gradients unless said; bytes/param = args + outputs - aliased + temporaries")
    print(f"  optax adamw, fp32 params             {base.peak / n:6.3f} B/param "
          f"(temporaries {base.temporaries / n:.3f})")
    rows = {
        "compensated int8 ( quantize int8 )": _compensated("int8"),
        "quantize int8 ( compensated int8 )": optstate.quantize_state(
            optstate.compensated_params(optstate.adamw(1e-3), "int8"), "int8"),
        "compensated stochastic ( int8 )": _compensated("stochastic"),
        "compensated int8, fp32 moments": _compensated("int8", None),
        "plain bf16 params, int8 moments": optstate.quantize_state(optstate.adamw(1e-3), "int8"),
    }
    for name, tx in rows.items():
        m = _peak(tx, jnp.bfloat16, leaves, side)
        print(f"  {name:36s} {m.peak / n:6.3f} B/param (args {m.arguments / n:.3f}, "
              f"temporaries {m.temporaries / n:.3f})  ratio {m.peak / base.peak:.3f}")


def least_squares(tx, dtype, *, steps: int = 1000) -> tuple[float, float]:
    """Final loss and mean parameter stall fraction of ``steps`` of full-batch least squares
    (256 x 128) from x0 in [1, 2) towards x* = x0 + N(0, 0.3^2)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    a = jax.random.normal(k1, (256, 128)) / jnp.sqrt(128.0)
    x0 = (jax.random.uniform(k2, (128,), minval=1, maxval=2)
          * jnp.sign(jax.random.normal(k3, (128,)))).astype(jnp.bfloat16)
    b = a @ (x0.astype(jnp.float32) + 0.3 * jax.random.normal(k4, (128,)))

    def loss(x):
        return 0.5 * jnp.mean((a @ x.astype(jnp.float32) - b) ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: loss(p["x"]))(p)
        u, s = tx.update(g, s, p)
        stall = optstate.staleness.param_stall_fraction(p, u)["['x']"]
        return optstate.apply_updates(p, u), s, stall

    p = {"x": x0.astype(dtype)}
    s = tx.init(p)
    stalls = []
    for _ in range(steps):  # one jitted step per call: the parameters really are bf16 between
        p, s, stall = step(p, s)
        stalls.append(stall)
    return float(loss(p["x"])), float(np.mean(jax.device_get(stalls)))


def bench_quality(steps: int = 1000) -> None:
    adamw = lambda: optstate.adamw(1e-3, weight_decay=1e-4)
    fp32, stall32 = least_squares(adamw(), jnp.float32, steps=steps)
    plain, stall = least_squares(adamw(), jnp.bfloat16, steps=steps)
    print(f"Least squares 256x128, AdamW lr 1e-3, {steps} steps, x0 in [1, 2) "
          f"(half a bf16 step: 3.9e-3)")
    print(f"  fp32 params                 loss {fp32:.3e}  stalled updates {stall32:6.1%}")
    print(f"  bf16 params, plain          loss {plain:.3e}  stalled updates {stall:6.1%}")
    for correction in CORRECTIONS:
        loss, st = least_squares(optstate.compensated_params(adamw(), correction),
                                 jnp.bfloat16, steps=steps)
        del st  # the returned updates are exactly p' - p: none of them rounds away
        label = f"bf16 + {correction}"
        print(f"  {label:27s} loss {loss:.3e}                         "
              f"gap closed {(plain - loss) / (plain - fp32):7.2%}")
    loss, _ = least_squares(optstate.compensated_params(
        optstate.quantize_state(adamw(), "int8", min_size=0), "int8"), jnp.bfloat16, steps=steps)
    print(f"  {'bf16 + int8, int8 moments':27s} loss {loss:.3e}                         "
          f"gap closed {(plain - loss) / (plain - fp32):7.2%}")


def bench_task(steps: int = 400) -> None:
    from optstate.tasks.configs import Hyperparameters
    from optstate.tasks.stdlib_text import load_corpus
    from optstate.tasks.training import (
        TrainConfig,
        init_model,
        make_eval_fn,
        make_train_step,
        run_training,
    )

    corpus = load_corpus()
    hyper = Hyperparameters()
    schedule = optstate.schedules.warmup_cosine_decay(
        0.0, hyper.learning_rate, max(1, int(hyper.warmup_fraction * steps)), steps,
        end_value=0.1 * hyper.learning_rate)

    def adamw():
        return optstate.adamw(schedule, b1=hyper.b1, b2=hyper.b2, eps=hyper.eps,
                              weight_decay=hyper.weight_decay)

    runs = [("fp32 params, seed 0", 0, jnp.float32, adamw),
            ("fp32 params, seed 1", 1, jnp.float32, adamw),
            ("bf16 params, plain", 0, jnp.bfloat16, adamw),
            ("bf16 + int8 residual, int8 moments", 0, jnp.bfloat16,
             lambda: optstate.compensated_params(optstate.quantize_state(adamw(), "int8"),
                                                 "int8"))]
    print(f"Embedded task, {steps} steps, AdamW (warm-up + cosine, lr {hyper.learning_rate}, "
          f"b2 {hyper.b2}); held-out loss (nats/byte)")
    for label, seed, dtype, make in runs:
        config = TrainConfig(steps=steps, seed=seed)
        graphdef, params = init_model(config.model, seed)
        params = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), params)
        tx = make()
        step = make_train_step(graphdef, tx, optstate.update_and_apply)
        start = time.perf_counter()
        result = run_training(corpus, config, step, make_eval_fn(graphdef), params,
                              tx.init(params))
        print(f"  {label:36s} held-out {result.final_heldout_loss:.4f}  train "
              f"{result.final_train_loss:.4f}  ({time.perf_counter() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all",
                        choices=["bytes", "memory", "quality", "task", "all"])
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of the quality (default 1000) or task (400) run")
    args = parser.parse_args()
    if args.what in ("bytes", "all"):
        bench_bytes()
    if args.what in ("memory", "all"):
        bench_memory()
    if args.what in ("quality", "all"):
        bench_quality(args.steps or 1000)
    if args.what in ("task", "all"):
        bench_task(args.steps or 400)


if __name__ == "__main__":
    main()
