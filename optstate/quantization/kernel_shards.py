"""The fused kernel per shard: sharded quantized state under ``jax.shard_map``.

A parameter whose state is split over a mesh (its leaves typed as split, sharding in types,
or split as recorded by :func:`typed_specs` before ``quantize_state`` switches the mesh's
Explicit axes to Auto) runs the kernel (:mod:`optstate.quantization.kernel`) on each device's
shard: optstate's sharding rule never lets a shard cut a block
(:func:`optstate.quantization.array.splits_whole_blocks`), so each shard's kernel computes
what the XLA path computes there. :func:`shards_of` says how a parameter runs per shard, or
why not; :func:`run_kernel` runs one chosen parameter, whole or per shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from optstate._core import _compat
from optstate.quantization.array import is_quantized, splits_whole_blocks
from optstate.quantization.kernel import Geometry, Leaf, fused_parameter

#: A parameter that takes the kernel: ``(leaf, geometry, backend, shards)``; ``shards`` is
#: ``None`` for one kernel on the whole leaf, else a :class:`Shards` (one per shard).
Chosen = tuple[Leaf, Geometry, str, Any]


@dataclasses.dataclass(frozen=True)
class _Typed:
    """The ``PartitionSpec`` in the type of every leaf of a step's state (``None`` where
    unsplit) and the mesh, recorded by :func:`typed_specs`."""

    mesh: Any
    s: list[Any]  # a quantized leaf: (codes spec, scales spec)
    shapes: list[tuple[int, ...]]  # of each state leaf (a quantized leaf's codes)


_TYPED: contextvars.ContextVar[_Typed | None] = contextvars.ContextVar(
    "optstate_fused_typed_specs", default=None)


def _typed_spec(x: Any) -> Any:
    sharding = _compat.typed_sharding(x)
    spec = getattr(sharding, "spec", None)
    if spec is None or not any(entry is not None for entry in spec):
        return None
    return spec


@contextlib.contextmanager
def typed_specs(updates: Any, state: Any, params: Any) -> Iterator[None]:
    """Inside, :func:`plan` knows how the leaves of ``state`` (a ``QuantizedState``) are split
    over the mesh that ``updates``, ``state`` or ``params`` are typed on (sharding in types).

    ``quantize_state`` runs its step with the mesh's Explicit axes switched to Auto (block
    reshapes of sharded codes), where the types no longer say how a leaf is split; recorded
    before that switch, the specs let the kernel run per shard under ``shard_map``. Nothing is
    recorded when no leaf is typed as split.
    """
    inner = getattr(state, "inner_state", None)
    s_leaves = [] if inner is None else jax.tree.leaves(inner, is_leaf=is_quantized)
    s = [(_typed_spec(x.codes), _typed_spec(x.scales)) if is_quantized(x) else _typed_spec(x)
         for x in s_leaves]
    shapes = [tuple(jnp.shape(x.codes if is_quantized(x) else x)) for x in s_leaves]
    mesh = None
    for x in jax.tree.leaves((updates, inner, params)):
        if _typed_spec(x) is not None:
            mesh = _compat.typed_sharding(x).mesh
            break
    token = _TYPED.set(None if mesh is None else _Typed(mesh, s, shapes))
    try:
        yield
    finally:
        _TYPED.reset(token)


@dataclasses.dataclass(frozen=True)
class Shards:
    """How one parameter's kernel runs per shard under ``jax.shard_map``.

    ``value``: the ``PartitionSpec`` of the parameter's values (its gradient, parameter,
    update and plain state leaves), the one its state's codes are split by; ``members``: per
    state leaf, ``(codes spec, scales spec)`` (quantized) or ``value``; ``local``: a shard's
    logical shape. Every shard holds whole blocks (checked by :func:`_shards`).
    """

    value: PartitionSpec
    members: dict[int, Any]
    local: tuple[int, ...]

    @property
    def contiguous(self) -> bool:
        """Whether a shard is one range of the leaf's row-major order (split on the first
        dimension only): stochastic rounding then offsets the shard's counters."""
        return all(entry is None for entry in tuple(self.value)[1:])


