"""Timing shared by the benchmarks and the ``optstate`` command line.

Timing interleaves the candidates in one process so that machine noise hits them alike.
(Peak memory comes from XLA's analysis of the compiled step: :mod:`optstate.memory`.)
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def time_interleaved(
    steps: dict[str, Callable[[], Any]], *, repeats: int = 20, warmup: int = 2
) -> dict[str, list[float]]:
    """Times each zero-argument callable ``repeats`` times, round-robin, in seconds.

    Each callable runs one step (and should block on its result, e.g. with
    ``jax.block_until_ready``). Returns the list of timings per name.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            timings[name].append(time.perf_counter() - start)
    return timings


def median_ratio(timings: dict[str, list[float]], name: str, reference: str) -> float:
    """``median(timings[name]) / median(timings[reference])``."""
    return statistics.median(timings[name]) / statistics.median(timings[reference])
