"""optstate: Optax-style composable gradient transformations that manage optimizer state.

Quantized (8-bit, 4-bit, FP8, BF16) state for any transform, staleness measurement and
resets, ZeRO-style sharding of state, and exact checkpoints. Heavy submodules
(``checkpoint``, ``sharding``, ``staleness``, ``inspect``, ``schedules``) are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# --- protocol (lead) ---------------------------------------------------------------------
from optstate._base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    chain,
    identity,
    named_chain,
    set_to_zero,
    with_extra_args_support,
)

# --- building blocks and aliases (foundation) --------------------------------------------

# --- wrappers (foundation) ---------------------------------------------------------------

# --- quantized state ---------------------------------------------------------------------

# --- staleness and resets ----------------------------------------------------------------

_LAZY_SUBMODULES = ("schedules", "inspect", "staleness", "sharding", "checkpoint", "tasks")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"optstate.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'optstate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY_SUBMODULES))
