"""What an optimizer state holds: per leaf path, shape, storage format, bytes, bytes per value.

``state_bytes(state)`` is the number of bytes the state's arrays occupy (a quantized leaf's
codes plus its scales). ``describe(state)`` returns a :class:`Description` whose ``str`` is a
table, one row per logical leaf, and a total::

    >>> print(optstate.memory.describe(state, params=params))
    path                      shape        format   bytes      bytes/value
    .inner_state[0].count     ()           int32    4          4.000
    .inner_state[0].mu['w']   (1024, 1024) int8     1064960    1.016
    ...
    total                                           2129932    2.031 bytes/parameter

Works on arrays and on ``jax.ShapeDtypeStruct`` trees (e.g. ``jax.eval_shape(tx.init, p)``),
so the memory of a configuration can be read without allocating it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

from optstate.quantization.array import is_quantized
from optstate.quantization.formats import dtype_format_name
from optstate.quantization.wrapper import recording_update_paths

__all__ = ["CompiledMemory", "Description", "LeafInfo", "compiled_memory", "describe", "format_name",
           "state_bytes"]

def format_name(leaf: Any) -> str:
    """The storage format of a leaf: a quantized leaf's ``fmt`` (``"int8"``, ``"int4"``,
    ``"fp8_e4m3"``, ...), else its dtype (``"fp32"``, ``"bf16"``, ``"int32"``, ...)."""
    if is_quantized(leaf):
        return leaf.fmt
    return dtype_format_name(leaf.dtype)


def _array_bytes(x: Any) -> int:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return math.prod(shape) * np.dtype(dtype).itemsize


def _leaf_bytes(leaf: Any) -> int:
    if is_quantized(leaf):
        return sum(_array_bytes(child) for child in jax.tree.leaves(leaf))
    return _array_bytes(leaf)


def state_bytes(state: Any) -> int:
    """Bytes occupied by the arrays of ``state``: ``sum(prod(shape) * itemsize)`` over its
    array leaves (so a quantized leaf counts its codes plus its scales)."""
    return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(state, is_leaf=is_quantized))


class LeafInfo(NamedTuple):
    """One row of :func:`describe`: ``path`` (``jax.tree_util.keystr``), logical ``shape``,
    storage ``format``, stored ``bytes``, ``bytes_per_value`` (bytes / logical elements) and,
    when ``describe`` was given the transform, the ``step`` a quantized leaf's update takes
    (``"chunked"``: the bounded-memory loop; ``"whole: <why>"``: dequantized at once)."""

    path: str
    shape: tuple[int, ...]
    format: str
    bytes: int
    bytes_per_value: float
    step: str = ""


class Description(NamedTuple):
    """The result of :func:`describe`: ``rows`` (one :class:`LeafInfo` per logical leaf),
    ``total_bytes``, ``num_params`` (``None`` unless ``params`` was given) and
    ``bytes_per_param`` (``total_bytes / num_params``, or ``None``). ``str()`` is a table."""

    rows: tuple[LeafInfo, ...]
    total_bytes: int
    num_params: int | None
    bytes_per_param: float | None

    def __str__(self) -> str:
        steps = any(r.step for r in self.rows)
        header = ("path", "shape", "format", "bytes", "bytes/value") + (("step",) * steps)
        body = [(r.path or "(root)", str(tuple(r.shape)), r.format, str(r.bytes),
                 f"{r.bytes_per_value:.3f}") + ((r.step,) * steps) for r in self.rows]
        total = ("total", "", "", str(self.total_bytes),
                 "" if self.bytes_per_param is None
                 else f"{self.bytes_per_param:.3f} bytes/parameter") + (("",) * steps)
        widths = [max(len(row[i]) for row in [header, *body, total]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in [header, *body, total]]
        return "\n".join(lines)


def describe(state: Any, params: Any = None, *, tx: Any = None) -> Description:
    """Per-leaf table of ``state``: path, shape, format, bytes, bytes per value, and the total.

    Args:
      state: an optimizer state (arrays or ``jax.ShapeDtypeStruct``s), quantized or not.
      params: optional parameters; when given, the total also shows bytes per parameter
        (``total_bytes / number of parameter elements``).
      tx: optionally the transform whose state this is (needs ``params``). Its update is
        traced once on abstract values (nothing runs) to show, per quantized leaf, the step
        ``quantize_state`` takes for it: ``"chunked"`` (bounded memory) or ``"whole: <why>"``.

    Returns:
      A :class:`Description`; ``print(describe(state))`` prints the table.
    """
    steps = {} if tx is None else _update_paths(tx, state, params)
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_quantized)
    rows = []
    for path, leaf in flat:
        if not hasattr(leaf, "shape"):
            continue
        shape = tuple(int(d) for d in leaf.shape)
        nbytes = _leaf_bytes(leaf)
        size = math.prod(shape)
        name = jax.tree_util.keystr(path)
        rows.append(LeafInfo(name, shape, format_name(leaf), nbytes,
                             nbytes / size if size else 0.0, _step_of(name, steps)))
    total = sum(r.bytes for r in rows)
    num_params = None
    per_param = None
    if params is not None:
        num_params = sum(math.prod(getattr(p, "shape", ())) for p in jax.tree.leaves(params))
        per_param = total / num_params if num_params else 0.0
    return Description(tuple(rows), total, num_params, per_param)


def _update_paths(tx: Any, state: Any, params: Any) -> dict[str, str]:
    """``{path inside a QuantizedState's inner state: step}`` from tracing ``tx.update``."""
    if params is None:
        raise ValueError("describe: tx= needs params= too (the update is traced with the "
                         "parameters as gradients); got params=None.")
    with recording_update_paths() as record:
        jax.eval_shape(lambda s, p: tx.update(p, s, p), state, params)
    return dict(record)


def _step_of(path: str, steps: dict[str, str]) -> str:
    for inner_path, step in steps.items():
        if path.endswith(".inner_state" + inner_path):
            return step
    return ""


# -- step memory: XLA's analysis of a compiled step --------------------------------------------


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
