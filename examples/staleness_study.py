"""Stale optimizer state: the stall model of Topollai & Choromanska (arXiv 2603.16731, 2026)
against measurement.

Part (1), the controlled simulation: Adam's second moment ``v = b2 v + (1 - b2) g^2`` of
Gaussian gradients, stored after every step in bf16, fp8_e4m3 or fp4_e2m2 with nearest or
stochastic rounding (``optstate.staleness.simulate_ema_stalls``). The measured fraction of
elements whose stored value a step left unchanged is compared, step by step from a zero start,
with the model's ``stall_probability(fmt, b2, rounding=..., step=j)`` and its steady state.
Writes ``simulation.md`` and ``simulation.png``.

Part (2), the embedded training task of ``optstate compare`` (a byte-level transformer on
Python's stdlib sources): final held-out loss for fp32, bf16 with nearest and with stochastic
rounding, and each bf16 variant with resets of Adam's moments every
``reset_period("bf16", b2)`` steps, over several seeds; how much of the gap to fp32 each
reset (and stochastic rounding) closes. Writes ``task.md``, ``task.png`` and ``task.json``.

    python examples/staleness_study.py [--part {1,2,all}] [--out optstate-results/staleness_study]
        part 1: [--steps 6000] [--size 4096] [--b2 0.999] [--window 1000] [--seed 0]
        part 2: [--task-steps 300] [--task-b2 0.99] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optstate import staleness as st

FORMATS = ("bf16", "fp8_e4m3", "fp4_e2m2")
ROUNDINGS = ("nearest", "stochastic")


# ---------------------------------------------------------------------------------------------
# Part (1): the controlled simulation
# ---------------------------------------------------------------------------------------------


def simulation_study(
    *, b2: float = 0.999, steps: int = 6000, size: int = 4096, window: int = 1000,
    formats: tuple[str, ...] = FORMATS, seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], np.ndarray]]:
    """Runs the simulation for every format and rounding.

    Each format whose exponent range is narrower than float32's (fp8_e4m3, fp4_e2m2) is also
    run with the same mantissa width and float32's exponent range (labelled ``"... unbounded
    exponent"``), which isolates the mantissa effect that the model describes from underflow
    of the small early values of the EMA.

    Returns:
      ``(rows, curves)``: one table row per (variant, rounding) with the model's steady-state
      stall probability, the stall fraction measured over the last ``window`` steps, the mean
      stored level relative to the exact EMA (drift), and the model's reset period; and the
      per-step measured stall fractions keyed by (variant label, rounding).
    """
    rows, curves = [], {}
    for fmt in formats:
        period = st.reset_period(fmt, b2)
        spec = st.float_format(fmt)
        variants = [(fmt, fmt)]
        if spec.min_exponent > -126:
            variants.append((f"{fmt}, unbounded exponent", spec.mantissa_bits))
        for label, emulated in variants:
            for rounding in ROUNDINGS:
                sim = st.simulate_ema_stalls(emulated, b2, steps=steps, size=size,
                                             rounding=rounding, seed=seed)
                curves[(label, rounding)] = sim.stall_fraction
                predicted = st.stall_probability(fmt, b2, rounding=rounding)
                measured = float(sim.stall_fraction[-window:].mean())
                rows.append({
                    "format": label,
                    "base_format": fmt,
                    "p": spec.mantissa_bits,
                    "rho": st.precision_ratio(fmt, b2),
                    "rounding": rounding,
                    "predicted": predicted,
                    "measured": measured,
                    "gap_points": 100.0 * (measured - predicted),
                    "level": float(sim.level[-window:].mean()),
                    "reset_period": period,
                })
    return rows, curves


def markdown_table(rows: list[dict[str, Any]], *, b2: float, steps: int, size: int,
                   window: int) -> str:
    """The study's table in Markdown."""
    lines = [
        f"Stall fraction of Adam's second moment (b2={b2}, Gaussian gradients, {size} elements, "
        f"zero start; measured over steps {steps - window + 1}-{steps}):",
        "",
        "| format | p | rho | rounding | model (steady) | measured | measured - model | "
        "stored v / exact v | reset period K* |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['p']} | {r['rho']:.2f} | {r['rounding']} | "
            f"{r['predicted']:.4f} | {r['measured']:.4f} | {r['gap_points']:+.1f} pt | "
            f"{r['level']:.3f} | {r['reset_period']} |"
        )
    return "\n".join(lines)


