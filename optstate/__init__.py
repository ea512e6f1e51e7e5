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
from optstate._core.base import (
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
from optstate.transforms.adadelta import ScaleByAdaDeltaState, scale_by_adadelta
from optstate.transforms.adam import ScaleByAdamState, scale_by_adam
from optstate.aliases import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adam_l2,
    adamw,
    lamb,
    lion,
    rmsprop,
    sgd,
)
from optstate.transforms.clipping import clip, clip_by_block_rms, clip_by_global_norm
from optstate.transforms.factored import FactoredState, scale_by_factored_rms, scale_by_param_block_rms
from optstate.transforms.lion import ScaleByLionState, scale_by_lion
from optstate.transforms.momentum import EmaState, TraceState, ema, trace
from optstate._core.numerics import safe_increment
from optstate.transforms.rms import (
    ScaleByRmsState,
    ScaleByRmsWithCountState,
    ScaleByRssState,
    ScaleByRStdDevState,
    ScaleByRStdDevWithCountState,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
)
from optstate.transforms.scale import ScaleByScheduleState, scale, scale_by_learning_rate, scale_by_schedule
from optstate.transforms.trust_ratio import scale_by_trust_ratio
from optstate.transforms.weight_decay import WeightDecaySchedule, add_decayed_weights

# --- wrappers (foundation) ---------------------------------------------------------------
from optstate.wrappers.finite import ApplyIfFiniteState, apply_if_finite
from optstate.wrappers.inject import InjectHyperparamsState, inject_hyperparams
from optstate.wrappers.masking import MaskedNode, MaskedState, masked
from optstate.wrappers.partition import PartitionState, partition

# --- quantized state ---------------------------------------------------------------------
from optstate.quantization.array import QuantizedArray, dequantize, is_quantized
from optstate.quantization.wrapper import (
    NONNEG_FIELDS,
    QuantizedState,
    default_chunk_elements,
    quantize_state,
)

# --- staleness and resets ----------------------------------------------------------------
from optstate.staleness.resets import adaptive_reset, reset_every_n

_LAZY_SUBMODULES = ("schedules", "inspect", "staleness", "sharding", "checkpoint", "tasks")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"optstate.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'optstate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY_SUBMODULES))
