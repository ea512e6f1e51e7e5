"""The aliases against Optax (the independent reference), worked examples, and the protocol."""

from __future__ import annotations

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate

from tests import helpers as parity

# The seeds this file's tests have always used (test_transforms.py uses 2 and 3).
PARAMS_SEED, NOISE_SEED = 0, 1


def _schedule(peak):
    return optax.schedules.warmup_cosine_decay_schedule(0.0, peak, 5, parity.STEPS, peak * 0.1)


# (name, optstate factory, optax factory, learning rate); each alias with a float and a
# schedule learning rate.
_ALIAS_CASES = [
    ("sgd", lambda lr: optstate.sgd(lr), lambda lr: optax.sgd(lr), 0.05),
    ("sgd_momentum", lambda lr: optstate.sgd(lr, momentum=0.9),
     lambda lr: optax.sgd(lr, momentum=0.9), 0.02),
    ("sgd_nesterov", lambda lr: optstate.sgd(lr, momentum=0.8, nesterov=True),
     lambda lr: optax.sgd(lr, momentum=0.8, nesterov=True), 0.02),
    ("adam", lambda lr: optstate.adam(lr), lambda lr: optax.adam(lr), 0.05),
    ("adamw", lambda lr: optstate.adamw(lr, weight_decay=0.05),
     lambda lr: optax.adamw(lr, weight_decay=0.05), 0.05),
    ("rmsprop", lambda lr: optstate.rmsprop(lr), lambda lr: optax.rmsprop(lr), 0.01),
    ("rmsprop_centered_momentum",
     lambda lr: optstate.rmsprop(lr, centered=True, momentum=0.9, eps=1e-4),
     lambda lr: optax.rmsprop(lr, centered=True, momentum=0.9, eps=1e-4), 0.005),
    ("adagrad", lambda lr: optstate.adagrad(lr), lambda lr: optax.adagrad(lr), 0.1),
    ("adadelta", lambda lr: optstate.adadelta(lr, weight_decay=0.01),
     lambda lr: optax.adadelta(lr, weight_decay=0.01), 1.0),
    ("lamb", lambda lr: optstate.lamb(lr, weight_decay=0.01),
     lambda lr: optax.lamb(lr, weight_decay=0.01), 0.02),
    ("lion", lambda lr: optstate.lion(lr), lambda lr: optax.lion(lr), 0.003),
    ("adafactor", lambda lr: optstate.adafactor(lr), lambda lr: optax.adafactor(lr), 0.05),
    ("adafactor_factored_momentum_decay",
     lambda lr: optstate.adafactor(lr, min_dim_size_to_factor=4, momentum=0.9,
                                   weight_decay_rate=1e-3),
     lambda lr: optax.adafactor(lr, min_dim_size_to_factor=4, momentum=0.9,
                                weight_decay_rate=1e-3), 0.05),
]


@pytest.mark.parametrize("scheduled", [False, True], ids=["float_lr", "schedule_lr"])
@pytest.mark.parametrize("name,ours,theirs,lr", _ALIAS_CASES, ids=[c[0] for c in _ALIAS_CASES])
def test_alias_matches_optax_after_40_steps(name, ours, theirs, lr, scheduled):
    rate = _schedule(lr) if scheduled else lr
    params, noise = parity.params(seed=PARAMS_SEED), parity.noise(seed=NOISE_SEED)
    (p_ours, s_ours), (p_ref, s_ref) = parity.run_pair(ours(rate), theirs(rate), params, noise)
    parity.assert_trees_close(p_ours, p_ref, f"{name} params", check_dtype=False)
    parity.assert_trees_close(s_ours, s_ref, f"{name} state", check_dtype=False,
                              check_structure=False)
    # The run moved the parameters (a test that cannot fail otherwise).
    assert float(jnp.max(jnp.abs(p_ours["w"] - params["w"]))) > 1e-3


def test_adafactor_factors_the_matrix_leaf():
    state = optstate.adafactor(0.1, min_dim_size_to_factor=4).init(parity.params(seed=PARAMS_SEED))
    factored = state[0]
    assert factored.v_row["w"].shape == (6,) and factored.v_col["w"].shape == (8,)
    assert factored.v["w"].shape == (1,) and factored.v["b"].shape == (6,)


# --- worked examples -----------------------------------------------------------------------


def test_adam_worked_example_on_x_squared():
    tx = optstate.adam(1e-3)
    x = jnp.asarray(3.0)
    state = tx.init(x)
    seen = []
    for _ in range(3):
        u, state = tx.update(2.0 * x, state, x)  # f(x) = x^2, f'(x) = 2x
        x = optstate.apply_updates(x, u)
        seen.append(float(x))
    np.testing.assert_allclose(seen, [2.999, 2.998, 2.997], atol=1e-6)


def test_adamw_worked_example_one_step():
    tx = optstate.adamw(0.1, weight_decay=0.01)
    p = jnp.asarray([1.0, -1.0])
    state = tx.init(p)
    u, _ = tx.update(jnp.asarray([0.25, -0.5]), state, p)
    # First Adam step is sign(g) (up to eps); decay uses the pre-step parameters:
    # 1 - 0.1 * (1 + 0.01 * 1) = 0.899.
    np.testing.assert_allclose(optstate.apply_updates(p, u), [0.899, -0.899], atol=1e-6)


