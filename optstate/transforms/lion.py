"""Lion's rescaling: the sign of an interpolation between momentum and gradient.

One moment per parameter (``mu``) instead of Adam's two; the state mirrors Optax's
``ScaleByLionState``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation
from optstate._core.checks import check_dtype, check_scalar, check_state, describe
from optstate._core.numerics import (
    cast_like,
    ema,
    is_none,
    safe_increment,
    zero_count,
    zeros_like,
)
from optstate._core.tree_checks import check_updates
from optstate._core.types import PyTree


class ScaleByLionState(NamedTuple):
    """Lion's state: step ``count`` (``int32``) and momentum ``mu``."""

    count: jax.Array
    mu: PyTree


LION_MODES = ("hard", "smooth", "refined")


def _direction(mode: str, smooth_beta: Any) -> Callable[[jax.Array], jax.Array]:
    """The map from the interpolated momentum :math:`c` to the update, per ``mode``."""
    if mode == "hard":
        return jnp.sign
    if mode == "smooth":
        return lambda c: jnp.tanh(smooth_beta * c)
    return lambda c: jnp.where(jnp.abs(c) < 1.0, c, jnp.sign(c))  # "refined"


def scale_by_lion(
    b1: float = 0.9, b2: float = 0.99, mu_dtype: Any = None, *, mode: str = "hard",
    smooth_beta: float = 1.0,
) -> GradientTransformation:
    r"""Lion (EvoLved Sign Momentum): the sign of an interpolated momentum.

    .. math::
        c_t = \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad u_t = \phi(c_t), \qquad
        m_t = \beta_2 m_{t-1} + (1 - \beta_2)\, g_t,

    with :math:`\phi` chosen by ``mode`` (Optax's three variants):
    ``"hard"``: :math:`\phi(c) = \operatorname{sign}(c)` (the paper's Lion);
    ``"smooth"``: :math:`\phi(c) = \tanh(\beta_s c)`, :math:`\beta_s` = ``smooth_beta``;
    ``"refined"``: :math:`\phi(c) = c` where :math:`|c| < 1`, else :math:`\operatorname{sign}(c)`.

    Args:
      b1: :math:`\beta_1`, the interpolation used for the update direction.
      b2: :math:`\beta_2`, the decay of the stored momentum.
      mu_dtype: storage dtype of ``mu``; ``None`` keeps the parameters' dtype.
      mode: ``"hard"`` (default), ``"smooth"`` or ``"refined"``, as above.
      smooth_beta: :math:`\beta_s > 0`, the slope of ``"smooth"`` at zero (default 1.0;
        unused by the other modes).

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ScaleByLionState`.

    Raises:
      ValueError: ``b1`` or ``b2`` outside :math:`[0, 1]`, ``smooth_beta`` not positive,
        any of them NaN or infinite, or ``mode`` not one of the three names.
      TypeError: a non-numeric ``b1``/``b2``/``smooth_beta``, ``mode`` not a string, or
        ``mu_dtype`` not a floating dtype; at ``update``, a state not made by this
        transform's ``init``.

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms",
    arXiv:2302.06675, 2023, Algorithm 2.
    """
    context = "scale_by_lion"
    check_scalar("b1", b1, context=context, low=0.0, high=1.0,
                 hint="b1 interpolates between momentum and gradient (0.9 is usual).")
    check_scalar("b2", b2, context=context, low=0.0, high=1.0,
                 hint="b2 is the decay of the momentum (0.99 is usual).")
    mu_dtype = check_dtype("mu_dtype", mu_dtype, context)
    if not isinstance(mode, str):
        raise TypeError(f"{context}: mode must be one of {list(LION_MODES)}; got "
                        f"{describe(mode)}.")
    if mode not in LION_MODES:
        raise ValueError(f"{context}: mode must be one of {list(LION_MODES)}; got {mode!r}. "
                         f"'hard' is the paper's sign update (the default).")
    check_scalar("smooth_beta", smooth_beta, context=context, low=0.0, low_inclusive=False,
                 hint="smooth_beta is the slope of tanh in mode='smooth' (1.0 is usual).")
    direction_of = _direction(mode, smooth_beta)

    def init(params):
        return ScaleByLionState(count=zero_count(), mu=zeros_like(params, dtype=mu_dtype))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, ScaleByLionState, "scale_by_lion")
        check_updates(updates, state.mu, reference_name="state.mu", context="scale_by_lion")
        direction = jax.tree.map(
            lambda g, m: None if g is None else direction_of((1.0 - b1) * g + b1 * m),
            updates, state.mu, is_leaf=is_none,
        )
        mu = cast_like(ema(updates, state.mu, b2, 1), state.mu)
        return direction, ScaleByLionState(count=safe_increment(state.count), mu=mu)

    return GradientTransformation(init, update)
