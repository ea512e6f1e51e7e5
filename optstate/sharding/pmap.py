"""The pmap path: the ZeRO update for code that still maps with ``jax.pmap``.

The update is the one of the ``shard_map`` path (reduce-scatter, local update, all-gather;
Rajbhandari et al., ZeRO, SC 2020). What ``pmap`` adds is a leading device axis on every
argument, so :func:`pmap_update` also returns the helpers that split a global tree into
per-device stacks (a sharded leaf into its :math:`N` shards, a replicated one into :math:`N`
copies) and merge such stacks back.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from optstate._core.base import GradientTransformation
from optstate._core.types import OptState, Params, PyTree
from optstate.sharding._checks import check_device_count, check_stage
from optstate.sharding._local import local_update
from optstate.sharding._rule import axes_of, is_spec


def _split_leaf(x: Any, spec: PartitionSpec, axis: str, n: int) -> Any:
    """``x`` as a stack of its ``n`` shards along ``axis`` (``n`` copies if not sharded)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    entries = tuple(spec)
    for d, e in enumerate(entries):
        if axis in axes_of(e):
            shape = x.shape
            x = x.reshape(shape[:d] + (n, shape[d] // n) + shape[d + 1:])
            return jnp.moveaxis(x, d, 0)
    return jnp.broadcast_to(x, (n,) + x.shape)


def _merge_leaf(x: Any, spec: PartitionSpec, axis: str) -> Any:
    """The inverse of :func:`_split_leaf`: shards concatenated, or the first copy."""
    if x is None:
        return None
    for d, e in enumerate(tuple(spec)):
        if axis in axes_of(e):
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
    stage = check_stage(stage, context)
    n = check_device_count(n_devices, context)
    local = local_update(tx, params, {axis_name: n}, axis_name, stage, context)
    p_specs, s_specs = local.param_specs, local.state_specs
    # below stage 3 every device holds whole parameters: split them into n copies
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

    return PmapUpdate(local.update, local.gather_params,
                      split_with(p_specs_split), split_with(s_specs),
                      merge_with(p_specs_split), merge_with(s_specs), p_specs, s_specs)
