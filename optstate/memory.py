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
from optstate.quantization.policy import recording_roundings
from optstate.quantization.wrapper import recording_update_paths

__all__ = ["CompiledMemory", "Description", "LeafInfo", "compiled_memory", "describe", "format_name",
           "memory_of", "state_bytes"]
__all__ += ["StepPlan", "plan", "shard_bytes"]  # the planner (issue 17)

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
    (``"chunked"``: the bounded-memory loop; ``"whole: <why>"``: dequantized at once), and
    its ``rounding`` (``"nearest"``, ``"stochastic"``, ``"stochastic: running sum"`` for a
    stall-prone leaf rounded stochastically, ``"fp32: running sum"`` for one kept in float32;
    see ``quantize_state(stalling=...)``)."""

    path: str
    shape: tuple[int, ...]
    format: str
    bytes: int
    bytes_per_value: float
    step: str = ""
    rounding: str = ""


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
        roundings = any(r.rounding for r in self.rows)
        header = (("path", "shape", "format", "bytes", "bytes/value") + (("step",) * steps)
                  + (("rounding",) * roundings))
        body = [(r.path or "(root)", str(tuple(r.shape)), r.format, str(r.bytes),
                 f"{r.bytes_per_value:.3f}") + ((r.step,) * steps) + ((r.rounding,) * roundings)
                for r in self.rows]
        total = ("total", "", "", str(self.total_bytes),
                 "" if self.bytes_per_param is None
                 else f"{self.bytes_per_param:.3f} bytes/parameter") + (("",) * steps) + (
                     ("",) * roundings)
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
        ``quantize_state`` takes for it: ``"chunked"`` (bounded memory) or ``"whole: <why>"``,
        and its rounding (``"nearest"``, ``"stochastic"``, or for a stall-prone leaf
        ``"stochastic: running sum"``, ``"fp32: running sum"``, ...).

    Returns:
      A :class:`Description`; ``print(describe(state))`` prints the table.
    """
    steps, roundings = ({}, {}) if tx is None else _update_paths(tx, state, params)
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
                             nbytes / size if size else 0.0, _step_of(name, steps),
                             _step_of(name, roundings)))
    total = sum(r.bytes for r in rows)
    num_params = None
    per_param = None
    if params is not None:
        num_params = sum(math.prod(getattr(p, "shape", ())) for p in jax.tree.leaves(params))
        per_param = total / num_params if num_params else 0.0
    return Description(tuple(rows), total, num_params, per_param)


def _update_paths(tx: Any, state: Any, params: Any) -> tuple[dict[str, str], dict[str, str]]:
    """``{path inside a QuantizedState's inner state: step}`` and ``{...: rounding}`` from
    tracing ``tx.update``."""
    if params is None:
        raise ValueError("describe: tx= needs params= too (the update is traced with the "
                         "parameters as gradients); got params=None.")
    with recording_update_paths() as record, recording_roundings() as roundings:
        jax.eval_shape(lambda s, p: tx.update(p, s, p), state, params)
    return dict(record), dict(roundings)


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
    return memory_of(jitted.lower(*args, **kwargs).compile())


def memory_of(compiled: Any) -> CompiledMemory:
    """XLA's memory analysis of an already compiled function (``jax.jit(f).lower(...)
    .compile()``), which can then be run without compiling again."""
    analysis = compiled.memory_analysis()
    return CompiledMemory(
        arguments=int(analysis.argument_size_in_bytes),
        outputs=int(analysis.output_size_in_bytes),
        aliased=int(analysis.alias_size_in_bytes),
        temporaries=int(analysis.temp_size_in_bytes),
    )


# -- the planner: will a train step fit? -------------------------------------------------------


def shard_bytes(shape: Any, dtype: Any, sharding: Any = None) -> int:
    """Bytes of one device's shard of an array of ``shape`` and ``dtype`` laid out by
    ``sharding`` (the whole array when ``sharding`` is ``None``)."""
    shape = tuple(int(d) for d in shape)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    return math.prod(shape) * int(getattr(dtype, "itemsize", 0) or np.dtype(dtype).itemsize)


