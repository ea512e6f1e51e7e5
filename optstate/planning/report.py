"""What ``optstate plan`` shows: the rows as cells, as JSON, and as a plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optstate.planning import GIB, Row, largest_fitting

__all__ = ["fit_cells", "plot", "row_cells", "to_json"]

HEADER = ("size", "params", "format", "stage", "params GiB", "grads GiB", "state GiB",
          "other GiB", "peak GiB")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def row_cells(row: Row, budgets: Sequence[float]) -> tuple[str, ...]:
    """The table cells of ``row``; one ``yes``/``no`` column per budget."""
    gib = lambda b: f"{b / GIB:.2f}"
    return ((row.size, _count(row.num_params), row.fmt, str(row.stage), gib(row.params),
             gib(row.grads), gib(row.state), gib(row.other), gib(row.peak))
            + tuple("yes" if row.fits(b) else "no" for b in budgets))


def header(budgets: Sequence[float]) -> tuple[str, ...]:
    return HEADER + tuple(f"fits {b:g}" for b in budgets)


def fit_cells(rows: Sequence[Row], budget: float) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """``(header, rows)`` of the reverse question: the largest size that fits ``budget``
    GiB, one row per format, one column per stage (``-`` when none fits)."""
    answer = largest_fitting(rows, budget)
    formats = list(dict.fromkeys(r.fmt for r in rows))
    stages = sorted({r.stage for r in rows})
    head = ("format",) + tuple(f"stage {s}" for s in stages)
    body = [(f,) + tuple(answer.get((f, s)) or "-" for s in stages) for f in formats]
    return head, body


def to_json(rows: Sequence[Row], budgets: Sequence[float]) -> dict[str, Any]:
    """The rows (bytes per device) and, per budget, the largest size per format and stage."""
    return {
        "units": "bytes per device",
        "rows": [dict(r._asdict(), compile_s=round(r.compile_s, 2)) for r in rows],
        "largest_fitting": {
            f"{b:g}": {f"{fmt} stage {stage}": size
                       for (fmt, stage), size in largest_fitting(rows, b).items()}
            for b in budgets
        },
    }


def plot(rows: Sequence[Row], budgets: Sequence[float], path: str) -> None:
    """Peak per device against parameters, one panel per stage, one line per format,
    budgets as horizontal lines; written to ``path`` (PNG, SVG or PDF by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r.stage for r in rows})
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.6), sharey=True,
                             squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for fmt in dict.fromkeys(r.fmt for r in rows):
            pts = sorted((r.num_params, r.peak / GIB) for r in rows
                         if r.stage == stage and r.fmt == fmt)
            ax.plot([p for p, _ in pts], [g for _, g in pts], marker="o", label=fmt)
        for b in budgets:
            ax.axhline(b, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(f"{b:g} GiB", (0.02, b), xycoords=("axes fraction", "data"),
                        fontsize=7, color="grey", va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"ZeRO stage {stage}")
        ax.set_xlabel("parameters")
    first = rows[0]
    axes[0][0].set_ylabel(f"peak GiB per device ({first.devices} devices)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"train step peak per device, batch {first.batch} x {first.seq} tokens",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
