"""Every optimizer under every wrapper: one table of optimizers crossed with one of wrappers.

Optax's pattern (its ``alias_test`` crossed with its wrappers): each optimizer of
:data:`OPTIMIZERS` is wrapped by each entry of :data:`WRAPPERS` (no wrapper; ``quantize_state``
in every storage format and with stochastic rounding; ``reset_every_n``; ``track_staleness``;
``masked``; ``apply_if_finite``; ``inject_hyperparams``), and every pair must

* keep its state structure (tree, shapes and dtypes) between ``init`` and ``update``;
* trace its jitted step once (no retrace on step 2);
* give finite updates;
* give the same updates and parameters with and without ``jit`` (to float32 rounding: XLA
  fuses differently; ``quantize_state`` takes the same whole-tree or chunked path either way);
* survive a checkpoint round trip (``optstate.checkpoint.save`` / ``restore`` with the target
  ``jax.eval_shape(tx.init, params)``) bit for bit.

The parameters are small (6240 values) and each pair runs :data:`STEPS` steps, enough for
``reset_every_n(n=3)`` to reset once.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optstate
import optstate.checkpoint
import optstate.staleness
from tests import helpers

STEPS = 4
#: ``quantize_state(min_size=...)`` below the size of both parameters, so each is quantized.
MIN_SIZE = 64


def _params() -> dict[str, jax.Array]:
    kw, kb = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(kw, (64, 96), jnp.float32) * 0.1,
            "b": jax.random.normal(kb, (96,), jnp.float32) * 0.01}


def _grads(step: int, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A fixed gradient per step: smooth in the parameters, different at every step."""
    return jax.tree.map(lambda p: jnp.cos((step + 1) * 7.0 * p) + 0.05 * step, params)


