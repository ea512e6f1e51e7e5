"""The placement rule, leaf by leaf: which dimension of which leaf goes on the data axis.

A leaf is sharded over ``axis`` on its first dimension that divides evenly by the axis size
and is not already taken by another mesh axis of its parameter's own sharding; otherwise it
is replicated over ``axis``. Scalars and non-floating leaves are replicated, except integer
codes named after a parameter of their shape (``compensated_params``' residual). A state leaf is
matched to its parameter (key-path suffix, then shape) so that it inherits the parameter's
tensor-parallel axes. A quantized leaf is placed as one unit, ``codes`` and ``scales`` on the
same dimension, and only where every shard holds whole blocks.

Everything here works on ``PartitionSpec``\\ s and sizes, never on devices: the public
functions of :mod:`~optstate.sharding.placement` and the local plans of ``shard_map`` and
``pmap`` are built on it, so that all three paths place every leaf the same way.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from optstate._core._compat import typed_sharding
from optstate._core.leaves import key_name, path_names, path_str
from optstate._core.types import Params
from optstate.quantization.array import is_quantized, splits_whole_blocks

Entry = Any  # one entry of a PartitionSpec: None, an axis name or a tuple of axis names
KeyPath = tuple[Hashable, ...]  # the plain names along a key path (``path_names``)


def is_none(x: Any) -> bool:
    """``is_leaf`` that keeps ``None`` leaves (parameters a transform skips) in place."""
    return x is None


def is_node(x: Any) -> bool:
    """``is_leaf`` for state trees: ``None`` and quantized arrays are placed whole."""
    return x is None or is_quantized(x)


def is_spec(x: Any) -> bool:
    """``is_leaf`` for trees of ``PartitionSpec`` (a spec is itself a tuple)."""
    return isinstance(x, PartitionSpec)


def abstract(params: Params) -> Params:
    """Shapes and dtypes of ``params`` without their shardings: the state's shapes do not
    depend on the sharding, and a transform that reshapes need not be Explicit-aware here."""

    def one(x: Any) -> Any:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
        return x

    return jax.tree.map(one, params)


def to_named(specs: Any, mesh: Any) -> Any:
    """A tree of ``PartitionSpec`` as ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


# --------------------------------------------------------------------------------------------
# Spec entries
# --------------------------------------------------------------------------------------------


def axes_of(entry: Entry) -> tuple[str, ...]:
    """The mesh axes named by one spec entry."""
    if entry is None:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    return (entry,)


def _without(entry: Entry, axis: str) -> Entry:
    rest = tuple(a for a in axes_of(entry) if a != axis)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def spec(entries: Sequence[Entry]) -> PartitionSpec:
    """A ``PartitionSpec`` of ``entries``, without trailing ``None``\\ s."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def place(shape: Sequence[int], base: Sequence[Entry], axis: str, n: int,
          dims: Sequence[int]) -> tuple[tuple[Entry, ...], int | None]:
    """Puts ``axis`` on the first of ``dims`` that is free in ``base`` and divides by ``n``."""
    entries = list(base) + [None] * (len(shape) - len(base))
    for d in dims:
        if entries[d] is None and shape[d] > 0 and shape[d] % n == 0:
            entries[d] = axis
            return tuple(entries), d
    return tuple(entries), None


# --------------------------------------------------------------------------------------------
# Parameters and matching state leaves to them
# --------------------------------------------------------------------------------------------


def _own_spec(leaf: Any, ndim: int, sizes: Mapping[str, int], axis: str,
              path: str, context: str) -> tuple[Entry, ...]:
    """The parameter's own PartitionSpec entries (one per dim) with ``axis`` removed."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:  # a tracer or an abstract value under an explicit mesh
        sharding = typed_sharding(leaf)
    own = getattr(sharding, "spec", None) if isinstance(sharding, NamedSharding) else None
    if own is None and isinstance(sharding, PartitionSpec):
        own = sharding
    if own is None:
        return (None,) * ndim
    entries = tuple(own) + (None,) * (ndim - len(own))
    unknown = sorted({a for e in entries for a in axes_of(e) if a not in sizes})
    if unknown:
        raise ValueError(
            f"{context}: parameter {path} is sharded over mesh axes {unknown} that the given "
            f"mesh does not have (its axes are {tuple(sizes)}); expected the parameters to "
            f"live on the same mesh.")
    return tuple(_without(e, axis) for e in entries[:ndim])


