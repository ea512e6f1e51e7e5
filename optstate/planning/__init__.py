"""Will a training step fit? Per-device memory of real-size train steps, from XLA's analysis.

For a LLaMA-like decoder family (:mod:`~optstate.planning.family`: 125M to 70B parameters,
layers under ``scan``), each state format (:data:`~optstate.planning.zero.FORMATS`), ZeRO
stage (Rajbhandari et al., SC 2020) and device count, :func:`plan_family` compiles the jitted,
donated train step from abstract inputs and reads its per-device peak from
``Compiled.memory_analysis()`` (:func:`optstate.memory.plan`); nothing is allocated, so the
70B step is planned on a laptop's CPU with emulated devices.

Each :class:`Row` splits the peak into

* ``params`` and ``state``: the per-device bytes of the step's parameter and optimizer-state
  arguments, as the compiled program lays them out;
* ``grads``: the per-device bytes of the gradients at the stage's layout (replicated at
  stages 0 and 1, sharded from stage 2): a model, since gradients are temporaries inside the
  step and XLA reports temporaries as one figure;
* ``other``: the rest of the peak (activations, logits, collectives' buffers, the update's
  temporaries, and gradients beyond the model, e.g. when the CPU backend lowers a
  reduce-scatter as an all-reduce).

:func:`largest_fitting` answers the reverse question: the largest member that fits a budget,
per format and stage. ``optstate plan`` prints both, writes JSON and a plot.

The family's sizes are exact parameter counts (no compiling needed)::

    >>> from optstate.planning import FAMILY
    >>> {name: round(c.num_params / 1e9, 2) for name, c in FAMILY.items()}
    {'125M': 0.13, '350M': 0.37, '1.3B': 1.36, '7B': 6.74, '70B': 68.98}

and one configuration is planned with ``plan_family(["7B"], ["int8"], [3])``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from optstate.planning.family import FAMILY, DecoderConfig, resolve
from optstate.planning.zero import FORMATS, Setup, available_formats, plan_setup

__all__ = ["FAMILY", "FORMATS", "DecoderConfig", "Row", "available_formats", "largest_fitting",
           "plan_family", "resolve"]

GIB = 1 << 30


class Row(NamedTuple):
    """One planned configuration; every byte figure is per device."""

    size: str
    num_params: int
    fmt: str
    stage: int
    devices: int
    batch: int
    seq: int
    params: int
    grads: int
    state: int
    other: int
    peak: int
    compile_s: float

    def fits(self, budget_gib: float) -> bool:
        """Whether the peak is at most ``budget_gib`` GiB."""
        return self.peak <= budget_gib * GIB


def plan_family(sizes: Iterable[str] = tuple(FAMILY), formats: Sequence[str] = ("fp32", "int8"),
                stages: Iterable[int] = (0, 1, 2, 3), *, devices: int = 8,
                batch: int | None = None, seq: int = 2048, remat: bool = True,
                progress: Callable[[str], None] | None = None) -> list[Row]:
    """Plans every (size, format, stage) of the family on ``devices`` devices.

    Args:
      sizes: member names (``"125M"``, ``"350M"``, ``"1.3B"``, ``"7B"``, ``"70B"``).
      formats: state formats, from :data:`~optstate.planning.zero.FORMATS`.
      stages: ZeRO stages, 0 to 3.
      devices: data-parallel devices (on CPU, emulated with
        ``--xla_force_host_platform_device_count``, set before JAX starts).
      batch: global batch in sequences (default: one per device); a multiple of ``devices``.
      seq: tokens per sequence.
      remat: recompute each block's activations in the backward pass (``jax.checkpoint``).
      progress: called with a line before and after each compile.

    Returns:
      One :class:`Row` per configuration, sizes outermost, then formats, then stages.
    """
    configs = [resolve(s) for s in sizes]
    batch = devices if batch is None else batch
    todo = [(c, f, s) for c in configs for f in formats for s in stages]
    rows = []
    for i, (config, fmt, stage) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {config.name} {fmt} stage {stage}"
        if progress:
            progress(f"{label}: compiling ...")
        start = time.perf_counter()
        result, grads = plan_setup(Setup(config, fmt, stage, devices, batch, seq, remat))
        seconds = time.perf_counter() - start
        params, state = result.arguments[0], result.arguments[1]
        rows.append(Row(config.name, config.num_params, fmt, stage, devices, batch, seq,
                        params, grads, state, result.peak - params - state - grads,
                        result.peak, seconds))
        if progress:
            progress(f"{label}: peak {result.peak / GIB:.2f} GiB per device ({seconds:.1f} s)")
    return rows


def largest_fitting(rows: Iterable[Row], budget_gib: float) -> dict[tuple[str, int], str | None]:
    """``{(format, stage): the largest size whose peak fits budget_gib, or None}``.

    "Largest" is by parameter count, over the sizes present in ``rows``.
    """
    best: dict[tuple[str, int], Row | None] = {}
    for row in rows:
        key = (row.fmt, row.stage)
        best.setdefault(key, None)
        if row.fits(budget_gib) and (best[key] is None or row.num_params > best[key].num_params):
            best[key] = row
    return {k: (None if r is None else r.size) for k, r in best.items()}


