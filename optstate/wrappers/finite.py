"""``apply_if_finite``: skip steps whose gradients contain a NaN or an Inf.

A skipped step returns zero updates and leaves the wrapped state bit for bit as it was, with
counters of consecutive and total non-finite steps kept in the state (Optax's
``apply_if_finite``, with the same state layout).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optstate._core.base import GradientTransformation, with_extra_args_support
from optstate._core.checks import check_state, check_transform
from optstate._core.numerics import safe_increment, zero_count
from optstate._core.types import OptState, Params, PyTree, Updates


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
      notfinite_count: consecutive steps (up to and including the last) whose updates held a
        NaN or an Inf; reset to 0 by a finite step. int32 scalar.
      last_finite: whether the last step's updates were all finite. bool scalar.
      total_notfinite: all non-finite steps since ``init``; never reset. int32 scalar.
      inner_state: the state of the wrapped transform.
    """

    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: OptState


def _all_finite(tree: PyTree) -> jax.Array:
    """A boolean scalar: whether every element of every leaf of ``tree`` is finite."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    if not flags:
        return jnp.array(True)
    return jnp.all(jnp.stack(flags))


def apply_if_finite(inner: GradientTransformation,
                    max_consecutive_errors: int) -> GradientTransformation:
    """Runs ``inner`` only on steps whose incoming updates are all finite.

    With :math:`f_t = [\\text{all } u_t \\text{ finite}]` and the consecutive-error count
    :math:`n_t = 0` if :math:`f_t` else :math:`n_{t-1} + 1`,

    .. math::

        (u, s) \\leftarrow \\begin{cases} \\mathrm{inner}(u_t, s_{t-1})
              & f_t \\text{ or } n_t > N \\\\
          (0, s_{t-1}) & \\text{otherwise,} \\end{cases}

    where :math:`N` is ``max_consecutive_errors``. A skipped step returns zero updates and
    leaves the inner state bit-for-bit unchanged (a ``lax.cond`` selects the old state), so
    a single overflowing batch in mixed-precision training does not poison the moments. After
    more than :math:`N` consecutive non-finite steps the update is let through (as Optax
    does), so a persistent divergence is not silently hidden. The test is on the updates that
    enter the wrapper (the gradients), as in Optax. Reference: dynamic loss scaling,
    Micikevicius et al., "Mixed Precision Training", ICLR 2018.

    Args:
      inner: the transform to protect (optstate's or Optax's).
      max_consecutive_errors: :math:`N \\ge 0`, how many consecutive non-finite steps are
        skipped before they are let through.

    Returns:
      A :class:`GradientTransformation` with state :class:`ApplyIfFiniteState`.

    Raises:
      ValueError: ``max_consecutive_errors`` is negative or not an int.
      TypeError: ``inner`` is not a transform; at ``update``, a state not made by this
        transform's ``init``.
    """
    check_transform(inner, "apply_if_finite", name="inner")
    if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int) \
            or max_consecutive_errors < 0:
        raise ValueError(
            "apply_if_finite: max_consecutive_errors must be a non-negative int, got "
            f"{max_consecutive_errors!r}.")
    inner = with_extra_args_support(inner)

    def init(params: Params) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(
            notfinite_count=zero_count(),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=zero_count(),
            inner_state=inner.init(params),
        )

    def update(updates: Updates, state: ApplyIfFiniteState, params: Params | None = None,
               **extra_args: Any) -> tuple[Updates, ApplyIfFiniteState]:
        check_state(state, ApplyIfFiniteState, "apply_if_finite")
        finite = _all_finite(updates)
        count = jnp.where(finite, zero_count(), safe_increment(state.notfinite_count))
        total = jnp.where(finite, state.total_notfinite, safe_increment(state.total_notfinite))

        def apply(operands):
            u, s = operands
            return inner.update(u, s, params, **extra_args)

        # Zeros shaped like what the inner transform returns (its dtypes may differ from the
        # incoming updates'), so both branches of the cond agree.
        out_shapes = jax.eval_shape(apply, (updates, state.inner_state))[0]

        def skip(operands):
            _, s = operands
            return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out_shapes), s

        new_updates, new_inner = lax.cond(
            jnp.logical_or(finite, count > max_consecutive_errors), apply, skip,
            (updates, state.inner_state))
        return new_updates, ApplyIfFiniteState(
            notfinite_count=count,
            last_finite=finite,
            total_notfinite=total,
            inner_state=new_inner,
        )

    return GradientTransformation(init, update)