def plot(curves: dict[tuple[str, str], np.ndarray], rows: list[dict[str, Any]], *, b2: float,
         path: Path) -> None:
    """Measured stall fraction per step against the model's curve, one panel per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = [f for f in FORMATS if (f, "nearest") in curves]
    fig, axes = plt.subplots(1, len(formats), figsize=(5.2 * len(formats), 4.4), sharey=True)
    axes = np.atleast_1d(axes)
    colors = {"nearest": "tab:red", "stochastic": "tab:blue"}
    light = {"nearest": "lightsalmon", "stochastic": "lightskyblue"}
    for ax, fmt in zip(axes, formats):
        for rounding in ROUNDINGS:
            measured = curves[(fmt, rounding)]
            steps = np.arange(1, len(measured) + 1)
            unbounded = curves.get((f"{fmt}, unbounded exponent", rounding))
            if unbounded is not None:
                ax.plot(steps, unbounded, color=light[rounding], lw=0.8,
                        label=f"measured, {rounding}, unbounded exponent")
            # the write at step j reads an EMA that has absorbed j - 1 writes
            model = st.stall_probability(fmt, b2, rounding=rounding, step=steps - 1)
            ax.plot(steps, measured, color=colors[rounding], lw=0.8, alpha=0.8,
                    label=f"measured, {rounding}")
            ax.plot(steps, model, color=colors[rounding], lw=1.6, ls="--",
                    label=f"model, {rounding}")
        period = next(r["reset_period"] for r in rows if r["format"] == fmt)
        ax.axvline(period, color="gray", lw=1, ls=":", label="reset period K*")
        ax.set_xscale("log")
        ax.set_xlabel("step after a zero start (init or reset)")
        ax.set_title(f"{fmt} (p={st.mantissa_bits(fmt)}, rho={st.precision_ratio(fmt, b2):.1f}, "
                     f"K*={period})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    axes[0].set_ylabel("fraction of stored elements unchanged")
    axes[0].set_ylim(0, 1.02)
    fig.suptitle(f"Stalling of Adam's second moment (b2={b2}): simulation vs model "
                 "(Topollai & Choromanska 2026)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_simulation_part(out: Path, *, b2: float, steps: int, size: int, window: int,
                        seed: int) -> str:
    """Part (1): runs the simulation, writes ``simulation.md`` and ``simulation.png``."""
    rows, curves = simulation_study(b2=b2, steps=steps, size=size, window=window, seed=seed)
    table = markdown_table(rows, b2=b2, steps=steps, size=size, window=window)
    (out / "simulation.md").write_text(table + "\n")
    plot(curves, rows, b2=b2, path=out / "simulation.png")
    return table


# ---------------------------------------------------------------------------------------------
# Part (2): the embedded training task (fp32, bf16-nearest, bf16-stochastic, each with and
# without resets at reset_period), called by main.
# ---------------------------------------------------------------------------------------------

TASK_CONFIGS: tuple[str, ...] = ("fp32", "bf16", "bf16+reset", "bf16-sr", "bf16-sr+reset")
"""Part (2)'s configurations (``optstate compare`` names); fp32 is the reference."""

TASK_STEPS = 300
"""Training steps per run: ``optstate compare``'s default."""

TASK_B2 = 0.99
"""Adam's b2 for part (2): ``optstate compare``'s default, whose bf16 reset period (103 steps)
is shorter than the run (at 0.999 it is 1116 steps and no reset would happen)."""

TASK_SEEDS = 3
"""Default number of seeds (0, 1, ...) of part (2)."""

TASK_EVAL_POINTS = 12
"""Held-out evaluations per run (the loss curves' points)."""

# Two-sided 95% Student-t quantiles by degrees of freedom (n_seeds - 1); 2.0 beyond the table.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
        10: 2.23}


