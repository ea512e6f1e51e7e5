"""optstate.inject_hyperparams: Optax parity, state dtypes, settable values, static args."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate import InjectHyperparamsState, inject_hyperparams
from optstate import schedules
from tests.helpers import assert_trees_close

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.5, -2.0])}


def grads(i):
    return jax.tree.map(lambda x: jnp.sin((i + 1) * x) + 0.1 * i, PARAMS)


def train(tx, steps=20, new_lr_at=10, new_lr=3e-3):
    """``steps`` jitted updates, setting the learning rate at step ``new_lr_at``; the step must
    be traced once (neither step 2 nor the new learning rate recompiles)."""
    chex.clear_trace_counter()
    state = tx.init(PARAMS)
    step = jax.jit(chex.assert_max_traces(tx.update, n=1))
    params = PARAMS
    for i in range(steps):
        if i == new_lr_at:
            state.hyperparams["learning_rate"] = jnp.asarray(new_lr, jnp.float32)
        updates, state = step(grads(i), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def kwargs(lib):
    return dict(learning_rate=0.05, b2=0.99, weight_decay=lib.linear_schedule(1e-2, 1e-1, 15))


def test_optstate_adamw_equals_optax_over_20_steps_with_lr_change():
    ours, s_ours = train(inject_hyperparams(optstate.adamw)(
        learning_rate=0.05, b2=0.99, weight_decay=schedules.linear(1e-2, 1e-1, 15)))
    theirs, s_theirs = train(optax.inject_hyperparams(optax.adamw)(**kwargs(optax)))
    assert_trees_close(ours, theirs, "params")
    assert set(s_ours.hyperparams) == set(s_theirs.hyperparams)
    assert_trees_close(s_ours.hyperparams, s_theirs.hyperparams, "hyperparams", rtol=1e-6,
                       atol=0)
    assert float(s_ours.hyperparams["learning_rate"]) == np.float32(3e-3)


def test_same_inner_equals_optax_exactly():
    ours, s_ours = train(inject_hyperparams(optax.adamw)(**kwargs(optax)))
    theirs, s_theirs = train(optax.inject_hyperparams(optax.adamw)(**kwargs(optax)))
    for k in ("w", "b"):
        np.testing.assert_array_equal(ours[k], theirs[k])
    assert int(s_ours.count) == int(s_theirs.count) == 20


def test_changing_lr_changes_the_next_step_like_a_fresh_optimizer():
    # Setting lr between steps = running that step with an optimizer built with that lr.
    tx = inject_hyperparams(optstate.sgd)(learning_rate=0.1, momentum=0.9)
    state = tx.init(PARAMS)
    _, state = tx.update(grads(0), state)
    state.hyperparams["learning_rate"] = 0.5
    updates, state = tx.update(grads(1), state)
    ref = optstate.sgd(0.1, momentum=0.9)
    rs = ref.init(PARAMS)
    _, rs = ref.update(grads(0), rs)
    trace = jax.tree.map(lambda t, g: g + 0.9 * t, rs[0].trace, grads(1))
    for k in ("w", "b"):
        np.testing.assert_allclose(updates[k], -0.5 * trace[k], rtol=1e-6)
    assert state.hyperparams["learning_rate"].dtype == jnp.float32
    state.hyperparams["learning_rate"] = 1  # a Python int stays a float32 hyperparameter
    _, state = tx.update(grads(2), state)
    assert state.hyperparams["learning_rate"].dtype == jnp.float32


def test_bfloat16_params_give_bfloat16_hyperparams_and_float32_on_request():
    # Optax's rule (parity with optax.inject_hyperparams: tests/test_optax_behaviours.py):
    # the parameters' dtype by default; hyperparam_dtype=jnp.float32 keeps float32.
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    for dtype, want in ((None, jnp.bfloat16), (jnp.float32, jnp.float32)):
        tx = inject_hyperparams(optstate.adam, hyperparam_dtype=dtype)(
            learning_rate=1e-3, b1=0.9)
        state = tx.init(params)
        assert isinstance(state, InjectHyperparamsState)
        for name in ("learning_rate", "b1", "b2", "eps", "eps_root"):
            v = state.hyperparams[name]
            assert isinstance(v, jax.Array) and v.dtype == want and v.shape == ()
            assert not v.weak_type
        assert float(state.hyperparams["learning_rate"]) == float(jnp.asarray(1e-3, want))
        # The state keeps its structure and dtypes, with or without params at update.
        for p in (params, None):
            _, new_state = tx.update(jax.tree.map(jnp.ones_like, params), state, p)
            assert jax.tree.structure(new_state) == jax.tree.structure(state)
            for x, y in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
                assert (x.dtype, x.shape, x.weak_type) == (y.dtype, y.shape, y.weak_type)


def test_schedule_evaluated_on_step_count_and_not_settable():
    sched = schedules.linear(1.0, 0.0, 4)
    tx = inject_hyperparams(optax.sgd)(learning_rate=sched)
    state = tx.init(PARAMS)
    assert float(state.hyperparams["learning_rate"]) == 1.0
    g = jax.tree.map(jnp.ones_like, PARAMS)
    seen = []
    for _ in range(3):
        state.hyperparams["learning_rate"] = jnp.float32(123.0)  # overwritten by the schedule
        updates, state = tx.update(g, state)
        seen.append(-float(updates["b"][0]))
    assert seen == [1.0, 0.75, 0.5]  # sched(0), sched(1), sched(2)
    assert float(state.hyperparams["learning_rate"]) == 0.5


def test_ints_bools_and_static_args_stay_static():
    received = {}

    def factory(step_size, repeats=2, negate=False, fn=None):
        received.update(repeats=repeats, negate=negate, fn=fn)
        assert isinstance(repeats, int) and isinstance(negate, bool)  # not traced

        def update(updates, state, params=None):
            factor = step_size * repeats * (-1 if negate else 1)
            return jax.tree.map(lambda u: fn(u) * factor, updates), state

        return optstate.GradientTransformation(lambda p: optstate.EmptyState(), update)

    tx = inject_hyperparams(factory, static_args="fn")(0.5, repeats=3, negate=True, fn=jnp.abs)
    state = tx.init(PARAMS)
    assert set(state.hyperparams) == {"step_size"}
    updates, _ = jax.jit(tx.update)(grads(0), state)
    np.testing.assert_allclose(updates["w"], -1.5 * np.abs(grads(0)["w"]), rtol=1e-6)
    assert received["fn"] is jnp.abs


def test_callable_mask_as_static_arg_equals_optax():
    mask = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)  # noqa: E731
    ours, _ = train(inject_hyperparams(optstate.adamw, static_args=("mask",))(
        learning_rate=0.05, weight_decay=0.1, mask=mask), steps=5)
    theirs, _ = train(optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.05, weight_decay=0.1, mask=mask), steps=5)
    assert_trees_close(ours, theirs, "params")


def test_errors_name_the_argument_or_key():
    with pytest.raises(ValueError, match=r"static_args \['not_an_arg'\].*learning_rate"):
        inject_hyperparams(optstate.adam, static_args="not_an_arg")
    tx = inject_hyperparams(optstate.adam)(learning_rate=0.1)
    state = tx.init(PARAMS)
    state.hyperparams["lr"] = 0.1
    with pytest.raises(KeyError, match=r"unknown keys \['lr'\]"):
        tx.update(grads(0), state)


def test_extra_args_ignored_and_transform_hashable():
    tx = inject_hyperparams(optax.adam)(learning_rate=0.1)
    hash(tx)
    assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(tx))
    state = tx.init(PARAMS)
    _, new_state = tx.update(grads(0), state, PARAMS, loss=jnp.float32(1.0))
    assert int(new_state.count) == 1
