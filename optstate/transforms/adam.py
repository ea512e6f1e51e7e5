"""Adam's rescaling: bias-corrected first and second moments (with Nesterov's variant).

:class:`ScaleByAdamState` (``count``, ``mu``, ``nu``) has Optax's field names and order, so
code written for Optax's Adam state (e.g. ``quantize_state``'s rule that ``nu`` is
non-negative) works on ours unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation
from optstate._core.checks import check_dtype, check_scalar, check_state
from optstate._core.numerics import (
    bias_correction,
    cast_like,
    ema,
    ema_of_squares,
    is_none,
    safe_increment,
    zero_count,
    zeros_like,
)
from optstate._core.tree_checks import check_updates
from optstate._core.types import PyTree


class ScaleByAdamState(NamedTuple):
    """Adam's state: step ``count`` (``int32``), first moment ``mu``, second moment ``nu``."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    r"""Rescales updates by Adam's bias-corrected moment estimates.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, |g_t|^2, \\
        \hat m_t &= m_t / (1 - \beta_1^t), \qquad \hat v_t = v_t / (1 - \beta_2^t), \\
        u_t &= \hat m_t / \left(\sqrt{\hat v_t + \epsilon_{\text{root}}} + \epsilon\right).

    With ``nesterov=True`` (NAdam, Dozat 2016) the numerator is
    :math:`\beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1)\, g_t / (1 - \beta_1^{t})`.

    The moments are updated in the promoted dtype of the gradient and the stored moment and
    then stored back in ``mu_dtype`` / ``nu_dtype``. For complex parameters
    :math:`|g|^2 = g \bar g` is real, as in Optax; ``nu`` keeps the parameters' (complex)
    dtype unless ``nu_dtype`` says otherwise.

    Args:
      b1: decay :math:`\beta_1` of the first moment.
      b2: decay :math:`\beta_2` of the second moment.
      eps: :math:`\epsilon`, added to the denominator outside the square root.
      eps_root: :math:`\epsilon_{\text{root}}`, added inside the square root (useful when
        differentiating through the update).
      mu_dtype: storage dtype of ``mu`` (e.g. ``jnp.bfloat16``); ``None``: the params' dtype.
      nu_dtype: storage dtype of ``nu``; ``None``: the params' dtype.
      nesterov: use Nesterov momentum (NAdam).

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ScaleByAdamState`.

    Raises:
      ValueError: ``b1`` or ``b2`` outside :math:`[0, 1)` (also after rounding to float32:
        :math:`\beta = 1` makes the bias correction a division by zero), ``eps`` or
        ``eps_root`` negative, or any of them NaN or infinite (Python or NumPy numbers;
        arrays, e.g. under :func:`optstate.inject_hyperparams`, are checked for shape only).
      TypeError: a hyperparameter that is not a real number, or ``mu_dtype``/``nu_dtype``
        not a floating dtype (an integer dtype would truncate the moments to integers).
      TypeError: at ``update``, a state not made by this transform's ``init``.

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
      Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
    """
    context = "scale_by_adam"
    check_scalar("b1", b1, context=context, low=0.0, high=1.0, high_inclusive=False,
                 hint="b1 is the decay of the first moment (0.9 is usual).")
    check_scalar("b2", b2, context=context, low=0.0, high=1.0, high_inclusive=False,
                 hint="b2 is the decay of the second moment (0.999 is usual).")
    check_scalar("eps", eps, context=context, low=0.0,
                 hint="eps is added to the denominator (1e-8 is usual).")
    check_scalar("eps_root", eps_root, context=context, low=0.0,
                 hint="eps_root is added under the square root (0 is usual).")
    mu_dtype = check_dtype("mu_dtype", mu_dtype, context)
    nu_dtype = check_dtype("nu_dtype", nu_dtype, context)

    def init(params):
        return ScaleByAdamState(
            count=zero_count(),
            mu=zeros_like(params, dtype=mu_dtype),
            nu=zeros_like(params, dtype=nu_dtype),
        )

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(state, ScaleByAdamState, "scale_by_adam")
        check_updates(updates, state.mu, reference_name="state.mu", context="scale_by_adam")
        mu = ema(updates, state.mu, b1, 1)
        nu = ema_of_squares(updates, state.nu, b2)
        count = safe_increment(state.count)
        if nesterov:
            mu_next = bias_correction(mu, b1, safe_increment(count))
            g_hat = bias_correction(updates, b1, count)
            mu_hat = jax.tree.map(
                lambda g, m: None if g is None else b1 * m + (1 - b1) * g,
                g_hat, mu_next, is_leaf=is_none,
            )
        else:
            mu_hat = bias_correction(mu, b1, count)
        nu_hat = bias_correction(nu, b2, count)
        updates = jax.tree.map(
            lambda g, m, v: None if g is None else m / (jnp.sqrt(v + eps_root) + eps),
            updates, mu_hat, nu_hat, is_leaf=is_none,
        )
        # Stored back in the dtypes chosen at init (mu_dtype / nu_dtype or the params').
        mu = cast_like(mu, state.mu)
        nu = cast_like(nu, state.nu)
        return updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)

