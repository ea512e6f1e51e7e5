"""Per-device memory: what a device really holds, and what ZeRO predicts it holds.

:func:`bytes_on_device` measures (the shards of a tree's arrays placed on one device);
:func:`zero_bytes` is the model of Rajbhandari et al. (ZeRO, SC 2020) to compare it with.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from optstate._core.types import PyTree
from optstate.sharding._checks import check_device_count, check_stage


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
    stage = check_stage(stage, context)
    n = check_device_count(n_devices, context)
    return ZeroBytes(param_bytes / n if stage >= 3 else float(param_bytes),
                     grad_bytes / n if stage >= 2 else float(grad_bytes),
                     state_bytes / n if stage >= 1 else float(state_bytes))
