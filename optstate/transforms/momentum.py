"""Momentum: the heavy-ball trace (with Nesterov's variant) and the exponential moving average.

:func:`trace` keeps an unnormalised sum (SGD with momentum); :func:`ema` a normalised,
optionally bias-corrected average (Adafactor's momentum). States mirror Optax's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from optstate._core.base import GradientTransformation
from optstate._core.checks import check_dtype, check_scalar, check_state
from optstate._core.numerics import (
    bias_correction,
    cast_like,
    ema as _ema_tree,
    is_none,
    safe_increment,
    zero_count,
    zeros_like,
)
from optstate._core.tree_checks import check_updates
from optstate._core.types import PyTree


class TraceState(NamedTuple):
    """The momentum buffer, one leaf per parameter."""

    trace: PyTree


class EmaState(NamedTuple):
    """The step count (``int32``) and the moving average, one leaf per parameter."""

    count: jax.Array
    ema: PyTree


def trace(
    decay: float, nesterov: bool = False, accumulator_dtype: Any = None
) -> GradientTransformation:
    r"""Heavy-ball momentum: accumulates a decaying sum of past updates.

    .. math::
        m_t = g_t + \mu\, m_{t-1}, \qquad
        u_t = \begin{cases} m_t & \text{(heavy ball)} \\ g_t + \mu\, m_t & \text{(Nesterov)}
        \end{cases}

    with :math:`m_0 = 0`. Note the sum is not normalised by :math:`1 - \mu` (unlike
    :func:`ema`).

    Args:
      decay: the momentum coefficient :math:`\mu`.
      nesterov: use Nesterov's accelerated form (Sutskever et al. 2013).
      accumulator_dtype: dtype of the stored buffer (e.g. ``jnp.bfloat16``); ``None`` keeps
        the parameters' dtype. The arithmetic runs in the promoted dtype.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`TraceState`.

    Raises:
      ValueError: ``decay`` outside :math:`[0, 1]`, NaN or infinite.
      TypeError: a non-numeric ``decay``, or ``accumulator_dtype`` not a floating dtype; at
        ``update``, a state not made by this transform's ``init``.

    References:
      Polyak, "Some methods of speeding up the convergence of iteration methods", 1964.
      Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and momentum
      in deep learning", ICML 2013.
    """
    check_scalar("decay", decay, context="trace", low=-1.0, high=1.0,
                 hint="decay is the momentum coefficient (0.9 is usual).")
    accumulator_dtype = check_dtype("accumulator_dtype", accumulator_dtype, "trace")

    def init(params):
        return TraceState(trace=zeros_like(params, dtype=accumulator_dtype))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, TraceState, "trace")
        check_updates(updates, state.trace, reference_name="state.trace", context="trace")
        new_trace = jax.tree.map(
            lambda g, m: m if g is None else g + decay * m, updates, state.trace, is_leaf=is_none
        )
        if nesterov:
            updates = jax.tree.map(
                lambda g, m: None if g is None else g + decay * m, updates, new_trace,
                is_leaf=is_none,
            )
        else:
            updates = jax.tree.map(lambda g, m: None if g is None else m, updates, new_trace,
                                   is_leaf=is_none)
        return updates, TraceState(trace=cast_like(new_trace, state.trace))

    return GradientTransformation(init, update)


def ema(decay: float, debias: bool = True, accumulator_dtype: Any = None) -> GradientTransformation:
    r"""Exponential moving average of the updates, optionally bias-corrected.

    .. math::
        m_t = \beta\, m_{t-1} + (1 - \beta)\, g_t, \qquad
        u_t = m_t / (1 - \beta^{t}) \ \text{(debias)} \ \text{or}\ m_t

    Args:
      decay: the averaging coefficient :math:`\beta`.
      debias: divide by :math:`1 - \beta^t` (as Adam's first moment).
      accumulator_dtype: dtype of the stored average; ``None`` keeps the parameters' dtype.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`EmaState`.

    Raises:
      ValueError: ``decay`` outside :math:`[0, 1]` (:math:`[0, 1)` with ``debias``, where
        :math:`\beta = 1` divides by zero), NaN or infinite.
      TypeError: a non-numeric ``decay``, or ``accumulator_dtype`` not a floating dtype; at
        ``update``, a state not made by this transform's ``init``.

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015
    (bias correction of a zero-initialised average).
    """
    check_scalar("decay", decay, context="ema", low=0.0, high=1.0, high_inclusive=not debias,
                 hint="decay is the averaging coefficient (0.9 is usual).")
    accumulator_dtype = check_dtype("accumulator_dtype", accumulator_dtype, "ema")

    def init(params):
        return EmaState(count=zero_count(), ema=zeros_like(params, dtype=accumulator_dtype))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, EmaState, "ema")
        check_updates(updates, state.ema, reference_name="state.ema", context="ema")
        new_ema = _ema_tree(updates, state.ema, decay, 1)
        count = safe_increment(state.count)
        out = bias_correction(new_ema, decay, count) if debias else new_ema
        updates = jax.tree.map(lambda g, m: None if g is None else m, updates, out,
                               is_leaf=is_none)
        return updates, EmaState(count=count, ema=cast_like(new_ema, state.ema))

    return GradientTransformation(init, update)
