"""optstate.partition against optax.partition; frozen groups hold no state; errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate import MaskedState, PartitionState, partition
from tests.helpers import assert_trees_close

PARAMS = {
    "backbone": {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "b": jnp.linspace(0, 1, 8)},
    "adapter": {"a": jnp.linspace(-0.5, 0.5, 8).reshape(8, 1), "b": jnp.array([0.3])},
    "head": jnp.array([1.5, 0.25, -0.75]),
}
LABELS = {"backbone": "frozen", "adapter": "adam", "head": "sgd"}


def grads(i):
    return jax.tree.map(lambda x: jnp.cos((i + 1) * x) - 0.05 * i, PARAMS)


def run(tx, steps=4):
    state = tx.init(PARAMS)
    params = PARAMS
    for i in range(steps):
        updates, state = tx.update(grads(i), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def label_fn(params):
    return {k: jax.tree.map(lambda _: LABELS[k], v) for k, v in params.items()}


@pytest.mark.parametrize("labels", [LABELS, label_fn], ids=["prefix_tree", "callable"])
def test_equals_optax_partition(labels):
    ours, s_ours = run(partition(
        {"adam": optax.adam(0.05), "sgd": optax.sgd(0.1, momentum=0.9),
         "frozen": optstate.set_to_zero()}, labels))
    theirs, s_theirs = run(optax.partition(
        {"adam": optax.adam(0.05), "sgd": optax.sgd(0.1, momentum=0.9),
         "frozen": optax.set_to_zero()}, labels))
    assert_trees_close(ours, theirs, "params", rtol=1e-6, atol=1e-7)
    assert_trees_close(jax.tree.leaves(s_ours), jax.tree.leaves(s_theirs), "state", rtol=1e-6,
                       atol=1e-7)
    # frozen parameters did not move
    assert_trees_close(ours["backbone"], PARAMS["backbone"], "frozen params", rtol=0, atol=0)


def test_optstate_inner_transforms_equal_optax():
    ours, _ = run(partition(
        {"adam": optstate.adam(0.05), "sgd": optstate.sgd(0.1, momentum=0.9),
         "frozen": optstate.set_to_zero()}, LABELS))
    theirs, _ = run(optax.partition(
        {"adam": optax.adam(0.05), "sgd": optax.sgd(0.1, momentum=0.9),
         "frozen": optax.set_to_zero()}, LABELS))
    assert_trees_close(ours, theirs, "params", rtol=2e-5, atol=2e-6)


def state_bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_frozen_group_holds_no_state_arrays():
    labels = {"backbone": "frozen", "adapter": "train", "head": "frozen"}
    tx = partition({"train": optstate.adam(1e-3), "frozen": optstate.set_to_zero()}, labels)
    state = tx.init(PARAMS)
    assert isinstance(state, PartitionState)
    assert isinstance(state.inner_states["frozen"], MaskedState)
    assert jax.tree.leaves(state.inner_states["frozen"]) == []
    # Total state = Adam's state over the adapter leaves alone (mu, nu: 2 x 9 floats + count).
    reference = optstate.adam(1e-3).init(PARAMS["adapter"])
    assert state_bytes(state) == state_bytes(reference)
    assert state_bytes(state) < state_bytes(optstate.adam(1e-3).init(PARAMS))
    # and the frozen updates are exact zeros
    updates, _ = tx.update(grads(0), state, PARAMS)
    for leaf in jax.tree.leaves(updates["backbone"]) + [updates["head"]]:
        assert not np.any(np.asarray(leaf))


def test_jit_no_recompile_structure_kept_extra_args_ignored():
    tx = partition({"adam": optstate.adam(0.05), "sgd": optax.sgd(0.1, momentum=0.9),
                    "frozen": optstate.set_to_zero()}, LABELS)
    hash(tx)
    state = tx.init(PARAMS)
    step = jax.jit(chex.assert_max_traces(
        lambda g, s, p: tx.update(g, s, p, some_unknown_arg=3), n=1))
    for i in range(3):
        _, new_state = step(grads(i), state, PARAMS)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        state = new_state


def test_label_without_transform_names_label_and_path():
    tx = partition({"adam": optax.adam(0.1), "sgd": optax.sgd(0.1)}, LABELS)
    with pytest.raises(ValueError, match=r"label 'frozen' at \['backbone'\].*\['adam', 'sgd'\]"):
        tx.init(PARAMS)


def test_label_tree_mismatch_names_path():
    bad = {"backbone": "frozen", "adapter": {"a": "adam"}, "head": "sgd"}
    tx = partition({"adam": optax.adam(0.1), "sgd": optax.sgd(0.1),
                    "frozen": optax.set_to_zero()}, bad)
    with pytest.raises(ValueError, match=r"partition.init.*labels.*\['adapter'\]\['b'\]"):
        tx.init(PARAMS)
