"""Adafactor's factored second moment, and its parameter-scale step size.

:func:`scale_by_factored_rms` keeps row and column statistics instead of a full second
moment for matrices (memory :math:`O(n + m)` instead of :math:`O(nm)`);
:func:`scale_by_param_block_rms` is the stateless relative step size.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.base import GradientTransformation, init_empty_state
from optstate._core.checks import check_int, check_scalar, check_state, describe
from optstate._core.numerics import (
    abs_sq,
    check_params_given,
    check_same_structure,
    is_none,
    safe_increment,
    safe_rms,
    zero_count,
)
from optstate._core.tree_checks import check_updates
from optstate._core.types import PyTree


class FactoredState(NamedTuple):
    """Adafactor's state.

    ``count`` (``int32``) is the step; for a factored leaf of shape ``S`` the row and column
    statistics ``v_row`` and ``v_col`` have ``S`` less one of its two largest axes each and
    ``v`` is a placeholder of shape ``(1,)``; for any other leaf ``v`` has shape ``S`` and
    ``v_row``, ``v_col`` are ``(1,)`` placeholders.
    """

    count: jax.Array
    v_row: PyTree
    v_col: PyTree
    v: PyTree


def _decay_rate_pow(step: jax.Array, exponent: float = 0.8) -> jax.Array:
    r"""Adafactor's increasing decay :math:`\hat\beta_{2,t} = 1 - (t + 1)^{-c}`."""
    t = jnp.asarray(step + 1, jnp.float32)
    return 1.0 - t ** (-exponent)


