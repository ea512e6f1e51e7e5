"""ZeRO-style sharding of optimizer state (and gradients, and parameters) over a data axis.

With :math:`\\Psi` parameters, :math:`N` data-parallel devices and :math:`K` bytes of
optimizer state per parameter, plain data parallelism keeps the whole state on every device.
ZeRO (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", SC 2020) partitions it instead:

=======  ==========================  =====================================================
stage    sharded over the data axis  bytes per device (params P, gradients G, state S)
=======  ==========================  =====================================================
0        nothing                     :math:`P + G + S`
1        optimizer state             :math:`P + G + S/N`
2        state and gradients         :math:`P + (G + S)/N`
3        state, gradients, params    :math:`(P + G + S)/N` (FSDP)
=======  ==========================  =====================================================

**The rule.** A leaf is sharded over ``axis`` on its first dimension that divides evenly by
the axis size and is not already used by another mesh axis in the parameter's own sharding
(tensor parallelism survives: a ``"model"`` axis on a parameter is kept on its state);
otherwise it is replicated over ``axis``. Scalars and non-floating leaves (counters, PRNG
keys) are replicated. State leaves are matched to their parameter by key path (the state
path ends with the parameter's path, as in Adam's ``mu['layer']['w']``) and shape; a leaf of
the parameter's shape inherits the parameter's sharding, other leaves (scales, factored
rows and columns) follow the rule on their own shape. Quantized leaves
(:class:`optstate.quantization.array.QuantizedArray`: codes in the leaf's shape with blocks over its
trailing axes, and per-block scales) are sharded as a unit, on the same dimension of codes
and scales, and only on a dimension where every shard holds whole blocks, so a block never
straddles a shard boundary (a leaf with no such dimension stays replicated; a
tensor-parallel axis that would cut blocks is dropped from its state).

**The jit path (two lines)**::

    state_sh = optstate.sharding.state_shardings(tx, params, mesh, stage=1)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    # then jit the train step with in_shardings/out_shardings (param_sh, state_sh) and
    # donate_argnums=(0, 1); from stage 2 on call reduce_scatter_gradients on the gradients;
    # at stage 3 on an Explicit mesh, gather the parameters for the forward pass with
    # constrain(params, param_shardings(params, mesh, stage=0)).

**The shard_map path** (:func:`shard_map_update`): an update for code that writes its own
collectives: ``psum_scatter`` the local gradients, update the local shard of parameters and
state, ``all_gather`` the new parameters. **The pmap path** (:func:`pmap_update`): the same
update under ``jax.pmap``, with helpers that split a tree into per-device shards and back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from optstate._core.base import GradientTransformation, OptState, Params, PyTree, Updates
from optstate._core.base import apply_updates, with_extra_args_support
from optstate.quantization.array import is_quantized

__all__ = [
    "STAGES",
    "state_shardings",
    "tree_shardings",
    "param_shardings",
    "grad_shardings",
    "reduce_scatter_gradients",
    "constrain",
    "ShardMapUpdate",
    "shard_map_update",
    "PmapUpdate",
    "pmap_update",
    "bytes_on_device",
    "zero_bytes",
]

STAGES = (0, 1, 2, 3)
"""The ZeRO stages: 0 replicated, 1 state, 2 state and gradients, 3 also parameters."""

_Entry = Any  # one entry of a PartitionSpec: None, an axis name or a tuple of axis names
_Path = tuple[Hashable, ...]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_stage(stage: Any, context: str) -> int:
    if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or stage not in STAGES:
        raise ValueError(
            f"{context}: stage must be one of {STAGES} (ZeRO: 0 replicated, 1 state, "
            f"2 state and gradients, 3 also parameters); got {stage!r}.")
    return int(stage)


def _axis_sizes(mesh: Any, axis: str, context: str) -> dict[str, int]:
    names = getattr(mesh, "axis_names", None)
    shape = getattr(mesh, "shape", None)
    if names is None or shape is None:
        raise ValueError(
            f"{context}: expected a jax.sharding.Mesh (or AbstractMesh); got "
            f"{type(mesh).__name__}.")
    sizes = {name: int(shape[name]) for name in names}
    if axis not in sizes:
        raise ValueError(
            f"{context}: the mesh has no axis {axis!r} to shard over; its axes are "
            f"{tuple(names)}. Pass axis= one of them, or build the mesh with an axis "
            f"named {axis!r}.")
    return sizes


def _abstract(params: Params) -> Params:
    """Shapes and dtypes of ``params`` without their shardings: the state's shapes do not
    depend on the sharding, and a transform that reshapes need not be Explicit-aware here."""

    def one(x: Any) -> Any:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
        return x

    return jax.tree.map(one, params)


def _explicit_axes(mesh: Any) -> frozenset[str]:
    types = getattr(mesh, "axis_types", None)
    if types is None:
        return frozenset()
    explicit = jax.sharding.AxisType.Explicit
    return frozenset(n for n, t in zip(mesh.axis_names, types) if t == explicit)


# --------------------------------------------------------------------------------------------
# Paths, parameter specs
# --------------------------------------------------------------------------------------------


def _key_name(key: Any) -> Hashable:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _names(path: Sequence[Any]) -> _Path:
    return tuple(_key_name(k) for k in path)


def _is_none(x: Any) -> bool:
    return x is None


def _axes_of(entry: _Entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    return (entry,)


def _without(entry: _Entry, axis: str) -> _Entry:
    rest = tuple(a for a in _axes_of(entry) if a != axis)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _own_spec(leaf: Any, ndim: int, sizes: Mapping[str, int], axis: str,
              path: str, context: str) -> tuple[_Entry, ...]:
    """The parameter's own PartitionSpec entries (one per dim) with ``axis`` removed."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        try:  # a tracer or an abstract value under an explicit mesh
            sharding = jax.typeof(leaf).sharding
        except Exception:  # noqa: BLE001 - anything without a type has no sharding
            sharding = None
    spec = getattr(sharding, "spec", None) if isinstance(sharding, NamedSharding) else None
    if spec is None and isinstance(sharding, PartitionSpec):
        spec = sharding
    if spec is None:
        return (None,) * ndim
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    unknown = sorted({a for e in entries for a in _axes_of(e) if a not in sizes})
    if unknown:
        raise ValueError(
            f"{context}: parameter {path} is sharded over mesh axes {unknown} that the given "
            f"mesh does not have (its axes are {tuple(sizes)}); expected the parameters to "
            f"live on the same mesh.")
    return tuple(_without(e, axis) for e in entries[:ndim])