class ParamInfo(NamedTuple):
    """What the rule needs to know of one parameter."""

    path: str  # as ``jax.tree_util.keystr`` writes it
    shape: tuple[int, ...]
    base: tuple[Entry, ...]  # own spec without the data axis


def param_infos(params: Params, sizes: Mapping[str, int], axis: str, context: str
                ) -> tuple[list[tuple[KeyPath, ParamInfo | None]], Any]:
    """``(names, info)`` per leaf of ``params`` (``None`` for a ``None`` leaf), and the
    treedef of ``params`` with ``None`` leaves kept."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)
    infos = []
    for path, leaf in flat:
        if leaf is None:
            infos.append((path_names(path), None))
            continue
        shape = tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))
        keystr = path_str(path)
        infos.append((path_names(path),
                      ParamInfo(keystr, shape,
                                _own_spec(leaf, len(shape), sizes, axis, keystr, context))))
    return infos, treedef


class Matcher:
    """Finds the parameter of a state leaf: longest key-path suffix of equal shape, else the
    parameters of that shape if they all carry the same sharding."""

    def __init__(self, infos: list[tuple[KeyPath, ParamInfo | None]]):
        self.by_path: dict[KeyPath, ParamInfo] = {p: i for p, i in infos if i is not None}
        self.by_shape: dict[tuple[int, ...], list[ParamInfo]] = {}
        for info in self.by_path.values():
            self.by_shape.setdefault(info.shape, []).append(info)

    def match(self, path: KeyPath, shape: tuple[int, ...]) -> ParamInfo | None:
        for k in range(len(path), -1, -1):
            info = self.by_path.get(path[len(path) - k:])
            if info is not None and info.shape == shape:
                return info
        same = self.by_shape.get(shape, [])
        if same and all(i.base == same[0].base for i in same):
            return same[0]
        return None

    def named_after(self, path: KeyPath, info: ParamInfo) -> bool:
        """Whether ``path`` ends with the key path of the parameter ``info`` (not a match by
        shape alone)."""
        return any(self.by_path.get(path[len(path) - k:]) is info
                   for k in range(1, len(path) + 1))


# --------------------------------------------------------------------------------------------
# Plain array leaves
# --------------------------------------------------------------------------------------------


def _is_floating(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.inexact))
    except TypeError:  # extended dtypes (typed PRNG keys)
        return False


class LeafPlan(NamedTuple):
    """Where one array leaf goes."""

    spec: PartitionSpec
    dim: int | None  # the dimension sharded over ``axis``, if any
    param: ParamInfo | None  # the matched parameter, if any


def array_plan(leaf: Any, path: KeyPath, matcher: Matcher, axis: str, n: int, shard: bool
               ) -> LeafPlan:
    """The plan of an array state leaf; ``shard=False`` replicates it over ``axis``."""
    shape = tuple(int(d) for d in leaf.shape)
    info = matcher.match(path, shape)
    base = info.base if info is not None else (None,) * len(shape)
    # integer codes shaped like the parameter they are named after (compensated_params'
    # int8/int16 residual) are per-parameter state: placed like floating state
    placed = _is_floating(leaf) or (info is not None and info.shape == shape
                                    and matcher.named_after(path, info))
    if not shard or len(shape) == 0 or not placed:
        # replicated over ``axis``; a scalar or counter carries no tensor-parallel axes
        if len(shape) == 0 or not placed:
            base = (None,) * len(shape)
        return LeafPlan(spec(base), None, info)
    entries, dim = place(shape, base, axis, n, range(len(shape)))
    return LeafPlan(spec(entries), dim, info)


def param_specs(params: Params, sizes: Mapping[str, int], axis: str, shard: bool,
                context: str) -> tuple[Any, list[int | None]]:
    """PartitionSpecs of the parameters (sharded over ``axis`` if ``shard``) and, per
    parameter leaf, the dimension on ``axis``."""
    infos, treedef = param_infos(params, sizes, axis, context)
    specs, dims = [], []
    for _, info in infos:
        if info is None:
            specs.append(None)
            dims.append(None)
            continue
        if shard and info.shape:
            entries, dim = place(info.shape, info.base, axis, sizes[axis], range(len(info.shape)))
        else:
            entries, dim = info.base, None
        specs.append(spec(entries))
        dims.append(dim)
    return treedef.unflatten(specs), dims


# --------------------------------------------------------------------------------------------
# Quantized leaves: whole blocks per shard
# --------------------------------------------------------------------------------------------


def quantized_plan(node: Any, path: KeyPath, matcher: Matcher, axis: str,
                   sizes: Mapping[str, int], shard: bool
                   ) -> tuple[list[PartitionSpec], int | None, ParamInfo | None]:
    """Specs for ``codes`` and ``scales`` of a quantized node, split on the same logical
    dimensions, never across a block; tensor-parallel axes of the parameter are kept where
    they split whole blocks too."""
    shape = tuple(int(x) for x in node.shape)
    ndim = len(shape)
    info = matcher.match(path, shape)
    codes_shape = tuple(int(x) for x in node.codes.shape)
    scales_shape = tuple(int(x) for x in node.scales.shape)

    def ok(d: int, k: int) -> bool:
        return splits_whole_blocks(node, codes_shape, scales_shape, d, k)

    base = list(info.base) if info is not None else [None] * ndim
    for d in range(ndim):
        if base[d] is not None and not ok(d, math.prod(sizes[a] for a in axes_of(base[d]))):
            base[d] = None
    dim = None
    entries = tuple(base)
    if shard and ndim:
        eligible = [d for d in range(ndim) if ok(d, sizes[axis])]
        entries, dim = place(shape, base, axis, sizes[axis], eligible)
    codes_spec = spec(entries) if len(codes_shape) == ndim else PartitionSpec()
    if math.prod(scales_shape) == 0 or len(scales_shape) > ndim:
        scales_spec = PartitionSpec()
    else:
        scales_spec = spec(entries[:len(scales_shape)])
    children = {"codes": codes_spec, "scales": scales_spec}
    leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(node)
    specs = [children.get(str(key_name(p[-1])), PartitionSpec()) for p, _ in leaves_with_path]
    return specs, dim, info


def quantized_specs(node: Any, specs: list[PartitionSpec]) -> Any:
    """The specs of ``quantized_plan`` arranged as a node of ``node``'s structure."""
    _, node_def = jax.tree_util.tree_flatten(node)
    return node_def.unflatten(specs)


