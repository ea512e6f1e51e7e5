"""optstate.apply_if_finite: skipped steps, counters, bit-identical state, Optax parity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate import ApplyIfFiniteState, apply_if_finite
from tests.helpers import assert_trees_close

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -2.0])}


def grads(i, bad=None):
    g = jax.tree.map(lambda x: jnp.sin((i + 1) * x) + 0.1 * i, PARAMS)
    if bad is not None:
        g = {"w": g["w"], "b": g["b"].at[1].set(bad)}
    return g


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# (step, bad value): NaN and Inf steps, one isolated, then three consecutive
BAD = {2: jnp.nan, 4: jnp.inf, 5: -jnp.inf, 6: jnp.nan}


def test_equals_optax_apply_if_finite_step_by_step():
    ours = apply_if_finite(optax.adam(0.1), max_consecutive_errors=2)
    theirs = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=2)
    s, o = ours.init(PARAMS), theirs.init(PARAMS)
    ours_step, theirs_step = jax.jit(ours.update), jax.jit(theirs.update)
    for i in range(9):
        g = grads(i, BAD.get(i))
        u, s = ours_step(g, s, PARAMS)
        v, o = theirs_step(g, o, PARAMS)
        for x, y in zip(jax.tree.leaves((u, tuple(s))), jax.tree.leaves((v, tuple(o)))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # 4 bad steps in all; the last run (4, 5, 6) ended with a finite step
    assert int(s.total_notfinite) == 4 and int(s.notfinite_count) == 0


def test_skipped_step_zero_updates_bit_identical_state_and_counters():
    tx = apply_if_finite(optstate.adam(0.1), max_consecutive_errors=3)
    state = tx.init(PARAMS)
    assert isinstance(state, ApplyIfFiniteState)
    step = jax.jit(chex.assert_max_traces(tx.update, n=1))
    _, state = step(grads(0), state, PARAMS)
    expected_counts = []
    for i, bad in enumerate([jnp.nan, jnp.inf, -jnp.inf]):
        before = bits(state.inner_state)
        updates, state = step(grads(i + 1, bad), state, PARAMS)
        assert bits(state.inner_state) == before
        for leaf in jax.tree.leaves(updates):
            assert np.all(np.asarray(leaf) == 0.0)
        assert not bool(state.last_finite)
        expected_counts.append((int(state.notfinite_count), int(state.total_notfinite)))
    assert expected_counts == [(1, 1), (2, 2), (3, 3)]
    # a finite step resets the consecutive count, keeps the total, and equals plain Adam's
    # second step (the skipped steps left no trace)
    updates, state = step(grads(9), state, PARAMS)
    assert (int(state.notfinite_count), int(state.total_notfinite)) == (0, 3)
    assert bool(state.last_finite)
    plain = optstate.adam(0.1)
    ps = plain.init(PARAMS)
    _, ps = plain.update(grads(0), ps, PARAMS)
    want, ps = plain.update(grads(9), ps, PARAMS)
    assert_trees_close((updates, state.inner_state), (want, ps), "step after the skips",
                       rtol=1e-6, atol=0)


def test_lets_update_through_after_max_consecutive_errors():
    tx = apply_if_finite(optax.sgd(1.0, momentum=0.5), max_consecutive_errors=1)
    state = tx.init(PARAMS)
    u1, state = tx.update(grads(0, jnp.nan), state)  # 1 consecutive: skipped
    assert np.all(np.asarray(u1["b"]) == 0)
    u2, state = tx.update(grads(1, jnp.nan), state)  # 2 > 1: let through
    assert np.isnan(np.asarray(u2["b"][1]))
    assert np.isnan(np.asarray(state.inner_state[0].trace["b"][1]))
    assert int(state.notfinite_count) == 2


def test_zero_updates_take_the_inner_output_dtype():
    # an inner transform that returns float32 updates for bfloat16 gradients
    def update(updates, state, params=None, **extra_args):
        return jax.tree.map(lambda u: u.astype(jnp.float32) * 2, updates), state

    inner = optstate.GradientTransformation(lambda p: optstate.EmptyState(), update)
    tx = apply_if_finite(inner, 1)
    g = {"w": jnp.array([1.0, jnp.nan], jnp.bfloat16)}
    updates, state = tx.update(g, tx.init(g))
    assert updates["w"].dtype == jnp.float32
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
    updates, _ = tx.update({"w": jnp.array([1.0, 2.0], jnp.bfloat16)}, state)
    np.testing.assert_array_equal(updates["w"], [2.0, 4.0])


def test_structure_kept_extra_args_hashable_and_bad_argument():
    tx = apply_if_finite(optstate.sgd(0.1, momentum=0.9), 2)
    hash(tx)
    state = tx.init(PARAMS)
    _, new_state = tx.update(grads(0, jnp.nan), state, PARAMS, unknown=1)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.shape == b.shape
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        apply_if_finite(optstate.sgd(0.1), -1)
