"""Rescaling by a root mean square of past gradients: RMSProp (plain and centred) and Adagrad.

The ``...WithCount`` states add the ``int32`` step count that bias correction needs; every
state mirrors Optax's, field for field.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation
from optstate._core.checks import check_scalar, check_state
from optstate._core.numerics import (
    bias_correction as _bias_correction,
    abs_sq,
    cast_like,
    ema,
    ema_of_squares,
    full_like,
    is_none,
    safe_increment,
    zero_count,
    zeros_like,
)
from optstate._core.tree_checks import check_updates
from optstate._core.types import PyTree


class ScaleByRmsState(NamedTuple):
    """RMSProp's moving average of squared gradients ``nu``."""

    nu: PyTree


class ScaleByRmsWithCountState(NamedTuple):
    """RMSProp's state with bias correction: step ``count`` (``int32``) and ``nu``."""

    count: jax.Array
    nu: PyTree


class ScaleByRStdDevState(NamedTuple):
    """Centred RMSProp's moving averages of gradients ``mu`` and squared gradients ``nu``."""

    mu: PyTree
    nu: PyTree


class ScaleByRStdDevWithCountState(NamedTuple):
    """Centred RMSProp's state with bias correction: ``count`` (``int32``), ``mu``, ``nu``."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


class ScaleByRssState(NamedTuple):
    """Adagrad's running sum of squared gradients."""

    sum_of_squares: PyTree


def _check_rms_args(context: str, decay: float, eps: float, initial_scale: float) -> None:
    """The checks shared by :func:`scale_by_rms` and :func:`scale_by_stddev`."""
    check_scalar("decay", decay, context=context, low=0.0, high=1.0, high_inclusive=False,
                 hint="decay is the decay of the average of squared gradients (0.9 is usual; "
                      "1 would never update it).")
    check_scalar("eps", eps, context=context, low=0.0,
                 hint="eps keeps the denominator away from zero (1e-8 is usual).")
    check_scalar("initial_scale", initial_scale, context=context, low=0.0,
                 hint="initial_scale is the initial average of squared gradients (0 is usual).")


def _inverse_root(eps: float, eps_in_sqrt: bool) -> Callable[[jax.Array], jax.Array]:
    r"""``s -> 1 / sqrt(s + eps)`` (``eps_in_sqrt``) or ``s -> 1 / (sqrt(s) + eps)``."""
    if eps_in_sqrt:
        return lambda s: jax.lax.rsqrt(s + eps)
    return lambda s: 1 / (jnp.sqrt(s) + eps)


def scale_by_rms(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> GradientTransformation:
    r"""RMSProp: divides updates by the root of a moving average of squared gradients.

    .. math::
        v_t = \rho\, v_{t-1} + (1 - \rho)\, |g_t|^2, \qquad
        u_t = g_t / \sqrt{\hat v_t + \epsilon}
        \quad\text{or}\quad g_t / (\sqrt{\hat v_t} + \epsilon)\ \text{(eps\_in\_sqrt=False)}

    with :math:`v_0` = ``initial_scale`` and :math:`\hat v_t = v_t / (1 - \rho^t)` when
    ``bias_correction`` else :math:`v_t`.

    Args:
      decay: :math:`\rho`, the decay of the average.
      eps: :math:`\epsilon`.
      initial_scale: initial value of :math:`v`.
      eps_in_sqrt: add :math:`\epsilon` inside the square root (default) or outside.
      bias_correction: divide by :math:`1 - \rho^t` (adds an ``int32`` count to the state).

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ScaleByRmsState`
      (or :class:`ScaleByRmsWithCountState` with ``bias_correction``).

    Raises:
      ValueError: ``decay`` outside :math:`[0, 1)`, ``eps`` or ``initial_scale`` negative, or
        any of them NaN or infinite. TypeError: one of them not a real number; at
        ``update``, a state not made by this transform's ``init``.

    Reference: Tieleman & Hinton, "Lecture 6.5 - RMSProp", COURSERA: Neural Networks for
    Machine Learning, 2012.
    """
    _check_rms_args("scale_by_rms", decay, eps, initial_scale)
    state_type = ScaleByRmsWithCountState if bias_correction else ScaleByRmsState
    inverse_root = _inverse_root(eps, eps_in_sqrt)

    def init(params):
        nu = full_like(params, initial_scale)
        if bias_correction:
            return ScaleByRmsWithCountState(count=zero_count(), nu=nu)
        return ScaleByRmsState(nu=nu)

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, state_type, "scale_by_rms")
        check_updates(updates, state.nu, reference_name="state.nu", context="scale_by_rms")
        nu = ema_of_squares(updates, state.nu, decay)
        if bias_correction:
            count = safe_increment(state.count)
            nu_hat = _bias_correction(nu, decay, count)
        else:
            nu_hat = nu
        updates = jax.tree.map(
            lambda g, v: None if g is None else inverse_root(v) * g, updates, nu_hat,
            is_leaf=is_none,
        )
        nu = cast_like(nu, state.nu)
        if bias_correction:
            return updates, ScaleByRmsWithCountState(count=count, nu=nu)
        return updates, ScaleByRmsState(nu=nu)

    return GradientTransformation(init, update)


