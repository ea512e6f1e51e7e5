"""The building blocks against Optax (the independent reference) and against formulas."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate._core import numerics as _numerics

from tests import helpers as parity

# The seeds this file's tests have always used (test_aliases.py uses 0 and 1).
PARAMS_SEED, NOISE_SEED = 2, 3


def _descend(o, x, lr=0.02):
    """``block -> scale(-lr)`` for ours (``o``) and Optax's (``x``)."""
    return optstate.chain(o, optstate.scale(-lr)), optax.chain(x, optax.scale(-lr))


_BF16 = jnp.bfloat16
_SCHED = optax.schedules.exponential_decay(0.05, transition_steps=10, decay_rate=0.5)

_BLOCK_CASES = {
    "trace_nesterov": lambda: _descend(optstate.trace(0.9, nesterov=True),
                                       optax.trace(0.9, nesterov=True), 0.01),
    "trace_bf16": lambda: _descend(optstate.trace(0.8, accumulator_dtype=_BF16),
                                   optax.trace(0.8, accumulator_dtype=_BF16), 0.01),
    "adam_nesterov_eps_root": lambda: _descend(
        optstate.scale_by_adam(b1=0.8, b2=0.99, eps_root=1e-8, nesterov=True),
        optax.scale_by_adam(b1=0.8, b2=0.99, eps_root=1e-8, nesterov=True)),
    "adam_mu_bf16": lambda: _descend(optstate.scale_by_adam(mu_dtype=_BF16),
                                     optax.scale_by_adam(mu_dtype=_BF16)),
    "rms_bias_corrected_eps_outside": lambda: _descend(
        optstate.scale_by_rms(0.95, 1e-6, initial_scale=0.1, eps_in_sqrt=False,
                              bias_correction=True),
        optax.scale_by_rms(0.95, 1e-6, initial_scale=0.1, eps_in_sqrt=False,
                           bias_correction=True), 0.005),
    "stddev_bias_corrected": lambda: _descend(
        optstate.scale_by_stddev(0.9, 1e-4, bias_correction=True),
        optax.scale_by_stddev(0.9, 1e-4, bias_correction=True), 0.005),
    "rss_zero_start": lambda: _descend(optstate.scale_by_rss(0.0, 1e-6),
                                       optax.scale_by_rss(0.0, 1e-6)),
    "adadelta": lambda: _descend(optstate.scale_by_adadelta(0.8, 1e-5),
                                 optax.scale_by_adadelta(0.8, 1e-5), 1.0),
    "lion_bf16": lambda: _descend(optstate.scale_by_lion(0.8, 0.95, mu_dtype=_BF16),
                                  optax.scale_by_lion(0.8, 0.95, mu_dtype=_BF16), 0.003),
    "trust_ratio_after_adam": lambda: _descend(
        optstate.chain(optstate.scale_by_adam(),
                       optstate.scale_by_trust_ratio(0.1, 0.5, 1e-3)),
        optax.chain(optax.scale_by_adam(), optax.scale_by_trust_ratio(0.1, 0.5, 1e-3))),
    "factored_rms_offset": lambda: _descend(
        optstate.scale_by_factored_rms(min_dim_size_to_factor=4, decay_rate=0.7,
                                       step_offset=-3),
        optax.scale_by_factored_rms(min_dim_size_to_factor=4, decay_rate=0.7,
                                    step_offset=-3)),
    "decayed_weights_schedule": lambda: _descend(
        optstate.chain(optstate.scale_by_adam(), optstate.add_decayed_weights(_SCHED)),
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(_SCHED))),
    "decayed_weights_mask": lambda: _descend(
        optstate.add_decayed_weights(0.5, mask={"w": True, "b": False, "s": True}),
        optax.add_decayed_weights(0.5, mask={"w": True, "b": False, "s": True}), 0.05),
    "clip": lambda: _descend(optstate.clip(0.3), optax.clip(0.3), 0.1),
    "clip_by_global_norm": lambda: _descend(optstate.clip_by_global_norm(1.0),
                                            optax.clip_by_global_norm(1.0), 0.2),
    "clip_by_block_rms": lambda: _descend(optstate.clip_by_block_rms(0.5),
                                          optax.clip_by_block_rms(0.5), 0.1),
    "schedule_and_ema": lambda: (
        optstate.chain(optstate.ema(0.9, debias=True), optstate.scale_by_schedule(
            lambda c: -_SCHED(c))),
        optax.chain(optax.ema(0.9, debias=True), optax.scale_by_schedule(
            lambda c: -_SCHED(c)))),
    "param_block_rms": lambda: _descend(optstate.scale_by_param_block_rms(0.01),
                                        optax.scale_by_param_block_rms(0.01), 0.05),
}


