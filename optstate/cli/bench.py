"""``optstate bench``: step time and peak memory of AdamW per state format, against Optax's.

The parameters are a tree of square float32 matrices with random gradients. Each optimizer's
update step is jitted with the parameters and the state donated; its peak memory is XLA's
compiled memory analysis and its step time the median of steps timed round-robin with the
others (``optstate.tasks.timing``), so that machine noise hits every row alike. The reference is
Optax's fp32 ``adamw``; Optax is imported only here, and only when the benchmark runs (it is
not a dependency of optstate).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import jax
import jax.numpy as jnp

import optstate
from optstate.cli.args import fail, positive_int, split_names
from optstate.cli.table import format_table
from optstate.memory import compiled_memory, state_bytes
from optstate.tasks.configs import (
    ConfigError,
    Hyperparameters,
    StateConfig,
    accepted_names_text,
    adamw_with_state,
    parse_config,
    parse_configs,
)
from optstate.tasks.timing import time_interleaved

NAME = "bench"
HELP = "Step time and peak memory of AdamW with each state format, against Optax's fp32 AdamW."
DEFAULT_CONFIGS = ("fp32", "bf16", "bf16-sr", "int8", "int4", "fp8_e4m3")
OPTAX_ROW = "optax fp32"
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers ``bench``'s options."""
    parser.add_argument("--configs", nargs="+", metavar="NAME", default=None,
                        help=f"optstate configurations ({accepted_names_text()}); default: "
                        f"{' '.join(DEFAULT_CONFIGS)} (those this installation provides)")
    parser.add_argument("--leaves", type=positive_int, default=4,
                        help="number of parameter matrices (default 4)")
    parser.add_argument("--side", type=positive_int, default=1024,
                        help="side of each square matrix (default 1024)")
    parser.add_argument("--repeats", type=positive_int, default=20,
                        help="timed steps per optimizer, interleaved (default 20)")


def _selected(names: list[str] | None) -> list[StateConfig]:
    if names is None:
        configs = [parse_config(name) for name in DEFAULT_CONFIGS]
        return [config for config in configs if not config.missing()]
    return parse_configs(split_names(names))


def _import_optax() -> Any:
    try:
        import optax
    except ImportError:
        return None
    return optax


class _Runner:
    """One optimizer's live parameters and state; each call runs one donated update step."""

    def __init__(self, tx: Any, params: Any, grads: Any):
        def step(p, state, g):
            updates, state = tx.update(g, state, p)
            return optstate.apply_updates(p, updates), state

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.params = jax.tree.map(jnp.copy, params)
        self.state = tx.init(self.params)
        self.grads = grads

    def __call__(self) -> None:
        self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))


def _tree(leaves: int, side: int, seed: int) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(seed), leaves)
    return {f"w{i}": jax.random.normal(k, (side, side), jnp.float32) for i, k in enumerate(keys)}


def run_bench(optax: Any, configs: list[StateConfig], leaves: int, side: int,
              repeats: int) -> list[dict[str, Any]]:
    """Measures every configuration and Optax's AdamW; returns one row per optimizer."""
    hyper = Hyperparameters()
    params, grads = _tree(leaves, side, 0), _tree(leaves, side, 1)
    count = leaves * side * side
    optimizers = {OPTAX_ROW: optax.adamw(1e-3, b1=hyper.b1, b2=hyper.b2, eps=hyper.eps,
                                         weight_decay=hyper.weight_decay)}
    for config in configs:
        optimizers[f"optstate {config.name}"] = adamw_with_state(config, hyper, 1e-3)
    runners = {name: _Runner(tx, params, grads) for name, tx in optimizers.items()}
    rows = []
    for name, runner in runners.items():
        memory = compiled_memory(runner.step, runner.params, runner.state, runner.grads)
        rows.append({"name": name, "peak_bytes": memory.peak,
                     "state_bytes_per_param": state_bytes(runner.state) / count})
    timings = time_interleaved(runners, repeats=repeats, warmup=2)
    reference = statistics.median(timings[OPTAX_ROW])
    for row in rows:
        median = statistics.median(timings[row["name"]])
        row.update(step_seconds=median, ratio=median / reference)
    return rows


def results_table(rows: list[dict[str, Any]], count: int) -> str:
    """The benchmark's rows (from :func:`run_bench`) as a text table under a title line that
    gives the number ``count`` of parameters."""
    header = ("optimizer (AdamW)", "state B/param", "peak MiB", "step ms", "time vs optax")
    cells = [(
        row["name"], f"{row['state_bytes_per_param']:.2f}", f"{row['peak_bytes'] / MIB:.1f}",
        f"{row['step_seconds'] * 1e3:.2f}", f"{row['ratio']:.2f}x") for row in rows]
    return (f"AdamW update step on {count / 1e6:.2f}M parameters\n"
            + format_table(cells, header))


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints its table; returns the exit code."""
    try:
        configs = _selected(args.configs)
    except ConfigError as error:
        return fail(NAME, str(error), 2)
    optax = _import_optax()
    if optax is None:
        return fail(NAME, "the benchmark compares against Optax, which is not installed; "
                    "install it with `pip install optax` (or `pip install -e .[dev]`).", 1)
    rows = run_bench(optax, configs, args.leaves, args.side, args.repeats)
    device = jax.devices()[0]
    print(results_table(rows, args.leaves * args.side**2))
    print(f"donated update steps, {args.repeats} interleaved repeats, median; peak memory from "
          f"XLA's analysis; device {device.platform} ({device.device_kind})")
    return 0
