"""The per-device ZeRO update that the ``shard_map`` and ``pmap`` paths share.

Both paths run the same function on every device (Rajbhandari et al., ZeRO, SC 2020):
reduce-scatter the local gradients over the data axis, update this device's shard of the
state (and of the parameters), all-gather the new parameters below stage 3. What they need
beyond the jit path's rule is a *consistent* plan: a state shard and its gradient shard
must cover the same elements, so each parameter gets one shard dimension that all of its
state leaves agree on (:func:`local_plan`), and quantized leaves, whose logical shape is
static metadata, are relabelled with their local shape while the transform runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from optstate._core._compat import pcast_varying, varying_axes
from optstate._core.base import GradientTransformation, apply_updates, with_extra_args_support
from optstate._core.leaves import path_names
from optstate._core.types import OptState, Params, PyTree, Updates
from optstate.quantization.array import is_quantized
from optstate.sharding._rule import (
    Matcher,
    abstract,
    array_plan,
    axes_of,
    is_node,
    is_none,
    is_spec,
    param_infos,
    param_specs,
    plan_tree,
    quantized_plan,
    quantized_specs,
    spec,
)

# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def local_plan(state_shapes: Any, params: Params, sizes: Mapping[str, int], axis: str,
               stage: int, context: str) -> tuple[Any, Any, list[int | None]]:
    """Consistent PartitionSpecs for parameters and state, and per-parameter shard dims.

    Under shard_map a state shard and its gradient shard must cover the same elements, so a
    parameter's gradient is scattered on the dimension its state leaves are sharded on; if
    those disagree (or a state leaf is not matched to any parameter) the leaf is replicated.
    ``state_shapes`` is ``jax.eval_shape(tx.init, abstract(params))``.
    """
    infos, p_treedef = param_infos(params, sizes, axis, context)
    shard = stage >= 1
    _, dims_rule = param_specs(params, sizes, axis, True, context)
    _, plans = plan_tree(state_shapes, params, sizes, axis, shard, context)
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
    flat, s_treedef = jax.tree_util.tree_flatten_with_path(state_shapes, is_leaf=is_node)
    state_specs = []
    matcher = Matcher(infos)
    for path, leaf in flat:
        if leaf is None:
            state_specs.append(None)
            continue
        names = path_names(path)
        if is_quantized(leaf):
            specs, dim, info = quantized_plan(leaf, names, matcher, axis, sizes, shard)
            want = dim_of.get(info.path) if info is not None else None
            if dim != want:
                specs, _, _ = quantized_plan(leaf, names, matcher, axis, sizes, False)
            state_specs.append(quantized_specs(leaf, specs))
        else:
            plan = array_plan(leaf, names, matcher, axis, sizes[axis], shard)
            want = dim_of.get(plan.param.path) if plan.param is not None else None
            if plan.dim != want:
                plan = array_plan(leaf, names, matcher, axis, sizes[axis], False)
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
        p_specs.append(spec(entries))
    return p_treedef.unflatten(p_specs), state_specs_tree, dims


def _quantized_shapes(state_shapes: Any, specs: Any, sizes: Mapping[str, int], local: bool
                      ) -> Any:
    """Per quantized node of ``state_shapes``: its global or its local (sharded) logical
    shape."""

    def one(node: Any, spec_node: Any) -> Any:
        if node is None or not is_quantized(node):
            return None
        shape = tuple(int(d) for d in node.shape)
        if not local:
            return shape
        children = jax.tree_util.tree_leaves(node)
        child_specs = jax.tree_util.tree_leaves(spec_node, is_leaf=is_spec)
        split = [1] * len(shape)
        for child, cspec in zip(children, child_specs):
            if len(child.shape) != len(shape):
                continue
            for d, e in enumerate(tuple(cspec)):
                k = int(np.prod([sizes[a] for a in axes_of(e)])) if e is not None else 1
                split[d] = max(split[d], k)
        return tuple(s // k for s, k in zip(shape, split))

    return jax.tree.map(one, state_shapes, specs, is_leaf=is_node)


def _with_shape(node: Any, shape: tuple[int, ...]) -> Any:
    """A copy of quantized ``node`` whose static logical shape is ``shape``."""
    if hasattr(node, "_replace"):
        return node._replace(shape=shape)
    if dataclasses.is_dataclass(node):
        return dataclasses.replace(node, shape=shape)
    raise TypeError(
        f"optstate.sharding: cannot re-shape quantized leaf of type {type(node).__name__}; "
        f"expected a NamedTuple or dataclass with a 'shape' field.")


# --------------------------------------------------------------------------------------------
# Replicated values under shard_map(check_vma=True)
# --------------------------------------------------------------------------------------------


def _tracks_variance(axis: str) -> bool:
    """True inside ``shard_map(check_vma=True)``, where replicated values are typed as such."""
    varying = varying_axes(jax.lax.axis_index(axis))
    return bool(varying) and axis in varying


def _already_summed(g: Any, axis: str) -> bool:
    """A gradient that does not vary over ``axis`` inside ``shard_map(check_vma=True)`` was
    summed over ``axis`` by autodiff (the transpose of the implicit broadcast of a replicated
    parameter is ``psum``)."""
    if not _tracks_variance(axis):
        return False
    varying = varying_axes(g)
    return varying is not None and axis not in varying


def _as_varying(x: Any, axis: str) -> Any:
    """Marks a replicated value as per-device inside ``shard_map(check_vma=True)``, so that
    its gradient stays per-device (to be reduce-scattered) instead of being all-reduced."""
    if not _tracks_variance(axis):
        return x
    varying = varying_axes(x)
    if varying is not None and axis in varying:
        return x
    return pcast_varying(x, axis)


# --------------------------------------------------------------------------------------------
# The update and the parameter gather
# --------------------------------------------------------------------------------------------


def _make_update(tx: GradientTransformation, axis: str, n: int, stage: int,
                 dims: list[int | None], p_treedef: Any, state_global: Any,
                 state_local_shapes: Any) -> Callable[..., tuple[Params, OptState]]:
    """The per-device update: scatter, update the local shard, gather."""
    tx = with_extra_args_support(tx)

    def relabel(state: Any, shapes: Any) -> Any:
        # quantized nodes carry their logical shape statically; inside shard_map / pmap their
        # children are local shards, so give them the local logical shape and back afterwards
        def fix(node: Any, shape: Any) -> Any:
            if node is None or not is_quantized(node):
                return node
            return _with_shape(node, shape)

        return jax.tree.map(fix, state, shapes, is_leaf=is_node)

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


def _make_gather(axis: str, dims: list[int | None], p_treedef: Any, stage: int
                 ) -> Callable[[Params], Params]:
    """``params -> full params`` for the forward pass: all-gathers stage-3 shards, and marks
    replicated parameters per-device so that their gradients reach the update unreduced."""

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


class LocalUpdate(NamedTuple):
    """The per-device update of ``tx`` and the plan it was built for."""

    update: Callable[..., tuple[Params, OptState]]
    gather_params: Callable[[Params], Params]
    param_specs: PyTree  # PartitionSpec tree of the parameters over the data axis
    state_specs: PyTree  # PartitionSpec tree of the state over the data axis


def local_update(tx: GradientTransformation, params: Params, sizes: Mapping[str, int],
                 axis: str, stage: int, context: str) -> LocalUpdate:
    """Plans ``tx``'s state and ``params`` over ``axis`` and builds the per-device update;
    ``stage`` is checked and ``axis`` is in ``sizes``."""
    state_shapes = jax.eval_shape(tx.init, abstract(params))
    p_specs, s_specs, dims = local_plan(state_shapes, params, sizes, axis, stage, context)
    p_treedef = jax.tree.structure(params, is_leaf=is_none)
    update = _make_update(
        tx, axis, sizes[axis], stage, dims, p_treedef,
        _quantized_shapes(state_shapes, s_specs, sizes, local=False),
        _quantized_shapes(state_shapes, s_specs, sizes, local=True))
    return LocalUpdate(update, _make_gather(axis, dims, p_treedef, stage), p_specs, s_specs)
