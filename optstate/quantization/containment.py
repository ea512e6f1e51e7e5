"""Containment: one non-finite value in a new state never spreads beyond its own element.

Block-wise storage shares one scale among a block's values, so a value that float32 would
simply hold as ``inf`` or ``NaN`` (one element damaged) could take its whole block with it.
Two guards keep the damage where float32 keeps it:

* the codecs (:mod:`optstate.quantization.codecs`) compute scales over the finite values only;
* :func:`keep_finite` skips the state update of any parameter element whose new state went
  non-finite in any of its leaves, which also stops the outlier that caused it (e.g. Adam's
  :math:`m_i` after a gradient of 1e20 whose square overflowed) from crushing its neighbours.

Finite values are never touched, so a run without such elements is bit-identical to one
without these guards. Wrap ``quantize_state`` in ``apply_if_finite`` to skip whole steps with a
non-finite gradient instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optstate.quantization.array import is_quantized


def keep_finite(new: list[jax.Array], old: list[jax.Array]) -> list[jax.Array]:
    r"""The new state of one parameter's elements, except where any of its leaves went
    non-finite: there every leaf keeps its old value.

    .. math:: s'_{\ell,i} \leftarrow s_{\ell,i} \text{ if } \exists \ell':
        s'_{\ell',i} \notin \mathbb{R} \text{, else } s'_{\ell,i}

    ``new`` and ``old`` hold the same parameter's state leaves (same shapes). A gradient of
    1e20 makes Adam's :math:`g^2` overflow: float32 then keeps :math:`\nu_i = \infty` and
    freezes that one element; a block-quantized state would instead crush its whole block to
    the outlier's scale. Skipping that element's state update contains the damage to it (its
    update of this step is still the inner transform's).
    """
    bad = None
    for value in new:
        non_finite = ~jnp.isfinite(value)
        bad = non_finite if bad is None else bad | non_finite
    if bad is None:
        return list(new)
    return [jnp.where(bad, o.astype(n.dtype), n) for n, o in zip(new, old)]


def keep_finite_leaves(stored: list[Any], old: list[Any], new: list[Any],
                       owners: list[int | None] | None) -> list[Any]:
    """:func:`keep_finite` over a whole flattened state: the leaves of each parameter (by
    ``owners``, from the elementwise analysis) are guarded together when one of them is
    stored quantized; without owners, each quantized leaf is guarded on its own.

    Args:
      stored: the stored leaves (``QuantizedArray`` or plain), which say what is quantized.
      old: their old values (dequantized), ``new``: the inner update's new values.
      owners: per leaf, the parameter it follows element by element, or ``None``.
    """
    groups: dict[Any, list[int]] = {}
    for s, x in enumerate(stored):
        owner = None if owners is None else owners[s]
        key = ("leaf", s) if owner is None else ("param", owner)
        groups.setdefault(key, []).append(s)
    out = list(new)
    for members in groups.values():
        if not any(is_quantized(stored[s]) for s in members):
            continue
        kept = keep_finite([new[s] for s in members], [old[s] for s in members])
        for s, value in zip(members, kept):
            out[s] = value
    return out
