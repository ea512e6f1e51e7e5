"""The ``optstate`` command line: one subcommand per module in :data:`COMMANDS`.

Each command module defines ``NAME`` (the subcommand), ``HELP`` (one line for ``--help``),
``add_arguments(parser)`` and ``main(args) -> int`` (the exit code: 0, 1 when the command
cannot run, 2 for a user error). What the commands share lives beside them: argument types
and error reporting in :mod:`optstate.cli.args`, the text table in :mod:`optstate.cli.table`.

The console script ``optstate`` and ``python -m optstate`` both call :func:`main`.
"""

from __future__ import annotations

import argparse

from optstate.cli import bench, compare, inspect, plan, stall_model

COMMANDS = (compare, bench, stall_model, inspect, plan)
"""The command modules, in the order ``optstate --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``optstate`` parser, with one subparser per module of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="optstate", description="Optimizer state: formats, staleness, memory, checkpoints."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command that ``argv`` (default: ``sys.argv[1:]``) names; returns its exit code."""
    args = build_parser().parse_args(argv)
    return int(args._main(args) or 0)
