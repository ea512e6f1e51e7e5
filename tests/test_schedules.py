"""optstate.schedules against Optax's schedules and against their closed forms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate import schedules as S

# Steps from before 0 to past every boundary used below (boundaries included).
STEPS = jnp.arange(-2, 131, dtype=jnp.int32)

PAIRS = {
    "constant": (S.constant(0.3), optax.constant_schedule(0.3)),
    "linear": (S.linear(0.1, 1e-3, 50, 10), optax.linear_schedule(0.1, 1e-3, 50, 10)),
    "linear_warmup": (S.linear(0.0, 2.0, 7), optax.linear_schedule(0.0, 2.0, 7)),
    "linear_zero_steps": (S.linear(0.1, 1e-3, 0), optax.linear_schedule(0.1, 1e-3, 0)),
    "polynomial": (S.polynomial(0.1, 1e-3, 2.5, 50, 10),
                   optax.polynomial_schedule(0.1, 1e-3, 2.5, 50, 10)),
    "cosine_decay": (S.cosine_decay(0.7, 100), optax.cosine_decay_schedule(0.7, 100)),
    "cosine_decay_alpha_exp": (S.cosine_decay(0.7, 100, 0.1, 2.0),
                               optax.cosine_decay_schedule(0.7, 100, 0.1, 2.0)),
    "warmup_cosine_decay": (S.warmup_cosine_decay(0.0, 1e-3, 10, 100, 1e-5),
                            optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100, 1e-5)),
    "exponential_decay": (S.exponential_decay(0.5, 7, 0.9),
                          optax.exponential_decay(0.5, 7, 0.9)),
    "exponential_staircase_end": (S.exponential_decay(0.5, 7, 0.9, 5, True, 0.2),
                                  optax.exponential_decay(0.5, 7, 0.9, 5, True, 0.2)),
    "exponential_growth_end": (S.exponential_decay(0.5, 7, 1.1, 5, False, 0.9),
                               optax.exponential_decay(0.5, 7, 1.1, 5, False, 0.9)),
    "piecewise_constant": (S.piecewise_constant(0.1, {30: 0.1, 10: 0.5, 80: 0.0}),
                           optax.piecewise_constant_schedule(0.1, {30: 0.1, 10: 0.5, 80: 0.0})),
    "join": (S.join([S.constant(1.0), S.linear(1.0, 0.0, 20), S.cosine_decay(0.5, 30)],
                    [10, 50]),
             optax.join_schedules([optax.constant_schedule(1.0),
                                   optax.linear_schedule(1.0, 0.0, 20),
                                   optax.cosine_decay_schedule(0.5, 30)], [10, 50])),
}


def _on_steps(schedule):
    # Optax's constant schedule returns a Python float; broadcast it to the steps' shape.
    fn = lambda c: jnp.broadcast_to(jnp.asarray(schedule(c), jnp.float32), c.shape)  # noqa: E731
    return np.asarray(jax.jit(jax.vmap(fn))(STEPS))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_equals_optax_over_steps(name):
    ours, theirs = PAIRS[name]
    got, want = _on_steps(ours), _on_steps(theirs)
    assert got.dtype == np.float32
    np.testing.assert_array_max_ulp(got, want, maxulp=1)


def test_python_int_steps_match_array_steps():
    for name, (ours, _) in PAIRS.items():
        for step in (0, 10, 37, 130):
            np.testing.assert_allclose(float(ours(step)), float(ours(jnp.int32(step))),
                                       rtol=1e-6, err_msg=name)


def test_closed_forms_at_boundaries():
    lin = S.linear(1.0, 0.0, 10, transition_begin=5)
    assert [float(lin(t)) for t in (0, 5, 10, 15, 99)] == [1.0, 1.0, 0.5, 0.0, 0.0]

    wc = S.warmup_cosine_decay(0.1, 1.0, warmup_steps=10, decay_steps=110, end_value=0.01)
    np.testing.assert_allclose(float(wc(0)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(wc(5)), 0.55, rtol=1e-6)
    np.testing.assert_allclose(float(wc(10)), 1.0, rtol=1e-6)
    # halfway through the cosine: the mean of peak and end value
    np.testing.assert_allclose(float(wc(60)), (1.0 + 0.01) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(wc(110)), 0.01, rtol=1e-5)
    np.testing.assert_allclose(float(wc(500)), 0.01, rtol=1e-5)

    cd = S.cosine_decay(2.0, 40, alpha=0.25)
    np.testing.assert_allclose(float(cd(10)), 2.0 * (0.75 * 0.5 * (1 + math.cos(math.pi / 4))
                                                     + 0.25), rtol=1e-6)

    ed = S.exponential_decay(1.0, transition_steps=10, decay_rate=0.5, transition_begin=4)
    np.testing.assert_allclose([float(ed(t)) for t in (0, 4, 14, 24, 9)],
                               [1.0, 1.0, 0.5, 0.25, 0.5**0.5], rtol=1e-6)
    eds = S.exponential_decay(1.0, 10, 0.5, staircase=True)
    assert [float(eds(t)) for t in (9, 10, 19, 20)] == [1.0, 0.5, 0.5, 0.25]

    pc = S.piecewise_constant(1.0, {10: 0.1, 20: 0.5})
    np.testing.assert_allclose([float(pc(t)) for t in (9, 10, 19, 20, 1000)],
                               [1.0, 0.1, 0.1, 0.05, 0.05], rtol=1e-6)

    j = S.join([S.constant(3.0), S.linear(0.0, 1.0, 4)], [2])
    np.testing.assert_allclose([float(j(t)) for t in range(8)],
                               [3.0, 3.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_jitted_schedule_does_not_recompile():
    sched = jax.jit(chex.assert_max_traces(S.warmup_cosine_decay(0.0, 1.0, 5, 50), n=1))
    for t in range(3):
        sched(jnp.int32(t))


def test_reachable_and_optax_aliases():
    assert optstate.schedules is S
    assert S.linear_schedule is S.linear and S.join_schedules is S.join
    assert S.warmup_cosine_decay_schedule is S.warmup_cosine_decay
    assert S.piecewise_constant_schedule is S.piecewise_constant


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"decay_steps must be .* > 0; got decay_steps=0"):
        S.cosine_decay(1.0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        S.piecewise_constant(1.0, {10: -0.5})
    with pytest.raises(ValueError, match=r"len\(boundaries\) == len\(schedules\) - 1"):
        S.join([S.constant(1.0), S.constant(2.0)], [1, 2])
