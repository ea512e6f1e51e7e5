"""Arguments are checked where the user writes them (issue 13).

Part 1 holds one test per case of the issue: each was silently accepted or failed with an
error that did not name the argument, and now raises an error naming the function, the
argument and the value given. Part 2 checks that what Optax accepts (its own tests use
``b1=0``, ``b2=0``, ``decay=0``) still builds and steps like Optax, that an Optax state is
still accepted where optstate's is, and that ``jit`` and ``inject_hyperparams`` are not
range-checked. Part 3 is the property test over every alias: hyperparameters drawn from
their valid ranges build a transform that takes a finite step on a tiny problem; a value
outside its range, NaN, an infinity or a wrong type raises ``ValueError``/``TypeError``
naming the alias and the argument.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optstate
from optstate import schedules as S
from tests.helpers import assert_trees_close

PARAMS = {"w": jnp.array([[1.0, -2.0, 0.5], [0.25, 3.0, -1.5], [2.0, 0.75, -0.5],
                          [-1.0, 1.5, 0.125]]),
          "b": jnp.array([0.5, -0.25, 1.0])}
GRADS = {"w": jnp.array([[0.5, -0.5, 0.25], [-0.125, 0.75, 0.3], [0.2, -0.6, 0.1],
                         [0.4, 0.05, -0.35]]),
         "b": jnp.array([-0.2, 0.3, 0.15])}


def _step(tx, params=PARAMS, grads=GRADS):
    state = tx.init(params)
    updates, new_state = tx.update(grads, state, params)
    return updates, state, new_state


# --- Part 1: the cases ----------------------------------------------------------


def test_adam_b1_above_one_is_refused():
    # Before: accepted; the first step moved every parameter up (ascent after a sign flip).
    with pytest.raises(ValueError, match=r"^adam: b1 must be .*\[0, 1\); got b1=1\.5\."):
        optstate.adam(0.1, b1=1.5)


def test_adam_b2_nan_is_refused():
    # Before: accepted; every update NaN.
    with pytest.raises(ValueError, match=r"^adam: b2 must be .*; got b2=nan\."):
        optstate.adam(0.1, b2=float("nan"))


def test_adam_negative_eps_is_refused():
    # Before: accepted (the denominator can cross zero).
    with pytest.raises(ValueError, match=r"^adam: eps must be .*>= 0; got eps=-0\.001\."):
        optstate.adam(0.1, eps=-1e-3)


@pytest.mark.parametrize("max_norm", [-1.0, 0.0])
def test_clip_by_global_norm_not_positive_is_refused(max_norm):
    # Before: -1 flipped the sign of every update that was clipped; 0 turned a zero update
    # into NaN.
    with pytest.raises(ValueError, match=rf"^clip_by_global_norm: max_norm must be .*> 0; "
                                         rf"got max_norm={max_norm!r}\."):
        optstate.clip_by_global_norm(max_norm)


def test_clip_negative_is_refused():
    # Before: accepted; every update became -1.
    with pytest.raises(ValueError, match=r"^clip: max_delta must be .*>= 0; got max_delta=-1"):
        optstate.clip(-1)
    assert optstate.clip(0.0) is not None  # 0 is a valid (if drastic) bound


@pytest.mark.parametrize("argument", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.bool_])
def test_adam_integer_state_dtype_is_refused(argument, dtype):
    # Before: mu_dtype=int8 was accepted and truncated mu to 0 at every step.
    with pytest.raises(TypeError, match=rf"^adam: {argument} must be a floating dtype.*got "
                                        rf"{jnp.dtype(dtype)}"):
        optstate.adam(0.1, **{argument: dtype})


def test_update_with_another_transforms_state_names_both():
    # Before: AttributeError: 'TraceState' object has no attribute 'mu'.
    sgd_state = optstate.sgd(0.1, momentum=0.9).init(PARAMS)
    with pytest.raises(TypeError) as info:
        optstate.adam(0.1).update(GRADS, sgd_state, PARAMS)
    message = str(info.value)
    assert message.startswith("scale_by_adam: expected the state made by this transform's init")
    assert "ScaleByAdamState (fields count, mu, nu)" in message
    assert "TraceState (fields trace)" in message
    assert "tx.init(params)" in message


def test_chain_of_a_non_transform_names_its_position():
    # Before: AttributeError: 'int' object has no attribute 'update'.
    with pytest.raises(TypeError, match=r"^chain: argument 1 must be a gradient transformation"
                                        r".*; got int 3\."):
        optstate.chain(optstate.adam(1e-3), 3)
    # The factory itself, not called: the message says to call it.
    with pytest.raises(TypeError, match=r"chain: argument 0 .*got the function adam\. .*call "
                                        r"it first: adam\(\.\.\.\)"):
        optstate.chain(optstate.adam)


def test_learning_rate_string_is_refused_naming_learning_rate():
    # Before: TypeError: Only integer scalar arrays can be converted to a scalar index.
    with pytest.raises(TypeError, match=r"^adam: learning_rate must be .*got the string "
                                        r"'0\.001'\. Pass the number itself: "
                                        r"learning_rate=0\.001\."):
        optstate.adam("0.001")


def test_learning_rate_vector_is_refused_naming_learning_rate():
    # Before: accepted and broadcast against a 2-element leaf (a per-element learning rate),
    # or a JAX broadcasting error for any other shape.
    with pytest.raises(ValueError, match=r"^sgd: learning_rate must be .*got an array of "
                                         r"shape \(2,\) and dtype float32\."):
        optstate.sgd(jnp.array([1.0, 2.0]))


def test_warmup_cosine_decay_reports_the_users_arguments():
    # Before: "cosine_decay: decay_steps must be positive, got decay_steps=-50".
    with pytest.raises(ValueError) as info:
        S.warmup_cosine_decay(0, 1, 100, 50)
    message = str(info.value)
    assert message.startswith("warmup_cosine_decay: decay_steps is the total length")
    assert "warmup_steps=100, decay_steps=50" in message
    assert "-50" not in message and "pass decay_steps=150" in message


@pytest.mark.parametrize("make", [
    lambda: optstate.masked(3, {"w": True, "b": False}),
    lambda: optstate.apply_if_finite(optstate.adam, 3),
    lambda: optstate.partition({"a": optstate.adam(1e-3), "b": "sgd"}, {"w": "a", "b": "b"}),
    lambda: optstate.named_chain(("adam", optstate.adam(1e-3)), ("clip", 1.0)),
])
def test_wrappers_refuse_what_is_not_a_transform(make):
    # Before: AttributeError: '...' object has no attribute 'update' (at init or update).
    with pytest.raises(TypeError, match=r"must be a gradient transformation"):
        make()


def test_inject_hyperparams_refuses_a_transform_and_checks_the_users_values():
    # Before: "GradientTransformation(...) is not a callable object".
    with pytest.raises(TypeError, match=r"inject_hyperparams: inner_factory must be a function "
                                        r"that returns a transform.*optstate\.adam\)"):
        optstate.inject_hyperparams(optstate.adam(1e-3))
    # The factory's checks run on the values as written (before: b1=1.5 was accepted).
    with pytest.raises(ValueError, match=r"^adam: b1 must be .*got b1=1\.5"):
        optstate.inject_hyperparams(optstate.adam)(learning_rate=1e-3, b1=1.5)


def test_inject_hyperparams_rejects_a_factory_that_returns_no_transform():
    def bad(learning_rate):
        return learning_rate

    with pytest.raises(TypeError, match=r"what bad\(\.\.\.\) returned.*got float 1\.0"):
        optstate.inject_hyperparams(bad)(learning_rate=1.0)


def test_decay_that_rounds_to_one_in_float32_is_refused():
    # Found with the property test below. Before: adam(b1=1 - 1e-9) stepped to -inf/inf
    # (b1 is 1.0 in float32, so the bias correction 1 - b1**t is 0).
    updates, _, _ = _step(optstate.adam(0.1, b1=1 - 2**-24))  # the largest float32 below 1
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    with pytest.raises(ValueError, match=r"^adam: b1 must be .*got b1=0\.999999999, which "
                                         r"rounds to 1 in float32.*use at most 0\.99999994"):
        optstate.adam(0.1, b1=1 - 1e-9)


@pytest.mark.parametrize("call, argument", [
    (lambda: S.constant(float("nan")), "value"),
    (lambda: S.linear("1.0", 0.0, 10), "init_value"),
    (lambda: S.polynomial(1.0, 0.0, float("inf"), 10), "power"),
    (lambda: S.cosine_decay(1.0, 100, alpha=float("nan")), "alpha"),
    (lambda: S.warmup_cosine_decay(0.0, 1.0, -5, 100), "warmup_steps"),
    (lambda: S.warmup_cosine_decay(0.0, 1.0, 10, 100, end_value=float("nan")), "end_value"),
    (lambda: S.exponential_decay(1.0, 10, -0.5), "decay_rate"),
    (lambda: S.exponential_decay(1.0, "10", 0.5), "transition_steps"),
    (lambda: S.piecewise_constant(1.0, {10: float("nan")}), "boundaries_and_scales[10]"),
    (lambda: S.piecewise_constant(1.0, [(10, 0.1)]), "boundaries_and_scales"),
    (lambda: S.join([S.constant(1.0), 0.5], [10]), "schedules[1]"),
    (lambda: S.join([S.constant(1.0), S.constant(0.5), S.constant(0.1)], [10, 5]),
     "boundaries"),
])
def test_schedules_name_the_argument_as_written(call, argument):
    # Before: accepted (NaN values, negative decay rates, decreasing boundaries) or a
    # Python/JAX error that did not name the argument.
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert argument in str(info.value)


@pytest.mark.parametrize("make, state", [
    (lambda: optstate.scale_by_adam(), lambda: optstate.trace(0.9).init(PARAMS)),
    (lambda: optstate.trace(0.9), lambda: optstate.scale_by_adam().init(PARAMS)),
    (lambda: optstate.ema(0.9), lambda: optstate.scale_by_rms().init(PARAMS)),
    (lambda: optstate.scale_by_rms(), lambda: optstate.scale_by_lion().init(PARAMS)),
    (lambda: optstate.scale_by_rms(bias_correction=True),
     lambda: optstate.scale_by_rms().init(PARAMS)),
    (lambda: optstate.scale_by_stddev(), lambda: optstate.scale_by_rss().init(PARAMS)),
    (lambda: optstate.scale_by_rss(), lambda: optstate.scale_by_adadelta().init(PARAMS)),
    (lambda: optstate.scale_by_adadelta(), lambda: optstate.scale_by_rss().init(PARAMS)),
    (lambda: optstate.scale_by_lion(), lambda: optstate.ema(0.9).init(PARAMS)),
    (lambda: optstate.scale_by_factored_rms(), lambda: optstate.scale_by_adam().init(PARAMS)),
    (lambda: optstate.scale_by_schedule(S.constant(1.0)), lambda: optstate.EmptyState()),
    (lambda: optstate.add_decayed_weights(S.constant(0.1)), lambda: optstate.EmptyState()),
    (lambda: optstate.masked(optstate.adam(0.1), {"w": True, "b": False}),
     lambda: optstate.adam(0.1).init(PARAMS)),
    (lambda: optstate.partition({"a": optstate.adam(0.1)}, {"w": "a", "b": "a"}),
     lambda: optstate.adam(0.1).init(PARAMS)),
    (lambda: optstate.apply_if_finite(optstate.adam(0.1), 3),
     lambda: optstate.adam(0.1).init(PARAMS)),
    (lambda: optstate.inject_hyperparams(optstate.adam)(learning_rate=0.1),
     lambda: optstate.adam(0.1).init(PARAMS)),
])
def test_every_stateful_transform_refuses_another_state(make, state):
    tx, other = make(), state()
    expected = type(tx.init(PARAMS)).__name__
    with pytest.raises(TypeError) as info:
        tx.update(GRADS, other, PARAMS)
    message = str(info.value)
    assert f"a {expected} (fields" in message, message
    assert "init" in message


def test_chain_refuses_a_single_transforms_state():
    with pytest.raises(TypeError, match=r"^chain: expected .* a tuple of 2 entries.*got a "
                                        r"ScaleByAdamState"):
        optstate.adam(0.1).update(GRADS, optstate.scale_by_adam().init(PARAMS), PARAMS)
    with pytest.raises(TypeError, match=r"^named_chain: expected .*dict with keys \['a'\]"):
        optstate.named_chain(("a", optstate.adam(0.1))).update(GRADS, (), PARAMS)


# --- Part 2: what stays accepted ---------------------------------------------------------


@pytest.mark.parametrize("ours, theirs", [
    # The edge values Optax's own tests use (combine_test, transform_test, _constraining_test).
    (lambda: optstate.adam(1.0, b1=0.0, b2=0.0), lambda: optax.adam(1.0, b1=0.0, b2=0.0)),
    (lambda: optstate.scale_by_adam(b1=0), lambda: optax.scale_by_adam(b1=0)),
    (lambda: optstate.trace(decay=0, nesterov=False), lambda: optax.trace(decay=0)),
    (lambda: optstate.adamw(1.0, b1=0.0, weight_decay=1e-4),
     lambda: optax.adamw(1.0, b1=0.0, weight_decay=1e-4)),
    (lambda: optstate.adam(0.1, eps=0.0), lambda: optax.adam(0.1, eps=0.0)),
    # Signs Optax leaves free: weight decay and a scale factor.
    (lambda: optstate.adamw(0.1, weight_decay=-0.01), lambda: optax.adamw(0.1, weight_decay=-0.01)),
    (lambda: optstate.scale(-2.0), lambda: optax.scale(-2.0)),
    (lambda: optstate.sgd(0.0), lambda: optax.sgd(0.0)),
    (lambda: optstate.lion(0.1, b1=1.0, b2=1.0), lambda: optax.lion(0.1, b1=1.0, b2=1.0)),
    (lambda: optstate.clip(0.0), lambda: optax.clip(0.0)),
    # NumPy numbers and 0-d arrays are numbers too.
    (lambda: optstate.adam(np.float32(0.1), b1=np.float64(0.8)),
     lambda: optax.adam(np.float32(0.1), b1=np.float64(0.8))),
    (lambda: optstate.sgd(jnp.float32(0.1), momentum=0.9),
     lambda: optax.sgd(jnp.float32(0.1), momentum=0.9)),
])
def test_values_optax_accepts_still_build_and_step_like_optax(ours, theirs):
    got, _, _ = _step(ours())
    want, _, _ = _step(theirs())
    assert_trees_close(got, want, "updates")


@pytest.mark.parametrize("ours, theirs", [
    (optstate.scale_by_adam, optax.scale_by_adam),
    (lambda: optstate.trace(0.9), lambda: optax.trace(0.9)),
    (lambda: optstate.ema(0.9), lambda: optax.ema(0.9)),
    (optstate.scale_by_rms, optax.scale_by_rms),
    (optstate.scale_by_stddev, optax.scale_by_stddev),
    (optstate.scale_by_rss, optax.scale_by_rss),
    (optstate.scale_by_lion, optax.scale_by_lion),
    (lambda: optstate.scale_by_factored_rms(min_dim_size_to_factor=2),
     lambda: optax.scale_by_factored_rms(min_dim_size_to_factor=2)),
])
def test_optax_equivalent_state_is_accepted(ours, theirs):
    # optstate's states are laid out like Optax's (same fields), so a state made by Optax's
    # transform (e.g. restored from an Optax checkpoint) is accepted and gives Optax's step.
    optax_state = theirs().init(PARAMS)
    got, _ = ours().update(GRADS, optax_state, PARAMS)
    want, _ = theirs().update(GRADS, optax_state, PARAMS)
    assert_trees_close(got, want, "updates")


def test_arrays_are_not_range_checked_so_jit_and_inject_hyperparams_work():
    # A hyperparameter stored in the state is an array, traced under jit: not range-checked,
    # so the step is traced once and changing it does not recompile.
    chex.clear_trace_counter()
    tx = optstate.inject_hyperparams(optstate.adam)(learning_rate=0.1, b1=0.9)
    state = tx.init(PARAMS)
    step = jax.jit(chex.assert_max_traces(tx.update, n=1))
    _, state = step(GRADS, state, PARAMS)
    state.hyperparams["b1"] = jnp.float32(0.5)
    updates, _ = step(GRADS, state, PARAMS)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    # A traced learning rate in a user's own factory is accepted the same way.
    updates = jax.jit(lambda lr: optstate.sgd(lr).update(GRADS, optstate.sgd(lr).init(PARAMS))
                      [0])(jnp.float32(0.1))
    assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, GRADS), "updates")


def test_plain_init_update_pair_is_a_transform():
    pair = (optstate.adam(0.1).init, optstate.adam(0.1).update)
    got, _, _ = _step(optstate.chain(pair, optstate.clip(0.05)))
    want, _, _ = _step(optstate.chain(optstate.adam(0.1), optstate.clip(0.05)))
    assert_trees_close(got, want, "updates")


# --- Part 3: property tests over every alias ----------------------------------------------

_BELOW_ONE = 1 - 2**-24  # the largest float32 below 1


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


# Any sign, as in Optax (a negative rate ascends).
_LR = st.one_of(_floats(-10.0, 10.0), st.just(S.cosine_decay(0.1, 10)),
                _floats(0.0, 1.0).map(jnp.float32))
_OPEN_UNIT = _floats(0.0, _BELOW_ONE)          # [0, 1) in float32
_CLOSED_UNIT = _floats(0.0, 1.0)
_SIGNED_UNIT = _floats(-1.0, 1.0)  # momentum: negative momentum is allowed, as in Optax
_NONNEG = st.one_of(st.just(0.0), _floats(1e-12, 1e3))
_REAL = _floats(-1e2, 1e2)
_DTYPE = st.sampled_from([None, jnp.float32, jnp.bfloat16, jnp.float16])

_NOT_A_NUMBER = st.sampled_from(["0.1", True, [0.1], 1 + 1j, jnp.ones(2), np.ones((1,)),
                                 {"x": 0.1}])
_NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
_NEGATIVE = st.floats(max_value=-1e-300, allow_nan=False)
# Values refused by each kind of range (besides _NOT_A_NUMBER and NaN).
_BAD_OPEN_UNIT = st.one_of(_NEGATIVE, st.floats(min_value=1 - 2**-25, allow_nan=False))
_BAD_CLOSED_UNIT = st.one_of(_NEGATIVE, st.floats(min_value=1.0, exclude_min=True,
                                                  allow_nan=False))
_BAD_NONNEG = st.one_of(_NEGATIVE, st.just(math.inf))
_BAD_SIGNED_UNIT = st.one_of(st.floats(max_value=-1.0, exclude_max=True, allow_nan=False),
                             st.floats(min_value=1.0, exclude_min=True, allow_nan=False))
_BAD_POSITIVE = st.one_of(st.floats(max_value=0.0, allow_nan=False), _floats(0.0, 7e-46),
                          st.just(math.inf))
_BAD_DTYPE = st.sampled_from([jnp.int8, jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64,
                              "float33", 3])
_BAD_INT = st.sampled_from([1.5, "3", True, None])


def _bad(kind, optional=False):
    """Invalid values for an argument of ``kind``: out of range, NaN, wrong type (and
    ``None`` unless the argument is optional)."""
    base = [_NOT_A_NUMBER, _NON_FINITE] + ([] if optional else [st.just(None)])
    return st.one_of(kind, *base)


# alias -> {argument: (valid values, invalid values)}; arguments not listed keep defaults.
_ADAM = {
    "learning_rate": (_LR, _bad(st.nothing())),
    "b1": (_OPEN_UNIT, _bad(_BAD_OPEN_UNIT)),
    "b2": (_OPEN_UNIT, _bad(_BAD_OPEN_UNIT)),
    # eps = 0 is valid (and steps like Optax, see Part 2), but with eps = eps_root = 0 a
    # zero gradient element (or g + wd * p = 0 in adam_l2) is 0 / 0, in Optax too: the
    # finite-step property is drawn with eps > 0.
    "eps": (_floats(1e-12, 1e3), _bad(_BAD_NONNEG)),
    "eps_root": (_NONNEG, _bad(_BAD_NONNEG)),
    "mu_dtype": (_DTYPE, _BAD_DTYPE),
    "nu_dtype": (_DTYPE, _BAD_DTYPE),
    "nesterov": (st.booleans(), None),
}
_WD = (st.one_of(_REAL, st.just(S.linear(0.0, 0.1, 5))), _bad(st.nothing()))
SPECS = {
    "sgd": {
        "learning_rate": (_LR, _bad(st.nothing())),
        "momentum": (st.one_of(st.none(), _SIGNED_UNIT), _bad(_BAD_SIGNED_UNIT, optional=True)),
        "nesterov": (st.booleans(), None),
        "accumulator_dtype": (_DTYPE, _BAD_DTYPE),
    },
    "adam": _ADAM,
    "adamw": {**_ADAM, "weight_decay": _WD},
    "adam_l2": {**_ADAM, "weight_decay": _WD},
    "rmsprop": {
        "learning_rate": (_LR, _bad(st.nothing())),
        "decay": (_OPEN_UNIT, _bad(_BAD_OPEN_UNIT)),
        # eps > 0 only because the centred variant divides by sqrt(v - m^2 + eps), and
        # v - m^2 is exactly 0 after one step with decay=0.
        "eps": (_floats(1e-4, 1e3), _bad(_BAD_NONNEG)),
        "initial_scale": (_NONNEG, _bad(_BAD_NONNEG)),
        "centered": (st.booleans(), None),
        "momentum": (st.one_of(st.none(), _SIGNED_UNIT), _bad(_BAD_SIGNED_UNIT, optional=True)),
        "nesterov": (st.booleans(), None),
        "bias_correction": (st.booleans(), None),
    },
    "adagrad": {
        "learning_rate": (_LR, _bad(st.nothing())),
        "initial_accumulator_value": (_NONNEG, _bad(_BAD_NONNEG)),
        "eps": (_NONNEG, _bad(_BAD_NONNEG)),
    },
    "adadelta": {
        "learning_rate": (st.one_of(st.none(), _LR), _bad(st.nothing(), optional=True)),
        "rho": (_OPEN_UNIT, _bad(_BAD_OPEN_UNIT)),
        "eps": (_floats(1e-30, 1.0), _bad(_BAD_POSITIVE)),
        "weight_decay": _WD,
    },
    "lamb": {
        **{k: _ADAM[k] for k in ("learning_rate", "b1", "b2", "eps", "eps_root")},
        "weight_decay": _WD,
    },
    "lion": {
        "learning_rate": (_LR, _bad(st.nothing())),
        "b1": (_CLOSED_UNIT, _bad(_BAD_CLOSED_UNIT)),
        "b2": (_CLOSED_UNIT, _bad(_BAD_CLOSED_UNIT)),
        "mu_dtype": (_DTYPE, _BAD_DTYPE),
        "weight_decay": _WD,
    },
    "adafactor": {
        "learning_rate": (st.one_of(st.none(), _LR), _bad(st.nothing(), optional=True)),
        "min_dim_size_to_factor": (st.integers(0, 8), st.one_of(_BAD_INT, st.just(-1))),
        # The decay 1 - (t + 1)**-c of step t = count - decay_offset, as in Optax: a positive
        # offset makes the first steps' decay 1 - 0**-c (it is meant for a resumed count),
        # and a large c with a negative offset makes it 1.0 in float32 from the start (the
        # second moment then stays 0). The paper's c is 0.8.
        "decay_rate": (_floats(0.0, 1.0), _bad(_NEGATIVE)),
        "decay_offset": (st.integers(-10, 0), _BAD_INT),
        "multiply_by_parameter_scale": (st.booleans(), None),
        "clipping_threshold": (st.one_of(st.none(), _floats(1e-3, 10.0)),
                               _bad(_BAD_POSITIVE, optional=True)),
        "momentum": (st.one_of(st.none(), _CLOSED_UNIT), _bad(_BAD_CLOSED_UNIT, optional=True)),
        "dtype_momentum": (st.sampled_from([jnp.float32, jnp.bfloat16]), _BAD_DTYPE),
        "weight_decay_rate": (st.one_of(st.none(), _REAL), _bad(st.nothing(), optional=True)),
        "eps": (_NONNEG, _bad(_BAD_NONNEG)),
        "factored": (st.booleans(), None),
    },
}


def test_every_alias_has_a_spec():
    aliases = {name for name in dir(optstate.aliases) if not name.startswith("_")
               and callable(getattr(optstate.aliases, name))
               and getattr(getattr(optstate.aliases, name), "__module__", "") == "optstate.aliases"}
    assert aliases == set(SPECS)


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


_PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("alias", sorted(SPECS))
@_PROPERTY
@given(data=st.data())
def test_valid_hyperparameters_take_a_finite_step(alias, data):
    spec = SPECS[alias]
    kwargs = {name: data.draw(valid, label=name) for name, (valid, _) in spec.items()}
    tx = getattr(optstate, alias)(**kwargs)
    state = tx.init(PARAMS)
    updates, new_state = tx.update(GRADS, state, PARAMS)
    new_params = optstate.apply_updates(PARAMS, updates)
    assert _finite(updates) and _finite(new_params), (kwargs, updates)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize("alias", sorted(SPECS))
@_PROPERTY
@given(data=st.data())
def test_invalid_hyperparameter_is_refused_naming_it(alias, data):
    spec = SPECS[alias]
    checked = sorted(n for n, (_, bad) in spec.items() if bad is not None)
    name = data.draw(st.sampled_from(checked), label="argument")
    value = data.draw(spec[name][1], label="value")
    kwargs = {"learning_rate": 0.1, name: value}
    with pytest.raises((TypeError, ValueError)) as info:
        getattr(optstate, alias)(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{alias}: {name} must be"), message
    if isinstance(value, float):
        assert f"{name}={value!r}" in message, message