# name -> (alias, keyword arguments). The aliases are passed as factories so that
# ``inject_hyperparams`` can rebuild them from their arguments.
OPTIMIZERS: dict[str, tuple[Callable[..., optstate.GradientTransformation], dict[str, Any]]] = {
    "sgd_momentum": (optstate.sgd, dict(learning_rate=1e-2, momentum=0.9)),
    "sgd_nesterov": (optstate.sgd, dict(learning_rate=1e-2, momentum=0.9, nesterov=True)),
    "adam": (optstate.adam, dict(learning_rate=1e-2)),
    "adamw": (optstate.adamw, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "adam_l2": (optstate.adam_l2, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "rmsprop": (optstate.rmsprop, dict(learning_rate=1e-2)),
    "adagrad": (optstate.adagrad, dict(learning_rate=1e-2)),
    "adadelta": (optstate.adadelta, dict(learning_rate=1.0, weight_decay=1e-3)),
    "lamb": (optstate.lamb, dict(learning_rate=1e-2, weight_decay=1e-2)),
    "lion": (optstate.lion, dict(learning_rate=1e-3)),
    "adafactor": (optstate.adafactor, dict(learning_rate=1e-2)),
}

Wrap = Callable[[Callable[..., optstate.GradientTransformation], dict[str, Any]],
                optstate.GradientTransformation]


def _around(wrapper: Callable[[optstate.GradientTransformation],
                              optstate.GradientTransformation]) -> Wrap:
    """A table entry that wraps the built optimizer."""
    return lambda alias, kwargs: wrapper(alias(**kwargs))


def _quantized(fmt: str, rounding: str = "nearest") -> Wrap:
    return _around(lambda tx: optstate.quantize_state(tx, fmt, min_size=MIN_SIZE,
                                                      rounding=rounding))


# name -> how to build the wrapped optimizer from (alias, kwargs).
WRAPPERS: dict[str, Wrap] = {
    "none": _around(lambda tx: tx),
    "int8": _quantized("int8"),
    "int4": _quantized("int4"),
    "fp8_e4m3": _quantized("fp8_e4m3"),
    "fp8_e5m2": _quantized("fp8_e5m2"),
    "bf16": _quantized("bf16"),
    "int8_stochastic": _quantized("int8", "stochastic"),
    "reset_every_3": _around(lambda tx: optstate.reset_every_n(tx, n=3)),
    "track_staleness": _around(optstate.staleness.track_staleness),
    "masked": _around(lambda tx: optstate.masked(tx, {"w": True, "b": False})),
    "apply_if_finite": _around(lambda tx: optstate.apply_if_finite(tx, 2)),
    # Every alias's numeric arguments can be injected, so no pair is skipped.
    "inject_hyperparams": lambda alias, kwargs: optstate.inject_hyperparams(alias)(**kwargs),
}

QUANTIZED = {"int8", "int4", "fp8_e4m3", "fp8_e5m2", "bf16", "int8_stochastic"}

#: The pairs whose checkpoint round trip runs: every wrapper under Adam, and every optimizer
#: under int8 and unwrapped. The round trip checks the state's leaves, not the optimizer's
#: arithmetic, so the full cross product would add time and no coverage.
CHECKPOINTED = {(opt, "none") for opt in OPTIMIZERS} | {(opt, "int8") for opt in OPTIMIZERS} \
    | {("adam", wrapper) for wrapper in WRAPPERS}

#: ``jit`` against eager execution: the same arithmetic up to float32 rounding (XLA fuses the
#: two programs differently).
RTOL, ATOL = 1e-4, 1e-6
#: With quantized state a value within float32 rounding of a rounding boundary (or, with
#: stochastic rounding, of its random threshold) can be stored as the neighbouring code in one
#: run and not the other; that element then differs by up to a grid step (several percent
#: for int8, more for int4) while the rest agree. At most this fraction of the elements of
#: a leaf may differ so; a real difference between the two paths would move almost all of
#: them.
MAX_FLIPPED = 0.01


def _assert_agree(got: Any, want: Any, what: str, quantized: bool) -> None:
    """``got`` and ``want`` agree to float32 rounding, but for a few flipped codes if
    ``quantized`` (see :data:`MAX_FLIPPED`)."""
    if not quantized:
        helpers.assert_trees_close(got, want, what, rtol=RTOL, atol=ATOL)
        return
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    for (path, g), w in zip(flat, jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        far = np.abs(g - w) > ATOL + RTOL * np.abs(w)
        assert far.mean() <= MAX_FLIPPED, (
            f"{what}: {far.sum()} of {far.size} elements of {jax.tree_util.keystr(path)} "
            f"differ, more than flipped codes explain; first at {np.argwhere(far)[0]}: "
            f"{g[far][0]} vs {w[far][0]}")


def _run(tx: optstate.GradientTransformation, params: Any, step: Callable) -> tuple:
    """``STEPS`` steps of ``step``; returns the final params and state and every update."""
    state0 = tx.init(params)
    state, all_updates = state0, []
    for i in range(STEPS):
        params, new_state, updates = step(params, state, _grads(i, params))
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state0)
        chex.assert_trees_all_equal_structs(new_state, state0)
        state = new_state
        all_updates.append(updates)
    return params, state, all_updates


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_pair(optimizer: str, wrapper: str, tmp_path) -> None:
    alias, kwargs = OPTIMIZERS[optimizer]
    tx = WRAPPERS[wrapper](alias, kwargs)
    params = _params()

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optstate.apply_updates(p, updates), s, updates

    # The trace counter is keyed by the function's source: reset it for each pair.
    chex.clear_trace_counter()
    jitted = jax.jit(chex.assert_max_traces(step, n=1))
    p_jit, s_jit, u_jit = _run(tx, params, jitted)
    chex.assert_tree_all_finite(u_jit)
    chex.assert_tree_all_finite(p_jit)

    p_eager, _, u_eager = _run(tx, params, step)
    quantized = wrapper in QUANTIZED
    _assert_agree(u_eager, u_jit, f"{optimizer} x {wrapper}: updates", quantized)
    _assert_agree(p_eager, p_jit, f"{optimizer} x {wrapper}: params", quantized)

    if (optimizer, wrapper) in CHECKPOINTED:
        optstate.checkpoint.save(tmp_path, STEPS, s_jit)
        restored = optstate.checkpoint.restore(tmp_path, STEPS,
                                               target=jax.eval_shape(tx.init, params))
        helpers.assert_trees_identical(restored, s_jit, f"{optimizer} x {wrapper}: state")
