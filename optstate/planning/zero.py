"""One planned configuration: a family member's train step at a ZeRO stage, state format and
device count, compiled from abstract inputs.

The step: ``value_and_grad`` of the loss, (from stage 2) a reduce-scatter of the gradients,
the optimizer update and ``apply_updates``; parameters and optimizer state donated;
shardings from :mod:`optstate.sharding` (Rajbhandari et al., ZeRO, SC 2020): state sharded
from stage 1, gradients from stage 2, parameters at stage 3 (then each block's weights are
gathered inside the scan, one block at a time, as FSDP does).

From stage 1 on, the update runs under ``jax.shard_map`` on each device's own shard of
gradients, parameters and state (ZeRO's "each device updates its partition"), and the new
parameters are all-gathered by the step's output sharding (stages 1 and 2). Left to XLA's
partitioner instead (``tx.update`` on the sharded arrays under ``jit``), the bounded-memory
loop of ``quantize_state`` slices state whose sharded dimension it merged with others, and
XLA all-gathers whole stacked leaves: measured at 1.3B, stage 3, int8, 10.1 GiB of
temporaries per device against 3.3 GiB here.

The mesh is ``("layers", "data")`` with a ``"layers"`` axis of size 1 put on the leading
(stacked) axis of every per-layer weight: it costs nothing, and it keeps the placement rule
(the data axis on the first free dimension that divides evenly) off the axis that ``scan``
slices every iteration, where sharding would make XLA gather the whole stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optstate import aliases
from optstate._core.base import GradientTransformation, apply_updates
from optstate.memory import StepPlan, plan, shard_bytes
from optstate.planning.family import STACKED, DecoderConfig, abstract_params, loss_fn
from optstate.quantization.array import is_quantized
from optstate.quantization.wrapper import quantize_state
from optstate.sharding import (
    constrain,
    param_shardings,
    reduce_scatter_gradients,
    shard_map_update,
    state_shardings,
)

__all__ = ["FORMATS", "Setup", "available_formats", "build", "make_mesh", "optimizer"]

DATA = "data"
LAYERS = "layers"

FORMATS = ("fp32", "bf16", "int8", "int4", "fp8", "compensated")
"""State formats the planner knows: AdamW with fp32 parameters and its state in fp32, bf16,
int8, int4 (block-wise, ``rank1=False``) or fp8 (e4m3) (``quantize_state``), and
``compensated``: bf16 parameters whose
lost low-order bits live in an int8 residual, over int8 moments (``compensated_params``),
offered when that transform is importable."""

_QUANTIZED = {"bf16": "bf16", "int8": "int8", "int4": "int4", "fp8": "fp8_e4m3"}


def _compensated() -> Callable[..., GradientTransformation] | None:
    try:  # being written alongside the planner; the format is offered once it is there
        from optstate.wrappers.compensated import compensated_params
    except ImportError:
        return None
    return compensated_params


def available_formats() -> tuple[str, ...]:
    """:data:`FORMATS` less ``compensated`` when ``optstate.compensated_params`` is absent."""
    return tuple(f for f in FORMATS if f != "compensated" or _compensated() is not None)


def optimizer(fmt: str, learning_rate: float = 3e-4, weight_decay: float = 0.1
              ) -> tuple[GradientTransformation, Any]:
    """``(tx, parameter dtype)`` of a state format: AdamW (LLaMA's settings) stored in it."""
    base = aliases.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=weight_decay)
    if fmt == "fp32":
        return base, jnp.float32
    if fmt == "int4":
        # block-wise for both moments: rank-1 normalisation (int4's default for the second
        # moment) divides by maxima over whole rows and columns, which no shard holds
        return quantize_state(base, "int4", rank1=False), jnp.float32
    if fmt in _QUANTIZED:
        return quantize_state(base, _QUANTIZED[fmt]), jnp.float32
    if fmt == "compensated":
        compensated = _compensated()
        if compensated is None:
            raise ValueError("format 'compensated' needs optstate.compensated_params, which "
                             "this optstate does not have; drop it from the formats.")
        return compensated(quantize_state(base, "int8"), correction="int8"), jnp.bfloat16
    raise ValueError(f"unknown state format {fmt!r}; expected one of {', '.join(FORMATS)}")


def make_mesh(devices: int) -> Mesh:
    """A ``(1, devices)`` mesh with axes ``("layers", "data")`` on the first devices."""
    available = jax.devices()
    if devices > len(available):
        raise ValueError(
            f"{devices} devices asked for, {len(available)} present; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before JAX starts "
            f"(the optstate plan command does this itself).")
    return Mesh(np.array(available[:devices]).reshape(1, devices), (LAYERS, DATA))


@dataclasses.dataclass(frozen=True)
class Setup:
    """A configuration to plan: the family member, format, ZeRO stage and batch shape."""

    config: DecoderConfig
    fmt: str
    stage: int
    devices: int
    batch: int
    seq: int
    remat: bool = True


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _replicated_like(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)


def _relabel(state: Any, shapes: Any) -> Any:
    """``state`` with each quantized node's static logical shape set from ``shapes`` (inside
    ``shard_map`` a node's children are one device's shard, so its shape must say so)."""

    def one(node: Any, shape: Any) -> Any:
        return dataclasses.replace(node, shape=shape) if is_quantized(node) else node

    return jax.tree.map(one, state, shapes, is_leaf=lambda x: x is None or is_quantized(x))


