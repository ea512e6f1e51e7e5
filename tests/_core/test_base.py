"""The protocol: chain, named_chain, identity, set_to_zero, apply_updates, extra args."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate._core.base import with_extra_args_support


def _params():
    return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([0.5, -1.0], jnp.bfloat16)}


def test_identity_and_set_to_zero_against_definition():
    params = _params()
    grads = jax.tree.map(lambda p: p * 2 + 1, params)
    for tx, expected in [(optstate.identity(), grads),
                         (optstate.set_to_zero(), jax.tree.map(jnp.zeros_like, grads))]:
        state = tx.init(params)
        assert state == optstate.EmptyState()
        out, new_state = tx.update(grads, state, params, unknown_kwarg=1)
        jax.tree.map(np.testing.assert_array_equal, out, expected)
        assert new_state == state


def test_chain_equals_optax_chain_of_the_same_transforms():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.sin(p.astype(jnp.float32)), params)
    ours = optstate.chain(optax.scale_by_adam(), optax.scale(-0.1))
    ref = optax.chain(optax.scale_by_adam(), optax.scale(-0.1))
    s1, s2 = ours.init(params), ref.init(params)
    for _ in range(3):
        u1, s1 = ours.update(grads, s1, params, extra=3)
        u2, s2 = ref.update(grads, s2, params)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)


def test_named_chain_state_is_keyed_by_name():
    params = _params()
    tx = optstate.named_chain(("adam", optax.scale_by_adam()), ("lr", optax.scale(-1.0)))
    state = tx.init(params)
    assert set(state) == {"adam", "lr"}
    updates, new_state = tx.update(params, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    with pytest.raises(ValueError, match="unique"):
        optstate.named_chain(("a", optstate.identity()), ("a", optstate.identity()))


def test_foreign_update_without_kwargs_is_wrapped():
    calls = []

    def init(params):
        return optstate.EmptyState()

    def update(updates, state, params=None):  # no **extra_args, like optax's plain transforms
        calls.append(1)
        return updates, state

    tx = with_extra_args_support(optstate.GradientTransformation(init, update))
    tx.update({"a": jnp.ones(2)}, optstate.EmptyState(), None, loss=1.0)
    assert calls == [1]


def test_apply_updates_casts_back_and_keeps_none():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": None}
    updates = {"a": jnp.full(3, 0.5, jnp.float32), "b": None}
    new = optstate.apply_updates(params, updates)
    assert new["a"].dtype == jnp.bfloat16 and new["b"] is None
    np.testing.assert_array_equal(new["a"], optax.apply_updates(params, updates)["a"])


def test_apply_updates_names_the_mismatched_leaf():
    with pytest.raises(ValueError, match=r"\['a'\].*shape \(2,\).*expected \(3,\)"):
        optstate.apply_updates({"a": jnp.ones(3)}, {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"'c'"):
        optstate.apply_updates({"a": jnp.ones(3), "c": jnp.ones(1)}, {"a": jnp.ones(3), "d": jnp.ones(1)})


def test_transform_is_hashable_namedtuple_of_functions():
    tx = optstate.chain(optstate.identity(), optstate.set_to_zero())
    assert isinstance(tx, tuple) and len(tx) == 2
    assert hash(tx) == hash(tx)
    assert jax.tree.leaves(tx) == [] or all(callable(leaf) for leaf in jax.tree.leaves(tx))
