"""Per-leaf decisions of ``quantize_state``: how each leaf rounds, and its layout.

* Stall-prone leaves (:mod:`optstate.quantization.running_sums`): running sums, and EMAs at
  least as slow as the format's ``stall_decay``, round stochastically (or stay float32) as
  ``quantize_state(stalling=...)`` says; every leaf's rounding is recorded for ``describe``.
* Rank-1 normalised leaves (``int4`` second moments of at least two dimensions): their scales
  are maxima over whole rows and columns, so their parameter's state is updated whole, one
  parameter at a time (a group of its own in :mod:`optstate.quantization.chunked`), never
  by the row-chunk loop or the fused kernel.

The stochastic-rounding randomness stays the per-leaf ``seeds`` list of the step (``None``:
nearest), so the bounded-memory loop and the kernel need no knowledge of the policy.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from optstate._core.base import GradientTransformation
from optstate._core.leaves import is_boxed, leaves_with_paths, path_str, unbox
from optstate.quantization import formats
from optstate.quantization.array import is_quantized
from optstate.quantization.block import uses_rank1
from optstate.quantization.formats import StorageFormat
from optstate.quantization.running_sums import is_running_sum, self_coefficients


def seed_for(step_key: jax.Array, index: int) -> jax.Array:
    return jax.random.bits(jax.random.fold_in(step_key, index), (2,), jnp.uint32)


# -- stall-prone leaves: running sums and slow EMAs ---------------------------------------------


def stall_reason(cfg: Any, coefficient: float | str | None) -> str | None:
    """Why a leaf whose new value keeps ``coefficient`` times its old one stalls under
    nearest rounding in ``cfg.fmt`` (``None``: it does not)."""
    if is_running_sum(coefficient):
        return "running sum"
    if isinstance(coefficient, float) and cfg.fmt.stall_decay <= coefficient < 1.0:
        return f"decay {coefficient:.3g}"
    return None


def stall_prone(cfg: Any, inner: GradientTransformation, updates: Any, state: Any,
                 params: Any, extra_args: dict[str, Any], candidates: list[int]
                 ) -> dict[int, str]:
    """``{index into jax.tree.leaves(state): reason}`` of the stall-prone ``candidates``
    (traced on abstract values; see :mod:`optstate.quantization.running_sums`)."""
    if cfg.stalling is None or not candidates:
        return {}
    coefficients = self_coefficients(inner.update, updates, state, params, extra_args,
                                     candidates)
    reasons = {i: stall_reason(cfg, c) for i, c in coefficients.items()}
    return {i: r for i, r in reasons.items() if r is not None}


def leaf_format(cfg: Any, value: Any, nonneg: bool) -> StorageFormat:
    """The format of one quantized leaf: the rank-1 variant for a non-negative leaf of at
    least two dimensions when ``cfg.rank1``, else the wrapper's."""
    if cfg.rank1 and nonneg and len(getattr(value, "shape", ())) >= 2:
        return formats.get(formats.RANK1_VARIANT[cfg.fmt.name])
    return cfg.fmt


def loop_owners(owners: list[int | None] | None, s_leaves: list[Any]
                 ) -> list[int | None] | None:
    """``owners`` without the parameters that own a rank-1 normalised leaf (what the fused
    kernel is offered): its scales are maxima over whole rows and columns, so it (with the
    rest of its parameter's state) is updated whole, not in tiles or row chunks."""
    if owners is None:
        return None
    rank1 = {k for k, x in zip(owners, s_leaves)
             if k is not None and is_quantized(x) and uses_rank1(x.format, x.shape)}
    return [None if k in rank1 else k for k in owners]


def unlooped(owners: list[int | None] | None, looped: list[int | None] | None
              ) -> frozenset[int]:
    """State leaves that :func:`_loop_owners` took out of the loop (rank-1 parameters)."""
    if owners is None or looped is None:
        return frozenset()
    return frozenset(s for s, (a, b) in enumerate(zip(owners, looped)) if a is not None
                     and b is None)


