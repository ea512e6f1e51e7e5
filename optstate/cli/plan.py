"""``optstate plan``: will the train step fit? Per-device peak per size, format and ZeRO stage.

Compiles the jitted, donated train step of a LLaMA-like decoder family (125M to 70B, layers
under ``scan``) for every asked format and ZeRO stage on ``--devices`` devices, from abstract
inputs (nothing is allocated), and prints XLA's per-device figures: parameters, gradients,
optimizer state, everything else, the peak, and whether it fits each ``--budget``; then the
largest size that fits each budget per format and stage. ``--json`` and ``--plot`` write the
same. On CPU the devices are emulated: the command sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts its backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

from optstate.cli.args import fail, integer_in, number_in, positive_int, split_names
from optstate.cli.table import format_table

NAME = "plan"
HELP = ("Will the train step fit? Per-device peak of a LLaMA-like 125M-70B train step per "
        "state format and ZeRO stage, from XLA's analysis of the compiled step.")

_FLAG = "--xla_force_host_platform_device_count"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--sizes --formats --stages --devices --batch --seq --budget --json --plot``."""
    parser.add_argument("--sizes", nargs="+", default=["125M", "350M", "1.3B", "7B", "70B"],
                        help="family members (default: 125M 350M 1.3B 7B 70B)")
    parser.add_argument("--formats", nargs="+", default=None,
                        help="state formats among fp32 bf16 int8 int4 fp8 compensated "
                             "(default: fp32 int8 int4, and compensated when available)")
    parser.add_argument("--stages", nargs="+", type=integer_in(0, 3), default=[0, 1, 2, 3],
                        help="ZeRO stages, 0 to 3 (default: all)")
    parser.add_argument("--devices", type=integer_in(1, 4096), default=8,
                        help="data-parallel devices, emulated on CPU (default 8)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="global batch in sequences, a multiple of --devices "
                             "(default: one per device)")
    parser.add_argument("--seq", type=integer_in(2, 1 << 20), default=2048,
                        help="tokens per sequence (default 2048)")
    parser.add_argument("--budget", nargs="+", type=number_in(0, float("inf")),
                        default=[80.0, 24.0], help="per-device budgets in GiB (default 80 24)")
    parser.add_argument("--no-remat", action="store_true",
                        help="keep every block's activations for the backward pass instead of "
                             "recomputing them")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--plot", metavar="FILE", help="also plot the peaks (PNG/SVG/PDF)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _emulate_devices(n: int) -> None:
    """Asks the CPU backend for ``n`` devices unless XLA_FLAGS already sets a count. Only
    effective before JAX starts its backend, which nothing in ``optstate`` does at import."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from optstate.planning import available_formats, resolve
    from optstate.planning.zero import FORMATS

    sizes = [resolve(s).name for s in split_names(args.sizes)]
    offered = available_formats()
    formats = (split_names(args.formats) if args.formats
               else [f for f in ("fp32", "int8", "int4", "compensated") if f in offered])
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}; expected some of {', '.join(FORMATS)}")
        if f not in offered:
            raise ValueError(f"format {f!r} needs optstate.compensated_params, which this "
                             f"optstate lacks; choose among {', '.join(offered)}")
    batch = args.devices if args.batch is None else args.batch
    if batch % args.devices:
        raise ValueError(f"--batch {batch} does not split over --devices {args.devices}; "
                         f"give a multiple of {args.devices}")
    return sizes, formats


def main(args: argparse.Namespace) -> int:
    """Plans, prints the table and the budget answers; 0, 1 when planning fails, 2 on a bad
    argument (one line on stderr)."""
    try:
        sizes, formats = _check(args)
    except ValueError as err:
        return fail(NAME, str(err), 2)
    _emulate_devices(args.devices)
    import jax

    from optstate.planning import plan_family
    from optstate.planning.report import fit_cells, header, plot, row_cells, to_json

    if jax.device_count() < args.devices:
        return fail(NAME, f"--devices {args.devices} but JAX sees {jax.device_count()} "
                          f"{jax.default_backend()} devices; on CPU run in a fresh process (or set "
                          f"XLA_FLAGS={_FLAG}={args.devices} before JAX starts)", 2)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    start = time.perf_counter()
    try:
        rows = plan_family(sizes, formats, sorted(set(args.stages)), devices=args.devices,
                           batch=args.batch, seq=args.seq, remat=not args.no_remat,
                           progress=progress)
    except (ValueError, TypeError, RuntimeError, MemoryError) as err:
        # the arguments were checked: this is the step failing to build or compile
        # (XLA's errors are RuntimeErrors)
        first_line = str(err).splitlines()[0] if str(err) else ""
        return fail(NAME, f"planning failed: {type(err).__name__}: {first_line}", 1)
    first = rows[0]
    print(f"train step per device: {first.devices} {jax.default_backend()} devices, batch "
          f"{first.batch} x {first.seq} tokens, AdamW, bf16 compute, "
          f"{'no remat' if args.no_remat else 'remat per block'} "
          f"({time.perf_counter() - start:.0f} s)")
    print(format_table([row_cells(r, args.budget) for r in rows], header=header(args.budget),
                       align="<><>" + ">" * (5 + len(args.budget))))
    for budget in args.budget:
        head, body = fit_cells(rows, budget)
        print(f"\nlargest size whose step fits {budget:g} GiB per device:")
        print(textwrap.indent(format_table(body, header=head, align="<" * len(head)), "  "))
    try:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(to_json(rows, args.budget), f, indent=1)
        if args.plot:
            plot(rows, args.budget, args.plot)
    except OSError as err:
        return fail(NAME, f"cannot write {err.filename}: {err.strerror}", 2)
    return 0
