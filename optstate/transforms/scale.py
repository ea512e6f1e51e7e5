"""Scaling by a constant, a learning rate, or a schedule of the step count.

:func:`scale` is stateless; :func:`scale_by_schedule` keeps the ``int32`` step count that
its schedule is evaluated on; :func:`scale_by_learning_rate` picks one of the two.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation, identity, init_empty_state
from optstate._core.checks import check_learning_rate, check_scalar, check_state, describe
from optstate._core.numerics import is_none, safe_increment, zero_count
from optstate._core.types import ScalarOrSchedule, Schedule


class ScaleByScheduleState(NamedTuple):
    """The step count fed to the schedule (``int32`` scalar)."""

    count: jax.Array


def scale(step_size: Any) -> GradientTransformation:
    r"""Multiplies every update by a constant.

    .. math:: u \leftarrow \alpha\, u

    Args:
      step_size: the scalar factor :math:`\alpha` (a Python number; keep arrays out of
        transforms and use :func:`optstate.inject_hyperparams` to change it during training).

    Returns:
      A stateless :class:`~optstate.GradientTransformation`.

    Raises:
      TypeError: ``step_size`` is not a real number or scalar array (a schedule belongs in
        :func:`scale_by_schedule`). ValueError: NaN, infinite, or an array that is not 0-d.

    Reference: Robbins & Monro, "A Stochastic Approximation Method", 1951 (the step size).
    """
    if callable(step_size) and not hasattr(step_size, "dtype"):
        raise TypeError(
            f"scale: step_size must be a real number or a scalar array; got "
            f"{describe(step_size)}. For a schedule use scale_by_schedule(step_size_fn) or "
            f"scale_by_learning_rate(schedule).")
    check_scalar("step_size", step_size, context="scale")

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        updates = jax.tree.map(
            lambda g: None if g is None else step_size * g, updates, is_leaf=is_none
        )
        return updates, state

    return GradientTransformation(init_empty_state, update)


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    r"""Multiplies every update by a schedule evaluated on the step count.

    .. math:: u_t \leftarrow \alpha(t)\, u_t, \qquad t = 0, 1, 2, \dots

    The count starts at 0 (the first update uses :math:`\alpha(0)`) and is an ``int32`` that
    saturates instead of overflowing.

    Args:
      step_size_fn: a jittable function of the ``int32`` step count returning a scalar.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ScaleByScheduleState`.

    Raises:
      TypeError: ``step_size_fn`` is not callable; at ``update``, a state not made by this
        transform's ``init``.

    Reference: Robbins & Monro, "A Stochastic Approximation Method", 1951 (decaying steps).
    """
    if not callable(step_size_fn) or hasattr(step_size_fn, "dtype"):
        raise TypeError(
            f"scale_by_schedule: step_size_fn must be a schedule, a function step -> value "
            f"(e.g. optstate.schedules.cosine_decay(1e-3, 1000)); got {describe(step_size_fn)}. "
            f"For a constant use scale(step_size).")

    def init(params):
        del params
        return ScaleByScheduleState(count=zero_count())

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, ScaleByScheduleState, "scale_by_schedule")
        step_size = step_size_fn(state.count)
        updates = jax.tree.map(
            lambda g: None if g is None else jnp.asarray(step_size, dtype=g.dtype) * g,
            updates, is_leaf=is_none,
        )
        return updates, ScaleByScheduleState(count=safe_increment(state.count))

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule | None = None, *, flip_sign: bool = True
) -> GradientTransformation:
    r"""Multiplies updates by the negative learning rate (a constant or a schedule).

    .. math:: u_t \leftarrow -\eta_t\, u_t

    (:math:`+\eta_t` with ``flip_sign=False``). A callable ``learning_rate`` is a schedule
    of the step count (see :func:`scale_by_schedule`); a number is a constant
    (see :func:`scale`).

    Args:
      learning_rate: a float, or a schedule ``step -> float``; ``None`` means no scaling.
      flip_sign: scale by :math:`-\eta` (gradient descent) when ``True``.

    Returns:
      A :class:`~optstate.GradientTransformation`.

    Raises:
      TypeError: ``learning_rate`` is not a number, a scalar array, a schedule or ``None``
        (e.g. the string ``"0.001"``).
      ValueError: ``learning_rate`` is negative (use ``flip_sign`` to choose the direction),
        NaN, infinite, or an array that is not 0-d.

    Reference: Robbins & Monro, "A Stochastic Approximation Method", 1951.
    """
    check_learning_rate(learning_rate, "scale_by_learning_rate", allow_none=True)
    if learning_rate is None:
        return identity()
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        schedule = learning_rate
        return scale_by_schedule(lambda count: sign * schedule(count))
    return scale(sign * learning_rate)
