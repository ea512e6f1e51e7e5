"""Lion's rescaling: the sign of an interpolation between momentum and gradient.

One moment per parameter (``mu``) instead of Adam's two; the state mirrors Optax's
``ScaleByLionState``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation
from optstate._core.checks import check_dtype, check_scalar, check_state
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


def scale_by_lion(
    b1: float = 0.9, b2: float = 0.99, mu_dtype: Any = None
) -> GradientTransformation:
    r"""Lion (EvoLved Sign Momentum): the sign of an interpolated momentum.

    .. math::
        u_t = \operatorname{sign}\big(\beta_1 m_{t-1} + (1 - \beta_1)\, g_t\big), \qquad
        m_t = \beta_2 m_{t-1} + (1 - \beta_2)\, g_t.

    Args:
      b1: :math:`\beta_1`, the interpolation used for the update direction.
      b2: :math:`\beta_2`, the decay of the stored momentum.
      mu_dtype: storage dtype of ``mu``; ``None`` keeps the parameters' dtype.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ScaleByLionState`.

    Raises:
      ValueError: ``b1`` or ``b2`` outside :math:`[0, 1]`, NaN or infinite.
      TypeError: a non-numeric ``b1``/``b2``, or ``mu_dtype`` not a floating dtype; at
        ``update``, a state not made by this transform's ``init``.

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms",
    arXiv:2302.06675, 2023, Algorithm 2.
    """
    context = "scale_by_lion"
    check_scalar("b1", b1, context=context, low=0.0, high=1.0,
                 hint="b1 interpolates between momentum and gradient (0.9 is usual).")
    check_scalar("b2", b2, context=context, low=0.0, high=1.0,
                 hint="b2 is the decay of the momentum (0.99 is usual).")
    mu_dtype = check_dtype("mu_dtype", mu_dtype, context)

    def init(params):
        return ScaleByLionState(count=zero_count(), mu=zeros_like(params, dtype=mu_dtype))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, ScaleByLionState, "scale_by_lion")
        check_updates(updates, state.mu, reference_name="state.mu", context="scale_by_lion")
        direction = jax.tree.map(
            lambda g, m: None if g is None else jnp.sign((1.0 - b1) * g + b1 * m),
            updates, state.mu, is_leaf=is_none,
        )
        mu = cast_like(ema(updates, state.mu, b2, 1), state.mu)
        return direction, ScaleByLionState(count=safe_increment(state.count), mu=mu)

    return GradientTransformation(init, update)
