"""``optstate inspect DIR [--step N] [--json]``: what a checkpoint directory holds.

Lists the complete steps (and any interrupted or in-progress saves, which are never restored
from), then for one step (default: the latest) each leaf's path, shape, storage format (fp32,
bf16, int8, int4, fp8_e4m3, ...; quantized leaves are shown once, with their logical shape and
format, their bytes being codes plus scales), bytes, the totals, the versions that wrote it and
its metadata. Reads only the checkpoint's JSON description, never the arrays.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from optstate import checkpoint
from optstate.cli.args import non_negative_int
from optstate.cli.table import format_table

NAME = "inspect"
HELP = "Show a checkpoint directory: steps, and per leaf path, shape, format, bytes; metadata."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``DIR [--step N] [--json]``."""
    parser.add_argument("directory", metavar="DIR", help="checkpoint directory")
    parser.add_argument("--step", type=non_negative_int, default=None,
                        help="step to describe (default: the latest complete one)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (steps plus the step's full description)")


def rows(description: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per logical leaf of a checkpoint description (as from
    :func:`optstate.checkpoint.describe`): ``path``, ``shape``, ``format``, ``bytes``,
    ``elements``. The array children of a quantized leaf are merged into its row."""
    leaves = description["leaves"]
    group_of: dict[int, dict[str, Any]] = {}
    for group in description.get("quantized", []):
        for index in group["leaves"]:
            group_of[index] = group
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, leaf in enumerate(leaves):
        group = group_of.get(index)
        if group is None:
            shape = leaf["shape"]
            out.append({"path": leaf["path"], "shape": shape, "format": leaf["format"],
                        "bytes": leaf["nbytes"], "elements": math.prod(shape)})
        elif group["path"] not in seen:
            seen.add(group["path"])
            shape = group.get("shape") or []
            out.append({
                "path": group["path"], "shape": shape, "format": group["fmt"],
                "bytes": sum(leaves[i]["nbytes"] for i in group["leaves"]),
                "elements": math.prod(shape),
            })
    return out


def leaf_table(table: list[dict[str, Any]]) -> str:
    """The rows of :func:`rows` as a text table: path, shape, format, bytes."""
    cells = [(r["path"] or "<root>", _shape_text(r["shape"]), r["format"], str(r["bytes"]))
             for r in table]
    return format_table(cells, header=("path", "shape", "format", "bytes"), align="<<<>")


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _shape_text(shape: list[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def main(args: argparse.Namespace) -> int:
    """Prints the description; returns 0, or 1 if there is no readable checkpoint to show."""
    directory = args.directory
    try:
        steps = checkpoint.all_steps(directory)
    except checkpoint.CheckpointError as e:
        print(f"optstate {NAME}: {e}", file=sys.stderr)
        return 1
    pending = checkpoint.incomplete_saves(directory)
    if not steps:
        print(f"optstate {NAME}: no complete checkpoint in {directory!r}"
              + (f" ({len(pending)} incomplete save(s) ignored)" if pending else "") + ".",
              file=sys.stderr)
        return 1
    try:
        description = checkpoint.describe(directory, args.step)
    except checkpoint.CheckpointError as e:
        print(f"optstate {NAME}: {e}", file=sys.stderr)
        return 1
    table = rows(description)
    total = sum(r["bytes"] for r in table)
    elements = sum(r["elements"] for r in table)

    if args.json:
        print(json.dumps({"directory": str(directory), "steps": steps,
                          "incomplete": pending, "rows": table, "total_bytes": total,
                          "description": description}, indent=1))
        return 0

    print(f"checkpoint directory: {directory}")
    print(f"steps: {', '.join(str(s) for s in steps)} (latest {steps[-1]})")
    if pending:
        print(f"incomplete saves (ignored): {', '.join(pending)}")
    print(f"step {description['step']}: written {description.get('created', '?')} by optstate "
          f"{description.get('optstate_version', '?')} (jax {description.get('jax_version', '?')}"
          f"), checkpoint format {description['format_version']}, checksums "
          f"{description.get('checksum', '?')}")
    print()
    print(leaf_table(table))
    print()
    print(f"total: {len(table)} leaves, {elements} elements, {total} bytes ({_human(total)})")
    metadata = description.get("metadata") or {}
    print("metadata: " + (json.dumps(metadata, sort_keys=True) if metadata else "(none)"))
    return 0
