"""The least-squares staleness study: data, the Adam it runs, the exact EMA it compares with,
and the bf16 ratchet it exists to show."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate.tasks import least_squares as ls
from optstate.tasks import second_moment as sm

TINY = ls.LeastSquaresConfig(problems=4, rows=20, cols=8, batch_rows=5, steps=600,
                             record_every=50, learning_rate=3e-2)
RESET = 7  # a short period, so that the run resets many times, mid-record too


@pytest.fixture(scope="module")
def study():
    variants = (ls.LsqVariant("fp32"), ls.LsqVariant("bf16", "bf16"),
                ls.LsqVariant("bf16-sr", "bf16", "stochastic"),
                ls.LsqVariant("fp32+reset", reset_period=RESET))
    return ls.run_study(TINY, variants)


def test_problems_match_a_float64_least_squares_solve():
    problems = ls.Problems(TINY)
    a, b = np.asarray(problems.a, np.float64), np.asarray(problems.b, np.float64)
    np.testing.assert_allclose(problems.scales, np.geomspace(0.1, 10.0, TINY.cols))
    for k in range(TINY.problems):
        # the normal equations hold at the solution, and its loss is the recorded minimum
        residual = a[k] @ problems.solution[k] - b[k]
        np.testing.assert_allclose(a[k].T @ residual, 0.0, atol=1e-4)
        assert problems.min_loss[k] == pytest.approx(0.5 * np.mean(residual**2), rel=1e-5)


def test_default_variants_reset_at_the_models_period():
    variants = {v.name: v for v in ls.default_variants(0.999)}
    assert list(variants) == ["fp32", "bf16", "bf16-sr", "bf16+reset", "fp32+reset"]
    period = optstate.staleness.reset_period("bf16", 0.999)
    assert variants["bf16+reset"].reset_period == variants["fp32+reset"].reset_period == period
    assert variants["bf16-sr"].rounding == "stochastic" and variants["bf16"].fmt == "bf16"


def test_fp32_run_is_optax_adam_on_the_same_batches(study):
    problems = ls.Problems(TINY)
    key = jax.random.key(TINY.seed)
    tx = optax.adam(TINY.learning_rate, b1=TINY.b1, b2=TINY.b2, eps=TINY.eps)
    x = jnp.zeros((TINY.problems, TINY.cols))
    state = tx.init(x)

    @jax.jit
    def step(x, state, t):
        rows = jax.random.randint(jax.random.fold_in(key, t), (TINY.problems, TINY.batch_rows),
                                  0, TINY.rows)
        a = jnp.take_along_axis(problems.a, rows[:, :, None], axis=1)
        b = jnp.take_along_axis(problems.b, rows, axis=1)
        g = jax.grad(lambda x: jnp.sum(0.5 * jnp.mean((jnp.einsum("pmn,pn->pm", a, x) - b)**2,
                                                      axis=1)))(x)
        updates, state = tx.update(g, state, x)
        return optax.apply_updates(x, updates), state

    for t in range(TINY.steps):
        x, state = step(x, state, t)
    residual = np.einsum("pmn,pn->pm", np.asarray(problems.a, np.float64), np.asarray(x)) - \
        np.asarray(problems.b, np.float64)
    excess = np.mean(0.5 * np.mean(residual**2, axis=1) - problems.min_loss)
    assert study["runs"]["fp32"]["final_excess_loss"] == pytest.approx(excess, rel=1e-3)


def test_exact_ema_is_fp32_adams_nu_with_and_without_resets(study):
    # In fp32 the stored nu is the exact EMA: a ratio of 1 at every point, also across resets
    # (an off-by-one restart of the exact EMA would show as a ratio far from 1 after each).
    for name in ("fp32", "fp32+reset"):
        np.testing.assert_allclose(study["runs"][name]["nu_drift"], 1.0, rtol=1e-5)
    assert study["runs"]["fp32"]["stall_fraction"][-1] < 0.05


def test_bf16_nearest_ratchets_and_stochastic_rounding_does_not(study):
    runs = study["runs"]
    assert study["model"]["rho"] > 1.0  # b2 = 0.999 in bf16: no write can lower nu
    drift = np.asarray(runs["bf16"]["nu_drift"])
    # the exact EMA falls as the gradients shrink; the stored one cannot follow
    assert drift[-1] > 1.4 and np.all(np.diff(drift) > 0)
    assert min(runs["bf16"]["stall_fraction"][4:]) > 0.99
    assert abs(runs["bf16-sr"]["nu_drift"][-1] - 1.0) < 0.1  # unbiased: follows the exact EMA
    assert runs["bf16"]["final_excess_loss"] > 1.3 * runs["fp32"]["final_excess_loss"]
    assert runs["bf16-sr"]["final_excess_loss"] < 1.1 * runs["fp32"]["final_excess_loss"]


def test_bf16_nearest_never_lowers_the_stored_second_moment():
    """The mechanism behind the study: with rho > 1 every decrease of nu rounds back."""
    x = {"x": jnp.ones((4, 1024))}
    ones, zeros = {"x": jnp.ones((4, 1024))}, {"x": jnp.zeros((4, 1024))}
    stored = {}
    for name, fmt in (("bf16", "bf16"), ("fp32", "fp32")):
        tx = ls.build_optimizer(ls.LsqVariant(name, fmt), TINY)
        update = jax.jit(tx.update)
        state = tx.init(x)
        for _ in range(3):
            _, state = update(ones, state, x)
        peak = np.asarray(next(iter(sm.nu_values(state).values())))
        for _ in range(30):  # zero gradients: the exact EMA falls by b2 every step
            _, state = update(zeros, state, x)
        stored[name] = (peak, np.asarray(next(iter(sm.nu_values(state).values()))))
    peak, end = stored["bf16"]
    np.testing.assert_array_equal(end, peak)  # 30 writes, all rounded back
    peak, end = stored["fp32"]
    np.testing.assert_allclose(end, peak * 0.999**30, rtol=1e-5)


def test_second_moment_helpers_explain_a_state_without_nu():
    state = optstate.sgd(0.1, momentum=0.9).init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="no second-moment leaf.*'nu'"):
        sm.nu_leaves(state)
    adam = optstate.adam(0.1).init({"w": jnp.zeros(3), "v": jnp.zeros((2, 2))})
    with pytest.raises(ValueError, match="do not pair"):
        sm.grads_like_nu({"w": jnp.zeros(3)}, adam)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="LeastSquaresConfig.steps"):
        ls.LeastSquaresConfig(steps=0)
    with pytest.raises(ValueError, match="multiple of record_every"):
        ls.LeastSquaresConfig(steps=105, record_every=10)
