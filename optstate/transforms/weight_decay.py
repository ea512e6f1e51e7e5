"""Weight decay: adds a multiple of the parameters to the updates.

Placed after an adaptive rescaling this is decoupled weight decay (AdamW); placed before it,
an L2 penalty on the gradient. With a ``mask`` the transform runs under
:func:`~optstate.masked`, as Optax's does, so its state layout equals Optax's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from optstate._core.base import GradientTransformation, init_empty_state
from optstate._core.checks import check_scalar, check_state
from optstate._core.numerics import check_params_given, is_none, safe_increment, zero_count
from optstate._core.tree_checks import check_updates
from optstate._core.types import MaskOrFn, ScalarOrSchedule
from optstate.wrappers.masking import masked


class WeightDecaySchedule(NamedTuple):
    """The step count (``int32``) fed to a weight-decay schedule."""

    count: jax.Array


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    r"""Adds the parameters, scaled by the weight decay, to the updates.

    .. math:: u_t \leftarrow u_t + \lambda_t\, p_{t-1}

    where :math:`p_{t-1}` are the parameters passed to ``update`` (those from before the
    step). Placed after Adam's rescaling and before the learning rate this gives AdamW's
    decoupled decay :math:`p \leftarrow p - \eta\,(\hat m / (\sqrt{\hat v} + \epsilon) +
    \lambda p)`; placed before the rescaling it is a plain L2 penalty on the gradient.

    Args:
      weight_decay: :math:`\lambda`, a float or a schedule of the step count.
      mask: a tree of booleans with the structure of (a prefix of) the parameters, or a
        function ``params -> tree of booleans``; ``True`` leaves are decayed, ``False``
        leaves pass through (e.g. biases and norm scales). Uses :func:`optstate.masked`.

    Returns:
      A :class:`~optstate.GradientTransformation`; its ``update`` needs ``params``. The state
      is :class:`WeightDecaySchedule` for a schedule, else empty. ``None`` updates (a whole
      tree of ``None``) are returned as ``None``, as Optax does; a schedule still advances.

    Raises:
      ValueError: ``weight_decay`` NaN, infinite, or an array that is not 0-d (its sign is
        free, as in Optax). TypeError: not a number, a scalar array or a schedule.

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    check_scalar("weight_decay", weight_decay, context="add_decayed_weights",
                 allow_schedule=True,
                 hint="weight_decay multiplies the parameters added to the updates (e.g. 1e-4).")
    scheduled = callable(weight_decay) and not hasattr(weight_decay, "dtype")

    def init_schedule(params):
        del params
        return WeightDecaySchedule(count=zero_count())

    def update(updates, state, params=None, **extra_args):
        del extra_args
        context = "add_decayed_weights"
        check_params_given(params, context)
        if updates is not None:  # None updates (nothing to decay into) pass through, as in Optax
            check_updates(updates, params, reference_name="params", context=context)
        if scheduled:
            check_state(state, WeightDecaySchedule, context)
            rate = weight_decay(state.count)
            new_state = WeightDecaySchedule(count=safe_increment(state.count))
        else:
            rate = weight_decay
            new_state = state
            if isinstance(weight_decay, (int, float)) and weight_decay == 0.0:
                return updates, new_state
        if updates is None:
            return None, new_state
        updates = jax.tree.map(
            lambda g, p: None if g is None else g + rate * p, updates, params, is_leaf=is_none
        )
        return updates, new_state

    tx = GradientTransformation(init_schedule if scheduled else init_empty_state, update)
    if mask is not None:
        return masked(tx, mask)
    return tx
