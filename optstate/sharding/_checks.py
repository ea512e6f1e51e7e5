"""The ZeRO stages and the argument checks that every entry point of the package shares.

Each check names the calling function (``context``) in its message, so that an error says
what was expected, what was given and where, whichever public function received it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STAGES = (0, 1, 2, 3)
"""The ZeRO stages: 0 replicated, 1 state, 2 state and gradients, 3 also parameters."""


def check_stage(stage: Any, context: str) -> int:
    """``stage`` as an ``int`` if it is one of :data:`STAGES` (booleans are refused)."""
    if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or stage not in STAGES:
        raise ValueError(
            f"{context}: stage must be one of {STAGES} (ZeRO: 0 replicated, 1 state, "
            f"2 state and gradients, 3 also parameters); got {stage!r}.")
    return int(stage)


def check_device_count(n_devices: Any, context: str) -> int:
    """``n_devices`` as an ``int`` if it is a positive integer (booleans are refused)."""
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ValueError(f"{context}: n_devices must be a positive integer; got {n_devices!r}.")
    return int(n_devices)


def axis_sizes(mesh: Any, axis: str, context: str) -> dict[str, int]:
    """The size of every axis of ``mesh``, once it is known to be a mesh that has ``axis``.

    Any object with ``axis_names`` and ``shape`` passes (a ``Mesh`` or an ``AbstractMesh``):
    the placement rule needs only the sizes, never the devices.
    """
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
