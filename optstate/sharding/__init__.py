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

**Where things live.** :mod:`~optstate.sharding.placement` (the shardings for ``jit``),
:mod:`~optstate.sharding.jit` (:func:`constrain`, :func:`reduce_scatter_gradients`),
:mod:`~optstate.sharding.shard_map`, :mod:`~optstate.sharding.pmap`, and
:mod:`~optstate.sharding.accounting` (:func:`bytes_on_device`, :func:`zero_bytes`); the
placement rule itself, which all three paths share, is in ``_rule.py``, and the per-device
update of the ``shard_map`` and ``pmap`` paths in ``_local.py``.
"""

from __future__ import annotations

# The protocol, the state types and is_quantized were importable from the old single-module
# optstate.sharding; they stay so for code that picked them up from here.
from optstate._core.base import (  # noqa: F401
    GradientTransformation,
    apply_updates,
    with_extra_args_support,
)
from optstate._core.types import OptState, Params, PyTree, Updates  # noqa: F401
from optstate.quantization.array import is_quantized  # noqa: F401
from optstate.sharding._checks import STAGES
from optstate.sharding.accounting import ZeroBytes, bytes_on_device, zero_bytes
from optstate.sharding.jit import constrain, reduce_scatter_gradients
from optstate.sharding.placement import (
    grad_shardings,
    param_shardings,
    state_shardings,
    tree_shardings,
)
from optstate.sharding.pmap import PmapUpdate, pmap_update
from optstate.sharding.shard_map import ShardMapUpdate, shard_map_update

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
    "ZeroBytes",
    "zero_bytes",
]
