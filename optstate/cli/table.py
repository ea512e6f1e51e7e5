"""The fixed-width text table that every ``optstate`` command prints.

Callers pass cells already formatted as strings, since each command knows its own units and
precision; this module only lines them up. Every line of a table has the same width: cells
are padded to their column's width (left-aligned text, right-aligned numbers), columns are
two spaces apart, and a header is followed by a rule of dashes under each column::

    >>> print(format_table([("fp32", "8.00"), ("int8", "2.03")], header=("config", "B/param")))
    config  B/param
    ------  -------
    fp32       8.00
    int8       2.03

``optstate.memory.Description`` keeps its own small ``__str__`` table: memory is a library
module below ``cli`` in the layering and must not import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

LEFT = "<"
RIGHT = ">"
SEPARATOR = "  "


def format_table(rows: Iterable[Sequence[str]], header: Sequence[str] | None = None,
                 align: str | None = None) -> str:
    """Lines up ``rows`` (and ``header``, if given) in columns.

    Args:
      rows: the table's rows, each a sequence of strings with one cell per column.
      header: optional column titles; when given they come first, followed by a rule of
        dashes as wide as each column.
      align: one character per column, ``"<"`` (left) or ``">"`` (right). The default,
        a name followed by numbers, aligns the first column left and the others right.

    Returns:
      The lines joined by newlines (no trailing newline); ``""`` for no rows and no header.

    Raises:
      ValueError: if a row has another number of cells than the header (or the first row),
        or ``align`` does not give ``"<"`` or ``">"`` for each column.
    """
    body = [tuple(row) for row in rows]
    lines = ([tuple(header)] if header is not None else []) + body
    if not lines:
        return ""
    columns = len(lines[0])
    for index, row in enumerate(body):
        if len(row) != columns:
            raise ValueError(f"table row {index} has {len(row)} cells, expected {columns} "
                             f"(as many as the {'header' if header is not None else 'first row'})"
                             f": {row!r}")
    if align is None:
        align = LEFT + RIGHT * (columns - 1)
    if len(align) != columns or set(align) - {LEFT, RIGHT}:
        raise ValueError(f"table align must be one of {LEFT!r} or {RIGHT!r} per column "
                         f"({columns} columns), got {align!r}")
    widths = [max(len(row[i]) for row in lines) for i in range(columns)]
    if header is not None:
        lines.insert(1, tuple("-" * width for width in widths))
    return "\n".join(_line(row, widths, align) for row in lines)


def _line(cells: Sequence[str], widths: Sequence[int], align: str) -> str:
    return SEPARATOR.join(cell.ljust(width) if side == LEFT else cell.rjust(width)
                          for cell, width, side in zip(cells, widths, align))