@dataclass
class TaskRun:
    """One training run of the embedded task.

    Attributes:
      config: the configuration name (e.g. ``"bf16-sr+reset"``).
      seed: the seed of the initial parameters and of the batch order.
      reset_period: the reset period ``K`` (``None`` without reset).
      final_heldout_loss: the held-out loss after the last step.
      heldout_curve: ``(step, held-out loss)`` pairs.
      seconds: wall time of the training loop (compilation included on first use).
    """

    config: str
    seed: int
    reset_period: int | None
    final_heldout_loss: float
    heldout_curve: list[tuple[int, float]]
    seconds: float


def _reset_counterpart(name: str) -> str | None:
    """The configuration a row's "gap closed" is measured against.

    ``X+reset`` against ``X`` (what the reset closes), ``bf16-sr`` against ``bf16`` (what
    stochastic rounding alone closes); ``None`` for the others.
    """
    if name.endswith("+reset"):
        return name[: -len("+reset")]
    if name.endswith("-sr"):
        return name[: -len("-sr")]
    return None


def task_runs(
    *, steps: int = TASK_STEPS, b2: float = TASK_B2, seeds: tuple[int, ...] = (0,),
    configs: tuple[str, ...] = TASK_CONFIGS, train_config: Any = None, hyper: Any = None,
    log: Callable[[str], None] | None = None,
) -> list[TaskRun]:
    """Trains every configuration for every seed on the embedded task (``optstate compare``'s).

    Every configuration of a seed starts from the same parameters and sees the same batches,
    so per-seed differences come from the optimizer state alone. Each configuration's train
    step is compiled once and reused across seeds.

    Args:
      steps: optimizer steps per run.
      b2: Adam's second-moment decay (also sets the reset period).
      seeds: the seeds to run.
      configs: configuration names; the fp32 reference is added first if absent.
      train_config: a ``TrainConfig`` template (its ``steps`` and ``seed`` are replaced);
        default: the 479K-parameter model this part was measured on, with
        :data:`TASK_EVAL_POINTS` evaluations.
      hyper: a ``Hyperparameters`` template (its ``b2`` is replaced); default: compare's.
      log: called with one line after each run.
    """
    import jax

    import optstate
    from optstate.tasks.configs import (
        REFERENCE, Hyperparameters, build_optimizer, parse_configs, reset_period,
    )
    from optstate.tasks.stdlib_text import load_corpus
    from optstate.tasks.training import (
        TrainConfig, init_model, make_eval_fn, make_train_step, run_training,
    )

    hyper = replace(hyper or Hyperparameters(), b2=b2)
    if train_config is None:
        # the model this part was measured on (optstate compare's default until the demo
        # moved to d_model 256): 479K parameters, windows of 128 bytes, batches of 16
        from optstate.tasks.transformer import ModelConfig

        train_config = TrainConfig(eval_points=TASK_EVAL_POINTS, batch_size=16, eval_batches=8,
                                   model=ModelConfig(seq_len=128, d_model=128))
    template = replace(train_config, steps=steps)
    parsed = parse_configs([REFERENCE, *configs])
    corpus = load_corpus()
    graphdef, _ = init_model(template.model, seeds[0])  # the same graph for every seed
    evaluate = make_eval_fn(graphdef)
    compiled: dict[str, tuple[Any, Any]] = {}
    runs = []
    for seed in seeds:
        for config in parsed:
            if config.name not in compiled:
                tx = build_optimizer(config, hyper, steps)
                compiled[config.name] = (
                    jax.jit(tx.init), make_train_step(graphdef, tx, optstate.update_and_apply))
            init, train_step = compiled[config.name]
            _, params = init_model(template.model, seed)
            result = run_training(corpus, replace(template, seed=seed), train_step, evaluate,
                                  params, init(params))
            run = TaskRun(config=config.name, seed=seed,
                          reset_period=reset_period(config, hyper),
                          final_heldout_loss=result.final_heldout_loss,
                          heldout_curve=result.heldout_curve, seconds=result.seconds)
            runs.append(run)
            if log is not None:
                log(f"[seed {seed}] {run.config:>14}: final held-out loss "
                    f"{run.final_heldout_loss:.4f} ({run.seconds:.0f} s)")
    return runs


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    return float(np.mean(values)), std


