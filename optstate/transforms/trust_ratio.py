"""Layer-wise trust ratio (LARS / LAMB): each leaf's update rescaled by ``||p|| / ||u||``.

Stateless; needs the parameters at ``update``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation, init_empty_state
from optstate._core.checks import check_scalar
from optstate._core.numerics import check_params_given, is_none, safe_norm
from optstate._core.tree_checks import check_updates


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
    r"""Scales each leaf's update by the ratio of the parameter norm to the update norm.

    .. math::
        u \leftarrow u \cdot \begin{cases}
          \dfrac{c\, \max(\|p\|, n_{\min})}{\max(\|u\|, n_{\min}) + \epsilon} &
            \|p\| > 0 \text{ and } \|u\| > 0 \\
          1 & \text{otherwise}
        \end{cases}

    with norms taken per leaf (per layer), :math:`c` the trust coefficient.

    Args:
      min_norm: :math:`n_{\min}`, floor on both norms.
      trust_coefficient: :math:`c`.
      eps: :math:`\epsilon`, added to the denominator.

    Returns:
      A stateless :class:`~optstate.GradientTransformation`; its ``update`` needs ``params``.

    Raises:
      ValueError: an argument negative (a negative ``trust_coefficient`` flips the update's
        sign), NaN or infinite. TypeError: an argument not a real number.

    References:
      You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks" (LARS),
      arXiv:1708.03888, 2017.
      You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
      (LAMB), ICLR 2020.
    """

    for name, value in (("min_norm", min_norm), ("trust_coefficient", trust_coefficient),
                        ("eps", eps)):
        check_scalar(name, value, context="scale_by_trust_ratio", low=0.0)

    def update(updates, state, params=None, **extra_args):
        del extra_args
        context = "scale_by_trust_ratio"
        check_params_given(params, context)
        check_updates(updates, params, reference_name="params", context=context)

        def one(u, p):
            if u is None:
                return None
            param_norm = safe_norm(p, min_norm)
            update_norm = safe_norm(u, min_norm)
            ratio = trust_coefficient * param_norm / (update_norm + eps)
            degenerate = jnp.logical_or(param_norm == 0.0, update_norm == 0.0)
            return u * jnp.where(degenerate, jnp.asarray(1.0, dtype=p.dtype), ratio)

        return jax.tree.map(one, updates, params, is_leaf=is_none), state

    return GradientTransformation(init_empty_state, update)