def scale_by_stddev(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> GradientTransformation:
    r"""Centred RMSProp: divides updates by a running estimate of the gradient's std. dev.

    .. math::
        m_t = \rho\, m_{t-1} + (1 - \rho)\, g_t, \qquad
        v_t = \rho\, v_{t-1} + (1 - \rho)\, |g_t|^2, \qquad
        u_t = g_t / \sqrt{\hat v_t - |\hat m_t|^2 + \epsilon}

    (or :math:`g_t / (\sqrt{\hat v_t - \hat m_t^2} + \epsilon)` with
    ``eps_in_sqrt=False``), hats meaning bias-corrected when ``bias_correction``.

    Args:
      decay: :math:`\rho`, the decay of both averages.
      eps: :math:`\epsilon`.
      initial_scale: initial value of :math:`v` (:math:`m` starts at zero).
      eps_in_sqrt: add :math:`\epsilon` inside the square root (default) or outside.
      bias_correction: divide both averages by :math:`1 - \rho^t`.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ScaleByRStdDevState`
      (or :class:`ScaleByRStdDevWithCountState`).

    Raises:
      ValueError, TypeError: as :func:`scale_by_rms`.

    Reference: Graves, "Generating Sequences With Recurrent Neural Networks",
    arXiv:1308.0850, 2013, eqs. 38-41.
    """
    _check_rms_args("scale_by_stddev", decay, eps, initial_scale)
    state_type = ScaleByRStdDevWithCountState if bias_correction else ScaleByRStdDevState
    inverse_root = _inverse_root(eps, eps_in_sqrt)

    def init(params):
        mu = zeros_like(params)
        nu = full_like(params, initial_scale)
        if bias_correction:
            return ScaleByRStdDevWithCountState(count=zero_count(), mu=mu, nu=nu)
        return ScaleByRStdDevState(mu=mu, nu=nu)

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, state_type, "scale_by_stddev")
        check_updates(updates, state.nu, reference_name="state.nu", context="scale_by_stddev")
        mu = ema(updates, state.mu, decay, 1)
        nu = ema_of_squares(updates, state.nu, decay)
        if bias_correction:
            count = safe_increment(state.count)
            mu_hat = _bias_correction(mu, decay, count)
            nu_hat = _bias_correction(nu, decay, count)
        else:
            mu_hat, nu_hat = mu, nu
        updates = jax.tree.map(
            lambda g, m, v: None if g is None else inverse_root(v - abs_sq(m)) * g,
            updates, mu_hat, nu_hat, is_leaf=is_none,
        )
        mu = cast_like(mu, state.mu)
        nu = cast_like(nu, state.nu)
        if bias_correction:
            return updates, ScaleByRStdDevWithCountState(count=count, mu=mu, nu=nu)
        return updates, ScaleByRStdDevState(mu=mu, nu=nu)

    return GradientTransformation(init, update)


def scale_by_rss(
    initial_accumulator_value: float = 0.1, eps: float = 1e-7
) -> GradientTransformation:
    r"""Adagrad: divides updates by the root of the sum of all squared gradients so far.

    .. math::
        s_t = s_{t-1} + |g_t|^2, \qquad
        u_t = \begin{cases} g_t / \sqrt{s_t + \epsilon} & s_t > 0 \\ 0 & s_t = 0 \end{cases}

    with :math:`s_0` = ``initial_accumulator_value``.

    Args:
      initial_accumulator_value: :math:`s_0 \ge 0`.
      eps: :math:`\epsilon`, inside the square root.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ScaleByRssState`.

    Raises:
      ValueError: ``initial_accumulator_value`` or ``eps`` negative, NaN or infinite.
      TypeError: one of them not a real number; at ``update``, a state not made by this
        transform's ``init``.

    Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 12, 2011.
    """

    check_scalar("initial_accumulator_value", initial_accumulator_value, context="scale_by_rss",
                 low=0.0, hint="It is the starting sum of squared gradients (0.1 is usual).")
    check_scalar("eps", eps, context="scale_by_rss", low=0.0,
                 hint="eps is added under the square root (1e-7 is usual).")

    def init(params):
        return ScaleByRssState(sum_of_squares=full_like(params, initial_accumulator_value))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, ScaleByRssState, "scale_by_rss")
        check_updates(updates, state.sum_of_squares, reference_name="state.sum_of_squares",
                      context="scale_by_rss")
        total = jax.tree.map(
            lambda g, s: s if g is None else abs_sq(g) + s, updates, state.sum_of_squares,
            is_leaf=is_none,
        )
        updates = jax.tree.map(
            lambda g, s: None if g is None else jnp.where(s > 0, jax.lax.rsqrt(s + eps), 0.0) * g,
            updates, total, is_leaf=is_none,
        )
        return updates, ScaleByRssState(sum_of_squares=cast_like(total, state.sum_of_squares))

    return GradientTransformation(init, update)
