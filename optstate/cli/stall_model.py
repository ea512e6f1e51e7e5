"""``optstate stall-model``: the staleness model's numbers for one format and decay.

Prints the precision ratio, the steady-state stall probabilities under nearest and stochastic
rounding, the reset period and the startup windows (Topollai & Choromanska, arXiv 2603.16731,
2026), from :mod:`optstate.staleness`; ``--json`` prints the same numbers as one object.
Every argument is checked while the command line is parsed (a bad one exits with code 2 and
argparse's one-line error naming it), and the model answers in bounded time (well under a
second) for any ``--b2`` in (0, 1).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from optstate import staleness
from optstate.cli.args import fail, probability, tolerance, unit_interval
from optstate.cli.table import format_table

NAME = "stall-model"
HELP = ("Stall model of a low-precision EMA (Topollai & Choromanska 2026): precision ratio, "
        "stall probabilities, reset period, startup windows.")

_DEFAULT_P0 = (0.25, 0.5, 0.75, 0.9, 0.99)


def _format_arg(text: str) -> Any:
    """argparse type: a format name the staleness model knows, or an int number of mantissa
    bits (1 to 52)."""
    text = text.strip()
    value = int(text) if text.isdigit() else text
    try:
        staleness.float_format(value)
    except (ValueError, TypeError) as error:
        message = str(error)
        raise argparse.ArgumentTypeError(message.removeprefix("format: ")) from None
    return value


_format_arg.__name__ = "format"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--format F --b2 B [--s0 S] [--p0 P ...] [--p-init P] [--json]``."""
    parser.add_argument("--format", dest="fmt", required=True, type=_format_arg,
                        help="storage format: bf16, fp8_e4m3, fp8_e5m2, fp4_e2m2, fp16, fp32, "
                             "or an int number of mantissa bits")
    parser.add_argument("--b2", type=unit_interval, required=True,
                        help="EMA decay of the second moment in (0, 1), e.g. 0.999 (any value "
                             "in (0, 1) answers in well under a second)")
    parser.add_argument("--s0", type=tolerance, default=0.6,
                        help="staleness tolerance s0 of the reset period, in [0, 1) "
                             "(default 0.6)")
    parser.add_argument("--p0", type=probability, nargs="+", default=list(_DEFAULT_P0),
                        help="stall probabilities in [0, 1] whose startup windows are printed "
                             f"(default {' '.join(map(str, _DEFAULT_P0))})")
    parser.add_argument("--p-init", type=tolerance, default=0.0,
                        help="measured floor of elements that stall from the start, in [0, 1) "
                             "(default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def compute(fmt: Any, b2: float, s0: float = 0.6, p0s: Any = _DEFAULT_P0,
            p_init: float = 0.0) -> dict[str, Any]:
    """The numbers that :func:`main` prints, as a dict (``startup_windows``: P0 -> j or None)."""
    spec = staleness.float_format(fmt)
    return {
        "format": spec.name,
        "mantissa_bits": spec.mantissa_bits,
        "b2": float(b2),
        "s0": float(s0),
        "precision_ratio": staleness.precision_ratio(spec, b2),
        "stall_nearest": staleness.stall_probability(spec, b2, rounding="nearest"),
        "stall_stochastic": staleness.stall_probability(spec, b2, rounding="stochastic"),
        "reset_period": staleness.reset_period(spec, b2, s0=s0),
        "p_init": float(p_init),
        "startup_windows": {
            repr(float(p)): staleness.startup_window(spec, b2, p, p_init=p_init) for p in p0s
        },
    }


def main(args: argparse.Namespace) -> int:
    """Prints the model's numbers; returns 0, or 2 on invalid arguments (message on stderr).

    The parser has checked every argument already; the model's own checks stay as a guard
    for callers that build ``args`` themselves.
    """
    try:
        out = compute(args.fmt, args.b2, args.s0, args.p0, args.p_init)
    except (ValueError, TypeError) as err:
        return fail(NAME, str(err), 2)
    print(json.dumps(out, indent=2) if args.json else text(out))
    return 0


def text(out: dict[str, Any]) -> str:
    """The human-readable form of :func:`compute`'s numbers: a title line, then two indented
    tables (the steady-state quantities, and the startup window of each P0)."""
    steady = format_table([
        ("precision ratio rho", f"{out['precision_ratio']:.6g}"),
        ("stall probability, nearest", f"{out['stall_nearest']:.6f}  (steady state)"),
        ("stall probability, stochastic", f"{out['stall_stochastic']:.6f}  (steady state)"),
        ("reset period K*", f"{out['reset_period']} steps"),
    ], align="<<")
    windows = format_table([
        (f"P0={float(p):g}", f"{j} steps" if j is not None else "never (above the steady state)")
        for p, j in out["startup_windows"].items()
    ], align="<<")
    floor = f", floor p_init={out['p_init']:g}" if out["p_init"] else ""
    return "\n".join([
        f"stall model (Topollai & Choromanska, arXiv 2603.16731): format {out['format']} "
        f"({out['mantissa_bits']} mantissa bits), b2={out['b2']:g}, s0={out['s0']:g}",
        textwrap.indent(steady, "  "),
        f"  startup windows (nearest rounding, steps after a zero start or reset{floor}):",
        textwrap.indent(windows, "    "),
    ])