def test_adam_l2_differs_from_adamw_and_equals_l2_then_adam():
    wd, lr = 0.1, 0.05
    params = parity.params(seed=PARAMS_SEED)
    noise = parity.noise(seed=NOISE_SEED)
    hand_adam = optax.chain(optax.scale_by_adam(), optax.scale(-lr))

    def l2_then_adam_step(carry, n):
        p, s = carry
        g = parity.grads(p, n)
        g = jax.tree.map(lambda g, p: g + wd * p, g, p)  # L2 folded into the gradient
        u, s = hand_adam.update(g, s)
        return (optax.apply_updates(p, u), s), None

    (p_hand, _), _ = jax.lax.scan(l2_then_adam_step, (params, hand_adam.init(params)), noise)
    (p_l2, _), (p_w, _) = parity.run_pair(optstate.adam_l2(lr, weight_decay=wd),
                                          optstate.adamw(lr, weight_decay=wd), params, noise)
    parity.assert_trees_close(p_l2, p_hand, "adam_l2 vs L2-then-Adam", check_dtype=False)
    assert float(jnp.max(jnp.abs(p_l2["w"] - p_w["w"]))) > 1e-3


# --- protocol ------------------------------------------------------------------------------


def _arrays_in_closures(obj, seen=None) -> list:
    """Every jax array reachable through the closures of the functions in ``obj``."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, jax.Array):
        return [obj]
    found = []
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found += _arrays_in_closures(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            found += _arrays_in_closures(item, seen)
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                found += _arrays_in_closures(cell.cell_contents, seen)
            except ValueError:  # empty cell
                pass
    return found


_EVERY_ALIAS = [
    optstate.sgd(0.1), optstate.sgd(0.1, momentum=0.9, nesterov=True),
    optstate.adam(0.1), optstate.adamw(0.1, mask={"w": True, "b": False, "s": False}),
    optstate.adam_l2(0.1), optstate.rmsprop(0.1, centered=True, momentum=0.9),
    optstate.adagrad(0.1), optstate.adadelta(0.1), optstate.lamb(0.1), optstate.lion(0.1),
    optstate.adafactor(0.1, min_dim_size_to_factor=4, momentum=0.9, weight_decay_rate=1e-3),
    optstate.adam(_schedule(0.1)),
]


@pytest.mark.parametrize("tx", _EVERY_ALIAS, ids=lambda tx: str(_EVERY_ALIAS.index(tx)))
def test_alias_protocol_hashable_no_arrays_structure_kept_extra_kwargs(tx):
    assert isinstance(tx, optstate.GradientTransformation)
    assert callable(tx.init) and callable(tx.update) and len(tx) == 2
    hash(tx)
    assert {tx: 1}[tx] == 1
    assert _arrays_in_closures(tx) == []
    params = parity.params(seed=PARAMS_SEED)
    grads = parity.grads(params, jax.tree.map(lambda x: x[0], parity.noise(1, seed=NOISE_SEED)))
    # Shape-level evaluation: no compilation, checks the state's structure, shapes and dtypes.
    state0 = jax.eval_shape(tx.init, params)
    _, state1 = jax.eval_shape(
        lambda g, s, p: tx.update(g, s, p, unknown_kwarg=3, another=jnp.ones(2)),
        grads, state0, params,
    )
    assert jax.tree.structure(state1) == jax.tree.structure(state0)
    assert jax.tree.leaves(state1) == jax.tree.leaves(state0)  # same shapes and dtypes
    counts = [x for x in jax.tree.leaves(state0) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert all(c.dtype == jnp.int32 for c in counts)


def test_jitted_step_does_not_recompile_on_step_two():
    tx = optstate.adamw(_schedule(0.1), weight_decay=0.01)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, n):
        u, state = tx.update(parity.grads(params, n), state, params)
        return optstate.apply_updates(params, u), state

    params = parity.params(seed=PARAMS_SEED)
    state = tx.init(params)
    noise = parity.noise(3, seed=NOISE_SEED)
    for i in range(3):
        params, state = step(params, state, jax.tree.map(lambda x: x[i], noise))
    assert int(state[0].count) == 3


def test_mixes_with_optax_in_chain_both_directions():
    lr, wd = 0.05, 0.05
    params, noise = parity.params(seed=PARAMS_SEED), parity.noise(seed=NOISE_SEED)
    ours_outside = optstate.chain(optax.scale_by_adam(), optstate.add_decayed_weights(wd),
                                  optax.scale_by_learning_rate(lr))
    optax_outside = optax.chain(optstate.scale_by_adam(), optax.add_decayed_weights(wd),
                                optstate.scale_by_learning_rate(lr))
    reference = optax.adamw(lr, weight_decay=wd)
    (p1, s1), (p_ref, s_ref) = parity.run_pair(ours_outside, reference, params, noise)
    (p2, s2), _ = parity.run_pair(optax_outside, reference, params, noise)
    parity.assert_trees_close(p1, p_ref, "optstate.chain(optax, optstate, optax)",
                              check_dtype=False)
    parity.assert_trees_close(p2, p_ref, "optax.chain(optstate, optax, optstate)",
                              check_dtype=False)
    parity.assert_trees_close(s2, s_ref, "state of optax.chain(optstate, ...)", check_dtype=False,
                              check_structure=False)


def test_flax_style_extra_args_through_optax_wrappers():
    # Optax's own combinators call update with extra keyword arguments (e.g. value=...).
    tx = optax.chain(optstate.adam(0.1), optax.scale(1.0))
    params = parity.params(seed=PARAMS_SEED)
    grads = parity.grads(params, jax.tree.map(lambda x: x[0], parity.noise(1, seed=NOISE_SEED)))
    u, _ = tx.update(grads, tx.init(params), params, value=jnp.asarray(1.0))
    u_ref, _ = optax.adam(0.1).update(grads, optax.adam(0.1).init(params), params)
    parity.assert_trees_close(u, u_ref, "updates", check_dtype=False)
