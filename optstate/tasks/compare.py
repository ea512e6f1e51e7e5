"""``optstate compare``'s engine: train the embedded task once per state configuration.

For each configuration it measures

* the optimizer state's bytes per parameter (``optstate.memory.state_bytes`` of the state);
* the peak memory of the whole jitted, donated train step (forward, backward and optimizer
  update) and of the optimizer update alone, both from XLA's compiled memory analysis
  (``optstate.memory.compiled_memory``; nothing is executed to measure them);
* the step time, interleaved with the other configurations after training so that machine
  noise hits them alike, as a ratio to the fp32 reference;
* the final loss on fixed training windows and on the held-out modules.

Every configuration starts from the same initial parameters and sees the same batches, so
differences between them come from the optimizer state alone.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import jax
import numpy as np

import optstate
from optstate.memory import compiled_memory, memory_of
from optstate.tasks.timing import time_interleaved
from optstate.tasks.configs import (
    REFERENCE,
    Hyperparameters,
    StateConfig,
    build_optimizer,
    reset_period,
)
from optstate.tasks.stdlib_text import ByteCorpus
from optstate.tasks.training import (
    RunResult,
    TrainConfig,
    init_model,
    make_eval_fn,
    make_train_step,
    num_params,
    run_training,
)

ProgressFactory = Callable[[StateConfig, int], Any]
"""``factory(config, steps)``: a context manager whose value is called as ``(step, loss)``."""


@dataclass
class _Timed:
    """One configuration's live step, kept after training to time it against the others."""

    step: Any
    params: Any
    opt_state: Any
    windows: np.ndarray

    def __call__(self) -> None:
        self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.windows)
        jax.block_until_ready((self.params, self.opt_state, loss))


@dataclass
class ConfigOutcome:
    """Measurements of one configuration (everything but the step-time ratio)."""

    config: StateConfig
    state_bytes: int
    num_params: int
    step_memory: dict[str, int]
    update_memory: dict[str, int]
    reset_period: int | None
    run: RunResult
    timed: _Timed = field(repr=False)


def measure_state_bytes(opt_state: Any) -> int:
    """Bytes the optimizer state occupies, as reported by ``optstate.memory.state_bytes``."""
    from optstate import inspect as state_inspect

    return int(state_inspect.state_bytes(opt_state))


def _memory_dict(memory: Any) -> dict[str, int]:
    return {**memory._asdict(), "peak": int(memory.peak)}


def update_memory(tx: Any, params: Any, opt_state: Any) -> dict[str, int]:
    """XLA's memory analysis of the optimizer update alone, as a train step runs it:
    ``optstate.update_and_apply(tx, grads, state, params) -> (new_params, new_state)`` with
    the gradients, the state and the parameters donated.

    Inside a train step the gradients die at the update, the old state dies with the new one
    written and the old parameters with the new ones, so all three are donated here.
    ``update_and_apply`` is ``tx.update`` followed by ``apply_updates`` for any transform
    (Optax's included); ``quantize_state`` writes the new parameters in place, chunk by chunk.
    Nothing is executed: ``params`` stands in for the gradients' shapes.
    """
    # the parameters first: JAX gives each output the buffer of the first donated argument of
    # its shape, and the new parameters belong in the old ones' (where the loop writes them)
    update = jax.jit(lambda p, state, grads: optstate.update_and_apply(tx, grads, state, p),
                     donate_argnums=(0, 1, 2))
    return _memory_dict(compiled_memory(update, params, opt_state, params))


def run_config(
    config: StateConfig,
    corpus: ByteCorpus,
    train_config: TrainConfig,
    hyper: Hyperparameters,
    progress_factory: ProgressFactory | None = None,
) -> ConfigOutcome:
    """Builds, measures and trains one configuration from the seed's initial parameters.

    The progress bar (if any) opens once the step is compiled, so its speed is the training
    speed.
    """
    tx = build_optimizer(config, hyper, train_config.steps)
    graphdef, params = init_model(train_config.model, train_config.seed)
    opt_state = jax.jit(tx.init)(params)  # one compiled call instead of many small ops
    state_bytes = measure_state_bytes(opt_state)
    train_step = make_train_step(graphdef, tx, optstate.update_and_apply)
    windows = corpus.train_batch(train_config.seed, 0, train_config.batch_size,
                                 train_config.model.seq_len)
    # compiled once: measured, then trained and timed with the same executable
    train_step = train_step.lower(params, opt_state, windows).compile()
    step_memory = _memory_dict(memory_of(train_step))
    upd_memory = update_memory(tx, params, opt_state)
    count = num_params(params)
    evaluate = make_eval_fn(graphdef)
    if progress_factory is None:
        run = run_training(corpus, train_config, train_step, evaluate, params, opt_state)
    else:
        with progress_factory(config, train_config.steps) as progress:
            run = run_training(corpus, train_config, train_step, evaluate, params, opt_state,
                               progress)
    return ConfigOutcome(
        config=config,
        state_bytes=state_bytes,
        num_params=count,
        step_memory=step_memory,
        update_memory=upd_memory,
        reset_period=reset_period(config, hyper),
        run=run,
        timed=_Timed(train_step, run.params, run.opt_state, windows),
    )


