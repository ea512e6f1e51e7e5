r"""Reading Adam's second moment out of any optimizer state, for the staleness study.

The study compares what a low-precision state *stores* for Adam's second moment :math:`\nu`
with what exact float32 arithmetic would hold after the same gradients,

.. math:: \nu^{\mathrm{exact}}_t = \beta_2 \nu^{\mathrm{exact}}_{t-1} + (1 - \beta_2) g_t^2,
    \qquad \text{drift}_t = \operatorname{mean}_i \frac{\nu^{\mathrm{stored}}_{t,i}}
    {\nu^{\mathrm{exact}}_{t,i}},

and counts the elements a step left unchanged (a *stall*, as in
:func:`optstate.staleness.stall_fraction`). The leaves are found by their NamedTuple field
name ``nu`` (``scale_by_adam``'s state, however deeply wrapped: ``reset_every_n``,
``quantize_state``, ``chain``), and a quantized leaf is read through its codes and
dequantized.

Reference: Topollai & Choromanska, arXiv 2603.16731, 2026 (stalling of low-precision EMAs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optstate._core.leaves import field_names, path_str, unbox
from optstate.quantization.array import is_quantized
from optstate.quantization.block import dequantize
from optstate.staleness.measure import state_leaves, unchanged_count

NU_FIELD = "nu"


def nu_leaves(state: Any, *, min_size: int = 1) -> dict[str, Any]:
    """``{path: stored leaf}`` of the second-moment leaves of ``state`` (field ``nu``) with at
    least ``min_size`` elements, in tree order.

    Raises:
      ValueError: if ``state`` has no such leaf (the message lists the fields it does have).
    """
    found, seen = {}, set()
    for path, leaf in state_leaves(state):
        names = field_names(path)
        seen |= names
        leaf = unbox(leaf)
        size = 1
        for dim in (leaf.shape if leaf is not None else ()):
            size *= dim
        if NU_FIELD in names and leaf is not None and size >= min_size:
            found[path_str(path)] = leaf
    if not found:
        raise ValueError(
            f"no second-moment leaf (field {NU_FIELD!r}) with at least {min_size} elements in "
            f"the optimizer state; its fields are {sorted(seen)}.")
    return found


def nu_values(state: Any, *, min_size: int = 1) -> dict[str, jax.Array]:
    """The second moment as float32 arrays (quantized leaves dequantized), by path."""
    return {path: jnp.asarray(dequantize(leaf) if is_quantized(leaf) else leaf, jnp.float32)
            for path, leaf in nu_leaves(state, min_size=min_size).items()}


def nu_stall_fraction(old_state: Any, new_state: Any, *, min_size: int = 1,
                      where: dict[str, jax.Array] | None = None) -> jax.Array:
    """Fraction of the stored second-moment elements (all ``nu`` leaves together) that the
    step from ``old_state`` to ``new_state`` left unchanged; float32 scalar, jittable.

    Without ``where`` every stored element counts, compared by its stored codes (as
    :func:`optstate.staleness.stall_fraction` does). With ``where`` (a boolean mask per
    ``nu`` path) only the selected elements count, compared by their stored values (the same
    thing for a float format such as bf16, whose codes are its values) -- e.g. only the
    elements that a gradient has reached, since an element whose gradient is always zero
    stays at zero in any format and would count as a stall.
    """
    if where is None:
        old = nu_leaves(old_state, min_size=min_size)
        new = nu_leaves(new_state, min_size=min_size)
        same, total = jnp.int32(0), 0
        for path, leaf in old.items():
            count, size = unchanged_count(leaf, new[path])
            same, total = same + count, total + size
        return same.astype(jnp.float32) / jnp.float32(total)
    old = nu_values(old_state, min_size=min_size)
    new = nu_values(new_state, min_size=min_size)
    same = sum(jnp.sum((old[p] == new[p]) & where[p], dtype=jnp.float32) for p in old)
    total = sum(jnp.sum(where[p], dtype=jnp.float32) for p in old)
    return same / jnp.maximum(total, 1.0)


def grads_like_nu(grads: Any, state: Any, *, min_size: int = 1) -> dict[str, jax.Array]:
    """The gradient leaves matching :func:`nu_leaves` of ``state``, keyed by the ``nu`` path.

    Adam's ``nu`` mirrors the parameter tree, so its leaves of at least ``min_size`` elements
    pair in order with the gradient leaves of that size.

    Raises:
      ValueError: if the counts or shapes do not pair (e.g. a state holding two Adams).
    """
    nus = nu_leaves(state, min_size=min_size)
    leaves = [g for g in jax.tree.leaves(grads) if jnp.size(g) >= min_size]
    shapes = [tuple(jnp.shape(g)) for g in leaves]
    expected = [tuple(leaf.shape) for leaf in nus.values()]
    if shapes != expected:
        raise ValueError(
            f"the gradient leaves of at least {min_size} elements (shapes {shapes[:4]}...) do "
            f"not pair with the second-moment leaves {list(nus)[:4]}... (shapes "
            f"{expected[:4]}...); expected one Adam over the whole parameter tree.")
    return dict(zip(nus, (jnp.asarray(g, jnp.float32) for g in leaves)))


def exact_ema(exact: dict[str, jax.Array], grads: dict[str, jax.Array], b2: float,
              restart: jax.Array | bool = False) -> dict[str, jax.Array]:
    r""":math:`\nu \leftarrow \beta_2 \nu + (1 - \beta_2) g^2` in float32, per path; with
    ``restart`` true the old value is taken as 0 first (what a reset does to Adam's ``nu``)."""
    b2 = float(b2)  # 1 - b2 in float64, then rounded once, as Adam's own update does
    return {path: b2 * jnp.where(restart, 0.0, value) + (1.0 - b2) * jnp.square(grads[path])
            for path, value in exact.items()}


def drift(stored: dict[str, jax.Array], exact: dict[str, jax.Array]) -> jax.Array:
    """Mean over elements of ``stored / exact`` (elements with ``exact == 0`` skipped):
    1 when the stored second moment is the exact EMA."""
    ratio_sum, count = jnp.float32(0.0), jnp.float32(0.0)
    for path, value in exact.items():
        positive = value > 0
        ratio = jnp.where(positive, stored[path] / jnp.where(positive, value, 1.0), 0.0)
        ratio_sum = ratio_sum + jnp.sum(ratio)
        count = count + jnp.sum(positive, dtype=jnp.float32)
    return ratio_sum / jnp.maximum(count, 1.0)


def drift_median(stored: dict[str, jax.Array], exact: dict[str, jax.Array]) -> jax.Array:
    """Median over elements of ``stored / exact`` (elements with ``exact == 0`` skipped): the
    typical element, where :func:`drift`'s mean can be carried by a few large ratios."""
    ratios = [jnp.where(value > 0, stored[path] / jnp.where(value > 0, value, 1.0), jnp.nan)
              .ravel() for path, value in exact.items()]
    return jnp.nanmedian(jnp.concatenate(ratios))
