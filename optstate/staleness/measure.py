r"""Measuring staleness on real state trees: :func:`stall_fraction` and :func:`track_staleness`.

A step stalls a stored element when the value stored after the write equals the value stored
before it. What is stored is the array itself for a plain floating leaf, and the codes for a
quantized leaf (packed 4-bit codes are compared value by value). Jittable, usable inside
``lax.scan``; the reset policies of :mod:`optstate.staleness.resets` measure with the same
functions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.base import GradientTransformation, with_extra_args_support
from optstate._core.leaves import is_boxed, path_str, unbox
from optstate._core.types import OptState, PyTree
from optstate.quantization.array import is_quantized
from optstate.staleness.simulate import round_to_format


def is_state_leaf(x: Any) -> bool:
    """What counts as one leaf of a state here: a quantized array, a Flax ``Variable`` and
    ``None`` each count once, at their own path, so paths are the same whether or not Flax
    boxed the arrays."""
    return x is None or is_quantized(x) or is_boxed(x)


def state_leaves(tree: PyTree) -> list[tuple[tuple, Any]]:
    """``(path, leaf)`` pairs of a state, leaves as :func:`is_state_leaf` says."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state_leaf)[0]


def stored_array(leaf: Any) -> Any:
    """The array whose elements are the stored values: a quantized leaf's ``codes``."""
    leaf = unbox(leaf)
    if is_quantized(leaf):
        return unbox(leaf.codes)
    return leaf


def _is_measured(leaf: Any) -> bool:
    """Whether ``leaf`` is stored state that can stall: floating arrays and quantized leaves.

    Integer leaves (counters), booleans, PRNG keys and ``None`` are not.
    """
    leaf = unbox(leaf)
    if leaf is None:
        return False
    if is_quantized(leaf):
        return int(np.prod(jnp.shape(unbox(leaf.codes)))) > 0
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        if isinstance(leaf, float):
            return True
        return False
    try:
        floating = jnp.issubdtype(dtype, jnp.inexact)
    except TypeError:  # extended dtypes such as typed PRNG keys
        return False
    return bool(floating) and int(np.prod(jnp.shape(leaf))) > 0


def unchanged_count(old: Any, new: Any) -> tuple[jax.Array, int]:
    """(number of stored elements equal before and after, number of stored elements).

    A quantized leaf compares its codes; 4-bit codes are packed two per byte along the last
    axis (element ``2i`` in the low nibble, ``2i+1`` in the high one) and are compared nibble
    by nibble, the padding nibble of an odd last axis excluded.
    """
    old, new = unbox(old), unbox(new)
    a = jnp.asarray(stored_array(old))
    b = jnp.asarray(stored_array(new))
    if is_quantized(old) and old.format.values_per_code > 1:
        logical = tuple(old.shape)
        n = logical[-1] if logical else 1
        unpack = old.format.unpack
        same = jnp.sum(unpack(a, n) == unpack(b, n), dtype=jnp.int32)
        return same, int(np.prod(logical))
    same = a == b
    if jnp.issubdtype(a.dtype, jnp.inexact):
        same = same | (jnp.isnan(a) & jnp.isnan(b))
    return jnp.sum(same, dtype=jnp.int32), int(np.prod(a.shape))


def _check_pair(old_state: PyTree, new_state: PyTree, context: str):
    old_flat = state_leaves(old_state)
    new_flat = state_leaves(new_state)
    old_paths = [path_str(p) for p, _ in old_flat]
    new_paths = [path_str(p) for p, _ in new_flat]
    if old_paths != new_paths:
        missing = sorted(set(old_paths) - set(new_paths))
        extra = sorted(set(new_paths) - set(old_paths))
        raise ValueError(
            f"{context}: new_state does not have the structure of old_state "
            f"(leaves only in old_state: {missing[:5]}, only in new_state: {extra[:5]})."
        )
    for path, (_, o), (_, n) in zip(old_paths, old_flat, new_flat):
        so, sn = jnp.shape(stored_array(o)), jnp.shape(stored_array(n))
        if so != sn:
            raise ValueError(
                f"{context}: leaf {path} is stored with shape {sn} in new_state; expected "
                f"{so} as in old_state."
            )
    return old_paths, old_flat, new_flat


def stall_fraction(old_state: PyTree, new_state: PyTree) -> dict[str, jax.Array]:
    r"""Per state leaf, the fraction of stored elements that a step left unchanged.

    .. math:: s_\ell = \frac{1}{n_\ell} \sum_{i=1}^{n_\ell} [\tilde x_{\ell,i}^{new} =
        \tilde x_{\ell,i}^{old}]

    where :math:`\tilde x` is what is stored: the array itself for a plain floating leaf,
    the codes for a quantized leaf (``optstate.quantization.array.QuantizedArray``), which counts once,
    at its own path (e.g. ``"[0].nu['w']"``), over its logical elements (packed 4-bit codes
    are compared nibble by nibble); its float32 per-block scales are not counted. Integer leaves (step counters), booleans, PRNG
    keys, ``None`` and empty leaves are skipped. Two NaNs count as equal. Jittable and usable
    inside ``lax.scan``; the keys depend only on the tree structure.

    Args:
      old_state: a state before a step.
      new_state: the state after it (same structure and stored shapes).

    Returns:
      ``{jax.tree_util.keystr(path): float32 scalar}`` in leaf order.

    Raises:
      ValueError: the two states differ in structure or in a leaf's stored shape (the message
        names the leaf).

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026 (stalling).
    """
    paths, old_flat, new_flat = _check_pair(old_state, new_state, "stall_fraction")
    out: dict[str, jax.Array] = {}
    for path, (_, o), (_, n) in zip(paths, old_flat, new_flat):
        if not (_is_measured(o) and _is_measured(n)):
            continue
        same, size = unchanged_count(o, n)
        out[path] = (same.astype(jnp.float32) / jnp.float32(size)).astype(jnp.float32)
    return out