def time_steps(outcomes: list[ConfigOutcome], repeats: int) -> dict[str, float]:
    """Median seconds per train step of each configuration, timed round-robin."""
    timings = time_interleaved({o.config.name: o.timed for o in outcomes}, repeats=repeats,
                               warmup=1)
    return {name: statistics.median(values) for name, values in timings.items()}


def _rounded(values: np.ndarray, digits: int = 5) -> list[float]:
    return [round(float(v), digits) for v in values]


def config_record(outcome: ConfigOutcome, step_time: float, reference: ConfigOutcome,
                  reference_time: float) -> dict[str, Any]:
    """The JSON record of one configuration."""
    run, ref = outcome.run, reference.run
    return {
        "name": outcome.config.name,
        "description": outcome.config.describe(),
        "format": outcome.config.fmt,
        "rounding": outcome.config.rounding,
        "reset": outcome.config.reset,
        "reset_period": outcome.reset_period,
        "num_params": outcome.num_params,
        "state_bytes": outcome.state_bytes,
        "state_bytes_per_param": outcome.state_bytes / outcome.num_params,
        "peak_step_memory_bytes": outcome.step_memory["peak"],
        "step_memory": outcome.step_memory,
        "peak_update_memory_bytes": outcome.update_memory["peak"],
        "update_memory": outcome.update_memory,
        "step_time_s": step_time,
        "step_time_ratio_to_fp32": step_time / reference_time,
        "final_train_loss": run.final_train_loss,
        "final_heldout_loss": run.final_heldout_loss,
        "loss_gap_to_fp32": run.final_heldout_loss - ref.final_heldout_loss,
        "train_loss_gap_to_fp32": run.final_train_loss - ref.final_train_loss,
        "run_seconds": run.seconds,
        "heldout_curve": [[s, round(v, 5)] for s, v in run.heldout_curve],
        "train_losses": _rounded(run.train_losses),
    }


def environment() -> dict[str, Any]:
    """Versions and device, recorded with the results."""
    device = jax.devices()[0]
    return {
        "optstate": optstate.__version__,
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": f"{device.platform} ({device.device_kind})",
        "device_count": jax.device_count(),
    }


def with_reference(configs: list[StateConfig]) -> list[StateConfig]:
    """``configs`` with the fp32 reference first (added if absent)."""
    from optstate.tasks.configs import parse_config

    rest = [c for c in configs if c.name != REFERENCE]
    return [parse_config(REFERENCE), *rest]


def compare(
    corpus: ByteCorpus,
    configs: list[StateConfig],
    train_config: TrainConfig,
    hyper: Hyperparameters,
    *,
    timing_repeats: int,
    progress_factory: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Trains every configuration (fp32 first) and returns the JSON-ready results."""
    start = time.perf_counter()
    outcomes = []
    for config in with_reference(configs):
        outcomes.append(run_config(config, corpus, train_config, hyper, progress_factory))
    step_times = time_steps(outcomes, timing_repeats)
    reference = outcomes[0]
    records = {
        o.config.name: config_record(o, step_times[o.config.name], reference,
                                     step_times[reference.config.name])
        for o in outcomes
    }
    return {
        "reference": REFERENCE,
        "steps": train_config.steps,
        "seed": train_config.seed,
        "task": task_record(corpus, train_config, reference.num_params),
        "optimizer": {"name": "adamw", "schedule": "warmup_cosine_decay", **asdict(hyper)},
        "measurement": {
            "state_bytes": "optstate.memory.state_bytes of the optimizer state after init",
            "peak_step_memory": "XLA compiled memory analysis of the jitted train step "
            "(forward + backward + update, params and state donated): "
            "arguments + outputs - aliased + temporaries",
            "peak_update_memory": "the same analysis of the optimizer update alone "
            "(optstate.update_and_apply: grads, state, params -> new params, new state; all "
            "three donated, as they die at the update inside a train step)",
            "step_time": f"median of {timing_repeats} train steps per configuration, "
            "interleaved round-robin after training",
            "final_train_loss": "mean next-byte cross-entropy (nats) on fixed training windows",
            "final_heldout_loss": "the same on fixed windows of the held-out modules",
            "loss_gap_to_fp32": "final_heldout_loss minus the fp32 run's",
        },
        "environment": environment(),
        "wall_seconds": time.perf_counter() - start,
        "configs": records,
    }


def task_record(corpus: ByteCorpus, train_config: TrainConfig, count: int) -> dict[str, Any]:
    """The task's description for the results file."""
    return {
        "name": "stdlib-bytes-transformer",
        "model": asdict(train_config.model),
        "num_params": count,
        "batch_size": train_config.batch_size,
        "tokens_per_step": train_config.batch_size * train_config.model.seq_len,
        "train_bytes": int(corpus.train.size),
        "heldout_bytes": int(corpus.heldout.size),
        "train_files": [p.name if p.name != "__init__.py" else f"{p.parent.name}/__init__.py"
                        for p in corpus.train_files],
        "heldout_files": [p.name if p.name != "__init__.py" else f"{p.parent.name}/__init__.py"
                          for p in corpus.heldout_files],
        "eval_windows": train_config.eval_batches * train_config.batch_size,
    }