@pytest.mark.parametrize("name", list(_BLOCK_CASES))
def test_block_matches_optax_after_40_steps(name):
    ours, theirs = _BLOCK_CASES[name]()
    params, noise = parity.params(seed=PARAMS_SEED), parity.noise(seed=NOISE_SEED)
    (p_ours, s_ours), (p_ref, s_ref) = parity.run_pair(ours, theirs, params, noise)
    parity.assert_trees_close(p_ours, p_ref, f"{name} params")
    parity.assert_trees_close(s_ours, s_ref, f"{name} state", check_structure=False)
    assert float(jnp.max(jnp.abs(p_ours["w"] - params["w"]))) > 1e-3


def test_bf16_first_moment_is_stored_in_bf16_and_nu_dtype_is_honoured():
    tx = optstate.scale_by_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    params = parity.params(seed=PARAMS_SEED)
    state = tx.init(params)
    first_noise = jax.tree.map(lambda x: x[0], parity.noise(1, seed=NOISE_SEED))
    _, state = tx.update(parity.grads(params, first_noise), state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.mu))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.nu))
    assert state.count.dtype == jnp.int32


def test_state_field_names_match_optax():
    params = parity.params(seed=PARAMS_SEED)
    pairs = [
        (optstate.scale_by_adam(), optax.scale_by_adam()),
        (optstate.trace(0.9), optax.trace(0.9)),
        (optstate.scale_by_rms(), optax.scale_by_rms()),
        (optstate.scale_by_rms(bias_correction=True), optax.scale_by_rms(bias_correction=True)),
        (optstate.scale_by_stddev(), optax.scale_by_stddev()),
        (optstate.scale_by_rss(), optax.scale_by_rss()),
        (optstate.scale_by_lion(), optax.scale_by_lion()),
        (optstate.scale_by_factored_rms(), optax.scale_by_factored_rms()),
        (optstate.scale_by_adadelta(), optax.scale_by_adadelta()),
        (optstate.scale_by_schedule(lambda c: 1.0), optax.scale_by_schedule(lambda c: 1.0)),
        (optstate.ema(0.9), optax.ema(0.9)),
    ]
    for ours, theirs in pairs:
        a, b = ours.init(params), theirs.init(params)
        assert type(a).__name__ == type(b).__name__
        assert a._fields == b._fields


# --- numerics helpers ----------------------------------------------------------------------


def test_safe_increment_saturates_int32():
    top = jnp.iinfo(jnp.int32).max
    assert int(_numerics.safe_increment(jnp.asarray(5, jnp.int32))) == 6
    out = _numerics.safe_increment(jnp.asarray(top, jnp.int32))
    assert int(out) == top and out.dtype == jnp.int32


def test_bias_correction_formula():
    m = {"a": jnp.asarray([0.1, 0.2])}
    got = _numerics.bias_correction(m, 0.9, jnp.asarray(3, jnp.int32))
    np.testing.assert_allclose(got["a"], np.array([0.1, 0.2]) / (1 - 0.9**3), rtol=1e-6)


def test_clip_by_global_norm_formula():
    g = {"a": jnp.asarray([3.0, 0.0]), "b": jnp.asarray([4.0])}  # norm 5
    tx = optstate.clip_by_global_norm(1.0)
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.8], rtol=1e-6)
    out, _ = optstate.clip_by_global_norm(10.0).update(g, ())
    np.testing.assert_allclose(out["b"], [4.0])


