"""Measurement utilities shared by the benchmarks and the ``optstate`` command line.

Peak memory is XLA's own compiled memory analysis of a jitted (and typically donated)
function: ``arguments + outputs - aliased + temporaries``. Timing interleaves the candidates
in one process so that machine noise hits them alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, NamedTuple

import jax


class CompiledMemory(NamedTuple):
    """Bytes reported by ``Compiled.memory_analysis()``; ``peak`` is the step's footprint."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compiled_memory(jitted: Any, *args: Any, **kwargs: Any) -> CompiledMemory:
    """Compiles ``jitted`` (a ``jax.jit`` object) for ``args`` and returns XLA's analysis.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s; nothing is executed.
    """
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return CompiledMemory(
        arguments=int(analysis.argument_size_in_bytes),
        outputs=int(analysis.output_size_in_bytes),
        aliased=int(analysis.alias_size_in_bytes),
        temporaries=int(analysis.temp_size_in_bytes),
    )


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


def block(tree: Any) -> Any:
    """``jax.block_until_ready`` on a tree, returned for chaining."""
    return jax.block_until_ready(tree)