def _confidence_interval(values: np.ndarray) -> tuple[float, float] | None:
    """The 95% Student-t interval of the mean of paired differences (``None`` for one seed)."""
    n = values.size
    if n < 2:
        return None
    mean, std = _mean_std(values)
    half = _T95.get(n - 1, 2.0) * std / np.sqrt(n)
    return mean - half, mean + half


def summarize_task(runs: list[TaskRun]) -> list[dict[str, Any]]:
    """One row per configuration (in run order): losses and gaps to fp32 over the seeds.

    Gaps are paired: each seed's loss minus the fp32 loss of the same seed. For ``X+reset``
    (and for ``bf16-sr``) the row also holds the fraction of its counterpart's gap that it
    closes, ``(gap_without - gap_with) / gap_without`` from the mean gaps (``None`` if the
    counterpart's mean gap is 0), and the per-seed loss change against the counterpart
    (``delta``, this loss minus the counterpart's: negative is better) with its 95% interval
    (``delta_within_noise`` when that interval contains 0, ``None`` with a single seed).
    """
    names = list(dict.fromkeys(r.config for r in runs))
    seeds = sorted({r.seed for r in runs})
    loss = {(r.config, r.seed): r.final_heldout_loss for r in runs}
    losses = {n: np.array([loss[(n, s)] for s in seeds]) for n in names}
    gaps = {n: losses[n] - losses["fp32"] for n in names}
    period = {r.config: r.reset_period for r in runs}
    rows = []
    for name in names:
        loss_mean, loss_std = _mean_std(losses[name])
        gap_mean, gap_std = _mean_std(gaps[name])
        gap_ci = _confidence_interval(gaps[name])
        row: dict[str, Any] = {
            "config": name, "reset_period": period[name], "seeds": seeds,
            "loss_mean": loss_mean, "loss_std": loss_std,
            "gap_mean": gap_mean, "gap_std": gap_std, "gaps": gaps[name].tolist(),
            "gap_ci": gap_ci, "gap_within_noise": None if gap_ci is None
            else bool(gap_ci[0] <= 0.0 <= gap_ci[1]),
            "versus": None, "closed": None, "delta": None, "delta_ci": None,
            "delta_within_noise": None,
        }
        versus = _reset_counterpart(name)
        if versus in gaps:
            base = float(np.mean(gaps[versus]))
            delta = losses[name] - losses[versus]  # < 0: this configuration's loss is lower
            ci = _confidence_interval(delta)
            row.update(
                versus=versus,
                closed=None if base == 0.0 else (base - gap_mean) / base,
                delta=delta.tolist(), delta_ci=ci,
                delta_within_noise=None if ci is None else bool(ci[0] <= 0.0 <= ci[1]),
            )
        rows.append(row)
    return rows


def _noise_words(within: bool | None) -> str:
    if within is None:
        return "noise unknown (one seed)"
    return "within noise" if within else "outside noise"


