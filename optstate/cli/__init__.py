"""The ``optstate`` command line: one subcommand per module in ``_COMMAND_MODULES``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

_COMMAND_MODULES = (
    "optstate.cli.compare",
    "optstate.cli.bench",
    "optstate.cli.stall_model",
    "optstate.cli.inspect",
)


def _available_commands():
    for module_name in _COMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            yield importlib.import_module(module_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optstate", description="Optimizer state: formats, staleness, memory, checkpoints."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in _available_commands():
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