def kept_in_fp32(cfg: Any, inner: GradientTransformation, params: Any, flat: list[Any],
                  treedef: Any, decisions: list[bool | None]) -> dict[int, str]:
    """With ``stalling="fp32"``: the leaves of a fresh state (``flat``, flattened with Flax
    boxes kept whole) that would be quantized but are stall-prone, so stay as they are."""
    candidates = [i for i, d in enumerate(decisions) if d is not None]
    if cfg.stalling != "fp32" or not candidates:
        return {}
    state = treedef.unflatten([unbox(x) for x in flat])
    plain = jax.tree.map(unbox, params, is_leaf=is_boxed)
    if len(jax.tree.leaves(state)) != len(flat):
        return {}
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)
    return stall_prone(cfg, inner, abstract(plain), abstract(state), abstract(plain), {},
                        candidates)


_ROUNDINGS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "optstate_quantize_state_roundings", default=None)


@contextlib.contextmanager
def recording_into(var: contextvars.ContextVar) -> Iterator[dict[str, str]]:
    """A fresh dict as ``var``'s value while active, for ``quantize_state`` to record per-leaf
    facts into. Local to the calling context (a ``contextvars`` variable): nothing
    process-wide changes."""
    record: dict[str, str] = {}
    token = var.set(record)
    try:
        yield record
    finally:
        var.reset(token)


def recording_roundings() -> contextlib.AbstractContextManager[dict[str, str]]:
    """Records, while active, how ``quantize_state`` updates traced or run in this context
    round each quantized leaf (and which leaves it keeps in float32 because they are
    stall-prone): ``{path in the inner state: "nearest" | "stochastic" |
    "stochastic: running sum" | "stochastic: decay 0.99" | "fp32: running sum"}``.
    ``optstate.memory.describe(state, tx=tx)`` shows it."""
    return recording_into(_ROUNDINGS)


def step_seeds(cfg: Any, inner: GradientTransformation, updates: Any, state: Any,
               s_leaves: list[Any], s_def: Any, params: Any, extra_args: dict[str, Any],
               would_quantize: Callable[[str, Any], bool]
               ) -> tuple[list[jax.Array | None], jax.Array]:
    """The per-leaf stochastic-rounding seeds of one step (``None``: nearest) and the key to
    store. A quantized leaf rounds stochastically when the wrapper does, or when it is
    stall-prone and ``stalling="stochastic"``; the key advances only if some leaf does.
    ``would_quantize(path, leaf)``: whether the wrapper would store a plain leaf quantized
    (for recording which leaves ``stalling="fp32"`` kept)."""
    quantized = [i for i, x in enumerate(s_leaves) if is_quantized(x)]
    record = _ROUNDINGS.get()
    wants = cfg.stalling == "stochastic" and cfg.rounding != "stochastic"
    prone: dict[int, str] = {}
    paths = [] if record is None else [
        path_str(p) for p, _ in leaves_with_paths(state.inner_state, is_leaf=is_quantized)]
    if (quantized and wants) or record is not None:
        candidates = list(quantized)
        if record is not None and cfg.stalling == "fp32" and len(paths) == len(s_leaves):
            candidates += [i for i, x in enumerate(s_leaves) if not is_quantized(x)
                           and would_quantize(paths[i], x)]
        abstract = s_def.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in s_leaves])
        prone = stall_prone(cfg, inner, updates, abstract, params, extra_args,
                             sorted(candidates))
    stochastic = [i for i in quantized
                  if cfg.rounding == "stochastic" or (wants and i in prone)]
    if len(paths) == len(s_leaves):
        for i, x in enumerate(s_leaves):
            how = "stochastic" if i in stochastic else "nearest"
            if not is_quantized(x):
                if i in prone:
                    record[paths[i]] = f"fp32: {prone[i]}"
                continue
            record[paths[i]] = f"{how}: {prone[i]}" if i in prone and wants else how
    if not stochastic:
        return [None] * len(s_leaves), state.key
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
    seeds = [seed_for(step_key, i) if i in stochastic else None for i in range(len(s_leaves))]
    return seeds, jax.random.key_data(next_key)