def _measured_paths(state: PyTree) -> list[str]:
    return [path_str(p) for p, leaf in state_leaves(state) if _is_measured(leaf)]


class TrackStalenessState(NamedTuple):
    """State of :func:`track_staleness`.

    Attributes:
      inner_state: the wrapped transform's state.
      stall: ``{leaf path in inner_state: float32 scalar}``, the fraction of stored elements
        of each floating (or quantized) leaf that the last update left unchanged; 0 before
        the first update.
    """

    inner_state: OptState
    stall: dict[str, jax.Array]


def track_staleness(inner: GradientTransformation) -> GradientTransformation:
    r"""Wraps ``inner`` and records, per state leaf, the stall fraction of the last update.

    .. math:: (u, s') = \mathrm{inner}(u, s), \qquad
        \mathrm{stall}_\ell = \mathrm{stall\_fraction}(s, s')_\ell

    The updates are those of ``inner``, unchanged. The record is a dict of float32 scalars
    whose keys are fixed at ``init`` (the paths of the floating and quantized leaves of
    ``inner``'s state), so the state structure never changes and the record can be logged,
    checkpointed and read inside ``jit``.

    Args:
      inner: any gradient transformation (optstate's or Optax's), e.g. a quantized Adam.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`TrackStalenessState`.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
    """
    inner = with_extra_args_support(inner)

    def init(params):
        inner_state = inner.init(params)
        stall = {path: jnp.zeros((), jnp.float32) for path in _measured_paths(inner_state)}
        return TrackStalenessState(inner_state=inner_state, stall=stall)

    def update(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        stall = stall_fraction(state.inner_state, new_inner)
        if set(stall) != set(state.stall):
            raise ValueError(
                f"track_staleness: the inner state's measured leaves changed from "
                f"{sorted(state.stall)} to {sorted(stall)}; the state structure must be fixed."
            )
        return new_updates, TrackStalenessState(inner_state=new_inner, stall=stall)

    return GradientTransformation(init, update)


# -- parameters: updates that round away ---------------------------------------------------


def param_stall_fraction(params: PyTree, updates: PyTree) -> dict[str, jax.Array]:
    r"""Per parameter leaf, the share of its non-zero updates that rounding to the
    parameter's dtype throws away: the parameters' own stall fraction.

    .. math:: s_\ell = \frac{\#\{i : u_i \ne 0,\ \mathrm{rd}(p_i + u_i) = p_i\}}
        {\#\{i : u_i \ne 0\}}

    with :math:`\mathrm{rd}` rounding to nearest in the parameter's dtype, what
    ``apply_updates`` does. For bf16 parameters every update smaller than half a bf16 step
    (:math:`2^{-8} |p|`) stalls: when this fraction nears 1 the weights have stopped
    learning, and ``optstate.compensated_params`` (which keeps the lost bits as state) is the
    cure. Float32 parameters give (nearly) 0. Leaves with no non-zero update give 0; integer
    and ``None`` leaves are skipped. Jittable; the rounding is explicit, so XLA's excess
    precision cannot hide it.

    Args:
      params: the parameters before the step.
      updates: the step's updates (a tree like ``params``).

    Returns:
      ``{jax.tree_util.keystr(path): float32 scalar}`` in leaf order.

    Raises:
      ValueError: ``updates`` does not match ``params`` (the message names the leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> from optstate import staleness
      >>> params = {"w": jnp.array([1.0, 1.0, 0.001], jnp.bfloat16)}
      >>> updates = {"w": jnp.array([1e-3, 0.0, 1e-3])}
      >>> staleness.param_stall_fraction(params, updates)
      {"['w']": Array(0.5, dtype=float32)}

    Reference: Zamirai et al., "Revisiting BFloat16 Training", arXiv 2010.06192, 2020 (bf16
    weight updates lost to rounding).
    """
    p_flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
    u_flat = jax.tree_util.tree_flatten_with_path(updates, is_leaf=lambda x: x is None)[0]
    if [p for p, _ in p_flat] != [p for p, _ in u_flat]:
        raise ValueError(
            f"param_stall_fraction: updates do not have the structure of params (params "
            f"leaves {[path_str(p) for p, _ in p_flat][:5]}, updates leaves "
            f"{[path_str(p) for p, _ in u_flat][:5]}).")
    out: dict[str, jax.Array] = {}
    for (path, p), (_, u) in zip(p_flat, u_flat):
        if p is None or u is None or not _is_measured(p):
            continue
        name = path_str(path)
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(f"param_stall_fraction: update {name} has shape {jnp.shape(u)}; "
                             f"expected {jnp.shape(p)} as the parameter.")
        p = jnp.asarray(unbox(p))
        u = jnp.asarray(unbox(u))
        if jnp.finfo(p.dtype).bits >= 32:
            same = (p + u).astype(p.dtype) == p
        else:
            p32 = p.astype(jnp.float32)
            same = round_to_format(p32 + u.astype(jnp.float32), p.dtype) == p32
        moved = u != 0
        stalled = jnp.sum(moved & same, dtype=jnp.int32).astype(jnp.float32)
        total = jnp.sum(moved, dtype=jnp.int32).astype(jnp.float32)
        out[name] = jnp.where(total > 0, stalled / jnp.maximum(total, 1.0), 0.0)
    return out
