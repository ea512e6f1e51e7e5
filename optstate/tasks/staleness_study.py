r"""``optstate compare --study staleness``: where stale low-precision state hurts, and where not.

Two parts, each against the stall model of Topollai & Choromanska (arXiv 2603.16731, 2026):

1. **Least squares** (:mod:`optstate.tasks.least_squares`): shrinking gradients, Adam at
   :math:`\beta_2 = 0.999`. bf16 with nearest rounding cannot lower its stored second moment
   (:math:`\rho = 2.71 > 1`), which freezes near its early peak; the loss stalls. Stochastic
   rounding, resets, and fp32 with the same resets (the control) are shown beside it.
2. **The transformer** (:mod:`optstate.tasks.transformer_staleness`): the measured stall
   fraction of bf16 state against the model, the stored :math:`\nu`'s drift from the exact
   EMA, and the held-out loss gap to fp32, which stays within noise.

Writes ``staleness.json``, ``staleness.md``, ``least_squares.png`` and
``transformer_staleness.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optstate.tasks.least_squares import LeastSquaresConfig, run_study
from optstate.tasks.transformer_staleness import DiagnosticsConfig, run_diagnostics

STUDY_JSON = "staleness.json"
STUDY_MD = "staleness.md"
LSQ_PNG = "least_squares.png"
TRANSFORMER_PNG = "transformer_staleness.png"

QUICK_LSQ_STEPS = 2000
QUICK_TRANSFORMER_STEPS = 500
LSQ_WINDOW = 1000
"""The last steps over which the least-squares stall fraction is averaged."""


def study_configs(quick: bool) -> tuple[LeastSquaresConfig, DiagnosticsConfig]:
    """The full study's settings, or a short run's (``quick``: fewer steps, one seed)."""
    lsq, diagnostics = LeastSquaresConfig(), DiagnosticsConfig()
    if quick:
        lsq = replace(lsq, steps=QUICK_LSQ_STEPS)
        diagnostics = replace(diagnostics, steps=QUICK_TRANSFORMER_STEPS, seeds=(0,),
                              window=QUICK_TRANSFORMER_STEPS // 2)
    return lsq, diagnostics


def run(corpus: Any, out: Path, *, lsq: LeastSquaresConfig, diagnostics: DiagnosticsConfig,
        log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Runs both parts and writes the files; returns the results and the paths written."""
    start = time.perf_counter()
    results = {
        "least_squares": run_study(lsq, log=log),
        "transformer": run_diagnostics(corpus, diagnostics, log=log),
    }
    results["wall_seconds"] = time.perf_counter() - start
    paths = [out / STUDY_JSON, out / STUDY_MD, out / LSQ_PNG, out / TRANSFORMER_PNG]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results) + "\n")
    plot_least_squares(results["least_squares"], paths[2])
    plot_transformer(results["transformer"], paths[3])
    return results, paths


def _window_mean(values: list[float], steps: list[int], window: int) -> float:
    """Mean of the recorded per-point values over the last ``window`` steps."""
    steps_arr = np.asarray(steps)
    keep = steps_arr > steps_arr[-1] - window
    return float(np.mean(np.asarray(values)[keep]))


