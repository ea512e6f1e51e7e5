"""Shardings for the jit path: where parameters, gradients and optimizer state live.

Each function returns a tree of ``NamedSharding`` to hand to ``jax.jit`` (``out_shardings``
of ``tx.init``, ``in_shardings``/``out_shardings`` of the train step) or to ``jax.device_put``.
All of them apply the one placement rule of :mod:`optstate.sharding` (the data axis on the
first dimension that divides evenly, other mesh axes of a parameter kept, quantized blocks
never split); they differ only in which tree they place and from which ZeRO stage on that
tree is sharded (Rajbhandari et al., ZeRO, SC 2020): state from stage 1, gradients from
stage 2, parameters at stage 3.
"""

from __future__ import annotations

from typing import Any

import jax

from optstate._core.base import GradientTransformation
from optstate._core.types import OptState, Params, PyTree
from optstate.sharding._checks import axis_sizes, check_stage
from optstate.sharding._rule import abstract, param_specs, plan_tree, to_named


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
    stage = check_stage(stage, context)
    sizes = axis_sizes(mesh, axis, context)
    specs, _ = plan_tree(state, params, sizes, axis, stage >= 1, context)
    return to_named(specs, mesh)


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
    stage = check_stage(stage, context)
    sizes = axis_sizes(mesh, axis, context)
    shapes = jax.eval_shape(tx.init, abstract(params))
    specs, _ = plan_tree(shapes, params, sizes, axis, stage >= 1, context)
    return to_named(specs, mesh)


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
    stage = check_stage(stage, context)
    sizes = axis_sizes(mesh, axis, context)
    specs, _ = param_specs(params, sizes, axis, stage == 3, context)
    return to_named(specs, mesh)


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
    stage = check_stage(stage, context)
    sizes = axis_sizes(mesh, axis, context)
    specs, _ = param_specs(params, sizes, axis, stage >= 2, context)
    return to_named(specs, mesh)