class _ParamInfo(NamedTuple):
    path: str
    shape: tuple[int, ...]
    base: tuple[_Entry, ...]  # own spec without the data axis


def _param_infos(params: Params, sizes: Mapping[str, int], axis: str, context: str
                 ) -> tuple[list[tuple[_Path, _ParamInfo]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)
    infos = []
    for path, leaf in flat:
        if leaf is None:
            infos.append((_names(path), None))
            continue
        shape = tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))
        keystr = jax.tree_util.keystr(path)
        infos.append((_names(path), _ParamInfo(keystr, shape,
                                               _own_spec(leaf, len(shape), sizes, axis, keystr,
                                                         context))))
    return infos, treedef


class _Matcher:
    """Finds the parameter of a state leaf: longest key-path suffix of equal shape, else the
    parameters of that shape if they all carry the same sharding."""

    def __init__(self, infos: list[tuple[_Path, _ParamInfo | None]]):
        self.by_path: dict[_Path, _ParamInfo] = {p: i for p, i in infos if i is not None}
        self.by_shape: dict[tuple[int, ...], list[_ParamInfo]] = {}
        for info in self.by_path.values():
            self.by_shape.setdefault(info.shape, []).append(info)

    def match(self, path: _Path, shape: tuple[int, ...]) -> _ParamInfo | None:
        for k in range(len(path), -1, -1):
            info = self.by_path.get(path[len(path) - k:])
            if info is not None and info.shape == shape:
                return info
        same = self.by_shape.get(shape, [])
        if same and all(i.base == same[0].base for i in same):
            return same[0]
        return None


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------


def _place(shape: Sequence[int], base: Sequence[_Entry], axis: str, n: int,
           dims: Sequence[int]) -> tuple[tuple[_Entry, ...], int | None]:
    """Puts ``axis`` on the first of ``dims`` that is free in ``base`` and divides by ``n``."""
    entries = list(base) + [None] * (len(shape) - len(base))
    for d in dims:
        if entries[d] is None and shape[d] > 0 and shape[d] % n == 0:
            entries[d] = axis
            return tuple(entries), d
    return tuple(entries), None


def _spec(entries: Sequence[_Entry]) -> PartitionSpec:
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _is_floating(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.inexact))
    except TypeError:  # extended dtypes (typed PRNG keys)
        return False


class _LeafPlan(NamedTuple):
    spec: PartitionSpec
    dim: int | None  # the dimension sharded over ``axis``, if any
    param: _ParamInfo | None  # the matched parameter, if any


def _array_plan(leaf: Any, path: _Path, matcher: _Matcher, axis: str, n: int, shard: bool
                ) -> _LeafPlan:
    shape = tuple(int(d) for d in leaf.shape)
    info = matcher.match(path, shape)
    base = info.base if info is not None else (None,) * len(shape)
    if not shard or len(shape) == 0 or not _is_floating(leaf):
        # replicated over ``axis``; a scalar or counter carries no tensor-parallel axes
        if len(shape) == 0 or not _is_floating(leaf):
            base = (None,) * len(shape)
        return _LeafPlan(_spec(base), None, info)
    entries, dim = _place(shape, base, axis, n, range(len(shape)))
    return _LeafPlan(_spec(entries), dim, info)