def _logical_shapes(state: Any, shardings: Any, local: bool) -> Any:
    """Per quantized node, its global logical shape or one device's (from its codes'
    sharding, whose dimensions are the logical ones); ``None`` elsewhere."""

    def one(node: Any, sharding: Any) -> Any:
        if not is_quantized(node):
            return None
        shape = tuple(int(d) for d in node.shape)
        if not local or len(node.codes.shape) != len(shape):
            return shape
        return tuple(sharding.codes.shard_shape(shape))

    return jax.tree.map(one, state, shardings, is_leaf=is_quantized)


def _sharded_update(tx: GradientTransformation, mesh: Mesh, state: Any, state_sh: Any,
                    grad_sh: Any, shard_sh: Any) -> Callable[..., tuple[Any, Any]]:
    """``(grads, state, params) -> (new params, new state)`` run on each device's shard:
    gradients as ``grad_sh`` (sharded), state as ``state_sh``, parameters as ``shard_sh``
    (the stage-3 layout: at stages 1 and 2 each device slices its part of the replicated
    parameters, and the step's output sharding all-gathers the new ones)."""
    local, whole = _logical_shapes(state, state_sh, True), _logical_shapes(state, state_sh, False)
    specs = lambda tree: jax.tree.map(lambda s: s.spec, tree)

    def update(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, _relabel(state, local), params)
        return apply_updates(params, updates), _relabel(state, whole)

    return jax.shard_map(update, mesh=mesh, in_specs=(specs(grad_sh), specs(state_sh),
                                                      specs(shard_sh)),
                         out_specs=(specs(shard_sh), specs(state_sh)), check_vma=False)


def build(setup: Setup) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """The jitted, donated train step of ``setup``, its abstract arguments
    ``(params, state, tokens)`` and the shardings used (``params``, ``state``, ``grads``,
    ``tokens``, and the ``mesh``). Nothing is allocated."""
    if setup.batch % setup.devices:
        raise ValueError(f"batch {setup.batch} does not split over {setup.devices} devices; "
                         f"give a multiple of {setup.devices}.")
    tx, dtype = optimizer(setup.fmt)
    mesh = make_mesh(setup.devices)
    stacked = NamedSharding(mesh, PartitionSpec(LAYERS))
    flat = abstract_params(setup.config, dtype)
    params = {k: (_with_shardings(v, jax.tree.map(lambda _: stacked, v)) if k == STACKED
                  else v) for k, v in flat.items()}
    token_sh = NamedSharding(mesh, PartitionSpec(DATA))
    state = jax.eval_shape(tx.init, flat)
    update = None
    if setup.stage == 0:
        param_sh = grad_sh = param_shardings(params, mesh, stage=0, axis=DATA)
        state_sh = state_shardings(tx, params, mesh, stage=0, axis=DATA)
    else:
        # the shard_map path's layout: each parameter's gradient and state on the same
        # dimension (a leaf whose state cannot split there, e.g. a quantized leaf with blocks
        # across it, stays replicated with its gradient)
        local = shard_map_update(tx, params, mesh, stage=3, axis=DATA)
        shard_sh, state_sh = local.param_shardings, local.state_shardings
        param_sh = shard_sh if setup.stage == 3 else param_shardings(params, mesh, stage=0,
                                                                      axis=DATA)
        grad_sh = shard_sh if setup.stage >= 2 else param_sh
        update = _sharded_update(tx, mesh, state, state_sh, shard_sh, shard_sh)
    gather = None
    if setup.stage == 3:
        def gather(tree: Any) -> Any:
            return constrain(tree, _replicated_like(tree, mesh))

    def step(params: Any, state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(setup.config, p, tokens, remat=setup.remat, gather=gather)
        )(params)
        # stage 1 all-reduces the gradients (every device holds them whole, as in ZeRO-1);
        # without the constraint XLA would reduce-scatter them, the update reading shards only
        grads = (reduce_scatter_gradients(grads, grad_sh) if setup.stage >= 2
                 else constrain(grads, grad_sh))
        if update is not None:
            params, state = update(grads, state, params)
        else:
            updates, state = tx.update(grads, state, params)
            params = apply_updates(params, updates)
        return params, state, loss

    jitted = jax.jit(step, in_shardings=(param_sh, state_sh, token_sh),
                     out_shardings=(param_sh, state_sh, NamedSharding(mesh, PartitionSpec())),
                     donate_argnums=(0, 1))
    args = (_with_shardings(flat, param_sh), _with_shardings(state, state_sh),
            jax.ShapeDtypeStruct((setup.batch, setup.seq), jnp.int32, sharding=token_sh))
    return jitted, args, {"params": param_sh, "state": state_sh, "grads": grad_sh,
                          "tokens": token_sh, "mesh": mesh, "tx": tx}


def grad_bytes(args: tuple[Any, ...], grad_sh: Any) -> int:
    """Per-device bytes of the gradients laid out as ``grad_sh`` (the parameters' dtype)."""
    return sum(shard_bytes(x.shape, x.dtype, s)
               for x, s in zip(jax.tree.leaves(args[0]), jax.tree.leaves(grad_sh)))


#: On CPU, code generation is most of a compile and does not change the memory analysis
#: (buffers are assigned before it), so the planner skips LLVM's optimisations.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def plan_setup(setup: Setup) -> tuple[StepPlan, int]:
    """``(plan of the compiled step, per-device gradient bytes)`` for ``setup``."""
    jitted, args, shardings = build(setup)
    options = FAST_CPU_COMPILE if jax.default_backend() == "cpu" else None
    return plan(jitted, *args, compiler_options=options), grad_bytes(args, shardings["grads"])
