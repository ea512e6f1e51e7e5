"""``optstate compare``: train the embedded task once per optimizer-state configuration.

Writes ``results.json``, ``loss_curves.png`` and ``memory_quality.png`` into ``--out`` and
prints a table: state bytes per parameter, peak step memory, step time relative to fp32,
final train and held-out loss, and the held-out loss gap to fp32. The training and the files
are :mod:`optstate.tasks`'s; this module reads the command line and prints.

``optstate compare --study staleness`` runs the staleness study instead
(:mod:`optstate.tasks.staleness_study`): where stale bf16 state hurts (least squares) and
where it does not (the transformer), written into ``--out``/staleness.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from optstate.cli.args import (
    UsageError,
    fail,
    integer_in,
    number_in,
    positive_int,
    split_names,
)
from optstate.cli.table import format_table
from optstate.tasks.configs import (
    DEFAULT_CONFIGS,
    REFERENCE,
    ConfigError,
    Hyperparameters,
    StateConfig,
    accepted_names_text,
    available_defaults,
    parse_configs,
    reset_period,
)

NAME = "compare"
HELP = ("Train a small byte-level transformer on Python's stdlib sources once per optimizer-state "
        "format; write a table, JSON and plots.")
DEFAULT_OUT = "optstate-results"
DEFAULT_STEPS = 300
QUICK_STEPS = 100
DEFAULT_TIMING_REPEATS = 10
QUICK_TIMING_REPEATS = 5
MIB = 2**20
DEMO_PACKAGES = ("flax", "matplotlib", "tqdm")
MAX_B2 = 0.99999
"""The largest ``--b2``: the demo trains in float32, whose spacing just below 1 (2**-24)
rounds ``1 - b2`` by up to 0.3% at 1e-5, and by more (up to all of it) closer to 1; the
moments and their bias correction would then silently use another decay than the one asked."""
STUDIES = ("staleness",)
STUDY_DIR = "staleness"
"""``--study staleness`` writes into this subdirectory of ``--out``."""
MAX_SEED = 2**32 - 1
"""The largest ``--seed``: JAX's keys keep the low 32 bits of a seed (with 64-bit mode off),
so larger seeds would silently repeat smaller ones."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers ``compare``'s options."""
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"training steps per configuration (default {DEFAULT_STEPS}, "
                        f"or {QUICK_STEPS} with --quick)")
    parser.add_argument("--configs", nargs="+", metavar="NAME", default=None,
                        help=f"configurations to run ({accepted_names_text()}); default: "
                        f"{' '.join(DEFAULT_CONFIGS)} (those this installation provides). "
                        f"{REFERENCE} always runs as the reference")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run ({QUICK_STEPS} steps, fewer timing repeats)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory for results.json and the plots (default ./{DEFAULT_OUT})")
    parser.add_argument("--seed", default=0, type=integer_in(
                            0, MAX_SEED, high_note=" (JAX keeps 32 bits of a seed)"),
                        help="seed of the initial parameters and the batch order, "
                        f"0 .. {MAX_SEED} (default 0)")
    parser.add_argument("--b2", default=Hyperparameters().b2, type=number_in(
                            0.0, MAX_B2, include_high=True,
                            high_note=" (the demo trains in float32, which cannot hold 1 - b2 "
                            "accurately below 1e-5)"),
                        help=f"Adam's second-moment decay, in (0, {MAX_B2}] (default "
                        "%(default)s, a 100-step memory that fits the short runs; Adam's usual "
                        "0.999 remembers 1000 steps)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--study", choices=STUDIES, default=None,
                        help="instead of the format comparison, run a study: 'staleness' (where "
                        "stale bf16 state hurts: least squares at b2=0.999 with fp32, bf16 "
                        "nearest/stochastic and resets; the transformer's stall fraction against "
                        "the model and its second-moment drift; about 5 minutes of CPU time, 1 "
                        f"with --quick), written into DIR/{STUDY_DIR}")


def selected_configs(names: list[str] | None) -> list[StateConfig]:
    """The configurations named on the command line (comma- or space-separated) or the defaults.

    The fp32 reference is checked too, since it always runs.

    Raises:
      ConfigError: for an unknown or unavailable name.
    """
    parse_configs([REFERENCE])
    if names is None:
        return available_defaults()
    split = split_names(names)
    if not split:
        raise ConfigError(f"--configs given without names; {accepted_names_text()}.")
    return parse_configs(split)


