"""Presenting ``optstate compare``'s results: progress bars, summary lines, the JSON and plots.

The results table is printed by the command itself (:func:`optstate.cli.compare.results_table`,
with the table formatter that every command shares), so that ``tasks`` does not depend on ``cli``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

MIB = 2**20
LOSS_CURVES_PNG = "loss_curves.png"
MEMORY_QUALITY_PNG = "memory_quality.png"
RESULTS_JSON = "results.json"


class RunProgress:
    """A tqdm progress bar for one run: steps, the latest loss, and steps and tokens per second.

    Used as a context manager; the value it yields is called as ``progress(step, loss)``.
    The loss is read back from the device only every ``every`` steps so that the bar does not
    serialise the training loop.
    """

    def __init__(self, label: str, steps: int, tokens_per_step: int, *, every: int = 10,
                 disable: bool = False):
        self.label = label
        self.steps = steps
        self.tokens_per_step = tokens_per_step
        self.every = every
        self.disable = disable
        self.bar: Any = None

    def __enter__(self) -> RunProgress:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.steps, desc=f"{self.label:>14}", unit="step",
                        dynamic_ncols=True, disable=self.disable)
        return self

    def __call__(self, step: int, loss: Any) -> None:
        self.bar.update(1)
        if step % self.every == 0 or step == self.steps:
            postfix = {"loss": f"{float(loss):.3f}"}
            rate = self.bar.format_dict.get("rate")
            if rate:
                postfix["tok/s"] = f"{rate * self.tokens_per_step:,.0f}"
            self.bar.set_postfix(postfix, refresh=False)

    def __exit__(self, *exc_info: Any) -> None:
        self.bar.close()


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A few lines describing the task and the measurement, printed above the table."""
    task = results["task"]
    model = task["model"]
    env = results["environment"]
    return [
        f"task: byte-level transformer ({task['num_params']:,} parameters, d_model "
        f"{model['d_model']}, {model['num_layers']} layers) on {task['train_bytes']:,} bytes of "
        f"Python stdlib source; held out: {task['heldout_bytes']:,} bytes",
        f"{results['steps']} steps of {task['tokens_per_step']:,} tokens, seed {results['seed']}, "
        f"AdamW b2={results['optimizer']['b2']}, on {env['device']}; "
        f"{results['wall_seconds']:.0f} s in all",
    ]


def write_json(results: dict[str, Any], path: Path) -> None:
    """Writes ``results`` as indented JSON."""
    path.write_text(json.dumps(results, indent=2) + "\n")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` values (shorter at the start)."""
    window = max(1, min(window, len(values)))
    cumulative = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    starts = np.arange(1, len(values) + 1) - counts
    return (cumulative[1:] - cumulative[starts]) / counts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(results: dict[str, Any], path: Path) -> None:
    """Training-loss curves (smoothed) with held-out points, and each curve minus fp32's."""
    plt = _pyplot()
    records = list(results["configs"].values())
    reference = results["configs"][results["reference"]]
    window = max(1, results["steps"] // 25)
    ref_curve = smooth(np.asarray(reference["train_losses"]), window)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for i, record in enumerate(records):
        color = f"C{i}"
        curve = smooth(np.asarray(record["train_losses"]), window)
        steps = np.arange(1, len(curve) + 1)
        top.plot(steps, curve, color=color, lw=1.4, label=record["name"])
        held = np.asarray(record["heldout_curve"], dtype=np.float64).reshape(-1, 2)
        top.plot(held[:, 0], held[:, 1], "o", color=color, ms=4, mfc="none")
        bottom.plot(steps, curve - ref_curve, color=color, lw=1.4)
    top.set_ylabel("loss (nats/byte)")
    top.set_title(f"Training loss, moving average of {window} steps (circles: held-out loss)")
    top.legend(ncol=2, fontsize=9)
    top.grid(alpha=0.3)
    _zoom_losses(top, ref_curve)
    bottom.axhline(0.0, color="black", lw=0.8)
    bottom.set_ylabel("loss minus fp32's")
    bottom.set_xlabel("step (same batches for every configuration)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _zoom_losses(axis: Any, reference_curve: np.ndarray) -> None:
    """Clips the y axis so that the first steps' large losses do not flatten the rest."""
    tail = reference_curve[len(reference_curve) // 10:]
    if tail.size:
        low, high = float(np.min(tail)), float(np.max(tail))
        axis.set_ylim(low - 0.1 * (high - low) - 0.05, high + 0.3 * (high - low) + 0.05)


def plot_memory_quality(results: dict[str, Any], path: Path) -> None:
    """Bars per configuration: state bytes per parameter, peak memory of the train step and of
    the optimizer update alone, and the held-out loss gap to fp32."""
    plt = _pyplot()
    records = list(results["configs"].values())
    names = [r["name"] for r in records]
    colors = [f"C{i}" for i in range(len(records))]
    panels = (
        ("optimizer state, bytes / parameter", [r["state_bytes_per_param"] for r in records],
         "{:.2f}"),
        ("peak memory of the train step, MiB (XLA)",
         [r["peak_step_memory_bytes"] / MIB for r in records], "{:.1f}"),
        ("peak memory of the optimizer update alone, MiB (XLA)",
         [r["peak_update_memory_bytes"] / MIB for r in records], "{:.2f}"),
        ("held-out loss minus fp32's (nats/byte)", [r["loss_gap_to_fp32"] for r in records],
         "{:+.3f}"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for axis, (title, values, fmt) in zip(axes.flat, panels):
        bars = axis.bar(names, values, color=colors)
        axis.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", rotation=45, labelsize=8)
        axis.grid(axis="y", alpha=0.3)
    gap_axis = axes.flat[3]
    gap_axis.axhline(0.0, color="black", lw=0.8)
    _pad_limits(gap_axis, panels[3][1])
    fig.suptitle(f"Memory and quality after {results['steps']} steps "
                 f"({results['task']['num_params']:,} parameters, AdamW b2="
                 f"{results['optimizer']['b2']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pad_limits(axis: Any, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    low, high = min(min(finite), 0.0), max(max(finite), 0.0)
    pad = 0.15 * (high - low) or 0.01
    axis.set_ylim(low - pad, high + pad)


def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    """Writes the JSON and both plots into ``out``; returns their paths."""
    paths = [out / RESULTS_JSON, out / LOSS_CURVES_PNG, out / MEMORY_QUALITY_PNG]
    write_json(results, paths[0])
    plot_losses(results, paths[1])
    plot_memory_quality(results, paths[2])
    return paths
