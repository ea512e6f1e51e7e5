"""Clipping of updates: element-wise, by global norm, and by per-leaf RMS.

All three are stateless (their state is ``EmptyState()``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation, init_empty_state
from optstate._core.checks import check_scalar
from optstate._core.numerics import abs_sq, global_norm, is_none


def clip(max_delta: float) -> GradientTransformation:
    r"""Clips every element of the updates to :math:`[-\delta, \delta]`.

    .. math:: u \leftarrow \min(\max(u, -\delta), \delta)

    Args:
      max_delta: :math:`\delta`, the largest absolute value allowed.

    Returns:
      A stateless :class:`~optstate.GradientTransformation`.

    Raises:
      ValueError: ``max_delta`` negative (``clip(-1)`` would set every update to -1), NaN or
        infinite. TypeError: not a real number.

    Reference: Mikolov, "Statistical Language Models Based on Neural Networks", PhD thesis,
    Brno University of Technology, 2012 (element-wise gradient clipping).
    """

    check_scalar("max_delta", max_delta, context="clip", low=0.0,
                 hint="max_delta is the largest absolute value an update may keep.")

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        updates = jax.tree.map(
            lambda g: None if g is None else jnp.clip(g, -max_delta, max_delta),
            updates, is_leaf=is_none,
        )
        return updates, state

    return GradientTransformation(init_empty_state, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    r"""Rescales the updates so that their global norm is at most ``max_norm``.

    .. math::
        u \leftarrow \begin{cases} u & \|u\|_2 < c \\ c\, u / \|u\|_2 & \text{otherwise}
        \end{cases}, \qquad \|u\|_2 = \sqrt{\textstyle\sum_{\text{leaves}} \sum |u_i|^2}

    Args:
      max_norm: :math:`c`.

    Returns:
      A stateless :class:`~optstate.GradientTransformation`.

    Raises:
      ValueError: ``max_norm`` not positive (a negative one flips the updates' sign, 0 turns
        zero updates into NaN), NaN or infinite. TypeError: not a real number.

    Reference: Pascanu, Mikolov & Bengio, "On the difficulty of training Recurrent Neural
    Networks", ICML 2013.
    """

    check_scalar("max_norm", max_norm, context="clip_by_global_norm", low=0.0,
                 low_inclusive=False,
                 hint="max_norm is the largest global norm the updates may keep (e.g. 1.0); "
                      "to drop the updates use set_to_zero().")

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        norm = global_norm(updates)
        keep = norm < max_norm

        def one(g):
            if g is None:
                return None
            return jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm)

        return jax.tree.map(one, updates, is_leaf=is_none), state

    return GradientTransformation(init_empty_state, update)


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    r"""Rescales each leaf so that its root mean square is at most ``threshold``.

    .. math:: u \leftarrow u / \max\!\big(1,\ \operatorname{RMS}(u) / d\big), \qquad
        \operatorname{RMS}(u) = \sqrt{\operatorname{mean} |u|^2}

    Args:
      threshold: :math:`d`, the largest RMS allowed per leaf.

    Returns:
      A stateless :class:`~optstate.GradientTransformation`.

    Raises:
      ValueError: ``threshold`` not positive, NaN or infinite. TypeError: not a real number.

    Reference: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018, section 6 (update clipping).
    """

    check_scalar("threshold", threshold, context="clip_by_block_rms", low=0.0,
                 low_inclusive=False,
                 hint="threshold is the largest RMS each leaf's update may keep (1.0 is usual).")

    def update(updates, state, params=None, **extra_args):
        del params, extra_args

        def one(g):
            if g is None:
                return None
            return g / jnp.maximum(1.0, jnp.sqrt(jnp.mean(abs_sq(g))) / threshold)

        return jax.tree.map(one, updates, is_leaf=is_none), state

    return GradientTransformation(init_empty_state, update)
