"""The shard_map path: the ZeRO update written with explicit collectives.

For code that runs its train step under ``jax.shard_map`` and writes its own collectives:
:func:`shard_map_update` returns the per-device update (``psum_scatter`` the local gradients,
update the local shard of parameters and state, ``all_gather`` the new parameters) together
with the ``PartitionSpec``\\ s and ``NamedSharding``\\ s that lay parameters and state out
the way that update expects (Rajbhandari et al., ZeRO, SC 2020).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from optstate._core.base import GradientTransformation
from optstate._core.types import OptState, Params, PyTree
from optstate.sharding._checks import axis_sizes, check_stage
from optstate.sharding._local import local_update
from optstate.sharding._rule import to_named


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
    stage = check_stage(stage, context)
    sizes = axis_sizes(mesh, axis, context)
    local = local_update(tx, params, sizes, axis, stage, context)
    return ShardMapUpdate(local.update, local.gather_params, local.param_specs,
                          local.state_specs, to_named(local.param_specs, mesh),
                          to_named(local.state_specs, mesh))