def _block_split_ok(node: Any, codes_shape: tuple[int, ...], scales_shape: tuple[int, ...],
                    d: int, k: int) -> bool:
    """Whether logical dimension ``d`` of quantized ``node`` can be split ``k`` ways with codes
    and scales split alike and every shard holding whole blocks.

    Layout of :class:`~optstate.quantization.array.QuantizedArray`: ``codes`` has the logical dims (the
    last one packed for int4); ``scales`` has shape ``(*shape[:a], n_blocks)``, where blocks
    run over the flattened trailing axes ``shape[a:]``, or ``(shape[0] // g, 1)`` when a block
    is ``g`` whole rows.
    """
    shape = tuple(int(x) for x in node.shape)
    if k == 1:
        return True
    if shape[d] % k or codes_shape[d] % k:
        return False
    if math.prod(scales_shape) == 0:  # bf16: no scales, no blocks
        return True
    block = int(getattr(node, "block_size", 0) or 0)
    last = len(scales_shape) - 1
    if d < last:
        # an axis before the blocked ones: every index along it has blocks of its own, or
        # (rows grouped g at a time) the scales follow whole groups of rows
        rows_grouped = (d == 0 and len(scales_shape) == 2 and scales_shape[1] == 1
                        and scales_shape[0] != shape[0])
        if rows_grouped:
            return scales_shape[0] % k == 0 and shape[0] % scales_shape[0] == 0
        return scales_shape[d] == shape[d]
    if d == last:
        # the first blocked axis: a shard holds shape[d] / k slices of the trailing axes,
        # which must be whole blocks (and the last block must not be ragged)
        inner = math.prod(shape[d + 1:])
        return (block > 0 and ((shape[d] // k) * inner) % block == 0
                and scales_shape[d] % k == 0)
    return False  # inside a block


def _quantized_plan(node: Any, path: _Path, matcher: _Matcher, axis: str,
                    sizes: Mapping[str, int], shard: bool) -> tuple[list[PartitionSpec], int | None,
                                                                    _ParamInfo | None]:
    """Specs for ``codes`` and ``scales`` of a quantized node, split on the same logical
    dimensions, never across a block; tensor-parallel axes of the parameter are kept where
    they split whole blocks too."""
    shape = tuple(int(x) for x in node.shape)
    ndim = len(shape)
    info = matcher.match(path, shape)
    codes_shape = tuple(int(x) for x in node.codes.shape)
    scales_shape = tuple(int(x) for x in node.scales.shape)

    def ok(d: int, k: int) -> bool:
        return _block_split_ok(node, codes_shape, scales_shape, d, k)

    base = list(info.base) if info is not None else [None] * ndim
    for d in range(ndim):
        if base[d] is not None and not ok(d, math.prod(sizes[a] for a in _axes_of(base[d]))):
            base[d] = None
    dim = None
    entries = tuple(base)
    if shard and ndim:
        eligible = [d for d in range(ndim) if ok(d, sizes[axis])]
        entries, dim = _place(shape, base, axis, sizes[axis], eligible)
    codes_spec = _spec(entries) if len(codes_shape) == ndim else PartitionSpec()
    if math.prod(scales_shape) == 0 or len(scales_shape) > ndim:
        scales_spec = PartitionSpec()
    else:
        scales_spec = _spec(entries[:len(scales_shape)])
    children = {"codes": codes_spec, "scales": scales_spec}
    leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(node)
    specs = [children.get(str(_key_name(p[-1])), PartitionSpec()) for p, _ in leaves_with_path]
    return specs, dim, info


def _plan_tree(tree: Any, params: Params, sizes: Mapping[str, int], axis: str, shard: bool,
               context: str) -> tuple[Any, list[tuple[_Path, Any]]]:
    """PartitionSpecs for every array leaf of ``tree``; also returns per-leaf plans."""
    infos, _ = _param_infos(params, sizes, axis, context)
    matcher = _Matcher(infos)
    n = sizes[axis]
    is_leaf = lambda x: x is None or is_quantized(x)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    out = []
    plans: list[tuple[_Path, Any]] = []
    for path, leaf in flat:
        names = _names(path)
        if leaf is None:
            out.append(None)
        elif is_quantized(leaf):
            specs, dim, info = _quantized_plan(leaf, names, matcher, axis, sizes, shard)
            _, node_def = jax.tree_util.tree_flatten(leaf)
            out.append(node_def.unflatten(specs))
            plans.append((names, ("quantized", dim, info)))
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            plan = _array_plan(leaf, names, matcher, axis, n, shard)
            out.append(plan.spec)
            plans.append((names, ("array", plan.dim, plan.param)))
        else:
            raise ValueError(
                f"{context}: state leaf {jax.tree_util.keystr(path)} is a "
                f"{type(leaf).__name__}; expected arrays (or jax.ShapeDtypeStruct) as leaves.")
    return treedef.unflatten(out), plans


def _to_named(specs: Any, mesh: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def _param_specs(params: Params, sizes: Mapping[str, int], axis: str, shard: bool,
                 context: str) -> tuple[Any, list[int | None]]:
    infos, treedef = _param_infos(params, sizes, axis, context)
    specs, dims = [], []
    for _, info in infos:
        if info is None:
            specs.append(None)
            dims.append(None)
            continue
        if shard and info.shape:
            entries, dim = _place(info.shape, info.base, axis, sizes[axis], range(len(info.shape)))
        else:
            entries, dim = info.base, None
        specs.append(_spec(entries))
        dims.append(dim)
    return treedef.unflatten(specs), dims


# --------------------------------------------------------------------------------------------
# Public: shardings for jit
# --------------------------------------------------------------------------------------------


def tree_shardings(state: OptState, params: Params, mesh: Any, *, stage: int = 1,
                   axis: str = "data") -> PyTree:
    """``NamedSharding``\\ s for an existing (or abstract) optimizer-state tree.

    The same rule as :func:`state_shardings`, applied to ``state`` itself instead of
    ``jax.eval_shape(tx.init, params)``: use it for state that comes wrapped by a framework,
    e.g. ``nnx.state(optimizer, nnx.optimizer.OptState)`` of a Flax NNX ``Optimizer`` (its
    leaves' paths end with the parameters' paths, so they are matched the same way).

    Args:
      state: a pytree of arrays or ``jax.ShapeDtypeStruct``.
      params: the parameters (arrays, possibly sharded with a ``NamedSharding`` whose other
        mesh axes are kept, or ``jax.ShapeDtypeStruct``).
      mesh: the device mesh; must have an axis named ``axis``.
      stage: ZeRO stage, 0 to 3 (state is sharded from stage 1 on).
      axis: the data-parallel mesh axis.

    Returns:
      A pytree with the structure of ``state`` whose leaves are ``NamedSharding``.

    Raises:
      ValueError: the mesh has no axis ``axis``, ``stage`` is not in 0..3, or a parameter is
        sharded over axes the mesh lacks.

    Reference: Rajbhandari et al., ZeRO, SC 2020 (stage 1, optimizer-state partitioning).
    """
    context = "optstate.sharding.tree_shardings"
    stage = _check_stage(stage, context)
    sizes = _axis_sizes(mesh, axis, context)
    specs, _ = _plan_tree(state, params, sizes, axis, stage >= 1, context)
    return _to_named(specs, mesh)


def state_shardings(tx: GradientTransformation, params: Params, mesh: Any, *, stage: int = 1,
                    axis: str = "data") -> PyTree:
    """``NamedSharding``\\ s for the state of ``tx``, ZeRO-partitioned over ``axis``.

    With :math:`N` devices on ``axis`` and :math:`K` state bytes per parameter, each device
    holds :math:`K\\Psi/N` bytes of state from stage 1 on (Rajbhandari et al., ZeRO, SC
    2020). Each leaf of ``jax.eval_shape(tx.init, params)`` is sharded over ``axis`` on its
    first dimension that divides evenly by :math:`N` and is not used by another mesh axis of
    its parameter's sharding; else it is replicated over ``axis``. Scalars and counters are
    replicated. Leaves of a parameter's shape keep that parameter's other mesh axes (tensor
    parallelism). Quantized leaves are sharded consistently (codes and scales on the same
    dimension, blocks never split). At stage 0 everything is replicated over ``axis``.

    Usage::

        shardings = state_shardings(tx, params, mesh, stage=1)
        state = jax.jit(tx.init, out_shardings=shardings)(params)

    Args:
      tx: any gradient transformation (optstate's or Optax's).
      params: the parameters, as arrays or ``jax.ShapeDtypeStruct`` (with or without a
        ``NamedSharding``).
      mesh: a ``jax.sharding.Mesh`` with an axis named ``axis`` (Auto or Explicit axes).
      stage: ZeRO stage, 0 to 3.
      axis: the data-parallel mesh axis.

    Returns:
      A pytree with the structure of ``jax.eval_shape(tx.init, params)`` whose leaves are
      ``NamedSharding`` on ``mesh``.

    Raises:
      ValueError: the mesh has no axis ``axis`` or ``stage`` is not in 0..3.
    """
    context = "optstate.sharding.state_shardings"
    stage = _check_stage(stage, context)
    sizes = _axis_sizes(mesh, axis, context)
    abstract = jax.eval_shape(tx.init, _abstract(params))
    specs, _ = _plan_tree(abstract, params, sizes, axis, stage >= 1, context)
    return _to_named(specs, mesh)


def param_shardings(params: Params, mesh: Any, *, stage: int = 1, axis: str = "data"
                    ) -> PyTree:
    """``NamedSharding``\\ s for the parameters at a ZeRO stage.

    Stages 0 to 2 replicate parameters over ``axis`` (keeping any other mesh axis of their
    own sharding); stage 3 (FSDP, Rajbhandari et al., ZeRO, SC 2020) shards each parameter
    over ``axis`` on its first free dimension that divides evenly by the axis size, so a
    device holds :math:`\\approx P/N` parameter bytes.

    Args:
      params: arrays or ``jax.ShapeDtypeStruct`` (tensor-parallel shardings are kept).
      mesh: a mesh with an axis named ``axis``.
      stage: ZeRO stage, 0 to 3.
      axis: the data-parallel mesh axis.

    Returns:
      A pytree with the structure of ``params`` whose leaves are ``NamedSharding``.

    Raises:
      ValueError: the mesh has no axis ``axis`` or ``stage`` is not in 0..3.
    """
    context = "optstate.sharding.param_shardings"
    stage = _check_stage(stage, context)
    sizes = _axis_sizes(mesh, axis, context)
    specs, _ = _param_specs(params, sizes, axis, stage == 3, context)
    return _to_named(specs, mesh)


def grad_shardings(params: Params, mesh: Any, *, stage: int = 2, axis: str = "data"
                   ) -> PyTree:
    """``NamedSharding``\\ s for the gradients at a ZeRO stage.

    From stage 2 on, gradients are reduce-scattered: device :math:`i` keeps the sum over the
    data axis of its own shard only, :math:`G/N` bytes (Rajbhandari et al., ZeRO, SC 2020).
    The shard of a gradient lies on the same dimension as the shard of its parameter at
    stage 3 and of its state, so the update needs no further communication. Stages 0 and 1
    keep gradients replicated over ``axis`` (an all-reduce).

    Args:
      params: arrays or ``jax.ShapeDtypeStruct``; gradients have their shapes.
      mesh: a mesh with an axis named ``axis``.
      stage: ZeRO stage, 0 to 3.
      axis: the data-parallel mesh axis.

    Returns:
      A pytree with the structure of ``params`` whose leaves are ``NamedSharding``.

    Raises:
      ValueError: the mesh has no axis ``axis`` or ``stage`` is not in 0..3.
    """
    context = "optstate.sharding.grad_shardings"
    stage = _check_stage(stage, context)
    sizes = _axis_sizes(mesh, axis, context)
    specs, _ = _param_specs(params, sizes, axis, stage >= 2, context)
    return _to_named(specs, mesh)


def constrain(tree: PyTree, shardings: PyTree) -> PyTree:
    """Constrains ``tree`` (inside ``jit``) to ``shardings``, whatever the mesh's axis types.

    Leaves whose sharding names an Explicit mesh axis (or lives on an all-Explicit mesh) go
    through ``jax.sharding.reshard``, the only way to change an Explicit sharding; the others
    through ``jax.lax.with_sharding_constraint``. Outside ``jit`` both move concrete arrays.
    The ZeRO recipes (Rajbhandari et al., SC 2020) use it to reduce-scatter gradients
    (stage 2) and to all-gather stage-3 parameters for the forward pass::

        full = constrain(params, param_shardings(params, mesh, stage=0))

    Args:
      tree: a pytree of arrays.
      shardings: a pytree of ``NamedSharding`` with the structure of ``tree``.

    Returns:
      ``tree`` with every leaf laid out as its sharding says.
    """

    def one(x: Any, sharding: NamedSharding) -> Any:
        if x is None:
            return None
        explicit = _explicit_axes(sharding.mesh)
        used = {a for e in sharding.spec for a in _axes_of(e)}
        if explicit and (used & explicit or explicit == set(sharding.mesh.axis_names)):
            return jax.sharding.reshard(x, sharding)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(one, tree, shardings, is_leaf=_is_none)


def reduce_scatter_gradients(grads: Updates, shardings: PyTree) -> Updates:
    """ZeRO stage 2: reduce-scatter the data-parallel gradients instead of all-reducing them.

    Inside a ``jit``-ed train step whose batch is sharded over the data axis, the gradient of
    the mean loss is a sum over devices, :math:`g = \\frac1N\\sum_i g_i`. Constraining it to
    ``grad_shardings(params, mesh, stage=2)`` tells XLA that device :math:`i` needs only its
    shard :math:`g^{(i)}`, so the all-reduce becomes a reduce-scatter and each device keeps
    :math:`G/N` gradient bytes (Rajbhandari et al., ZeRO, SC 2020). On GPU and TPU XLA emits
    a ``reduce-scatter``; the CPU backend may lower it as all-reduce plus slice.

    Usage (inside the jitted step)::

        grads = jax.grad(loss)(params, batch)
        grads = reduce_scatter_gradients(grads, grad_sh)   # grad_sh = grad_shardings(...)
        updates, state = tx.update(grads, state, params)

    Args:
      grads: the gradients, with the structure of the parameters.
      shardings: ``grad_shardings(params, mesh, stage=2, axis=...)``.

    Returns:
      The gradients, sharded over the data axis.
    """
    return constrain(grads, shardings)


# --------------------------------------------------------------------------------------------
# The local update (shard_map and pmap)
# --------------------------------------------------------------------------------------------


def _local_plan(tx: GradientTransformation, params: Params, sizes: Mapping[str, int],
                axis: str, stage: int, context: str) -> tuple[Any, Any, list[int | None]]:
    """Consistent PartitionSpecs for parameters and state, and per-parameter shard dims.

    Under shard_map a state shard and its gradient shard must cover the same elements, so a
    parameter's gradient is scattered on the dimension its state leaves are sharded on; if
    those disagree (or a state leaf is not matched to any parameter) the leaf is replicated.
    """
    abstract = jax.eval_shape(tx.init, _abstract(params))
    infos, p_treedef = _param_infos(params, sizes, axis, context)
    shard = stage >= 1
    _, dims_rule = _param_specs(params, sizes, axis, True, context)
    _, plans = _plan_tree(abstract, params, sizes, axis, shard, context)
    chosen: dict[str, set[int | None]] = {}
    for _, (_, dim, info) in plans:
        if info is not None:
            chosen.setdefault(info.path, set()).add(dim)
    dims: list[int | None] = []
    for (_, info), rule_dim in zip(infos, dims_rule):
        if info is None or stage == 0:
            dims.append(None)
            continue
        seen = chosen.get(info.path)
        if seen is None:
            dims.append(rule_dim)
        elif len(seen) == 1:
            dims.append(next(iter(seen)))
        else:
            dims.append(None)
    dim_of = {info.path: d for (_, info), d in zip(infos, dims) if info is not None}

    # state specs: matched leaves follow their parameter's dim, unmatched ones are replicated
    is_leaf = lambda x: x is None or is_quantized(x)  # noqa: E731
    flat, s_treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_leaf)
    state_specs = []
    matcher = _Matcher(infos)
    for path, leaf in flat:
        if leaf is None:
            state_specs.append(None)
            continue
        names = _names(path)
        if is_quantized(leaf):
            specs, dim, info = _quantized_plan(leaf, names, matcher, axis, sizes, shard)
            want = dim_of.get(info.path) if info is not None else None
            if dim != want:
                specs, _, _ = _quantized_plan(leaf, names, matcher, axis, sizes, False)
            _, node_def = jax.tree_util.tree_flatten(leaf)
            state_specs.append(node_def.unflatten(specs))
        else:
            plan = _array_plan(leaf, names, matcher, axis, sizes[axis], shard)
            want = dim_of.get(plan.param.path) if plan.param is not None else None
            if plan.dim != want:
                plan = _array_plan(leaf, names, matcher, axis, sizes[axis], False)
            state_specs.append(plan.spec)
    state_specs_tree = s_treedef.unflatten(state_specs)

    p_specs = []
    for (_, info), d in zip(infos, dims):
        if info is None:
            p_specs.append(None)
            continue
        entries = list(info.base)
        if stage == 3 and d is not None:
            entries[d] = axis
        p_specs.append(_spec(entries))
    return p_treedef.unflatten(p_specs), state_specs_tree, dims


def _with_shape(node: Any, shape: tuple[int, ...]) -> Any:
    """A copy of quantized ``node`` whose static logical shape is ``shape``."""
    if hasattr(node, "_replace"):
        return node._replace(shape=shape)
    if dataclasses.is_dataclass(node):
        return dataclasses.replace(node, shape=shape)
    raise TypeError(
        f"optstate.sharding: cannot re-shape quantized leaf of type {type(node).__name__}; "
        f"expected a NamedTuple or dataclass with a 'shape' field.")


def _varying_axes(x: Any) -> frozenset | None:
    """The manual mesh axes over which ``x`` varies inside shard_map, if JAX tracks them."""
    try:
        aval = jax.typeof(x)
    except Exception:  # noqa: BLE001 - not a JAX value
        return None
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", None)
    return None if vma is None else frozenset(vma)


def _tracks_variance(axis: str) -> bool:
    """True inside ``shard_map(check_vma=True)``, where replicated values are typed as such."""
    varying = _varying_axes(jax.lax.axis_index(axis))
    return bool(varying) and axis in varying


def _already_summed(g: Any, axis: str) -> bool:
    """A gradient that does not vary over ``axis`` inside ``shard_map(check_vma=True)`` was
    summed over ``axis`` by autodiff (the transpose of the implicit broadcast of a replicated
    parameter is ``psum``)."""
    if not _tracks_variance(axis):
        return False
    varying = _varying_axes(g)
    return varying is not None and axis not in varying


def _as_varying(x: Any, axis: str) -> Any:
    """Marks a replicated value as per-device inside ``shard_map(check_vma=True)``, so that
    its gradient stays per-device (to be reduce-scattered) instead of being all-reduced."""
    if not _tracks_variance(axis):
        return x
    varying = _varying_axes(x)
    if varying is not None and axis in varying:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axis, to="varying")
    return jax.lax.pvary(x, axis)


def _make_local_update(tx: GradientTransformation, axis: str, n: int, stage: int,
                       dims: list[int | None], p_treedef: Any, state_global: Any,
                       state_local_shapes: Any) -> Callable[..., tuple[Params, OptState]]:
    """The per-device update shared by the shard_map and pmap paths."""
    tx = with_extra_args_support(tx)
    is_q = lambda x: x is None or is_quantized(x)  # noqa: E731

    def relabel(state: Any, shapes: Any) -> Any:
        # quantized nodes carry their logical shape statically; inside shard_map / pmap their
        # children are local shards, so give them the local logical shape and back afterwards
        def fix(node: Any, shape: Any) -> Any:
            if node is None or not is_quantized(node):
                return node
            return _with_shape(node, shape)

        return jax.tree.map(fix, state, shapes, is_leaf=is_q)

    def scatter(g: jax.Array, d: int | None) -> jax.Array:
        if _already_summed(g, axis):
            # shard_map's autodiff summed the gradient of a replicated parameter over the
            # axis already: only the mean and the local shard are left to take
            return local_slice(g / n, d)
        if d is None:
            return jax.lax.pmean(g, axis)
        return jax.lax.psum_scatter(g, axis, scatter_dimension=d, tiled=True) / n

    def local_slice(p: jax.Array, d: int | None) -> jax.Array:
        if d is None:
            return p
        size = p.shape[d] // n
        return jax.lax.dynamic_slice_in_dim(p, jax.lax.axis_index(axis) * size, size, axis=d)

    def gather(p: jax.Array, d: int | None) -> jax.Array:
        if d is None:
            return p
        # the gathered parameters are the same on every device (replicated out_specs)
        return jax.lax.all_gather(p, axis, axis=d, tiled=True, to="invarying")

    def update(grads: Updates, state: OptState, params: Params, **extra_args: Any
               ) -> tuple[Params, OptState]:
        g_leaves = p_treedef.flatten_up_to(grads)
        p_leaves = p_treedef.flatten_up_to(params)
        local_g = [None if g is None else scatter(g, d) for g, d in zip(g_leaves, dims)]
        if stage == 3:
            local_p = p_leaves
        else:
            local_p = [None if p is None else local_slice(p, d) for p, d in zip(p_leaves, dims)]
        local_g_tree = p_treedef.unflatten(local_g)
        local_p_tree = p_treedef.unflatten(local_p)
        state_in = relabel(state, state_local_shapes)
        updates, new_state = tx.update(local_g_tree, state_in, local_p_tree, **extra_args)
        new_state = relabel(new_state, state_global)
        new_local = p_treedef.flatten_up_to(apply_updates(local_p_tree, updates))
        if stage == 3:
            return p_treedef.unflatten(new_local), new_state
        full = [None if p is None else gather(p, d) for p, d in zip(new_local, dims)]
        return p_treedef.unflatten(full), new_state

    return update


def _quantized_shapes(abstract: Any, specs: Any, sizes: Mapping[str, int], local: bool) -> Any:
    """Per quantized node of ``abstract``: its global or its local (sharded) logical shape."""
    is_q = lambda x: x is None or is_quantized(x)  # noqa: E731

    def one(node: Any, spec_node: Any) -> Any:
        if node is None or not is_quantized(node):
            return None
        shape = tuple(int(d) for d in node.shape)
        if not local:
            return shape
        children = jax.tree_util.tree_leaves(node)
        child_specs = jax.tree_util.tree_leaves(
            spec_node, is_leaf=lambda x: isinstance(x, PartitionSpec))
        split = [1] * len(shape)
        for child, cspec in zip(children, child_specs):
            if len(child.shape) != len(shape):
                continue
            for d, e in enumerate(tuple(cspec)):
                k = int(np.prod([sizes[a] for a in _axes_of(e)])) if e is not None else 1
                split[d] = max(split[d], k)
        return tuple(s // k for s, k in zip(shape, split))

    return jax.tree.map(one, abstract, specs, is_leaf=is_q)


class ShardMapUpdate(NamedTuple):
    """What :func:`shard_map_update` returns.

    Attributes:
      update: ``update(grads, state, params, **extra) -> (params, state)``, to call inside
        ``jax.shard_map`` over the mesh; ``grads`` are this device's (unreduced) gradients of
        its own batch shard, ``state`` and ``params`` are this device's blocks as laid out by
        ``state_specs`` and ``param_specs``.
      gather_params: ``params -> full params`` inside ``shard_map``, for the forward pass:
        all-gathers stage-3 shards over the data axis, and marks replicated parameters as
        per-device so that their gradients reach ``update`` unreduced and are
        reduce-scattered there (without it, ``shard_map``'s autodiff all-reduces them first;
        ``update`` still gives the right result, but without the stage-2 saving).
      param_specs: ``PartitionSpec`` tree of the parameters (``in_specs``/``out_specs``).
      state_specs: ``PartitionSpec`` tree of the state.
      param_shardings: ``NamedSharding`` tree of the parameters (for ``jax.device_put``).
      state_shardings: ``NamedSharding`` tree of the state (for ``jax.jit(tx.init, ...)``).
    """

    update: Callable[..., tuple[Params, OptState]]
    gather_params: Callable[[Params], Params]
    param_specs: PyTree
    state_specs: PyTree
    param_shardings: PyTree
    state_shardings: PyTree


def _gatherer(axis: str, dims: list[int | None], p_treedef: Any, stage: int
              ) -> Callable[[Params], Params]:
    def gather_params(params: Params) -> Params:
        leaves = p_treedef.flatten_up_to(params)
        out = []
        for p, d in zip(leaves, dims):
            if p is None:
                out.append(None)
            elif stage == 3 and d is not None:
                out.append(jax.lax.all_gather(p, axis, axis=d, tiled=True))
            else:
                out.append(_as_varying(p, axis))
        return p_treedef.unflatten(out)

    return gather_params


def shard_map_update(tx: GradientTransformation, params: Params, mesh: Any, *, stage: int = 1,
                     axis: str = "data") -> ShardMapUpdate:
    """The ZeRO update written with explicit collectives, for ``jax.shard_map``.

    Each device :math:`i` of the :math:`N` on ``axis`` holds the gradients :math:`g_i` of its
    own batch shard. The update (Rajbhandari et al., ZeRO, SC 2020)

    1. reduce-scatters them: :math:`\\bar g^{(i)} = \\frac1N \\sum_j g_j^{(i)}`
       (``psum_scatter`` on the leaf's shard dimension; ``pmean`` for replicated leaves),
    2. updates its own shard: :math:`(u^{(i)}, s^{(i)}) = \\mathrm{tx.update}(\\bar g^{(i)},
       s^{(i)}, p^{(i)})`, :math:`p^{(i)} \\leftarrow p^{(i)} + u^{(i)}`,
    3. all-gathers the new parameters (stages 1 and 2), or keeps them sharded (stage 3).

    The result equals the ``jit`` path with :func:`state_shardings` for transforms that act
    element-wise or block-wise within a shard (SGD, momentum, Adam, AdamW, RMSProp, Lion,
    Adagrad, masked/partitioned groups, ``quantize_state`` with nearest rounding). Transforms
    that reduce over a whole leaf or tree (global-norm clipping, LAMB's trust ratio,
    Adafactor's factored statistics) need the ``jit`` path. State leaves that cannot be
    matched to a parameter are replicated and updated from the local shard's view, so keep
    such transforms on the ``jit`` path.

    Usage::

        su = shard_map_update(tx, params, mesh, stage=2)
        params = jax.device_put(params, su.param_shardings)
        state = jax.jit(tx.init, out_shardings=su.state_shardings)(params)

        @jax.jit
        @functools.partial(jax.shard_map, mesh=mesh,
                           in_specs=(su.param_specs, su.state_specs, P("data")),
                           out_specs=(su.param_specs, su.state_specs))
        def step(params, state, batch):
            grads = jax.grad(loss)(su.gather_params(params), batch)
            return su.update(grads, state, params)

    Args:
      tx: the transform (optstate's or Optax's).
      params: the (global) parameters, arrays or ``jax.ShapeDtypeStruct``.
      mesh: a mesh with an axis named ``axis``.
      stage: ZeRO stage, 0 to 3 (0: plain data parallelism, ``pmean`` of the gradients).
      axis: the data-parallel mesh axis.

    Returns:
      A :class:`ShardMapUpdate`.

    Raises:
      ValueError: the mesh has no axis ``axis`` or ``stage`` is not in 0..3.
    """
    context = "optstate.sharding.shard_map_update"
    stage = _check_stage(stage, context)
    sizes = _axis_sizes(mesh, axis, context)
    p_specs, s_specs, dims = _local_plan(tx, params, sizes, axis, stage, context)
    p_treedef = jax.tree.structure(params, is_leaf=_is_none)
    abstract = jax.eval_shape(tx.init, _abstract(params))
    update = _make_local_update(
        tx, axis, sizes[axis], stage, dims, p_treedef,
        _quantized_shapes(abstract, s_specs, sizes, local=False),
        _quantized_shapes(abstract, s_specs, sizes, local=True))
    return ShardMapUpdate(update, _gatherer(axis, dims, p_treedef, stage), p_specs, s_specs,
                          _to_named(p_specs, mesh), _to_named(s_specs, mesh))


# --------------------------------------------------------------------------------------------
# pmap
# --------------------------------------------------------------------------------------------


def _split_leaf(x: Any, spec: PartitionSpec, axis: str, n: int) -> Any:
    if x is None:
        return None
    x = jnp.asarray(x)
    entries = tuple(spec)
    for d, e in enumerate(entries):
        if axis in _axes_of(e):
            shape = x.shape
            x = x.reshape(shape[:d] + (n, shape[d] // n) + shape[d + 1:])
            return jnp.moveaxis(x, d, 0)
    return jnp.broadcast_to(x, (n,) + x.shape)


def _merge_leaf(x: Any, spec: PartitionSpec, axis: str) -> Any:
    if x is None:
        return None
    for d, e in enumerate(tuple(spec)):
        if axis in _axes_of(e):
            x = jnp.moveaxis(jnp.asarray(x), 0, d)
            shape = x.shape
            return x.reshape(shape[:d] + (shape[d] * shape[d + 1],) + shape[d + 2:])
    return x[0]


class PmapUpdate(NamedTuple):
    """What :func:`pmap_update` returns.

    Attributes:
      update: ``update(grads, state, params, **extra) -> (params, state)``, to call inside
        ``jax.pmap(..., axis_name=axis_name)``; the same per-device update as the shard_map
        path (reduce-scatter, local update, all-gather).
      gather_params: all-gathers stage-3 parameter shards inside ``pmap`` (identity below
        stage 3).
      split_params: global parameters -> per-device stack (leading axis of size ``n``).
      split_state: global state -> per-device stack of state shards.
      merge_params: the inverse of ``split_params``.
      merge_state: the inverse of ``split_state``.
      param_specs: ``PartitionSpec`` tree of the parameters over ``axis_name``.
      state_specs: ``PartitionSpec`` tree of the state over ``axis_name``.
    """

    update: Callable[..., tuple[Params, OptState]]
    gather_params: Callable[[Params], Params]
    split_params: Callable[[Params], Params]
    split_state: Callable[[OptState], OptState]
    merge_params: Callable[[Params], Params]
    merge_state: Callable[[OptState], OptState]
    param_specs: PyTree
    state_specs: PyTree


def pmap_update(tx: GradientTransformation, params: Params, n_devices: int, *, stage: int = 1,
                axis_name: str = "data") -> PmapUpdate:
    """The ZeRO update for code that still uses ``jax.pmap``.

    Same rule and same update as :func:`shard_map_update` (Rajbhandari et al., ZeRO, SC
    2020): reduce-scatter the per-device gradients (``psum_scatter`` over ``axis_name``),
    update the local shard of state (and parameters), all-gather the parameters. Under
    ``pmap`` every argument carries a leading device axis, so the returned helpers split the
    global parameters and state into per-device stacks (a sharded leaf becomes its
    :math:`N` shards, a replicated one :math:`N` copies) and merge them back.

    Usage::

        pu = pmap_update(tx, params, jax.local_device_count(), stage=1)
        state = pu.split_state(tx.init(params))
        stacked = pu.split_params(params)

        def step(params, state, batch):           # batch: this device's shard
            grads = jax.grad(loss)(pu.gather_params(params), batch)
            return pu.update(grads, state, params)

        step = jax.pmap(step, axis_name="data", donate_argnums=(0, 1))
        stacked, state = step(stacked, state, batches)   # batches: (n, per-device batch, ...)
        params = pu.merge_params(stacked)

    Args:
      tx: the transform (element-wise or block-wise, as for :func:`shard_map_update`).
      params: the global parameters (arrays or ``jax.ShapeDtypeStruct``, unsharded).
      n_devices: the number of devices ``pmap`` maps over.
      stage: ZeRO stage, 0 to 3.
      axis_name: the ``pmap`` axis name.

    Returns:
      A :class:`PmapUpdate`.

    Raises:
      ValueError: ``stage`` is not in 0..3 or ``n_devices`` is not a positive integer.
    """
    context = "optstate.sharding.pmap_update"
    stage = _check_stage(stage, context)
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ValueError(f"{context}: n_devices must be a positive integer; got {n_devices!r}.")
    n = int(n_devices)
    sizes = {axis_name: n}
    p_specs, s_specs, dims = _local_plan(tx, params, sizes, axis_name, stage, context)
    p_treedef = jax.tree.structure(params, is_leaf=_is_none)
    abstract = jax.eval_shape(tx.init, _abstract(params))
    update = _make_local_update(
        tx, axis_name, n, stage, dims, p_treedef,
        _quantized_shapes(abstract, s_specs, sizes, local=False),
        _quantized_shapes(abstract, s_specs, sizes, local=True))
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    p_specs_split = p_specs if stage == 3 else jax.tree.map(
        lambda s: PartitionSpec(), p_specs, is_leaf=is_spec)

    def split_with(specs: Any) -> Callable[[Any], Any]:
        def split(tree: Any) -> Any:
            spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
            leaves, treedef = jax.tree.flatten(tree)
            if len(leaves) != len(spec_leaves):
                raise ValueError(
                    f"{context}: expected a tree of {len(spec_leaves)} arrays (the structure "
                    f"of the state/params this update was built for); got {len(leaves)}.")
            return treedef.unflatten([_split_leaf(x, s, axis_name, n)
                                      for x, s in zip(leaves, spec_leaves)])

        return split

    def merge_with(specs: Any) -> Callable[[Any], Any]:
        def merge(tree: Any) -> Any:
            spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
            leaves, treedef = jax.tree.flatten(tree)
            return treedef.unflatten([_merge_leaf(x, s, axis_name)
                                      for x, s in zip(leaves, spec_leaves)])

        return merge

    return PmapUpdate(update, _gatherer(axis_name, dims, p_treedef, stage),
                      split_with(p_specs_split), split_with(s_specs),
                      merge_with(p_specs_split), merge_with(s_specs), p_specs, s_specs)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def bytes_on_device(tree: PyTree, device: Any = None) -> int:
    """Bytes of the arrays of ``tree`` that live on ``device`` (default: the first local one).

    Counts each array's addressable shards placed on ``device``; this is the per-device
    memory that ZeRO's formulas predict (Rajbhandari et al., ZeRO, SC 2020).
    """
    if device is None:
        device = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                if shard.device == device:
                    total += shard.data.nbytes
        elif hasattr(leaf, "nbytes"):
            total += int(leaf.nbytes)
    return total


class ZeroBytes(NamedTuple):
    """Per-device bytes predicted by ZeRO for parameters, gradients and state."""

    params: float
    grads: float
    state: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.state


def zero_bytes(param_bytes: float, grad_bytes: float, state_bytes: float, n_devices: int, *,
               stage: int) -> ZeroBytes:
    """ZeRO's per-device memory model (Rajbhandari et al., ZeRO, SC 2020, Figure 1).

    With total parameter bytes :math:`P`, gradient bytes :math:`G`, state bytes :math:`S`
    and :math:`N` devices: stage 0 :math:`(P, G, S)`, stage 1 :math:`(P, G, S/N)`, stage 2
    :math:`(P, G/N, S/N)`, stage 3 :math:`(P/N, G/N, S/N)`.

    Raises:
      ValueError: ``stage`` is not in 0..3 or ``n_devices`` is not a positive integer.
    """
    context = "optstate.sharding.zero_bytes"
    stage = _check_stage(stage, context)
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ValueError(f"{context}: n_devices must be a positive integer; got {n_devices!r}.")
    n = int(n_devices)
    return ZeroBytes(param_bytes / n if stage >= 3 else float(param_bytes),
                     grad_bytes / n if stage >= 2 else float(grad_bytes),
                     state_bytes / n if stage >= 1 else float(state_bytes))