def _mesh(x: Any) -> Any:
    """The mesh a parameter's kernel runs per shard on: the context's (inside
    ``quantize_state``'s Auto-mode step), else the one state leaf ``x`` is typed on, else the
    one recorded by :func:`typed_specs`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        typed = getattr(_compat.typed_sharding(x.codes if is_quantized(x) else x), "mesh", None)
        if typed is not None and not typed.empty:
            return typed
        recorded = _TYPED.get()
        if recorded is not None:
            return recorded.mesh
    return mesh


def _entries(spec: Any, ndim: int) -> tuple[Any, ...]:
    entries = tuple(spec or ())
    return entries + (None,) * (ndim - len(entries))


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def shards_of(ss: list[int], s_leaves: list[Any], shape: tuple[int, ...]
            ) -> Shards | str | None:
    """How the parameter whose state leaves are ``ss`` runs per shard: ``None`` when its state
    is not split over a mesh (one kernel on the whole leaf), or why not per shard.

    The specs are the leaves' own types' (sharding in types) or those recorded by
    :func:`typed_specs`."""
    typed = _TYPED.get()
    recorded = None
    if typed is not None and typed.shapes == [
            tuple(jnp.shape(x.codes if is_quantized(x) else x)) for x in s_leaves]:
        recorded = typed.s  # the step's own state (not another transform's)
    mesh = _mesh(s_leaves[ss[0]])
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if not mesh.empty else {}
    value: tuple[Any, ...] | None = None
    members: dict[int, Any] = {}
    for s in ss:
        x = s_leaves[s]
        if is_quantized(x):
            spec = (_typed_spec(x.codes), _typed_spec(x.scales))
            if spec == (None, None) and recorded is not None:
                spec = recorded[s] if isinstance(recorded[s], tuple) else (None, None)
            entries = _entries(spec[0], len(shape))
        else:
            spec = _typed_spec(x)
            if spec is None and recorded is not None and not isinstance(recorded[s], tuple):
                spec = recorded[s]
            entries = _entries(spec, len(shape))
        members[s] = spec
        if value is None:
            value = entries
        elif entries != value:
            return "its state leaves are split over the mesh in different ways"
    if value is None or all(e is None for e in value):
        return None
    if any(a not in sizes for e in value for a in _axes(e)):
        return "its state is split over mesh axes that the step's mesh does not have"
    local = []
    for d, entry in enumerate(value):
        n = math.prod(sizes[a] for a in _axes(entry))
        if shape[d] % n:
            return f"dimension {d} of size {shape[d]} does not split evenly {n} ways"
        local.append(shape[d] // n)
        for t in ss:
            x = s_leaves[t]
            if not is_quantized(x) or n == 1:
                continue
            codes_shape = tuple(int(c) for c in jnp.shape(x.codes))
            scales_shape = tuple(int(c) for c in jnp.shape(x.scales))
            if not splits_whole_blocks(x, codes_shape, scales_shape, d, n):
                return (f"a shard of its state would cut a block (dimension {d} split "
                        f"{n} ways by {entry!r})")
    for t in ss:
        x = s_leaves[t]
        n_scales = len(jnp.shape(x.scales)) if is_quantized(x) else 0
        if (n_scales and math.prod(jnp.shape(x.scales))
                and _entries(members[t][1], n_scales) != value[:n_scales]):
            return "its codes and scales are split over the mesh in different ways"
    for t in ss:
        if not is_quantized(s_leaves[t]):
            members[t] = PartitionSpec(*value)
        else:
            members[t] = (PartitionSpec(*value), members[t][1] or PartitionSpec())
    return Shards(PartitionSpec(*value), members, tuple(local))



def run_kernel(entry: Chosen, inner_update: Callable[..., Any], *, u_leaves: list[Any],
               u_def: Any, s_leaves: list[Any], s_def: Any, p_leaves: list[Any] | None,
               p_def: Any, extra_args: dict[str, Any], seeds: list[Any], apply: bool
               ) -> tuple[jax.Array, dict[int, Any]]:
    """:func:`~optstate.quantization.kernel.fused_parameter` for one chosen parameter: on the
    whole leaf, or per shard under ``jax.shard_map`` when its state is split over a mesh.

    Per shard, the parameter's gradient, parameter and state go in split like its state's
    codes (``shard_map`` reshards a gradient or parameter laid out otherwise), its scalars and
    the extra arguments replicated; each device runs the kernel on its own shard, whose
    blocks are whole (:func:`shards_of`), so it computes what the XLA path computes there. The
    other parameters' leaves are not passed in: stand-ins of their shapes and dtypes, which
    the kernel only reads the types of, are made inside and left unused.
    """
    leaf, geo, backend, shards = entry
    if shards is None:
        return fused_parameter(inner_update, leaf, geo, u_leaves=u_leaves, u_def=u_def,
                               s_leaves=s_leaves, s_def=s_def, p_leaves=p_leaves, p_def=p_def,
                               extra_args=extra_args, seeds=seeds, backend=backend,
                               apply=apply)
    k, members = leaf.k, leaf.members
    scalar = PartitionSpec()
    args: list[Any] = []
    specs: list[Any] = []

    def take(x: Any, spec: Any) -> int:
        args.append(x)
        specs.append(spec)
        return len(args) - 1

    g_at = take(u_leaves[k], shards.value)
    p_at = None if p_leaves is None else take(p_leaves[k], shards.value)
    m_at: dict[int, Any] = {}
    for s in members:
        x = s_leaves[s]
        if is_quantized(x):
            codes_spec, scales_spec = shards.members[s]
            m_at[s] = (take(x.codes, codes_spec), take(x.scales, scales_spec))
        else:
            m_at[s] = take(x, shards.value)
    # rank-0 leaves (counters, scalar schedules) and the extra arguments: replicated
    scalar_at = {(tree, t): take(x, scalar)
                 for tree, leaves in (("u", u_leaves), ("s", s_leaves), ("p", p_leaves or []))
                 for t, x in enumerate(leaves) if not is_quantized(x) and not jnp.shape(x)}
    extra_at = {name: take(x, scalar) for name, x in extra_args.items()}
    seed_at = {s: take(seeds[s], scalar) for s in members if seeds[s] is not None}

    def stand_in(x: Any) -> Any:
        if is_quantized(x):
            return dataclasses.replace(x, codes=jnp.zeros(jnp.shape(x.codes), x.codes.dtype),
                                       scales=jnp.zeros(jnp.shape(x.scales), x.scales.dtype))
        return jnp.zeros(jnp.shape(x), jnp.asarray(x).dtype)

    def per_shard(*local):
        def rebuild(tree, leaves):
            return [local[scalar_at[(tree, t)]] if (tree, t) in scalar_at else stand_in(x)
                    for t, x in enumerate(leaves)]

        u_local = rebuild("u", u_leaves)
        u_local[k] = local[g_at]
        s_local = rebuild("s", s_leaves)
        for s in members:
            x = s_leaves[s]
            if is_quantized(x):
                c_at, sc_at = m_at[s]
                s_local[s] = dataclasses.replace(x, codes=local[c_at], scales=local[sc_at],
                                                 shape=shards.local)
            else:
                s_local[s] = local[m_at[s]]
        p_local = None
        if p_leaves is not None:
            p_local = rebuild("p", p_leaves)
            p_local[k] = local[p_at]
        seeds_local = [local[seed_at[s]] if s in seed_at else None
                       for s in range(len(s_leaves))]
        offset = None
        if seed_at and tuple(shards.value) and shards.value[0] is not None:
            # the shard's first element in the leaf's row-major order (split on dim 0 only)
            index = lax.axis_index(_axes(shards.value[0]))
            offset = (index * math.prod(shards.local)).astype(jnp.uint32)
        out, new = fused_parameter(
            inner_update, leaf, geo, u_leaves=u_local, u_def=u_def, s_leaves=s_local,
            s_def=s_def, p_leaves=p_local, p_def=p_def,
            extra_args={name: local[i] for name, i in extra_at.items()}, seeds=seeds_local,
            backend=backend, apply=apply, counter_offset=offset)
        flat = []
        for s in members:
            flat += [new[s].codes, new[s].scales] if is_quantized(new[s]) else [new[s]]
        return out, flat

    out_specs = [shards.value]
    for s in members:
        out_specs += list(shards.members[s]) if is_quantized(s_leaves[s]) else [shards.value]
    mesh = _mesh(s_leaves[members[0]])
    out, flat = jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs),
                              out_specs=(out_specs[0], out_specs[1:]))(*args)
    new_members: dict[int, Any] = {}
    i = 0
    for s in members:
        x = s_leaves[s]
        if is_quantized(x):
            new_members[s] = dataclasses.replace(x, codes=flat[i], scales=flat[i + 1])
            i += 2
        else:
            new_members[s] = flat[i]
            i += 1
    return out, new_members