def _factored_axes(shape: tuple[int, ...], factored: bool,
                   min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """The (second largest, largest) axes to factor over, or ``None`` if not factored."""
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    decay_rate_fn: Callable[[jax.Array, float], jax.Array] = _decay_rate_pow,
) -> GradientTransformation:
    r"""Adafactor: divides updates by a (row x column) factored estimate of the gradient RMS.

    With :math:`\hat\beta_t` = ``decay_rate_fn(t - step_offset, decay_rate)`` (by default
    :math:`1 - (t+1)^{-0.8}`) and :math:`G = |g|^2 + \epsilon_1`, a matrix leaf
    (both factored axes of size at least ``min_dim_size_to_factor``) keeps

    .. math::
        R_t &= \hat\beta_t R_{t-1} + (1 - \hat\beta_t)\, \operatorname{mean}_{\text{col}} G, \qquad
        C_t = \hat\beta_t C_{t-1} + (1 - \hat\beta_t)\, \operatorname{mean}_{\text{row}} G, \\
        u_t &= g_t \,/\, \sqrt{R_t C_t / \operatorname{mean}(R_t)}

    (the means taken over the largest and second largest axes), and any other leaf keeps the
    full :math:`V_t = \hat\beta_t V_{t-1} + (1 - \hat\beta_t) G` with
    :math:`u_t = g_t / \sqrt{V_t}`.

    Args:
      factored: factor the second moment of leaves with two or more axes.
      decay_rate: the exponent :math:`c` passed to ``decay_rate_fn``.
      step_offset: subtracted from the step count (for fine-tuning from a later step).
      min_dim_size_to_factor: factor only when the second largest axis has at least this
        size.
      epsilon: :math:`\epsilon_1`, added to the squared gradient.
      decay_rate_fn: ``(step, decay_rate) -> beta_t``.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`FactoredState`; its
      ``update`` needs ``params``.

    Raises:
      ValueError: ``decay_rate`` (with the default ``decay_rate_fn``) or ``epsilon``
        negative, NaN or infinite; ``min_dim_size_to_factor`` negative.
      TypeError: an argument of the wrong type; at ``update``, a state not made by this
        transform's ``init``.

    Reference: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018, Algorithms 4 and 5.
    """

    context = "scale_by_factored_rms"
    if decay_rate_fn is _decay_rate_pow:
        check_scalar("decay_rate", decay_rate, context=context, low=0.0,
                     hint="decay_rate is the exponent c of the decay 1 - (t+1)^-c (0.8 is "
                          "usual); a negative one makes the decay negative.")
    if not callable(decay_rate_fn):
        raise TypeError(f"{context}: decay_rate_fn must be a function (step, decay_rate) -> "
                        f"decay; got {describe(decay_rate_fn)}.")
    check_int("step_offset", step_offset, context=context)
    check_int("min_dim_size_to_factor", min_dim_size_to_factor, context=context, low=0)
    check_scalar("epsilon", epsilon, context=context, low=0.0,
                 hint="epsilon is added to the squared gradients (1e-30 is usual).")

    def axes_of(x) -> tuple[int, int] | None:
        return _factored_axes(tuple(x.shape), factored, min_dim_size_to_factor)

    def init(params):
        def placeholder(p):
            return jnp.zeros((1,), dtype=p.dtype)

        def row(p):
            axes = axes_of(p)
            if axes is None:
                return placeholder(p)
            return jnp.zeros(tuple(np.delete(np.array(p.shape), axes[1])), dtype=p.dtype)

        def col(p):
            axes = axes_of(p)
            if axes is None:
                return placeholder(p)
            return jnp.zeros(tuple(np.delete(np.array(p.shape), axes[0])), dtype=p.dtype)

        def full(p):
            return placeholder(p) if axes_of(p) is not None else jnp.zeros_like(p)

        return FactoredState(
            count=zero_count(),
            v_row=jax.tree.map(row, params),
            v_col=jax.tree.map(col, params),
            v=jax.tree.map(full, params),
        )

    def update(updates, state, params=None, **extra_args):
        del extra_args
        check_state(state, FactoredState, context)
        check_params_given(params, context)
        check_updates(updates, params, reference_name="params", context=context)
        check_same_structure(updates, state.v, name="updates", reference_name="state.v",
                             context=context)
        beta = decay_rate_fn(state.count - step_offset, decay_rate)

        grads, treedef = jax.tree.flatten(updates)
        rows = treedef.flatten_up_to(state.v_row)
        cols = treedef.flatten_up_to(state.v_col)
        fulls = treedef.flatten_up_to(state.v)
        ps = treedef.flatten_up_to(params)

        out_u, out_r, out_c, out_v = [], [], [], []
        for g, r, c, v, p in zip(grads, rows, cols, fulls, ps):
            dtype = p.dtype
            axes = axes_of(p)
            sq = abs_sq(g) + epsilon
            if axes is not None:
                small, large = axes
                new_r = (beta * r + (1.0 - beta) * jnp.mean(sq, axis=large)).astype(dtype)
                new_c = (beta * c + (1.0 - beta) * jnp.mean(sq, axis=small)).astype(dtype)
                # new_r lost axis `large`; find where `small` sits in it.
                small_in_r = small - 1 if small > large else small
                r_factor = (new_r / jnp.mean(new_r, axis=small_in_r, keepdims=True)) ** -0.5
                c_factor = new_c ** -0.5
                u = (g * jnp.expand_dims(r_factor, axis=large)
                     * jnp.expand_dims(c_factor, axis=small))
                new_v = jnp.zeros((1,), dtype=dtype)
            else:
                new_v = (beta * v + (1.0 - beta) * sq).astype(dtype)
                u = g * new_v ** -0.5
                new_r = jnp.zeros((1,), dtype=dtype)
                new_c = jnp.zeros((1,), dtype=dtype)
            out_u.append(u)
            out_r.append(new_r)
            out_c.append(new_c)
            out_v.append(new_v)

        unflat = lambda leaves: jax.tree.unflatten(treedef, leaves)  # noqa: E731
        new_state = FactoredState(
            count=safe_increment(state.count),
            v_row=unflat(out_r), v_col=unflat(out_c), v=unflat(out_v),
        )
        return unflat(out_u), new_state

    return GradientTransformation(init, update)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
    r"""Scales each leaf's update by the RMS of that leaf's parameters (Adafactor's
    relative step size).

    .. math:: u \leftarrow u \cdot \max\!\big(\operatorname{RMS}(p),\, s_{\min}\big)

    Args:
      min_scale: :math:`s_{\min}`, the floor (so zero-initialised parameters still move).

    Returns:
      A stateless :class:`~optstate.GradientTransformation`; its ``update`` needs ``params``.

    Raises:
      ValueError: ``min_scale`` negative, NaN or infinite. TypeError: not a real number.

    Reference: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018, section 8 (relative step size, :math:`\epsilon_2`).
    """

    check_scalar("min_scale", min_scale, context="scale_by_param_block_rms", low=0.0)

    def update(updates, state, params=None, **extra_args):
        del extra_args
        context = "scale_by_param_block_rms"
        check_params_given(params, context)
        check_updates(updates, params, reference_name="params", context=context)
        updates = jax.tree.map(
            lambda u, p: None if u is None else u * safe_rms(p, min_scale),
            updates, params, is_leaf=is_none,
        )
        return updates, state

    return GradientTransformation(init_empty_state, update)