def task_markdown(rows: list[dict[str, Any]], *, steps: int, b2: float) -> str:
    """Part (2)'s table in Markdown, with notes on how to read it and on noise."""
    seeds = rows[0]["seeds"]
    by_name = {r["config"]: r for r in rows}
    lines = [
        f"Final held-out loss on the embedded task (byte-level transformer on Python's stdlib "
        f"sources, AdamW, {steps} steps, b2={b2}; seeds {', '.join(map(str, seeds))}; "
        f"mean ± sample std over seeds; nats per byte):",
        "",
        "| config | reset period K | final held-out loss | gap to fp32 | gap per seed | "
        "gap closed |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        period = "-" if r["reset_period"] is None else str(r["reset_period"])
        closed = "-" if r["versus"] is None else _closed_text(r, by_name[r["versus"]])
        per_seed = ", ".join(f"{g:+.4f}" for g in r["gaps"])
        lines.append(
            f"| {r['config']} | {period} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | "
            f"{r['gap_mean']:+.4f} ± {r['gap_std']:.4f} | {per_seed} | {closed} |")
    lines += ["", "Notes:", "",
              "- gap = held-out loss minus fp32's for the same seed (same initial parameters and "
              "batches). gap closed = (gap without - gap with) / gap without, from the mean "
              "gaps: `X+reset` against `X` (what the reset closes), `bf16-sr` against `bf16` "
              "(what stochastic rounding alone closes). Negative: the gap widened. Flags: "
              "'no gap to close' when the counterpart's mean gap is <= 0 (it is no worse than "
              "fp32, so the ratio's sign says nothing), 'noise' when the loss change against "
              "the counterpart is within noise (see below), 'one seed' when that is unknown."]
    for r in rows:
        if r["config"] != "fp32" and r["versus"] is None:
            lines.append(f"- {r['config']} gap to fp32: {_ci_text(r['gap_ci'])}, "
                         f"{_noise_words(r['gap_within_noise'])}.")
    for r in rows:
        if r["versus"] is None:
            continue
        delta = ", ".join(f"{d:+.4f}" for d in r["delta"])
        lines.append(
            f"- {r['config']} minus {r['versus']} (held-out loss, negative = better): {delta} "
            f"per seed (higher in {sum(d > 0 for d in r['delta'])} of {len(r['delta'])}), "
            f"{_ci_text(r['delta_ci'])}, {_noise_words(r['delta_within_noise'])}; "
            f"its gap to fp32: {_ci_text(r['gap_ci'])}.")
    lines.append("- Intervals are 95% Student-t intervals of the mean over seeds of the paired "
                 "per-seed differences; 'within noise' means the interval contains 0, and a "
                 "fraction closed built on such a difference is not evidence either way.")
    return "\n".join(lines)


def _closed_text(row: dict[str, Any], versus: dict[str, Any]) -> str:
    """The "gap closed" cell: the fraction as computed, with flags that qualify it."""
    if row["closed"] is None:
        return f"n/a ({row['versus']}'s gap is 0)"
    flags = []
    if versus["gap_mean"] <= 0.0:
        flags.append("no gap to close")
    if row["delta_within_noise"] is None:
        flags.append("one seed")
    elif row["delta_within_noise"]:
        flags.append("noise")
    text = f"{100 * row['closed']:+.0f}% of {row['versus']}'s"
    return text + (f" ({'; '.join(flags)})" if flags else "")


def _ci_text(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return "95% interval n/a (one seed)"
    return f"95% interval [{ci[0]:+.4f}, {ci[1]:+.4f}]"


_TASK_STYLE = {
    "fp32": ("black", "-"),
    "bf16": ("tab:red", "-"),
    "bf16+reset": ("tab:red", "--"),
    "bf16-sr": ("tab:blue", "-"),
    "bf16-sr+reset": ("tab:blue", "--"),
}


def task_plot(runs: list[TaskRun], *, steps: int, b2: float, path: Path) -> None:
    """Held-out loss curves (mean over seeds) and each configuration's gap to fp32 (mean over
    seeds, band from the lowest to the highest seed), with the reset steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.config for r in runs))
    seeds = sorted({r.seed for r in runs})
    curves = {(r.config, r.seed): np.array(r.heldout_curve, dtype=float) for r in runs}
    at = curves[(names[0], seeds[0])][:, 0]
    loss = {n: np.stack([curves[(n, s)][:, 1] for s in seeds]) for n in names}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in names:
        color, style = _TASK_STYLE.get(name, (None, "-"))
        left.plot(at, loss[name].mean(axis=0), color=color, ls=style, marker=".", label=name)
        gap = loss[name] - loss["fp32"]
        right.plot(at, gap.mean(axis=0), color=color, ls=style, marker=".", label=name)
        if len(seeds) > 1 and name != "fp32":
            right.fill_between(at, gap.min(axis=0), gap.max(axis=0), color=color, alpha=0.1)
    periods = sorted({r.reset_period for r in runs if r.reset_period is not None})
    for ax in (left, right):
        for k in periods:
            for i, step in enumerate(range(k, steps, k)):
                ax.axvline(step, color="gray", lw=0.8, ls=":",
                           label=f"resets (every K={k} steps)" if i == 0 else None)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.set_ylabel("held-out loss (nats per byte)")
    left.set_title(f"held-out loss, mean over {len(seeds)} seed(s)")
    right.set_ylabel("held-out loss minus fp32's (same seed)")
    right.set_title("gap to fp32" + (" (band: lowest to highest seed)" if len(seeds) > 1 else ""))
    right.legend(fontsize=8)
    fig.suptitle(f"Embedded task, AdamW b2={b2}, {steps} steps: bf16 state with nearest or "
                 "stochastic rounding, with and without resets at the model's period")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_task_outputs(out: Path, runs: list[TaskRun], *, steps: int, b2: float,
                       ) -> tuple[str, list[dict[str, Any]]]:
    """Writes part (2)'s ``task.md``, ``task.png`` and ``task.json`` from its runs.

    Returns:
      ``(table, rows)``: the Markdown table and the rows of :func:`summarize_task`.
    """
    rows = summarize_task(runs)
    table = task_markdown(rows, steps=steps, b2=b2)
    (out / "task.md").write_text(table + "\n")
    task_plot(runs, steps=steps, b2=b2, path=out / "task.png")
    record = {"steps": steps, "b2": b2, "rows": rows, "runs": [asdict(r) for r in runs]}
    (out / "task.json").write_text(json.dumps(record, indent=1) + "\n")
    return table, rows


def load_task_runs(path: Path) -> tuple[list[TaskRun], int, float]:
    """The runs, steps and b2 of a ``task.json`` written by :func:`write_task_outputs`."""
    record = json.loads(Path(path).read_text())
    runs = [TaskRun(**{**r, "heldout_curve": [tuple(p) for p in r["heldout_curve"]]})
            for r in record["runs"]]
    return runs, int(record["steps"]), float(record["b2"])


def run_task_part(out: Path, *, steps: int = TASK_STEPS, b2: float = TASK_B2,
                  seeds: tuple[int, ...] = tuple(range(TASK_SEEDS)), train_config: Any = None,
                  hyper: Any = None, log: Callable[[str], None] | None = None,
                  ) -> tuple[str, list[dict[str, Any]]]:
    """Part (2): trains the runs (:func:`task_runs`), then :func:`write_task_outputs`."""
    runs = task_runs(steps=steps, b2=b2, seeds=seeds, train_config=train_config, hyper=hyper,
                     log=log)
    return write_task_outputs(out, runs, steps=steps, b2=b2)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("1", "2", "all"), default="all",
                        help="1: the controlled simulation, 2: the embedded task, all: both")
    part1 = parser.add_argument_group("part 1 (simulation)")
    part1.add_argument("--b2", type=float, default=0.999)
    part1.add_argument("--steps", type=int, default=6000)
    part1.add_argument("--size", type=int, default=4096)
    part1.add_argument("--window", type=int, default=1000,
                       help="the last steps over which the steady state is measured")
    part1.add_argument("--seed", type=int, default=0)
    part2 = parser.add_argument_group("part 2 (embedded task)")
    part2.add_argument("--task-steps", type=int, default=TASK_STEPS,
                       help="training steps per run (default %(default)s)")
    part2.add_argument("--task-b2", type=float, default=TASK_B2,
                       help="Adam's b2 on the task (default %(default)s, as optstate compare)")
    part2.add_argument("--seeds", type=int, default=TASK_SEEDS,
                       help="number of seeds, 0..N-1 (default %(default)s)")
    part2.add_argument("--task-json", type=Path, default=None, metavar="PATH",
                       help="re-render the table and plot from a task.json of an earlier run "
                       "instead of training")
    parser.add_argument("--out", type=Path, default=Path("optstate-results/staleness_study"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.part in ("1", "all"):
        table = run_simulation_part(args.out, b2=args.b2, steps=args.steps, size=args.size,
                                    window=args.window, seed=args.seed)
        print(table)
        print(f"\nwrote {args.out / 'simulation.md'} and {args.out / 'simulation.png'}\n")
    if args.part in ("2", "all"):
        start = time.perf_counter()
        if args.task_json is not None:
            runs, steps, b2 = load_task_runs(args.task_json)
            table, _ = write_task_outputs(args.out, runs, steps=steps, b2=b2)
        else:
            table, _ = run_task_part(args.out, steps=args.task_steps, b2=args.task_b2,
                                     seeds=tuple(range(args.seeds)), log=_log)
        print(table)
        print(f"\nwrote {args.out / 'task.md'}, {args.out / 'task.png'} and "
              f"{args.out / 'task.json'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
