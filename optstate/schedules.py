"""Step-size schedules: functions ``step -> value``, jittable, numerically equal to Optax's.

Every schedule takes the step count (a Python int or an integer array, possibly traced) and
returns the value for that step. Pass one wherever a learning rate is accepted, or as a
hyperparameter to :func:`optstate.inject_hyperparams`.

Optax-style long names (``linear_schedule``, ``cosine_decay_schedule``, ...) are kept as
aliases so that code written for Optax ports by changing the import.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from optstate._core.types import Schedule

__all__ = [
    "Schedule", "constant", "polynomial", "linear", "cosine_decay", "warmup_cosine_decay",
    "exponential_decay", "piecewise_constant", "join",
    "constant_schedule", "polynomial_schedule", "linear_schedule", "cosine_decay_schedule",
    "warmup_cosine_decay_schedule", "piecewise_constant_schedule", "join_schedules",
]

#: A number, or a scalar array.
Scalar = float | jax.Array


def constant(value: Scalar) -> Schedule:
    """The constant schedule :math:`\\eta_t = v`.

    Args:
      value: the value returned for every step.

    Returns:
      A schedule returning ``value`` (broadcast to the shape of the step argument).

    Reference: Optax, ``constant_schedule``.
    """

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

    Reference: polynomial decay as in TensorFlow/Optax (``polynomial_schedule``).
    """
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

    Reference: linear warmup, Goyal et al., "Accurate, Large Minibatch SGD: Training
    ImageNet in 1 Hour", 2017; Optax ``linear_schedule``.
    """
    return polynomial(init_value, end_value, 1, transition_steps, transition_begin)


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
      ValueError: ``decay_steps`` is not positive.

    Reference: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm
    Restarts", ICLR 2017.
    """
    if not decay_steps > 0:
        raise ValueError(
            f"cosine_decay: decay_steps must be positive, got decay_steps={decay_steps}.")
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

    Reference: Goyal et al. 2017 (warmup); Loshchilov & Hutter, ICLR 2017 (cosine).
    """
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join(
        [linear(init_value, peak_value, warmup_steps),
         cosine_decay(peak_value, decay_steps - warmup_steps, alpha, exponent)],
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

    Reference: TensorFlow/Optax ``exponential_decay``.
    """
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

    Reference: step decay as in He et al., "Deep Residual Learning for Image Recognition",
    CVPR 2016; Optax ``piecewise_constant_schedule``.
    """
    items = sorted((boundaries_and_scales or {}).items())
    negative = [(b, s) for b, s in items if not s >= 0.0]
    if negative:
        raise ValueError(
            f"piecewise_constant: scales must be non-negative; got {negative} "
            "as (boundary, scale).")
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
      ValueError: ``len(boundaries) != len(schedules) - 1``.

    Reference: Optax ``join_schedules``.
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if not schedules or len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join: expected len(boundaries) == len(schedules) - 1; got {len(schedules)} "
            f"schedules and {len(boundaries)} boundaries ({boundaries}).")

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
