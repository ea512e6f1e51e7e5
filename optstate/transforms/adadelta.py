"""Adadelta's rescaling: a ratio of running RMS of updates to running RMS of gradients.

Its state, two moving averages per parameter (``e_g``, ``e_x``), is laid out as Optax's
``ScaleByAdaDeltaState`` so that states convert one to one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation
from optstate._core.checks import check_scalar, check_state
from optstate._core.numerics import cast_like, ema, is_none, zeros_like
from optstate._core.tree_checks import check_updates
from optstate._core.types import PyTree


class ScaleByAdaDeltaState(NamedTuple):
    """Adadelta's moving averages of squared gradients ``e_g`` and squared updates ``e_x``."""

    e_g: PyTree
    e_x: PyTree


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    r"""Adadelta: scales each gradient by RMS(past updates) / RMS(gradients).

    .. math::
        E[g^2]_t &= \rho\, E[g^2]_{t-1} + (1 - \rho)\, g_t^2, \\
        u_t &= \frac{\sqrt{E[\Delta x^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}}\, g_t, \\
        E[\Delta x^2]_t &= \rho\, E[\Delta x^2]_{t-1} + (1 - \rho)\, u_t^2.

    The squares are plain squares, :math:`g^2` and :math:`u^2`, also for complex parameters
    (complex averages, as Optax's ``scale_by_adadelta`` keeps them), unlike the
    :math:`|g|^2` of Adam, RMSProp and Adagrad.

    Args:
      rho: :math:`\rho`, the decay of both averages.
      eps: :math:`\epsilon`, inside both square roots.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ScaleByAdaDeltaState`.

    Raises:
      ValueError: ``rho`` outside :math:`[0, 1)` (1 never updates :math:`E[g^2]`), ``eps``
        not positive (with 0 the first update, and so every later one, is 0), or either NaN
        or infinite. TypeError: one of them not a real number; at ``update``, a state not
        made by this transform's ``init``.

    Reference: Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012,
    Algorithm 1.
    """

    check_scalar("rho", rho, context="scale_by_adadelta", low=0.0, high=1.0,
                 high_inclusive=False, hint="rho is the decay of both averages (0.9 is usual).")
    check_scalar("eps", eps, context="scale_by_adadelta", low=0.0, low_inclusive=False,
                 hint="eps starts the update average off zero (1e-6 is usual).")

    def init(params):
        return ScaleByAdaDeltaState(e_g=zeros_like(params), e_x=zeros_like(params))

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, ScaleByAdaDeltaState, "scale_by_adadelta")
        check_updates(updates, state.e_g, reference_name="state.e_g",
                      context="scale_by_adadelta")
        e_g = ema(updates, state.e_g, rho, 2)
        updates = jax.tree.map(
            lambda g, eg, ex: None if g is None
            else (jnp.sqrt(ex + eps) / jnp.sqrt(eg + eps)) * g,
            updates, e_g, state.e_x, is_leaf=is_none,
        )
        e_x = ema(updates, state.e_x, rho, 2)
        return updates, ScaleByAdaDeltaState(e_g=cast_like(e_g, state.e_g),
                                             e_x=cast_like(e_x, state.e_x))

    return GradientTransformation(init, update)
