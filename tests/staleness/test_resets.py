"""Tests of reset_every_n and adaptive_reset against manually re-initialised optimizers (Optax's
and optstate's) and against the staleness model's reset period."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from tests import helpers
from optstate import adaptive_reset, reset_every_n
from optstate import staleness as st

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.array([0.5, -0.25, 0.1])}


def _grads(t: int):
    rng = np.random.default_rng(100 + t)
    return {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32)) for k, v in PARAMS.items()}


def _run(tx, steps, params=PARAMS, pass_params=True):
    state = tx.init(params)
    step = helpers.jit_traced_once(lambda g, s, p: tx.update(g, s, p if pass_params else None))
    updates, states = [], []
    for t in range(steps):
        u, state = step(_grads(t), state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
        states.append(state)
    return updates, states, step


def _close(a, b):
    helpers.assert_trees_close(a, b, "updates", rtol=1e-6, atol=1e-9, check_dtype=False)


def _differs(a, b) -> bool:
    return any(not np.allclose(x, y, rtol=1e-3) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_reset_every_n_equals_fresh_optax_adam_at_resets_only():
    n, steps = 4, 11
    inner = optax.adam(1e-2)
    updates, _, step = _run(reset_every_n(inner, n), steps)
    # reference: Optax's adam, re-initialised by hand before updates n+1, 2n+1, ...
    params, state = PARAMS, inner.init(PARAMS)
    for t in range(steps):
        if t > 0 and t % n == 0:
            state = inner.init(params)
        ref, state = inner.update(_grads(t), state, params)
        _close(updates[t], ref)
        fresh, _ = inner.update(_grads(t), inner.init(params), params)
        if t % n == 0:
            _close(updates[t], fresh)  # a fresh optimizer's first step from the current params
        else:
            assert _differs(updates[t], fresh), f"update {t + 1} looks like a reset"
        params = optax.apply_updates(params, ref)
    # one compilation across reset boundaries: helpers.jit_traced_once fails on a retrace


def test_reset_every_n_restarts_adam_but_not_the_learning_rate_schedule():
    n, steps = 3, 8
    schedule = lambda count: 0.1 / (1.0 + count)  # noqa: E731
    inner = optstate.adam(schedule, nu_dtype=jnp.bfloat16)
    updates, states, _ = _run(reset_every_n(inner, n), steps)
    params, state = PARAMS, inner.init(PARAMS)
    ref_step = jax.jit(inner.update)  # the same XLA arithmetic as the wrapped, jitted step
    for t in range(steps):
        if t > 0 and t % n == 0:
            state = (inner.init(params)[0], state[1])  # Adam restarts, the schedule goes on
        ref, state = ref_step(_grads(t), state, params)
        _close(updates[t], ref)
        params = optax.apply_updates(params, ref)
    wrapped = states[-1]
    assert int(wrapped.inner_state[1].count) == steps  # schedule count never reset
    assert int(wrapped.inner_state[0].count) == (steps - 1) % n + 1
    assert wrapped.inner_state[0].nu["w"].dtype == jnp.bfloat16  # stored dtype preserved
    assert [int(s.count) for s in states] == [(t % n) + 1 for t in range(steps)]


def test_asymmetric_reset_of_the_second_moment_only():
    n, steps = 3, 7
    inner = optax.adam(1e-2)
    updates, _, _ = _run(reset_every_n(inner, n, fields=("nu",)), steps)
    params, state = PARAMS, inner.init(PARAMS)
    for t in range(steps):
        if t > 0 and t % n == 0:
            adam_state = state[0]
            state = (adam_state._replace(nu=jax.tree.map(jnp.zeros_like, adam_state.nu),
                                         count=jnp.zeros_like(adam_state.count)),) + state[1:]
        ref, state = inner.update(_grads(t), state, params)
        _close(updates[t], ref)
        params = optax.apply_updates(params, ref)


def test_reset_without_params_uses_the_update_shapes():
    tx = reset_every_n(optax.adam(1e-2), 2)
    with_params, _, _ = _run(tx, 5)
    without, states, _ = _run(tx, 5, pass_params=False)
    for a, b in zip(with_params, without):
        _close(a, b)
    assert jax.tree.structure(states[-1]) == jax.tree.structure(tx.init(PARAMS))


def test_reset_keeps_injected_hyperparameters_and_their_count():
    n = 2
    inner = optstate.inject_hyperparams(optstate.adam)(learning_rate=0.1)
    tx = reset_every_n(inner, n)
    state = tx.init(PARAMS)
    ref_state = inner.init(PARAMS)
    step = jax.jit(tx.update)
    params = PARAMS
    for t in range(5):
        if t == 1:  # a user lowers the learning rate between steps
            state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
            ref_state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
        if t > 0 and t % n == 0:
            fresh = inner.init(params)
            ref_state = ref_state._replace(inner_state=fresh.inner_state)
        u, state = step(_grads(t), state, params)
        ref, ref_state = inner.update(_grads(t), ref_state, params)
        _close(u, ref)
        params = optax.apply_updates(params, ref)
    assert float(state.inner_state.hyperparams["learning_rate"]) == pytest.approx(0.01)
    assert int(state.inner_state.count) == 5


def test_reset_every_n_rejects_bad_arguments():
    with pytest.raises(ValueError, match="int >= 1, got 0"):
        reset_every_n(optax.adam(1e-3), 0)
    with pytest.raises(ValueError, match="int >= 1, got 2.5"):
        reset_every_n(optax.adam(1e-3), 2.5)
    with pytest.raises(ValueError, match=r"fields=\('zeta',\) select no floating state leaf.*'nu'"):
        reset_every_n(optax.adam(1e-3), 3, fields=("zeta",)).init(PARAMS)


def _quantize_state():
    fn = getattr(optstate, "quantize_state", None)
    if fn is None:  # not yet re-exported by optstate/__init__.py
        from optstate.quantization.wrapper import quantize_state as fn
    return fn


@pytest.mark.parametrize("order,fmt", [("reset_outside", "int8"), ("reset_inside", "int8"),
                                       ("reset_outside", "int4")])
def test_reset_every_n_composes_with_quantize_state_in_either_order(order, fmt):
    quantize_state = _quantize_state()
    params = {"w": jnp.linspace(-1.0, 1.0, 8192).reshape(64, 128)}
    n = 3

    def grads(t):
        return {"w": jnp.asarray(np.random.default_rng(t).normal(size=(64, 128)), jnp.float32)}

    if order == "reset_outside":
        tx = reset_every_n(quantize_state(optstate.adam(1e-2), fmt), n)
    else:
        tx = quantize_state(reset_every_n(optstate.adam(1e-2), n), fmt)
    fresh_tx = quantize_state(optstate.adam(1e-2), fmt)
    fresh_step = jax.jit(fresh_tx.update)
    state = tx.init(params)
    structure = jax.tree.structure(state)
    step = helpers.jit_traced_once(tx.update)
    p = params
    for t in range(n + 2):
        u, state = step(grads(t), state, p)
        fresh, _ = fresh_step(grads(t), fresh_tx.init(p), p)
        if t % n == 0:  # first update after init or a reset: a fresh quantized Adam's
            _close(u, fresh)
        else:
            assert _differs(u, fresh), f"update {t + 1} looks like a reset"
        p = optax.apply_updates(p, u)
    assert jax.tree.structure(state) == structure


# ---------------------------------------------------------------------------------------------
# adaptive_reset
# ---------------------------------------------------------------------------------------------


class _ToyState(NamedTuple):
    count: jax.Array
    nu: jax.Array


def _scripted_staleness(table: np.ndarray, size: int) -> optstate.GradientTransformation:
    """A test transform whose update j after a (re)start leaves exactly round(size * S_j) of
    its ``nu`` elements unchanged."""
    frozen = jnp.asarray(np.rint(table * size).astype(np.int32))

    def init(params):
        del params
        return _ToyState(jnp.zeros((), jnp.int32), jnp.zeros((size,), jnp.float32))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        moved = jnp.arange(size) >= frozen[jnp.minimum(count, len(table) - 1)]
        return updates, _ToyState(count, state.nu + moved.astype(jnp.float32))

    return optstate.GradientTransformation(init, update)


def _brute_period(p: int, b2: float, s0: float) -> tuple[int, np.ndarray]:
    rho = 2.0**-p * math.log(2) / (2 * (1 - b2))
    F = lambda x: math.erf(math.sqrt(max(x, 0.0) / 2))  # noqa: E731
    steady = F(1 + rho) - F(max(0.0, 1 - rho))
    s = [0.0] + [(F((1 + rho) * (1 - b2**j)) - F(max(0.0, (1 - rho) * (1 - b2**j)))) / steady
                 for j in range(1, 4000)]
    total = 0.0
    for k in range(1, 4000):
        total += max(0.0, (s[k] - s0) / (1 - s0))
        if total / k >= 2 * b2**k / (1 + b2**k):
            return k, np.array(s)
    raise AssertionError


def test_adaptive_reset_on_model_staleness_resets_at_the_model_period():
    b2, s0 = 0.99, 0.6
    period, table = _brute_period(3, b2, s0)  # fp8_e4m3
    assert period == st.reset_period("fp8_e4m3", b2, s0=s0)
    tx = adaptive_reset(_scripted_staleness(table, 1 << 16), b2=b2, s0=s0)
    params = jnp.zeros(3)

    def body(state, _):
        _, state = tx.update(params, state, params)
        return state, (state.pending, state.cycle_step, state.resets, state.inner_state.count)

    steps = 3 * period + 2
    _, (pending, cycle, resets, inner_count) = jax.jit(
        lambda s: jax.lax.scan(body, s, None, length=steps))(tx.init(params))
    flagged = np.nonzero(np.asarray(pending))[0] + 1  # 1-based update numbers
    assert len(flagged) == 3
    lengths = np.diff(np.concatenate([[0], flagged]))
    assert np.all(np.abs(lengths - period) <= 1), (lengths, period)
    # the update after a flag starts a new cycle from a fresh inner state (count restarted)
    first = flagged[0]
    assert int(cycle[first]) == 1 and int(inner_count[first]) == 1 and int(resets[first]) == 1
    assert int(resets[-1]) == 3


def test_adaptive_reset_follows_its_rule_on_a_bf16_adam():
    b2, s0 = 0.999, 0.6
    inner = optstate.scale_by_adam(b2=b2, nu_dtype=jnp.bfloat16)
    tx = adaptive_reset(inner, b2=b2, s0=s0)
    params = {"w": jnp.zeros((512,))}

    def body(state, key):
        grads = {"w": jax.random.normal(key, (512,))}
        _, new = tx.update(grads, state, params)
        before = jnp.where(state.pending > 0, 0.0, state.inner_state.nu["w"].astype(jnp.float32))
        independent = jnp.mean(before == new.inner_state.nu["w"].astype(jnp.float32))
        return new, (new.stall, independent, new.pending, new.inner_state.count, new.resets)

    _, (stall, independent, pending, count, resets) = jax.jit(lambda s: jax.lax.scan(
        body, s, jax.random.split(jax.random.key(0), 3000)))(tx.init(params))
    stall, independent, pending = map(np.asarray, (stall, independent, pending))
    np.testing.assert_allclose(stall, independent, atol=1e-6)
    # replay the rule in float64 from the measured stall fractions
    k, total, expected = 0, 0.0, []
    for t in range(len(stall)):
        if t > 0 and expected[-1]:
            k, total = 0, 0.0
        k += 1
        total += max(0.0, (stall[t] - s0) / (1 - s0))
        expected.append(total / k >= 2 * b2**k / (1 + b2**k))
    np.testing.assert_array_equal(pending.astype(bool), np.array(expected))
    flagged = np.nonzero(pending)[0]
    assert len(flagged) >= 1
    assert int(count[flagged[0] + 1]) == 1  # Adam's bias-correction count restarted
    assert int(resets[-1]) == int(np.sum(pending[:-1]))


def test_adaptive_reset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0 < b2 < 1"):
        adaptive_reset(optax.adam(1e-3), b2=1.5)
    with pytest.raises(ValueError, match=r"measure=\('v',\) matches no floating state leaf"):
        adaptive_reset(optax.adam(1e-3), b2=0.999, measure=("v",)).init(PARAMS)