def least_squares_table(study: dict[str, Any]) -> str:
    """Part 1 in Markdown: one row per configuration."""
    cfg, model, runs = study["config"], study["model"], study["runs"]
    window = min(LSQ_WINDOW, cfg["steps"])
    ref = runs["fp32"]["final_excess_loss"]
    lines = [
        f"Least squares: {cfg['problems']} problems of {cfg['rows']}x{cfg['cols']}, column "
        f"scales {cfg['scale_low']:g} to {cfg['scale_high']:g}, mini-batches of "
        f"{cfg['batch_rows']} rows, Adam b2={cfg['b2']}, constant lr {cfg['learning_rate']:g}, "
        f"{cfg['steps']:,} steps (bf16: rho = {model['rho']:.2f}, model stall probability "
        f"{model['stall_nearest']:.3f} nearest / {model['stall_stochastic']:.3f} stochastic "
        f"in steady state, reset period K* = {model['reset_period']})",
        "",
        "| config | reset every | final excess loss | x fp32's | nu stored / exact (end) | "
        f"stall fraction (last {window} steps) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        period = "-" if run["reset_period"] is None else str(run["reset_period"])
        stall = _window_mean(run["stall_fraction"], run["steps"], window)
        lines.append(
            f"| {name} | {period} | {run['final_excess_loss']:.3e} | "
            f"{run['final_excess_loss'] / ref:.1f} | {run['final_nu_drift']:.1f} | "
            f"{stall:.3f} | {run['seconds']:.0f} |")
    return "\n".join(lines)


def transformer_table(study: dict[str, Any]) -> str:
    """Part 2 in Markdown: one row per configuration (means over seeds)."""
    cfg, summary = study["config"], study["summary"]
    model = cfg["model"]
    seeds = cfg["seeds"]
    lines = [
        f"Transformer: byte-level LM (d_model {model['d_model']}, {model['num_layers']} layers, "
        f"windows of {model['seq_len']} bytes, batch {cfg['batch_size']}), AdamW b2={cfg['b2']}"
        f", {cfg['steps']:,} steps, seeds {', '.join(map(str, seeds))}; stall fraction of the "
        f"stored nu over the last {cfg['window']} steps; nu stored / exact: mean and median over "
        "elements at the last step",
        "",
        "| config | stall measured | model (steady) | model (these steps) | nu stored / exact, "
        "mean | median | held-out loss | gap to fp32 per seed |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, s in summary.items():
        steady = s.get("stall_model_steady")
        at_end = s.get("stall_model_at_end")
        gaps = ", ".join(f"{g:+.4f}" for g in s["gaps"])
        lines.append(
            f"| {name} | {s['stall_measured']:.3f} | "
            f"{'-' if steady is None else f'{steady:.3f}'} | "
            f"{'-' if at_end is None else f'{at_end:.3f}'} | {s['nu_drift']:.2f} | "
            f"{s['nu_drift_median']:.2f} | {s['heldout_loss']:.4f} | {gaps} |")
    noise = next(iter(summary.values()))["seed_noise"]
    if noise is not None:
        lines += ["", f"Noise scale: the sample std of fp32's final held-out loss over the seeds "
                  f"is {noise:.4f}; a mean gap within twice that is called within noise: "
                  + ", ".join(f"{n} {'within' if s['gap_within_noise'] else 'outside'}"
                              for n, s in summary.items() if n != "fp32") + "."]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """Both tables."""
    return (least_squares_table(results["least_squares"]) + "\n\n"
            + transformer_table(results["transformer"]) + "\n\n"
            + f"({results['wall_seconds']:.0f} s in all)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_STYLE = {"fp32": ("black", "-"), "bf16": ("tab:red", "-"), "bf16-sr": ("tab:blue", "-"),
          "bf16+reset": ("tab:red", "--"), "fp32+reset": ("gray", "--")}


def plot_least_squares(study: dict[str, Any], path: Path) -> None:
    """Excess loss and stored/exact second moment over the steps, one line per configuration."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, run in study["runs"].items():
        color, style = _STYLE.get(name, (None, "-"))
        left.plot(run["steps"], run["excess_loss"], color=color, ls=style, label=name)
        right.plot(run["steps"], run["nu_drift"], color=color, ls=style, label=name)
    for axis in (left, right):
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3, which="both")
    left.set_ylabel("excess loss, mean over problems")
    left.set_title("f(x) - min f")
    right.set_ylabel("stored nu / exact float32 EMA (mean)")
    right.set_title("second moment: stored over exact")
    left.legend(fontsize=9)
    cfg = study["config"]
    fig.suptitle(f"Least squares, Adam b2={cfg['b2']}, lr {cfg['learning_rate']:g}: bf16 nearest "
                 "freezes nu; stochastic rounding and resets recover (fp32+reset: the control)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_transformer(study: dict[str, Any], path: Path) -> None:
    """Stall fraction against the model, nu drift, and the held-out loss gap to fp32."""
    from optstate import staleness
    from optstate.tasks.configs import parse_config

    plt = _pyplot()
    cfg = study["config"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    runs = study["runs"]
    fp32 = {r["seed"]: r for r in runs if r["config"] == "fp32"}
    for name in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == name]
        color, style = _STYLE.get(name, (None, "-"))
        steps = np.asarray(mine[0]["steps"])
        axes[0].plot(steps, np.mean([r["stall_fraction"] for r in mine], axis=0), color=color,
                     label=f"{name}, measured")
        parsed = parse_config(name)
        if parsed.fmt != "fp32":
            model = staleness.stall_probability(parsed.fmt, cfg["b2"], rounding=parsed.rounding,
                                                step=steps - 1)
            axes[0].plot(steps, model, color=color, ls="--", label=f"{name}, model")
        axes[1].plot(steps, np.mean([r["nu_drift"] for r in mine], axis=0), color=color,
                     label=f"{name}, mean")
        axes[1].plot(steps, np.mean([r["nu_drift_median"] for r in mine], axis=0), color=color,
                     ls=":", label=f"{name}, median")
        curve = np.mean([np.asarray(r["heldout_curve"])[:, 1]
                         - np.asarray(fp32[r["seed"]]["heldout_curve"])[:, 1] for r in mine],
                        axis=0)
        axes[2].plot(np.asarray(mine[0]["heldout_curve"])[:, 0], curve, color=color, marker=".",
                     label=name)
    axes[0].set_ylabel("fraction of stored nu unchanged by a step")
    axes[0].set_title("stalling: measured vs model")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("stored nu / exact float32 EMA")
    axes[1].set_title("second-moment drift")
    axes[2].axhline(0.0, color="black", lw=0.8)
    axes[2].set_ylabel("held-out loss minus fp32's (same seed)")
    axes[2].set_title(f"loss gap, mean over {len(cfg['seeds'])} seed(s)")
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"Byte-level transformer, AdamW b2={cfg['b2']}: stalling matches the model, "
                 "nu drifts, the loss does not notice")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
