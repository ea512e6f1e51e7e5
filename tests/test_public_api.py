"""Every public name of the package before its reorganisation still resolves: the flat
``optstate.<name>`` surface and ``optstate.{schedules,inspect,staleness,sharding,checkpoint}.<name>``.

The lists were taken from ``dir()`` of each module on the last commit with the flat layout
(private names, imported modules and typing helpers left out)."""

import importlib

import pytest

import optstate

PUBLIC = {
    "optstate": [
        "ApplyIfFiniteState", "EmaState", "EmptyState", "FactoredState",
        "GradientTransformation", "InjectHyperparamsState", "MaskedNode", "MaskedState",
        "NONNEG_FIELDS", "PartitionState", "QuantizedArray", "QuantizedState",
        "ScaleByAdaDeltaState", "ScaleByAdamState", "ScaleByLionState", "ScaleByRStdDevState",
        "ScaleByRStdDevWithCountState", "ScaleByRmsState", "ScaleByRmsWithCountState",
        "ScaleByRssState", "ScaleByScheduleState", "TraceState", "WeightDecaySchedule",
        "adadelta", "adafactor", "adagrad", "adam", "adam_l2", "adamw", "adaptive_reset",
        "add_decayed_weights", "apply_if_finite", "apply_updates", "chain", "checkpoint",
        "clip", "clip_by_block_rms", "clip_by_global_norm", "default_chunk_elements",
        "dequantize", "ema", "identity", "inject_hyperparams", "inspect", "is_quantized",
        "lamb", "lion", "masked", "named_chain", "partition", "quantize_state",
        "reset_every_n", "rmsprop", "safe_increment", "scale", "scale_by_adadelta",
        "scale_by_adam", "scale_by_factored_rms", "scale_by_learning_rate", "scale_by_lion",
        "scale_by_param_block_rms", "scale_by_rms", "scale_by_rss", "scale_by_schedule",
        "scale_by_stddev", "scale_by_trust_ratio", "schedules", "set_to_zero", "sgd",
        "sharding", "staleness", "tasks", "trace", "with_extra_args_support",
    ],
    "schedules": [
        "constant", "constant_schedule", "cosine_decay", "cosine_decay_schedule",
        "exponential_decay", "join", "join_schedules", "linear", "linear_schedule",
        "piecewise_constant", "piecewise_constant_schedule", "polynomial",
        "polynomial_schedule", "warmup_cosine_decay", "warmup_cosine_decay_schedule",
    ],
    "inspect": [
        "Description", "LeafInfo", "describe", "format_name", "is_quantized", "state_bytes",
    ],
    "staleness": [
        "EmaSimulation", "FORMAT_NAMES", "FloatFormat", "FormatLike", "GradientTransformation",
        "TrackStalenessState", "float_format", "mantissa_bits", "precision_ratio",
        "remaining_benefit", "reset_period", "round_to_format", "simulate_ema_stalls",
        "stall_fraction", "stall_probability", "startup_window", "track_staleness",
        "with_extra_args_support",
    ],
    "sharding": [
        "GradientTransformation", "PmapUpdate", "STAGES", "ShardMapUpdate", "ZeroBytes",
        "apply_updates", "bytes_on_device", "constrain", "grad_shardings", "is_quantized",
        "param_shardings", "pmap_update", "reduce_scatter_gradients", "shard_map_update",
        "state_shardings", "tree_shardings", "with_extra_args_support", "zero_bytes",
    ],
    "checkpoint": [
        "CheckpointError", "FORMAT_VERSION", "all_steps", "describe", "incomplete_saves",
        "latest_step", "read_metadata", "restore", "save", "wait_until_finished",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_still_resolve(module):
    mod = optstate if module == "optstate" else importlib.import_module(f"optstate.{module}")
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"optstate{'' if module == 'optstate' else '.' + module} lost {missing}"


def test_flat_all_lists_only_real_names():
    assert set(PUBLIC["optstate"]) <= set(optstate.__all__)
    for name in optstate.__all__:
        assert getattr(optstate, name) is not None


def test_inspect_is_the_memory_module_under_its_first_name():
    assert optstate.inspect.describe is optstate.memory.describe
    assert optstate.inspect.state_bytes is optstate.memory.state_bytes