# --------------------------------------------------------------------------------------------
# A whole state tree
# --------------------------------------------------------------------------------------------


def plan_tree(tree: Any, params: Params, sizes: Mapping[str, int], axis: str, shard: bool,
              context: str) -> tuple[Any, list[tuple[KeyPath, Any]]]:
    """PartitionSpecs for every array leaf of ``tree``; also returns per-leaf plans."""
    infos, _ = param_infos(params, sizes, axis, context)
    matcher = Matcher(infos)
    n = sizes[axis]
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    out = []
    plans: list[tuple[KeyPath, Any]] = []
    for path, leaf in flat:
        names = path_names(path)
        if leaf is None:
            out.append(None)
        elif is_quantized(leaf):
            specs, dim, info = quantized_plan(leaf, names, matcher, axis, sizes, shard)
            out.append(quantized_specs(leaf, specs))
            plans.append((names, ("quantized", dim, info)))
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            plan = array_plan(leaf, names, matcher, axis, n, shard)
            out.append(plan.spec)
            plans.append((names, ("array", plan.dim, plan.param)))
        else:
            raise ValueError(
                f"{context}: state leaf {path_str(path)} is a "
                f"{type(leaf).__name__}; expected arrays (or jax.ShapeDtypeStruct) as leaves.")
    return treedef.unflatten(out), plans
