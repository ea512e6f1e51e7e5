r"""State resets: periodic (:func:`reset_every_n`) and adaptive (:func:`adaptive_reset`).

A reset returns selected state leaves to their ``init`` values and restarts the bias-correction
step count of the transform that owns them, so that the next update equals a fresh
optimizer's first update from the current parameters. It cures stale low-precision state
(Topollai & Choromanska, arXiv 2603.16731, 2026). Both wrappers are jittable selects on a
step counter kept in the state: no recompilation, and the state structure never changes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.base import GradientTransformation, with_extra_args_support
from optstate._core.leaves import field_names, path_str, unbox
from optstate._core.types import OptState, PyTree
from optstate.quantization.array import is_quantized
from optstate.staleness.measure import is_state_leaf, stored_array, unchanged_count

__all__ = ["reset_every_n", "adaptive_reset", "ResetEveryNState", "AdaptiveResetState"]

_HYPERPARAMS = "hyperparams"


class ResetEveryNState(NamedTuple):
    """State of :func:`reset_every_n`.

    Attributes:
      count: updates since the last reset (or since ``init``), int32 scalar in ``[0, n]``.
      inner_state: the wrapped transform's state.
    """

    count: jax.Array
    inner_state: OptState


class AdaptiveResetState(NamedTuple):
    """State of :func:`adaptive_reset`.

    Attributes:
      inner_state: the wrapped transform's state.
      cycle_step: :math:`K`, updates since the last reset, int32 scalar.
      excess_sum: :math:`\\sum_{j \\le K} \\max(0, (S_j - s_0)/(1 - s_0))` over the current
        cycle, float32 scalar.
      pending: 1 when the last update decided to reset (the reset is applied at the start of
        the next update, from the then current parameters), else 0; int32 scalar.
      stall: :math:`S_K`, the measured stalled fraction of the second moment at the last
        update, float32 scalar.
      resets: number of resets applied so far, int32 scalar.
    """

    inner_state: OptState
    cycle_step: jax.Array
    excess_sum: jax.Array
    pending: jax.Array
    stall: jax.Array
    resets: jax.Array


# ------------------------------------------------------------------------------------------
# Which leaves a reset touches
# ------------------------------------------------------------------------------------------


def _flatten(tree: PyTree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state_leaf)

def _is_floating(leaf: Any) -> bool:
    leaf = unbox(leaf)
    if leaf is None:
        return False
    if is_quantized(leaf):
        return True
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return isinstance(leaf, float)
    try:
        return bool(jnp.issubdtype(dtype, jnp.inexact))
    except TypeError:  # typed PRNG keys
        return False


def _is_integer(leaf: Any) -> bool:
    dtype = getattr(unbox(leaf), "dtype", None)
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.integer))
    except TypeError:
        return False


def _reset_mask(state: PyTree, fields: tuple[str, ...] | None, context: str) -> list[bool]:
    """Per logical leaf of ``state``, whether a reset returns it to its init value.

    Floating leaves (and quantized leaves) are selected when ``fields`` is ``None`` (except
    hyperparameters, leaves under a field named ``hyperparams``), else when a NamedTuple
    field name or dict key on their path is in ``fields``. Each selected leaf also selects
    the nearest integer ``count`` field above it: the step count that drives its bias
    correction.
    """
    flat, _ = _flatten(state)
    mask = [False] * len(flat)
    count_owner: dict[tuple, int] = {}
    for i, (path, leaf) in enumerate(flat):
        last = path[-1] if path else None
        if (_is_integer(leaf) and isinstance(last, jax.tree_util.GetAttrKey)
                and last.name == "count"):
            count_owner[tuple(path[:-1])] = i
    available: set[str] = set()
    for i, (path, leaf) in enumerate(flat):
        if not _is_floating(leaf):
            continue
        names = field_names(path)
        available |= names
        if fields is None:
            selected = _HYPERPARAMS not in names
        else:
            selected = bool(names & set(fields))
        if not selected:
            continue
        mask[i] = True
        for cut in range(len(path) - 1, -1, -1):
            owner = tuple(path[:cut])
            if owner in count_owner:
                mask[count_owner[owner]] = True
                break
    if fields is not None and not any(
        m and _is_floating(leaf) for m, (_, leaf) in zip(mask, flat)
    ):
        raise ValueError(
            f"{context}: fields={tuple(fields)} select no floating state leaf; expected NamedTuple "
            f"field names or dict keys among {sorted(available)}."
        )
    return mask


def _measure_mask(state: PyTree, measure: tuple[str, ...], context: str) -> list[bool]:
    flat, _ = _flatten(state)
    mask, available = [], set()
    for path, leaf in flat:
        names = field_names(path) if _is_floating(leaf) else set()
        available |= names
        mask.append(bool(names & set(measure)))
    if not any(mask):
        raise ValueError(
            f"{context}: measure={tuple(measure)} matches no floating state leaf (the second "
            f"moment to watch); expected NamedTuple field names or dict keys among "
            f"{sorted(available)}."
        )
    return mask


def _normalize_fields(fields: Any, name: str, context: str) -> tuple[str, ...] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        fields = (fields,)
    fields = tuple(fields)
    if not fields or not all(isinstance(f, str) for f in fields):
        raise ValueError(
            f"{context}: expected {name} to be None or a non-empty sequence of field names "
            f"(e.g. ('nu',)), got {fields!r}."
        )
    return fields


def _fresh_state(inner: GradientTransformation, updates: PyTree, params: PyTree) -> PyTree:
    """``inner.init`` on the current parameters, or on the updates when none are given."""
    return inner.init(params if params is not None else updates)


def _select_reset(reset: jax.Array, fresh: PyTree, state: PyTree, mask: list[bool],
                  context: str) -> PyTree:
    """``fresh`` where ``mask`` and ``reset``, else ``state``; a jittable per-leaf select."""
    flat, treedef = _flatten(state)
    fresh_flat, _ = _flatten(fresh)
    paths = [path_str(p) for p, _ in flat]
    fresh_paths = [path_str(p) for p, _ in fresh_flat]
    if paths != fresh_paths:
        raise ValueError(
            f"{context}: the inner transform's init state does not have the structure of the "
            f"state being reset (state leaves {paths[:6]}..., init leaves {fresh_paths[:6]}...)."
        )
    out = []
    for path, (_, old), (_, new), m in zip(paths, flat, fresh_flat, mask):
        if not m:
            out.append(old)
            continue
        old_leaves, old_def = jax.tree.flatten(old)
        new_leaves, new_def = jax.tree.flatten(new)
        if old_def != new_def:
            raise ValueError(
                f"{context}: leaf {path} of the init state is stored as {new_def}; expected "
                f"{old_def} as in the state being reset."
            )
        chosen = []
        for o, f in zip(old_leaves, new_leaves):
            o = jnp.asarray(o)
            f = jnp.asarray(f)
            if f.shape != o.shape:
                raise ValueError(
                    f"{context}: leaf {path} has shape {f.shape} in the init state; expected "
                    f"{o.shape} as in the state being reset."
                )
            chosen.append(jnp.where(reset, f.astype(o.dtype), o))
        out.append(jax.tree.unflatten(old_def, chosen))
    return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------------------------
# Periodic reset
# ------------------------------------------------------------------------------------------


def reset_every_n(
    inner: GradientTransformation,
    n: int,
    *,
    fields: Sequence[str] | None = None,
) -> GradientTransformation:
    r"""Returns the selected state of ``inner`` to its init values every ``n`` updates.

    With :math:`k` the number of updates since the last reset,

    .. math::
        s \leftarrow \begin{cases} \mathrm{init}(\theta)|_{\text{fields}} & k = n \\
            s & \text{otherwise} \end{cases}, \qquad (u, s) \leftarrow \mathrm{inner}(u, s),

    applied at the start of updates :math:`n+1, 2n+1, \dots`: each of them is exactly a
    fresh optimizer's first update from the current parameters :math:`\theta`. Reset leaves:
    every floating state leaf (default; hyperparameters stored by ``inject_hyperparams``
    excepted) or those with a NamedTuple field name or dict key in ``fields``
    (``fields=("nu",)`` is the asymmetric policy that resets Adam's second moment only), plus
    the nearest integer ``count`` field above each of them, so bias correction restarts
    (with ``fields=("nu",)`` Adam's first moment keeps its value but is bias-corrected as if
    new for about :math:`1/(1-\beta_1)` steps). Quantized leaves
    (``optstate.quantize_state``) return to their init encoding; the wrapper composes with
    ``quantize_state`` in either order.

    The init values are obtained by calling ``inner.init`` inside ``update`` on ``params``
    when they are given, else on the updates (same shapes; leaves are cast to the state's
    dtypes). No copy of the init state is kept, so the wrapper costs no state memory beyond
    one int32 counter; under ``jit`` the fresh values are constants selected by a
    ``jnp.where``, so there is no recompilation and the state structure never changes.
    (For an ``inner`` whose init state depends on parameter values, pass ``params``.)

    Args:
      inner: the transform whose state is reset (optstate's or Optax's).
      n: the period :math:`n \ge 1`, e.g. ``optstate.staleness.reset_period(fmt, b2)``.
      fields: ``None`` (all floating state) or NamedTuple field names / dict keys to reset.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> tx = optstate.reset_every_n(optstate.adam(0.1), n=2)
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> for g in (1.0, 2.0, 3.0):
      ...     updates, state = tx.update({"w": jnp.full(3, g)}, state, params)
      >>> int(state.count), int(state.inner_state[0].count)  # reset after step 2
      (1, 1)
      >>> print(f"{float(updates['w'][0]):.4f}")  # a fresh Adam's first step: -lr * sign(g)
      -0.1000

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`ResetEveryNState`.

    Raises:
      ValueError: ``n`` is not a positive int, or ``fields`` select no floating leaf (at
        ``init``; the message lists the available names).

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026 (state resets).
    """
    context = "reset_every_n"
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise ValueError(f"{context}: expected a period n that is an int >= 1, got {n!r}.")
    n = int(n)
    fields = _normalize_fields(fields, "fields", context)
    inner = with_extra_args_support(inner)

    def init(params):
        inner_state = inner.init(params)
        _reset_mask(inner_state, fields, context)  # validate the selection early
        return ResetEveryNState(count=jnp.zeros((), jnp.int32), inner_state=inner_state)

    def update(updates, state, params=None, **extra_args):
        mask = _reset_mask(state.inner_state, fields, context)
        count = jnp.asarray(state.count, jnp.int32)
        reset = count >= n
        fresh = _fresh_state(inner, updates, params)
        inner_state = _select_reset(reset, fresh, state.inner_state, mask, context)
        new_updates, new_inner = inner.update(updates, inner_state, params, **extra_args)
        new_count = jnp.where(reset, 1, count + 1).astype(jnp.int32)
        return new_updates, ResetEveryNState(count=new_count, inner_state=new_inner)

    return GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------
# Adaptive reset
# ------------------------------------------------------------------------------------------


def adaptive_reset(
    inner: GradientTransformation,
    *,
    b2: float,
    s0: float = 0.6,
    measure: Sequence[str] = ("nu",),
    fields: Sequence[str] | None = None,
) -> GradientTransformation:
    r"""Resets ``inner``'s state when its measured staleness outweighs further averaging.

    The online policy: at each update measure :math:`S_K`, the fraction of the second
    moment's stored elements that the update left unchanged (see
    ``optstate.staleness.stall_fraction``), taking the steady state as 1; over the current
    cycle of :math:`K` updates since the last reset track

    .. math::
        \bar S_K = \frac{1}{K} \sum_{j=1}^{K} \max\!\left(0, \frac{S_j - s_0}{1 - s_0}\right),
        \qquad E(K) = \frac{2 \beta_2^K}{1 + \beta_2^K},

    and when :math:`\bar S_K \ge E(K)` reset (as :func:`reset_every_n` does: selected leaves
    to their init values from the current parameters, the owning ``count`` restarted) at
    the start of the next update, which starts a new cycle. Where the measured staleness
    follows the model, the cycles have the length of
    ``optstate.staleness.reset_period(fmt, b2, s0=s0)``.

    Args:
      inner: the transform to watch and reset (optstate's or Optax's).
      b2: :math:`\beta_2`, the decay of the watched second moment.
      s0: the tolerance :math:`s_0 \in [0, 1)` (default 0.6).
      measure: NamedTuple field names / dict keys of the leaves whose stalling is measured
        (default ``("nu",)``: Adam's and RMSProp's second moment); their elements are pooled.
      fields: what a reset touches, as in :func:`reset_every_n` (default: all floating state).

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`AdaptiveResetState`.

    Raises:
      ValueError: bad ``b2`` or ``s0``, or ``measure``/``fields`` match no floating leaf.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026 (adaptive resets).
    """
    context = "adaptive_reset"
    b2 = float(b2)
    if not 0.0 < b2 < 1.0:
        raise ValueError(f"{context}: expected a decay b2 with 0 < b2 < 1, got {b2}.")
    s0 = float(s0)
    if not 0.0 <= s0 < 1.0:
        raise ValueError(f"{context}: expected a tolerance 0 <= s0 < 1, got s0={s0}.")
    measure = _normalize_fields(measure, "measure", context)
    fields = _normalize_fields(fields, "fields", context)
    inner = with_extra_args_support(inner)
    log_b2 = math.log(b2)

    def init(params):
        inner_state = inner.init(params)
        _reset_mask(inner_state, fields, context)
        _measure_mask(inner_state, measure, context)
        return AdaptiveResetState(
            inner_state=inner_state,
            cycle_step=jnp.zeros((), jnp.int32),
            excess_sum=jnp.zeros((), jnp.float32),
            pending=jnp.zeros((), jnp.int32),
            stall=jnp.zeros((), jnp.float32),
            resets=jnp.zeros((), jnp.int32),
        )

    def update(updates, state, params=None, **extra_args):
        reset_mask = _reset_mask(state.inner_state, fields, context)
        measure_mask = _measure_mask(state.inner_state, measure, context)
        reset = jnp.asarray(state.pending) > 0
        fresh = _fresh_state(inner, updates, params)
        before = _select_reset(reset, fresh, state.inner_state, reset_mask, context)
        new_updates, after = inner.update(updates, before, params, **extra_args)

        old_flat, _ = _flatten(before)
        new_flat, _ = _flatten(after)
        same = jnp.zeros((), jnp.float32)
        total = 0
        for m, (path, o), (_, nw) in zip(measure_mask, old_flat, new_flat):
            if not m:
                continue
            if jnp.shape(stored_array(o)) != jnp.shape(stored_array(nw)):
                raise ValueError(
                    f"{context}: leaf {path_str(path)} changed its stored shape "
                    f"from {jnp.shape(stored_array(o))} to {jnp.shape(stored_array(nw))}."
                )
            count, size = unchanged_count(o, nw)
            same = same + count.astype(jnp.float32)
            total += size
        stall = same / jnp.float32(max(total, 1))

        k = jnp.where(reset, 0, state.cycle_step).astype(jnp.int32) + 1
        excess = jnp.maximum(0.0, (stall - s0) / (1.0 - s0))
        excess_sum = jnp.where(reset, 0.0, state.excess_sum) + excess
        sbar = excess_sum / k.astype(jnp.float32)
        power = jnp.exp(k.astype(jnp.float32) * jnp.float32(log_b2))
        benefit = 2.0 * power / (1.0 + power)
        pending = (sbar >= benefit).astype(jnp.int32)
        return new_updates, AdaptiveResetState(
            inner_state=after,
            cycle_step=k,
            excess_sum=excess_sum.astype(jnp.float32),
            pending=pending,
            stall=stall.astype(jnp.float32),
            resets=(state.resets + reset.astype(jnp.int32)).astype(jnp.int32),
        )

    return GradientTransformation(init, update)
