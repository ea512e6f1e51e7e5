"""Shared helpers for the Optax-parity tests (``test_aliases.py``, ``test_transforms.py``).

A small three-leaf parameter tree, a fixed random gradient-noise sequence, a gradient with
per-leaf curvature, a jitted runner that steps an optstate transform and an Optax transform on
the same gradient sequence, and a leaf-by-leaf tree comparison. Each test file passes its own
seeds, so its tests see the same data they always did.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEPS = 40
RTOL, ATOL = 2e-5, 2e-6


def params(*, seed: int):
    """``{"w": (8, 6), "b": (6,), "s": ()}`` float32 parameters drawn from ``key(seed)``."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w": jax.random.normal(k1, (8, 6), jnp.float32),
        "b": jax.random.normal(k2, (6,), jnp.float32) * 0.1,
        "s": jnp.asarray(0.5, jnp.float32),
    }


def noise(steps: int = STEPS, *, seed: int):
    """A ``steps``-long gradient-noise sequence per leaf of :func:`params`, from ``key(seed)``."""
    ks = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": jax.random.normal(ks[0], (steps, 8, 6), jnp.float32),
        "b": jax.random.normal(ks[1], (steps, 6), jnp.float32),
        "s": jax.random.normal(ks[2], (steps,), jnp.float32),
    }


# Per-leaf curvature two orders of magnitude apart: the gradient depends on the parameters
# (so the two trajectories feed back) and on a fixed random sequence (so it is not constant).
CURVATURE = {"w": 1.0, "b": 0.02, "s": 3.0}


def grads(params, noise):
    return {k: CURVATURE[k] * (params[k] - 0.3) + 0.1 * noise[k] for k in params}


@functools.partial(jax.jit, static_argnums=(0, 1))
def run_pair(ours, theirs, params, noise):
    """One step per row of ``noise`` for both transforms on the same gradient sequence, in one
    program; returns ``(params, state)`` for ``ours`` and for ``theirs``."""

    def run(tx):
        def step(carry, n):
            p, s = carry
            u, s = tx.update(grads(p, n), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(step, (params, tx.init(params)), noise)
        return p, s

    return run(ours), run(theirs)


def assert_trees_close(got, want, what, *, rtol=RTOL, atol=ATOL, check_dtype=True):
    """Same number of leaves, each close to its counterpart (compared in float32); with
    ``check_dtype`` the leaf dtypes must also match."""
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    want_leaves = jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), what
    for (path, g), w in zip(got_leaves, want_leaves):
        if check_dtype:
            assert jnp.result_type(g) == jnp.result_type(w), f"{what} dtype at {path}"
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol,
            equal_nan=False,
            err_msg=f"{what} at {jax.tree_util.keystr(path)}",
        )
