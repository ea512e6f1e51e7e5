"""``optstate inspect DIR [--step N] [--json] [--verify]``: what a checkpoint directory holds.

Lists the complete steps (and any interrupted or in-progress saves, which are never restored
from), then for one step (default: the latest) each leaf's path, shape, storage format (fp32,
bf16, int8, int4, fp8_e4m3, ...; quantized leaves are shown once, with their logical shape and
format, their bytes being codes plus scales), bytes, the totals, the versions that wrote it and
its metadata. Reads only the checkpoint's JSON description, unless ``--verify`` is given: then
every array is read (onto one device of this process) and its checksum compared with the
recorded one.

Exit status: 0 when shown (and verified); 2, with one line on stderr, when ``DIR`` is not a
checkpoint directory or has no such step; 1, with one line, when the checkpoint is damaged
(unreadable description, or ``--verify`` found an array that does not match).
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
    """Adds ``DIR [--step N] [--json] [--verify]``."""
    parser.add_argument("directory", metavar="DIR", help="checkpoint directory")
    parser.add_argument("--step", type=non_negative_int, default=None,
                        help="step to describe (default: the latest complete one)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (steps plus the step's full description)")
    parser.add_argument("--verify", action="store_true",
                        help="also read every array and check it against its recorded checksum")


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


def _fail(code: int, error: Exception | str) -> int:
    print(f"optstate {NAME}: " + " ".join(str(error).split()), file=sys.stderr)
    return code


def main(args: argparse.Namespace) -> int:
    """Prints the description; returns 0, 2 if ``DIR`` holds no such checkpoint, 1 if it is
    damaged (one line on stderr in both cases)."""
    directory = args.directory
    try:
        steps = checkpoint.all_steps(directory)
        pending = checkpoint.incomplete_saves(directory)
    except checkpoint.CheckpointError as e:
        return _fail(2, e)
    if not steps:
        return _fail(2, f"{directory!r} is not a checkpoint directory: no complete checkpoint "
                        "(step_<N> directories written by optstate.checkpoint)"
                     + (f"; {len(pending)} incomplete save(s) ignored" if pending else "")
                     + ".")
    if args.step is not None and args.step not in steps:
        return _fail(2, f"no complete checkpoint for step {args.step} in {directory!r}; steps "
                        f"present: {steps}.")
    try:
        if args.verify:
            description = checkpoint.verify(directory, args.step)
        else:
            description = checkpoint.describe(directory, args.step)
    except checkpoint.CheckpointError as e:
        return _fail(1, e)
    table = rows(description)
    total = sum(r["bytes"] for r in table)
    elements = sum(r["elements"] for r in table)

    if args.json:
        print(json.dumps({"directory": str(directory), "steps": steps,
                          "incomplete": pending, "rows": table, "total_bytes": total,
                          "verified": bool(args.verify), "description": description},
                         indent=1))
        return 0

    print(f"checkpoint directory: {directory}")
    print(f"steps: {', '.join(str(s) for s in steps)} (latest {steps[-1]})")
    if pending:
        print(f"incomplete saves (ignored): {', '.join(pending)}")
    if args.verify:
        print(f"verified: every array of step {description['step']} matches its checksum")
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