class StepPlan(NamedTuple):
    """What :func:`plan` found for one compiled step, in bytes per device.

    ``arguments``: per positional argument, the bytes of its shard on one device (from the
    compiled program's own input shardings); ``memory``: XLA's analysis
    (:class:`CompiledMemory`); ``peak``: ``memory.peak``, the step's footprint on a device.
    """

    arguments: tuple[int, ...]
    memory: CompiledMemory

    @property
    def peak(self) -> int:
        return self.memory.peak

    @property
    def other(self) -> int:
        """``peak`` less the arguments: temporaries and outputs not written in place."""
        return self.peak - sum(self.arguments)

    def fits(self, budget_bytes: float) -> bool:
        """Whether the peak is at most ``budget_bytes``."""
        return self.peak <= budget_bytes


def plan(step_fn: Any, *abstract_args: Any, donate_argnums: Any = (),
         compiler_options: dict[str, Any] | None = None, **jit_kwargs: Any) -> StepPlan:
    r"""Per-device memory of a train step, from XLA's analysis of the compiled program.

    The step is lowered and compiled for ``abstract_args`` (``jax.ShapeDtypeStruct`` values,
    with a ``sharding=`` where they are sharded; arrays work too) and nothing is executed or
    allocated, so a 70B-parameter step can be planned on a laptop. The peak on one device is

    .. math::

       \text{peak} = \text{arguments} + \text{outputs} - \text{aliased}
                     + \text{temporaries},

    as ``Compiled.memory_analysis()`` reports them (donated arguments are aliased to the
    outputs that reuse their buffers). With ``jax.jit``'s SPMD partitioning the compiled
    program is one device's, so every figure is per device.

    Example (the shapes alone; nothing is allocated)::

        >>> import jax, jax.numpy as jnp, optstate
        >>> tx = optstate.adamw(1e-3)
        >>> p = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
        >>> s = jax.eval_shape(tx.init, p)
        >>> def step(p, s, g):
        ...     u, s = tx.update(g, s, p)
        ...     return optstate.apply_updates(p, u), s
        >>> r = optstate.memory.plan(step, p, s, p, donate_argnums=(0, 1))
        >>> r.arguments  # params, state (mu, nu and a counter), gradients
        (4194304, 8388612, 4194304)
        >>> r.peak >= sum(r.arguments)
        True

    Args:
      step_fn: the step, a plain function (then jitted here with ``donate_argnums`` and
        ``jit_kwargs``, e.g. ``in_shardings``) or a ``jax.jit`` object (used as it is).
      *abstract_args: its positional arguments.
      donate_argnums: arguments whose buffers the step may reuse (parameters and state).
      compiler_options: XLA options for this compilation only; on CPU,
        ``{"xla_backend_optimization_level": 0}`` shortens code generation and leaves the
        memory analysis unchanged (code generation comes after buffer assignment).
      **jit_kwargs: more ``jax.jit`` options when ``step_fn`` is not jitted yet.

    Returns:
      A :class:`StepPlan`: per-argument bytes on one device, XLA's analysis and the peak.

    Raises:
      TypeError: ``step_fn`` is not callable.
    """
    if not callable(step_fn):
        raise TypeError(f"plan: step_fn must be a function or a jax.jit object, got "
                        f"{type(step_fn).__name__}.")
    jitted = step_fn if hasattr(step_fn, "lower") else jax.jit(
        step_fn, donate_argnums=donate_argnums, **jit_kwargs)
    compiled = jitted.lower(*abstract_args).compile(compiler_options=compiler_options)
    analysis = compiled.memory_analysis()
    memory = CompiledMemory(
        arguments=int(analysis.argument_size_in_bytes),
        outputs=int(analysis.output_size_in_bytes),
        aliased=int(analysis.alias_size_in_bytes),
        temporaries=int(analysis.temp_size_in_bytes),
    )
    in_shardings, _ = compiled.input_shardings
    per_argument = []
    for arg, shardings in zip(abstract_args, in_shardings):
        leaves = [x for x in jax.tree.leaves(arg) if hasattr(x, "shape")]
        placed = jax.tree.leaves(shardings)
        if len(placed) != len(leaves):
            # jit leaves unused arrays (e.g. the empty scales of bf16 state) out of the
            # program; such leaves count with their own sharding, if any
            placed = [getattr(x, "sharding", None) for x in leaves]
        per_argument.append(sum(shard_bytes(x.shape, x.dtype, s)
                                for x, s in zip(leaves, placed)))
    return StepPlan(tuple(per_argument), memory)
