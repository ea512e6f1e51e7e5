"""Step-size schedules: functions ``step -> value``, jittable, numerically equal to Optax's.

Every schedule takes the step count (a Python int or an integer array, possibly traced) and
returns the value for that step. Pass one wherever a learning rate is accepted, or as a
hyperparameter to :func:`optstate.inject_hyperparams`.

Optax-style long names (``linear_schedule``, ``cosine_decay_schedule``, ...) are kept as
aliases so that code written for Optax ports by changing the import.

Each schedule checks the arguments it was given, under their own names, before deriving
anything from them: values must be real scalars (not NaN or infinite), step counts real
numbers, and ``warmup_cosine_decay`` says that ``decay_steps`` includes the warmup rather
than reporting the derived length of its cosine part.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from optstate._core.checks import check_scalar, describe
from optstate._core.types import Schedule

__all__ = [
    "Schedule", "constant", "polynomial", "linear", "cosine_decay", "warmup_cosine_decay",
    "exponential_decay", "piecewise_constant", "join",
    "constant_schedule", "polynomial_schedule", "linear_schedule", "cosine_decay_schedule",
    "warmup_cosine_decay_schedule", "piecewise_constant_schedule", "join_schedules",
]

#: A number, or a scalar array.
Scalar = float | jax.Array


def _values(context: str, **values: object) -> None:
    """Checks that each of ``values`` (a schedule's value arguments) is a finite real scalar;
    ``None`` entries are skipped (optional arguments)."""
    for name, value in values.items():
        if value is not None:
            check_scalar(name, value, context=context)


def _steps(context: str, **steps: object) -> None:
    """Checks that each of ``steps`` (step counts and boundaries) is a finite real number."""
    for name, value in steps.items():
        check_scalar(name, value, context=context, hint=f"{name} is a number of steps.")


def constant(value: Scalar) -> Schedule:
    """The constant schedule :math:`\\eta_t = v`.

    Args:
      value: the value returned for every step.

    Returns:
      A schedule returning ``value`` (broadcast to the shape of the step argument).

    Reference: Optax, ``constant_schedule``.
    """

    _values("constant", value=value)

    def schedule(count: jax.Array | int) -> jax.Array:
        return jnp.broadcast_to(jnp.asarray(value), jnp.shape(count))

    return schedule


def polynomial(init_value: Scalar, end_value: Scalar, power: Scalar, transition_steps: int,
               transition_begin: int = 0) -> Schedule:
    """Polynomial interpolation from ``init_value`` to ``end_value``.

    .. math::

        c = \\min(\\max(t - t_0, 0), T), \\qquad
        \\eta_t = (\\eta_0 - \\eta_T)\\,(1 - c / T)^{p} + \\eta_T.

    Args:
      init_value: :math:`\\eta_0`, the value up to step ``transition_begin``.
      end_value: :math:`\\eta_T`, the value from step ``transition_begin + transition_steps``.
      power: :math:`p`, the exponent of the interpolation (1 is linear).
      transition_steps: :math:`T`; if not positive the schedule is constant ``init_value``.
      transition_begin: :math:`t_0`, the step at which the transition starts (negative
        values are treated as 0).

    Returns:
      The schedule.

    Raises:
      TypeError, ValueError: an argument is not a finite real scalar (naming it).

    Reference: polynomial decay as in TensorFlow/Optax (``polynomial_schedule``).
    """
    return _polynomial("polynomial", init_value, end_value, power, transition_steps,
                       transition_begin)


def _polynomial(context: str, init_value: Scalar, end_value: Scalar, power: Scalar,
                transition_steps: int, transition_begin: int) -> Schedule:
    """:func:`polynomial`, its arguments checked under the name of the function called."""
    _values(context, init_value=init_value, end_value=end_value)
    if context == "polynomial":
        _values(context, power=power)
    _steps(context, transition_steps=transition_steps, transition_begin=transition_begin)
    if transition_steps <= 0:
        return constant(init_value)
    begin = max(int(transition_begin), 0)
    span = init_value - end_value

    def schedule(count: jax.Array | int) -> jax.Array:
        done = jnp.clip(count - begin, 0, transition_steps)
        remaining = 1 - done / transition_steps
        return span * remaining**power + end_value

    return schedule


def linear(init_value: Scalar, end_value: Scalar, transition_steps: int,
           transition_begin: int = 0) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value`` (linear warmup or decay).

    .. math::

        c = \\min(\\max(t - t_0, 0), T), \\qquad
        \\eta_t = \\eta_0 + (\\eta_T - \\eta_0)\\, c / T.

    Args:
      init_value: :math:`\\eta_0`, the value up to step ``transition_begin``.
      end_value: :math:`\\eta_T`, the value from step ``transition_begin + transition_steps``.
      transition_steps: :math:`T`; if not positive the schedule is constant ``init_value``.
      transition_begin: :math:`t_0` (negative values are treated as 0).

    Returns:
      The schedule.

    Raises:
      TypeError, ValueError: an argument is not a finite real scalar (naming it).

    Reference: linear warmup, Goyal et al., "Accurate, Large Minibatch SGD: Training
    ImageNet in 1 Hour", 2017; Optax ``linear_schedule``.
    """
    return _polynomial("linear", init_value, end_value, 1, transition_steps, transition_begin)


def cosine_decay(init_value: Scalar, decay_steps: int, alpha: Scalar = 0.0,
                 exponent: Scalar = 1.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``.

    .. math::

        c = \\min(t, T), \\qquad
        \\eta_t = \\eta_0 \\Big((1 - \\alpha)
            \\big(\\tfrac{1}{2}(1 + \\cos(\\pi c / T))\\big)^{e} + \\alpha\\Big).

    Args:
      init_value: :math:`\\eta_0`.
      decay_steps: :math:`T > 0`, the number of steps of the decay.
      alpha: the final value as a fraction of ``init_value``.
      exponent: :math:`e`, applied to the cosine factor.

    Returns:
      The schedule.

    Raises:
      ValueError: ``decay_steps`` is not positive; TypeError, ValueError: an argument is not
        a finite real scalar (naming it).

    Reference: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm
    Restarts", ICLR 2017.
    """
    return _cosine_decay("cosine_decay", init_value, decay_steps, alpha, exponent)


def _cosine_decay(context: str, init_value: Scalar, decay_steps: int, alpha: Scalar,
                  exponent: Scalar) -> Schedule:
    """:func:`cosine_decay`; ``context`` names the function called (for its checks)."""
    if context == "cosine_decay":
        _values(context, init_value=init_value, alpha=alpha, exponent=exponent)
        check_scalar("decay_steps", decay_steps, context=context, low=0.0, low_inclusive=False,
                     hint="decay_steps is the number of steps of the decay.")
    total = float(decay_steps) if isinstance(decay_steps, int) else decay_steps

    def schedule(count: jax.Array | int) -> jax.Array:
        if isinstance(count, int):
            count = float(count)
        done = jnp.minimum(count, total)
        cos_factor = 0.5 * (1 + jnp.cos(jnp.pi * done / total))
        return init_value * ((1 - alpha) * cos_factor**exponent + alpha)

    return schedule


def warmup_cosine_decay(init_value: Scalar, peak_value: Scalar, warmup_steps: int,
                        decay_steps: int, end_value: Scalar = 0.0,
                        exponent: Scalar = 1.0) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    .. math::

        \\eta_t = \\begin{cases}
          \\eta_0 + (\\eta_p - \\eta_0)\\, t / W & t < W \\\\
          \\eta_T + (\\eta_p - \\eta_T)
            \\big(\\tfrac12(1 + \\cos(\\pi \\min(t - W, T - W) / (T - W)))\\big)^{e}
            & t \\ge W. \\end{cases}

    Args:
      init_value: :math:`\\eta_0`, the value at step 0.
      peak_value: :math:`\\eta_p`, reached at step ``warmup_steps``.
      warmup_steps: :math:`W`.
      decay_steps: :math:`T`, the total length **including** the warmup (as in Optax);
        must exceed ``warmup_steps``.
      end_value: :math:`\\eta_T`, the value from step ``decay_steps`` on.
      exponent: :math:`e`, applied to the cosine factor.

    Returns:
      The schedule.

    Raises:
      ValueError: ``decay_steps`` does not exceed ``warmup_steps`` (naming both), or
        ``warmup_steps`` is negative; TypeError, ValueError: an argument is not a finite real
        scalar (naming it).

    Reference: Goyal et al. 2017 (warmup); Loshchilov & Hutter, ICLR 2017 (cosine).
    """
    context = "warmup_cosine_decay"
    _values(context, init_value=init_value, peak_value=peak_value, end_value=end_value,
            exponent=exponent)
    check_scalar("warmup_steps", warmup_steps, context=context, low=0.0,
                 hint="warmup_steps is the number of steps of the linear warmup.")
    _steps(context, decay_steps=decay_steps)
    if not decay_steps > warmup_steps:
        raise ValueError(
            f"{context}: decay_steps is the total length of the schedule, warmup included "
            f"(as in Optax), so it must exceed warmup_steps; got warmup_steps={warmup_steps!r}"
            f", decay_steps={decay_steps!r}. For {decay_steps!r} steps of cosine decay after "
            f"the warmup, pass decay_steps={warmup_steps + decay_steps!r}.")
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join(
        [_polynomial(context, init_value, peak_value, 1, warmup_steps, 0),
         _cosine_decay(context, peak_value, decay_steps - warmup_steps, alpha, exponent)],
        [warmup_steps],
    )


def exponential_decay(init_value: Scalar, transition_steps: int, decay_rate: float,
                      transition_begin: int = 0, staircase: bool = False,
                      end_value: Scalar | None = None) -> Schedule:
    """Exponential decay.

    .. math::

        p = (t - t_0) / T \\ (\\lfloor\\cdot\\rfloor \\text{ if staircase}), \\qquad
        \\eta_t = \\begin{cases} \\eta_0 & t \\le t_0 \\\\ \\eta_0\\, r^{p} & t > t_0,
        \\end{cases}

    then clipped from below (``r < 1``) or above (``r > 1``) at ``end_value`` if given.

    Args:
      init_value: :math:`\\eta_0`.
      transition_steps: :math:`T`; if not positive the schedule is constant ``init_value``.
      decay_rate: :math:`r`; 0 gives the constant schedule ``init_value``.
      transition_begin: :math:`t_0` (negative values are treated as 0).
      staircase: decay in discrete steps of ``transition_steps``.
      end_value: optional bound on the decayed value.

    Returns:
      The schedule.

    Raises:
      ValueError: ``decay_rate`` negative (its fractional powers are NaN); TypeError,
        ValueError: an argument is not a finite real scalar (naming it).

    Reference: TensorFlow/Optax ``exponential_decay``.
    """
    context = "exponential_decay"
    _values(context, init_value=init_value, end_value=end_value)
    _steps(context, transition_steps=transition_steps, transition_begin=transition_begin)
    check_scalar("decay_rate", decay_rate, context=context, low=0.0,
                 hint="decay_rate is the factor applied every transition_steps (e.g. 0.5).")
    if transition_steps <= 0 or decay_rate == 0:
        return constant(init_value)
    begin = max(int(transition_begin), 0)
    bound = None
    if end_value is not None:
        bound = jnp.maximum if decay_rate < 1.0 else jnp.minimum

    def schedule(count: jax.Array | int) -> jax.Array:
        since = count - begin
        p = since / transition_steps
        if staircase:
            p = jnp.floor(p)
        value = jnp.where(since <= 0, init_value, init_value * jnp.power(decay_rate, p))
        if bound is not None:
            value = bound(value, end_value)
        return value

    return schedule


def piecewise_constant(init_value: Scalar,
                       boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """Step decay: multiply the value by ``scale`` from each boundary step on.

    .. math::

        \\eta_t = \\eta_0 \\prod_{b_i \\le t} s_i.

    Args:
      init_value: :math:`\\eta_0`.
      boundaries_and_scales: ``{b_i: s_i}``, step boundaries and non-negative factors.

    Returns:
      The schedule.

    Raises:
      ValueError: a scale is negative.
      TypeError: ``boundaries_and_scales`` is not a mapping; TypeError, ValueError:
        ``init_value``, a boundary or a scale is not a finite real number (naming it).

    Reference: step decay as in He et al., "Deep Residual Learning for Image Recognition",
    CVPR 2016; Optax ``piecewise_constant_schedule``.
    """
    context = "piecewise_constant"
    _values(context, init_value=init_value)
    if boundaries_and_scales is not None and not isinstance(boundaries_and_scales, Mapping):
        raise TypeError(
            f"{context}: boundaries_and_scales must be a dict {{boundary step: scale}}, e.g. "
            f"{{1000: 0.1, 2000: 0.1}}; got {describe(boundaries_and_scales)}.")
    for boundary, factor in (boundaries_and_scales or {}).items():
        check_scalar(f"boundaries_and_scales key {boundary!r}", boundary, context=context,
                     hint="Keys are step boundaries.")
        check_scalar(f"boundaries_and_scales[{boundary!r}]", factor, context=context, low=0.0,
                     hint="Values are the non-negative factors applied from their boundary on.")
    items = sorted((boundaries_and_scales or {}).items())
    if not items:
        return constant(init_value)

    def schedule(count: jax.Array | int) -> jax.Array:
        value = jnp.asarray(init_value)
        for boundary, scale in items:
            value = jnp.where(jnp.asarray(count) < boundary, value, value * scale)
        return value

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]``, and so on.

    .. math::

        \\eta_t = s_k(t - b_{k}) \\quad \\text{for } b_k \\le t < b_{k+1},
        \\qquad b_0 = 0.

    Each schedule sees the number of steps since its own boundary.

    Args:
      schedules: ``n`` schedules.
      boundaries: ``n - 1`` increasing step boundaries.

    Returns:
      The joined schedule.

    Raises:
      ValueError: ``len(boundaries) != len(schedules) - 1``, or the boundaries decrease.
      TypeError: a schedule is not callable, or a boundary not a real number (naming it).

    Reference: Optax ``join_schedules``.
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if not schedules or len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join: expected len(boundaries) == len(schedules) - 1; got {len(schedules)} "
            f"schedules and {len(boundaries)} boundaries ({boundaries}).")
    for i, s in enumerate(schedules):
        if not callable(s) or hasattr(s, "dtype"):
            raise TypeError(
                f"join: schedules[{i}] must be a schedule (a function step -> value); got "
                f"{describe(s)}. For a constant use optstate.schedules.constant(value).")
    for i, b in enumerate(boundaries):
        check_scalar(f"boundaries[{i}]", b, context="join")
    if any(b > c for b, c in zip(boundaries, boundaries[1:])):
        raise ValueError(f"join: boundaries must be increasing; got {boundaries}.")

    def schedule(count: jax.Array | int) -> jax.Array:
        value = schedules[0](count)
        for boundary, later in zip(boundaries, schedules[1:]):
            value = jnp.where(count < boundary, value, later(count - boundary))
        return value

    return schedule


# Optax-style names.
constant_schedule = constant
polynomial_schedule = polynomial
linear_schedule = linear
cosine_decay_schedule = cosine_decay
warmup_cosine_decay_schedule = warmup_cosine_decay
piecewise_constant_schedule = piecewise_constant
join_schedules = join