def test_scale_by_learning_rate_schedule_counts_from_zero():
    tx = optstate.scale_by_learning_rate(lambda c: 1.0 / (c + 1.0))
    g = jnp.asarray([2.0])
    state = tx.init(g)
    seen = []
    for _ in range(3):
        u, state = tx.update(g, state)
        seen.append(float(u[0]))
    np.testing.assert_allclose(seen, [-2.0, -1.0, -2.0 / 3.0], rtol=1e-6)
    assert state.count.dtype == jnp.int32 and int(state.count) == 3
    u, _ = optstate.scale_by_learning_rate(0.5, flip_sign=False).update(g, optstate.EmptyState())
    np.testing.assert_allclose(u, [1.0])


def test_trust_ratio_formula_and_zero_norm_case():
    tx = optstate.scale_by_trust_ratio()
    params = {"a": jnp.asarray([3.0, 4.0]), "z": jnp.zeros(2)}
    updates = {"a": jnp.asarray([0.0, 0.5]), "z": jnp.asarray([1.0, 1.0])}
    out, _ = tx.update(updates, tx.init(params), params)
    np.testing.assert_allclose(out["a"], [0.0, 5.0], rtol=1e-6)  # ratio 5 / 0.5 = 10
    np.testing.assert_allclose(out["z"], [1.0, 1.0])  # zero parameter norm: ratio 1


def test_none_updates_pass_through_and_keep_state_structure():
    tx = optstate.scale_by_adam()
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(params)
    out, new_state = tx.update({"a": jnp.ones(2), "b": None}, state)
    assert out["b"] is None
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    np.testing.assert_array_equal(new_state.nu["b"], state.nu["b"])


# --- bad input -----------------------------------------------------------------------------

_PER_PARAM_STATE = [
    optstate.trace(0.9), optstate.ema(0.9), optstate.scale_by_adam(), optstate.scale_by_rms(),
    optstate.scale_by_stddev(), optstate.scale_by_rss(), optstate.scale_by_adadelta(),
    optstate.scale_by_lion(), optstate.scale_by_factored_rms(),
    optstate.add_decayed_weights(0.1), optstate.scale_by_trust_ratio(),
    optstate.scale_by_param_block_rms(),
]


@pytest.mark.parametrize("tx", _PER_PARAM_STATE, ids=lambda tx: str(_PER_PARAM_STATE.index(tx)))
def test_bad_updates_raise_errors_naming_the_leaf(tx):
    params = {"layer": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}}
    state = tx.init(params)

    extra = {"layer": {"w": jnp.ones((3, 2)), "b": jnp.ones(2), "c": jnp.ones(1)}}
    with pytest.raises(ValueError) as info:
        tx.update(extra, state, params)
    message = str(info.value)
    assert "['layer']['c']" in message and "expected structure" in message
    assert "given structure" in message

    wrong_shape = {"layer": {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}}
    with pytest.raises(ValueError) as info:
        tx.update(wrong_shape, state, params)
    message = str(info.value)
    assert "['layer']['w']" in message and "(2, 3)" in message and "(3, 2)" in message

    integer = {"layer": {"w": jnp.ones((3, 2)), "b": jnp.ones(2, jnp.int32)}}
    with pytest.raises(TypeError) as info:
        tx.update(integer, state, params)
    message = str(info.value)
    assert "['layer']['b']" in message and "int32" in message and "floating" in message


def test_transforms_needing_params_say_so():
    for tx in (optstate.add_decayed_weights(0.1), optstate.scale_by_trust_ratio(),
               optstate.scale_by_factored_rms()):
        g = {"w": jnp.ones(2)}
        with pytest.raises(ValueError, match="params"):
            tx.update(g, tx.init(g))


def test_checks_cost_nothing_under_jit():
    # The checks read only static information, so they raise at trace time under jit too.
    tx = optstate.scale_by_adam()
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"\['w'\]"):
        jax.jit(tx.update)({"w": jnp.ones(4)}, state)
