"""optstate.masked against optax.masked, pass-through, state layout and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate import MaskedNode, MaskedState, masked
from tests.helpers import assert_trees_close

PARAMS = {
    "dense": {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -2.0])},
    "norm": jnp.array([1.5, 0.25, -0.75]),
}
MASK = {"dense": {"w": True, "b": False}, "norm": True}
PREFIX_MASK = {"dense": False, "norm": True}


def grads(i):
    return jax.tree.map(lambda x: jnp.sin((i + 1) * x) + 0.1 * i, PARAMS)


def run(tx, steps=4):
    state = tx.init(PARAMS)
    params = PARAMS
    out = []
    for i in range(steps):
        updates, state = tx.update(grads(i), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return params, state, out


def ndim2_mask(params):
    return jax.tree.map(lambda x: x.ndim == 2, params)


@pytest.mark.parametrize("mask", [MASK, PREFIX_MASK, ndim2_mask],
                         ids=["tree", "prefix", "callable"])
def test_equals_optax_masked(mask):
    ours, s_ours, u_ours = run(masked(optax.adam(0.1), mask))
    theirs, s_theirs, u_theirs = run(optax.masked(optax.adam(0.1), mask))
    assert_trees_close(ours, theirs, "params", rtol=1e-6, atol=1e-7)
    assert_trees_close(u_ours, u_theirs, "updates", rtol=1e-6, atol=1e-7)
    # Same state leaves (optax's MaskedNode and ours are both empty nodes).
    assert_trees_close(jax.tree.leaves(s_ours), jax.tree.leaves(s_theirs), "state", rtol=1e-6,
                       atol=0)


def test_optstate_inner_equals_optax():
    # tolerance of issue 2 for optstate vs optax building blocks
    ours, _, _ = run(masked(optstate.scale_by_adam(), MASK))
    theirs, _, _ = run(optax.masked(optax.scale_by_adam(), MASK))
    assert_trees_close(ours, theirs, "params", rtol=2e-5, atol=2e-6)
    # and optax.masked accepts an optstate transform: same as our masked, exactly
    mixed, _, _ = run(optax.masked(optstate.scale_by_adam(), MASK))
    assert_trees_close(mixed, ours, "params", rtol=0, atol=0)


def test_all_true_mask_equals_unmasked_inner_exactly():
    ours, _, _ = run(masked(optstate.scale_by_adam(), {"dense": True, "norm": True}))
    plain, _, _ = run(optstate.scale_by_adam())
    assert_trees_close(ours, plain, "params", rtol=0, atol=0)


def test_masked_out_leaves_pass_through_and_hold_no_state():
    tx = masked(optax.adam(0.1), MASK)
    state = tx.init(PARAMS)
    assert isinstance(state, MaskedState)
    mu = state.inner_state[0].mu
    assert isinstance(mu["dense"]["b"], MaskedNode)
    # state holds exactly the selected leaves: w (6) + norm (3) for mu and nu, plus the count
    n_floats = sum(x.size for x in jax.tree.leaves(state) if x.dtype == jnp.float32)
    assert n_floats == 2 * (6 + 3)
    g = grads(3)
    updates, _ = tx.update(g, state, PARAMS)
    assert np.array_equal(np.asarray(updates["dense"]["b"]), np.asarray(g["dense"]["b"]))
    # selected leaves: Adam's first step is -lr * sign(g) (up to eps)
    np.testing.assert_allclose(updates["norm"], -0.1 * np.sign(g["norm"]), rtol=1e-5)


def test_inner_sees_only_selected_leaves():
    seen = []

    def init(params):
        seen.append(jax.tree.leaves(params))
        return optstate.EmptyState()

    def update(updates, state, params=None):  # no **extra_args: gets wrapped
        seen.append(jax.tree.leaves(updates))
        return jax.tree.map(lambda u: 2 * u, updates), state

    tx = masked(optstate.GradientTransformation(init, update), PREFIX_MASK)
    state = tx.init(PARAMS)
    updates, _ = tx.update(grads(0), state, PARAMS, unknown_kwarg=1)
    assert [len(leaves) for leaves in seen] == [1, 1]  # only 'norm'
    np.testing.assert_allclose(updates["norm"], 2 * grads(0)["norm"])
    np.testing.assert_array_equal(updates["dense"]["w"], grads(0)["dense"]["w"])


def test_jit_no_recompile_structure_kept_and_hashable():
    tx = masked(optax.adam(0.1), MASK)
    hash(tx)
    assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(tx))
    state = tx.init(PARAMS)
    step = jax.jit(chex.assert_max_traces(tx.update, n=1))
    for i in range(3):
        updates, new_state = step(grads(i), state, PARAMS)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        state = new_state


def test_mask_missing_leaf_names_path():
    tx = masked(optax.adam(0.1), {"dense": {"w": True}, "norm": True})
    with pytest.raises(ValueError, match=r"params leaf \['dense'\]\['b'\]") as err:
        tx.init(PARAMS)
    assert "masked.init" in str(err.value)


def test_mask_extra_leaf_names_path():
    tx = masked(optax.adam(0.1), {"dense": True, "norm": True, "head": False})
    with pytest.raises(ValueError, match=r"leaf at \['head'\]"):
        tx.init(PARAMS)


def test_mask_mismatch_in_update_names_path():
    tx = masked(optax.adam(0.1), PREFIX_MASK)
    state = tx.init(PARAMS)
    bad = {"dense": grads(0)["dense"], "other": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"masked.update.*\['norm'\]"):
        tx.update(bad, state)


def test_non_bool_mask_leaf_names_path():
    with pytest.raises(TypeError, match=r"mask leaf \['norm'\] must be a bool.*float32"):
        masked(optax.adam(0.1), {"dense": True, "norm": jnp.ones(3)}).init(PARAMS)