def prepare_out(out: str) -> Path:
    """Creates ``out`` if needed and checks that files can be written into it.

    Raises:
      UsageError: if ``out`` is a file, cannot be created, or is not writable.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} is an existing file, expected a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".optstate-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"cannot write results to --out {out!r}: {reason}.") from None
    return path


def missing_demo_packages() -> list[str]:
    """Those of :data:`DEMO_PACKAGES` (the ``demo`` extra) that are not installed."""
    return [name for name in DEMO_PACKAGES if importlib.util.find_spec(name) is None]


def main(args: argparse.Namespace) -> int:
    """Runs the comparison; returns the exit code (2 for user errors)."""
    missing = missing_demo_packages()
    if missing:
        return fail(NAME, f"the comparison needs {', '.join(missing)} (install them with "
                    "`pip install 'optstate[demo]'`).", 1)
    if args.study is not None:
        return _main_study(args)
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    hyper = Hyperparameters(b2=args.b2)
    try:
        configs = selected_configs(args.configs)
        periods = {c.name: reset_period(c, hyper) for c in configs}  # fail now, not after fp32
        out = prepare_out(args.out)
    except (ConfigError, UsageError) as error:
        return fail(NAME, str(error), 2)
    if args.configs is None:
        configs = _drop_idle_resets(configs, periods, steps)
    return _run(args, configs, hyper, steps, out)


def _main_study(args: argparse.Namespace) -> int:
    """``--study staleness``: checks that no comparison option was given, then runs it."""
    given = [flag for flag, value, default in (
        ("--configs", args.configs, None), ("--steps", args.steps, None),
        ("--b2", args.b2, Hyperparameters().b2), ("--seed", args.seed, 0)) if value != default]
    if given:
        verb = "does" if len(given) == 1 else "do"
        return fail(NAME, f"{' and '.join(given)} {verb} not apply to --study {args.study} (its "
                    "settings are fixed; --quick shortens it, --out chooses where it writes).", 2)
    try:
        out = prepare_out(os.path.join(args.out, STUDY_DIR))
    except UsageError as error:
        return fail(NAME, str(error), 2)
    from optstate.tasks import staleness_study
    from optstate.tasks.stdlib_text import load_corpus

    try:
        corpus = load_corpus()
    except OSError as error:
        return fail(NAME, str(error), 1)
    lsq, diagnostics = staleness_study.study_configs(args.quick)

    def log(line: str) -> None:
        if not args.no_progress:
            print(line, file=sys.stderr, flush=True)

    try:
        results, paths = staleness_study.run(corpus, out, lsq=lsq, diagnostics=diagnostics,
                                             log=log)
    except OSError as error:
        return fail(NAME, f"cannot write results to --out {str(out)!r}: "
                    f"{error.strerror or error}.", 2)
    print(staleness_study.markdown(results))
    print()
    print("wrote " + ", ".join(os.fspath(p) for p in paths))
    return 0


def _drop_idle_resets(configs: list[StateConfig], periods: dict[str, int | None],
                      steps: int) -> list[StateConfig]:
    """Drops default ``+reset`` configurations whose period is not shorter than the run
    (they would never reset, and duplicate the run without reset)."""
    kept = []
    for config in configs:
        period = periods[config.name]
        if period is not None and period >= steps:
            print(f"optstate {NAME}: skipping {config.name}: its reset period ({period} steps) "
                  f"is not shorter than the run ({steps} steps).", file=sys.stderr)
            continue
        kept.append(config)
    return kept


def _run(args: argparse.Namespace, configs: list[StateConfig], hyper: Hyperparameters,
         steps: int, out: Path) -> int:
    # The task needs the demo extra (Flax, Matplotlib, tqdm): imported only once main has
    # checked that it is installed, so that a missing package is a one-line error.
    from optstate.tasks import compare, report
    from optstate.tasks.stdlib_text import load_corpus
    from optstate.tasks.training import TrainConfig

    repeats = QUICK_TIMING_REPEATS if args.quick else DEFAULT_TIMING_REPEATS
    train_config = TrainConfig(steps=steps, seed=args.seed)
    try:
        corpus = load_corpus()
    except OSError as error:
        return fail(NAME, str(error), 1)
    tokens = train_config.batch_size * train_config.model.seq_len

    def progress(config: StateConfig, total: int) -> report.RunProgress:
        return report.RunProgress(config.name, total, tokens, disable=args.no_progress)

    results = compare.compare(corpus, configs, train_config, hyper, timing_repeats=repeats,
                              progress_factory=progress)
    results["quick"] = bool(args.quick)
    try:
        paths = report.write_outputs(results, out)
    except OSError as error:
        return fail(NAME, f"cannot write results to --out {str(out)!r}: "
                    f"{error.strerror or error}.", 2)
    print("\n".join(report.summary_lines(results)))
    print()
    print(results_table(results))
    print()
    print("wrote " + ", ".join(os.fspath(p) for p in paths))
    return 0


def results_table(results: dict[str, Any]) -> str:
    """The comparison (``results`` as written to ``results.json``) as a text table, one row
    per configuration."""
    header = ("config", "state B/param", "step peak MiB", "update peak MiB", "time vs fp32",
              "train loss", "held-out loss", "gap vs fp32")
    rows = [(
        record["name"],
        f"{record['state_bytes_per_param']:.2f}",
        f"{record['peak_step_memory_bytes'] / MIB:.1f}",
        f"{record['peak_update_memory_bytes'] / MIB:.1f}",
        f"{record['step_time_ratio_to_fp32']:.2f}x",
        f"{record['final_train_loss']:.4f}",
        f"{record['final_heldout_loss']:.4f}",
        f"{record['loss_gap_to_fp32']:+.4f}",
    ) for record in results["configs"].values()]
    return format_table(rows, header)
