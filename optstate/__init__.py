"""optstate: Optax-style composable gradient transformations that manage optimizer state.

Quantized (8-bit, 4-bit, FP8, BF16) state for any transform, staleness measurement and
resets, ZeRO-style sharding of state, and exact checkpoints. Every public name is re-exported
here, flat; the packages behind them are described in the README's Development section. The
submodules ``schedules``, ``memory`` (alias ``inspect``), ``staleness``, ``sharding``,
``checkpoint`` and ``tasks`` are attributes too, imported on first use where heavy (Orbax).
"""

from __future__ import annotations

import importlib
from typing import Any

from optstate._core.version import __version__  # noqa: F401 (optstate.__version__)

# --- protocol ---------------------------------------------------------------------
from optstate._core.base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    chain,
    identity,
    init_empty_state,
    named_chain,
    set_to_zero,
    update_and_apply,
    with_extra_args_support,
)

# --- building blocks and aliases --------------------------------------------
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

# --- wrappers ---------------------------------------------------------------
from optstate.wrappers.compensated import (
    CompensatedParamsState,
    FullPrecision,
    compensated_params,
    master_params,
)
from optstate.wrappers.finite import ApplyIfFiniteState, apply_if_finite
from optstate.wrappers.inject import InjectHyperparamsState, inject_hyperparams
from optstate.wrappers.masking import MaskedNode, MaskedState, masked
from optstate.wrappers.multi_steps import MultiStepsState, multi_steps
from optstate.wrappers.partition import PartitionState, partition

# --- quantized state ---------------------------------------------------------------------
from optstate.quantization.array import QuantizedArray, is_quantized
from optstate.quantization.block import dequantize
from optstate.quantization.wrapper import (
    BoundedStepFallbackWarning,
    NONNEG_FIELDS,
    QuantizedState,
    default_chunk_elements,
    quantize_state,
)

# --- staleness and resets ----------------------------------------------------------------
from optstate.staleness.resets import adaptive_reset, reset_every_n

_LAZY_SUBMODULES = (
    "schedules", "memory", "inspect", "staleness", "sharding", "checkpoint", "tasks")

__all__ = [
    "compensated_params", "CompensatedParamsState", "FullPrecision", "master_params",
    "BoundedStepFallbackWarning",
    "adadelta", "adafactor", "adagrad", "adam", "adam_l2", "adamw", "adaptive_reset",
    "add_decayed_weights", "apply_if_finite", "apply_updates", "ApplyIfFiniteState", "chain",
    "clip", "clip_by_block_rms", "clip_by_global_norm", "default_chunk_elements", "dequantize",
    "ema", "EmaState", "EmptyState", "FactoredState", "GradientTransformation", "identity",
    "init_empty_state", "inject_hyperparams", "InjectHyperparamsState", "is_quantized", "lamb",
    "lion", "masked", "MaskedNode", "MaskedState", "multi_steps", "MultiStepsState",
    "named_chain", "NONNEG_FIELDS", "partition",
    "PartitionState", "quantize_state", "QuantizedArray", "QuantizedState", "reset_every_n",
    "rmsprop", "safe_increment", "scale", "scale_by_adadelta", "scale_by_adam",
    "scale_by_factored_rms", "scale_by_learning_rate", "scale_by_lion",
    "scale_by_param_block_rms", "scale_by_rms", "scale_by_rss", "scale_by_schedule",
    "scale_by_stddev", "scale_by_trust_ratio", "ScaleByAdaDeltaState", "ScaleByAdamState",
    "ScaleByLionState", "ScaleByRmsState", "ScaleByRmsWithCountState", "ScaleByRssState",
    "ScaleByRStdDevState", "ScaleByRStdDevWithCountState", "ScaleByScheduleState",
    "set_to_zero", "sgd", "trace", "TraceState", "update_and_apply", "WeightDecaySchedule",
    "with_extra_args_support",
    *_LAZY_SUBMODULES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"optstate.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'optstate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY_SUBMODULES))
