"""Small numeric and tree helpers shared by the building blocks and wrappers.

The step counter (:func:`zero_count`, :func:`safe_increment`: THE counter increment of every
transform and wrapper), tree-wide zeros, casts, the exponential moving average and its bias
correction, norms whose gradients stay finite at zero, and the argument checks that several
transforms share. Everything here is pure ``jax.numpy``; nothing allocates state or holds
arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optstate._core.tree_checks import check_same_tree
from optstate._core.types import PyTree


def is_none(x: Any) -> bool:
    """``True`` for ``None`` (used as ``is_leaf`` so that ``None`` updates pass through)."""
    return x is None


def canonical_dtype(dtype: Any) -> Any:
    """``jax.dtypes.canonicalize_dtype(dtype)``, or ``None`` for ``None``."""
    return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def zero_count() -> jax.Array:
    """A fresh step counter: a scalar ``int32`` zero."""
    return jnp.zeros((), jnp.int32)


def safe_increment(count: jax.Array) -> jax.Array:
    r"""Returns ``count + 1``, saturating at the largest value of its dtype.

    .. math:: c \leftarrow \min(c + 1, c_{\max})

    An ``int32`` step counter therefore never wraps round to a negative number (which would
    turn a bias correction :math:`1 - \beta^t` into garbage after :math:`2^{31}` steps).

    Args:
      count: an integer (usually ``int32``) or floating scalar counter.

    Returns:
      The incremented counter, same dtype.
    """
    count = jnp.asarray(count)
    dtype = count.dtype
    if jnp.issubdtype(dtype, jnp.integer):
        top = jnp.iinfo(dtype).max
    elif jnp.issubdtype(dtype, jnp.floating):
        top = jnp.finfo(dtype).max
    else:
        raise TypeError(
            f"safe_increment: expected an integer or floating counter, got dtype {dtype}."
        )
    top = jnp.asarray(top, dtype)
    return jnp.where(count < top, count + jnp.asarray(1, dtype), top)


def zeros_like(tree: PyTree, dtype: Any = None) -> PyTree:
    """A tree of zeros shaped like ``tree``, in ``dtype`` (default: each leaf's own dtype)."""
    return jax.tree.map(lambda x: jnp.zeros_like(x, dtype=dtype), tree)


def full_like(tree: PyTree, value: Any, dtype: Any = None) -> PyTree:
    """A tree filled with ``value``, shaped like ``tree``, in ``dtype`` (default: each leaf's)."""
    return jax.tree.map(lambda x: jnp.full_like(x, value, dtype=dtype), tree)


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``reference``."""
    return jax.tree.map(
        lambda x, r: None if x is None else x.astype(jnp.asarray(r).dtype),
        tree, reference, is_leaf=is_none,
    )


def ema(updates: PyTree, moments: PyTree, decay: Any, order: int) -> PyTree:
    r"""The exponential moving average of the ``order``-th power of ``updates``.

    .. math:: m \leftarrow (1 - \beta)\, g^{k} + \beta\, m

    A ``None`` update (a frozen leaf) leaves its moment unchanged, so the state keeps its
    structure.

    Args:
      updates: the gradients :math:`g` (``None`` leaves allowed).
      moments: the running averages :math:`m`, a tree like ``updates``.
      decay: :math:`\beta`.
      order: :math:`k` (1: first moment, 2: :math:`g^2` itself, complex for complex
        :math:`g`, as Optax's Adadelta has it; second moments of Adam-like transforms use
        :func:`ema_of_squares`).

    Returns:
      The new moments, in the promoted dtype of ``g`` and ``m`` (callers cast them back).

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
    Algorithm 1.
    """

    def one(g, m):
        if g is None:
            return m
        power = g if order == 1 else g**order
        return (1 - decay) * power + decay * m

    return jax.tree.map(one, updates, moments, is_leaf=is_none)


def abs_sq(x: jax.Array) -> jax.Array:
    r"""The squared modulus :math:`|x|^2 = x \bar x`, real for complex ``x``.

    For real ``x`` this is ``x * x`` (same dtype). For complex ``x`` it is
    ``(conj(x) * x).real``, a real array, where ``x**2`` would be complex and of the wrong
    modulus and phase (Optax's ``numerics.abs_sq`` convention). The second moments of Adam,
    RMSProp, Adagrad and Adafactor are built from it.

    Args:
      x: a real or complex array.

    Returns:
      An array shaped like ``x``: ``x``'s dtype if real, the matching real dtype if complex.
    """
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        return (jnp.conj(x) * x).real
    return x * x


def ema_of_squares(updates: PyTree, moments: PyTree, decay: Any) -> PyTree:
    r"""The exponential moving average of the squared modulus of ``updates``.

    .. math:: v \leftarrow (1 - \beta)\, |g|^2 + \beta\, v

    Equal to ``ema(updates, moments, decay, 2)`` for real gradients; for complex ones it
    averages :math:`|g|^2 = g \bar g` (real, non-negative) rather than :math:`g^2`, as Optax's
    ``tree.update_moment_per_elem_norm`` does. A ``None`` update leaves its moment unchanged.

    Args:
      updates: the gradients :math:`g` (``None`` leaves allowed).
      moments: the running averages :math:`v`, a tree like ``updates``.
      decay: :math:`\beta`.

    Returns:
      The new averages, in the promoted dtype of :math:`|g|^2` and :math:`v` (callers cast
      them back).

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
    Algorithm 1 (with :math:`g^2` read as :math:`|g|^2` for complex parameters).
    """

    def one(g, v):
        if g is None:
            return v
        return (1 - decay) * abs_sq(g) + decay * v

    return jax.tree.map(one, updates, moments, is_leaf=is_none)


def bias_correction(moment: PyTree, decay: Any, count: jax.Array) -> PyTree:
    r"""Divides an EMA that started at zero by its total weight, :math:`1 - \beta^{t}`.

    .. math:: \hat m = m / (1 - \beta^{t})

    Args:
      moment: the moving average :math:`m` (``None`` leaves pass through).
      decay: :math:`\beta`.
      count: :math:`t \ge 1`, the number of updates averaged so far.

    Returns:
      The corrected average, each leaf in its own dtype.

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
    section 3.
    """
    correction = 1 - decay**count

    def one(m):
        if m is None:
            return None
        return m / jnp.asarray(correction).astype(m.dtype)

    return jax.tree.map(one, moment, is_leaf=is_none)


def global_norm(tree: PyTree) -> jax.Array:
    r"""The Euclidean norm of all leaves together, :math:`\sqrt{\sum_i \|x_i\|_2^2}`.

    Args:
      tree: a pytree of arrays (real or complex).

    Returns:
      A scalar; ``0.0`` (``float32``) for a tree without leaves.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    total = sum(jnp.sum(abs_sq(x)) for x in leaves)
    return jnp.sqrt(total)


def safe_norm(x: jax.Array, min_norm: Any) -> jax.Array:
    r"""``max(||x||_2, min_norm)`` whose gradient is finite at ``x = 0``.

    The norm is computed on ``x`` replaced by ones wherever the true norm is below the floor,
    so that the untaken branch never differentiates ``sqrt`` at zero.

    Args:
      x: an array.
      min_norm: the floor.

    Returns:
      A scalar.
    """
    norm = jnp.linalg.norm(x)
    below = norm <= min_norm
    masked = jnp.where(below, jnp.ones_like(x), x)
    return jnp.where(below, min_norm, jnp.linalg.norm(masked))


def safe_rms(x: jax.Array, min_rms: Any) -> jax.Array:
    r"""``max(sqrt(mean(|x|^2)), min_rms)`` whose gradient is finite at ``x = 0``.

    Args:
      x: an array.
      min_rms: the floor (as in :func:`safe_norm`).

    Returns:
      A scalar.
    """
    rms = jnp.sqrt(jnp.mean(abs_sq(x)))
    below = rms <= min_rms
    masked = jnp.where(below, jnp.ones_like(x), x)
    return jnp.where(below, min_rms, jnp.sqrt(jnp.mean(abs_sq(masked))))


def check_params_given(params: Any, context: str) -> None:
    """Raises ``ValueError`` when a transform that needs ``params`` was called without them."""
    if params is None:
        raise ValueError(
            f"{context}: this transform needs the current parameters; call "
            f"update(updates, state, params) with params (a tree like the updates), got None."
        )


def check_same_structure(tree: PyTree, reference: PyTree, *, name: str, reference_name: str,
                         context: str) -> None:
    """Like ``check_same_tree`` but compares only the tree structure, not the leaf shapes.

    Used where a state tree has the structure of the parameters but other leaf shapes
    (e.g. Adafactor's factored accumulators).
    """
    def erase(t):
        return jax.tree.map(lambda x: None if x is None else 0.0, t, is_leaf=is_none)

    check_same_tree(erase(tree), erase(reference), name=name, reference_name=reference_name,
                    context=context)


def round_half_even(v: jax.Array) -> jax.Array:
    """``jnp.round`` (ties to even) from ``floor``: Pallas' Triton lowering has no ``round``,
    and kernels (the fused kernel's codecs, ``compensated_params`` inside it) use this.
    Exact for ``|v| < 2**22``."""
    f = jnp.floor(v)
    d = v - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    out = f + jnp.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)
    return jnp.where(out == 0, v * 0.0, out)  # -0.0 for small negative v, as jnp.round
