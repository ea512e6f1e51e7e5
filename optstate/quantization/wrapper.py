"""``quantize_state``: store any transform's state in 8-bit, 4-bit, FP8 or BF16.

The wrapper keeps the inner transform's state with every large floating leaf replaced by a
:class:`~optstate.quantization.array.QuantizedArray` (codes plus per-block scales). Each step
dequantizes, runs the inner update and quantizes the new state again, but never holds the
whole state in float32 at once: when the inner update is elementwise per parameter (Adam,
AdamW, RMSProp, Adagrad, Adadelta, Lion, momentum, weight decay, schedules; decided by
reading its jaxpr, see :mod:`optstate.quantization.elementwise`), each large parameter's new state is
computed in chunks of whole blocks and stored in place, one parameter after another, and the
updates are left to XLA to fuse with their consumer; otherwise (global-norm clipping, LAMB,
Adafactor, a finiteness check inside) it falls back to dequantizing the whole state, which
is always correct.

How the step is arranged, and why (XLA on CPU, checked with its memory analysis):

* The update ``u`` of a chunked parameter comes from one call of the inner update on the
  whole tree: an elementwise function of gradients, parameters and dequantized codes, which
  XLA fuses into ``apply_updates`` (no float32 update or moment is materialized). Computing
  ``u`` inside the chunk loop instead would materialize a float32 array per parameter.
* The loop writes the new codes in place (the donated buffers) and reads the old ones from a
  copy, made in a ``cond`` so that XLA neither fuses it away nor sinks it into the loop, and
  after the previous parameter's loop so that one copy is alive at a time.
* FP8 and BF16 codes are kept as raw unsigned bits: XLA on CPU rewrites an in-place update
  of a BF16/FP8 array as converting the whole array at every iteration.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Collection, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optstate._core.base import GradientTransformation, with_extra_args_support
from optstate.quantization.block import (
    View,
    block_layout,
    check_format,
    codes_shape,
    dequantize_piece,
    quantize_array,
    quantize_piece,
)
from optstate.quantization.codebooks import uniform_from_counter
from optstate.quantization.elementwise import elementwise_owners
from optstate.quantization.array import QuantizedArray, dequantize, is_quantized

#: State field names whose leaves are non-negative (second moments and other accumulators of
#: squares), stored on an unsigned, zero-free grid. They match the NamedTuple fields of
#: optstate's and Optax's states: Adam/AdamW/AdaBelief/AMSGrad ``nu`` (and ``nu_max``),
#: RMSProp ``nu``, Adagrad ``sum_of_squares``, Adadelta ``e_g``/``e_x``, Adafactor
#: ``v_row``/``v_col``/``v``.
NONNEG_FIELDS: frozenset[str] = frozenset(
    {"nu", "nu_max", "sum_of_squares", "e_g", "e_x", "v_row", "v_col", "v", "grad_sqr_avg",
     "sum_of_squared_grads"})

ROUNDINGS = ("nearest", "stochastic")

#: Default ``chunk_elements`` per backend. On CPU a chunk's float32 values should stay in cache
#: and XLA runs a loop body's kernels one after another: 128K values per chunk. On GPU and TPU
#: each chunk costs kernel launches and a whole leaf streams at full bandwidth: 4M values, i.e.
#: whole leaves up to 4M elements, so that the temporaries are bounded by 4M float32 values
#: per state field (measured in ``bench/quantized.py``).
DEFAULT_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 17}
ACCELERATOR_CHUNK_ELEMENTS = 1 << 22


def default_chunk_elements(backend: str | None = None) -> int:
    """The ``chunk_elements`` that :func:`quantize_state` uses when given ``None``, for
    ``backend`` (default: ``jax.default_backend()``)."""
    backend = jax.default_backend() if backend is None else backend
    return DEFAULT_CHUNK_ELEMENTS.get(backend, ACCELERATOR_CHUNK_ELEMENTS)


#: Parameters with at least this many elements (or two chunks, if fewer) get their state
#: updated by the bounded-memory loop; smaller ones are updated in one piece.
MIN_LOOP_ELEMENTS = 1 << 16


class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`.

    ``inner_state``: the inner transform's state, large floating leaves replaced by
    :class:`~optstate.quantization.array.QuantizedArray`. ``key``: raw ``uint32`` PRNG key data
    (``jax.random.key_data``) for stochastic rounding, advanced once per step (unchanged with
    nearest rounding).
    """

    inner_state: Any
    key: jax.Array


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _is_boxed(x: Any) -> bool:
    """A Flax ``Variable`` (a pytree node boxing one value), detected without importing Flax."""
    return any(c.__name__ == "Variable" and c.__module__.startswith("flax")
               for c in type(x).__mro__)


def _is_leaf(x: Any) -> bool:
    return is_quantized(x) or _is_boxed(x)


def _unbox(x: Any) -> Any:
    if not _is_boxed(x):
        return x
    return x.get_value() if hasattr(x, "get_value") else x.value


def field_labels(tree: Any) -> list[str | None]:
    """For each leaf of ``tree`` (flattened with ``QuantizedArray`` and Flax variables as
    leaves), the name of
    the innermost NamedTuple field that holds it (e.g. ``"nu"`` for ``ScaleByAdamState.nu``,
    whatever the parameter tree below it looks like), or ``None``."""
    out: list[str | None] = []

    def visit(node: Any, field: str | None) -> None:
        if _is_leaf(node):
            out.append(field)
            return
        if _is_namedtuple(node):
            for name in node._fields:
                visit(getattr(node, name), name)
            return
        children = jax.tree_util.tree_flatten(
            node, is_leaf=lambda x: x is not node and (_is_namedtuple(x) or _is_leaf(x)))[0]
        if len(children) == 1 and children[0] is node:
            out.append(field)
            return
        for child in children:
            if _is_namedtuple(child) or _is_leaf(child):
                visit(child, field)
            else:
                out.append(field)

    visit(tree, None)
    return out


@dataclasses.dataclass(frozen=True)
class _Config:
    fmt: str
    block: int
    min_size: int
    rounding: str
    keep: tuple[str, ...]
    seed: int
    nonneg_fields: frozenset[str]
    chunk_elements: int | None  # None: chosen per backend at trace time


def _leaf_decision(cfg: _Config, path: str, field: str | None, leaf: Any) -> bool | None:
    """``None``: keep as is; else the ``nonneg`` flag of the quantized leaf."""
    if cfg.fmt == "fp32" or is_quantized(leaf):
        return None
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return None
    size = math.prod(shape)
    if not shape or size == 0 or size < cfg.min_size:
        return None
    if any(re.search(pattern, path) for pattern in cfg.keep):
        return None
    return field in cfg.nonneg_fields


def _seed_for(step_key: jax.Array, index: int) -> jax.Array:
    return jax.random.bits(jax.random.fold_in(step_key, index), (2,), jnp.uint32)


def _requantize(q: QuantizedArray, x: jax.Array, seed: jax.Array | None) -> QuantizedArray:
    """``x`` stored with ``q``'s format and layout."""
    new = quantize_array(x.astype(q.dtype), q.fmt, block_size=q.block_size or None,
                         nonneg=q.nonneg, key_data=seed)
    return dataclasses.replace(new, dtype=q.dtype)


# -- chunk geometry ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Chunking:
    """Row chunks of a leaf of ``shape``: the leaf is viewed as ``(n_outer, shape[axis], M)``
    (``M = prod(shape[axis+1:])``); a chunk is ``rows`` consecutive rows of one outer index.
    ``n_main`` full chunks per outer index, then one of ``rem`` rows if ``rem > 0``."""

    shape: tuple[int, ...]
    axis: int
    rows: int
    n_outer: int
    n_main: int
    rem: int

    @property
    def inner(self) -> int:
        return math.prod(self.shape[self.axis + 1:])

    def chunk_shape(self, rows: int) -> tuple[int, ...]:
        return (1,) * self.axis + (rows,) + self.shape[self.axis + 1:]


def _chunking(shape: tuple[int, ...], block: int, chunk_elements: int) -> _Chunking:
    lay = block_layout(shape, max(block, 1))
    ndim = len(shape)
    if lay.axis == -1:  # groups of g rows
        g, per_row = lay.group, math.prod(shape[1:])
        rows = max(g, (chunk_elements // (g * per_row)) * g)
        rows = min(rows, shape[0])
        return _Chunking(shape, 0, rows, 1, shape[0] // rows, shape[0] % rows)
    a = lay.axis
    k = next(k for k in range(ndim) if math.prod(shape[k + 1:]) <= chunk_elements or k == a)
    k = min(k, a)
    inner = math.prod(shape[k + 1:])
    if k < a:
        rows = max(1, chunk_elements // inner)
    else:
        step = block // math.gcd(inner, block) if block > 0 else 1
        rows = max(step, (chunk_elements // inner) // step * step)
    rows = min(rows, shape[k])
    return _Chunking(shape, k, rows, math.prod(shape[:k]), shape[k] // rows, shape[k] % rows)


@dataclasses.dataclass(frozen=True)
class _ArrayCut:
    """How one stored array (codes, scales or a plain leaf) is cut alike: viewed as
    ``(n_outer, total_rows, width)``; chunk ``j`` is rows ``[j * rows, j * rows + rows)`` and
    the remainder chunk has ``rem_rows`` rows."""

    view: tuple[int, int, int]
    rows: int
    rem_rows: int


def _plain_cut(ch: _Chunking) -> _ArrayCut:
    return _ArrayCut((ch.n_outer, ch.shape[ch.axis], ch.inner), ch.rows, ch.rem)


def _codes_cut(ch: _Chunking, q: QuantizedArray) -> _ArrayCut:
    if q.fmt != "int4":
        return _plain_cut(ch)
    last = ch.shape[-1]
    packed = -(-last // 2)
    if ch.axis < len(ch.shape) - 1:
        width = ch.inner // last * packed
        return _ArrayCut((ch.n_outer, ch.shape[ch.axis], width), ch.rows, ch.rem)
    # chunks along the last axis: rows is even (a multiple of the even block) or the whole row
    return _ArrayCut((ch.n_outer, packed, 1), -(-ch.rows // 2), -(-ch.rem // 2))


def _scales_cut(ch: _Chunking, q: QuantizedArray) -> _ArrayCut | None:
    if q.fmt == "bf16":
        return None
    lay = block_layout(q.shape, q.block_size)
    if lay.axis == -1:
        g = lay.group
        return _ArrayCut((1, lay.n_rows, 1), ch.rows // g, ch.rem // g)
    if ch.axis < lay.axis:
        width = math.prod(ch.shape[ch.axis + 1:lay.axis]) * lay.n_blocks
        return _ArrayCut((ch.n_outer, ch.shape[ch.axis], width), ch.rows, ch.rem)
    per_chunk = -(-ch.rows * ch.inner // q.block_size) if ch.n_main else 0
    rem_blocks = lay.n_blocks - ch.n_main * per_chunk
    return _ArrayCut((ch.n_outer, lay.n_blocks, 1), per_chunk, rem_blocks)


def _piece_view(ch: _Chunking, q: QuantizedArray, rows: int) -> View:
    lay = block_layout(q.shape, max(q.block_size, 1))
    n = rows * ch.inner
    if q.fmt == "bf16":
        return View(1, n, 0, n)
    if lay.axis == -1 or ch.axis < lay.axis:
        row_len = lay.row_len
    else:
        row_len = n
    pack_len = ch.shape[-1] if ch.axis < len(ch.shape) - 1 else rows
    return View(n // row_len, row_len, q.block_size, pack_len)


def _slice_rows(x3: jax.Array, outer: jax.Array, start: jax.Array, rows: int) -> jax.Array:
    return lax.dynamic_slice(x3, (outer, start, jnp.zeros_like(start)), (1, rows, x3.shape[2]))


def _update_rows(x3: jax.Array, piece: jax.Array, outer: jax.Array, start: jax.Array
                 ) -> jax.Array:
    return lax.dynamic_update_slice(x3, piece.reshape((1, -1, x3.shape[2])).astype(x3.dtype),
                                    (outer, start, jnp.zeros_like(start)))


def _placeholder(x: Any) -> Any:
    """An empty stand-in for a leaf another parameter's chunk does not read (same rank and
    dtype, first dimension 0); scalars are passed as they are."""
    shape = tuple(x.shape)
    if not shape:
        return x
    return jnp.zeros((0,) + shape[1:], x.dtype)


# -- explicit-sharding meshes ------------------------------------------------------------------


def _explicit_spec(x: Any) -> Any:
    """The ``PartitionSpec`` of ``x``'s type when ``x`` is typed on a mesh with an Explicit
    axis (``jax.sharding.AxisType.Explicit``), else ``None``."""
    try:
        sharding = getattr(jax.typeof(x), "sharding", None)
    except TypeError:
        return None
    mesh = getattr(sharding, "mesh", None)
    types = getattr(mesh, "axis_types", ())
    if not any(t == jax.sharding.AxisType.Explicit for t in types):
        return None
    return sharding.spec


def _run_in_auto_mode(fn: Any, args: tuple, out_specs: Any) -> Any:
    """``fn(*args)`` with the mesh's Explicit axes switched to Auto
    (``jax.sharding.auto_axes``), its outputs typed with ``out_specs``.

    Block quantization reshapes codes and scales (``(rows, n) -> (rows * n / B, B)``), which
    sharding-in-types rejects for sharded operands on Explicit axes; in Auto mode XLA's
    partitioner handles them (blocks never straddle a shard, so no data moves)."""
    return jax.sharding.auto_axes(fn, out_sharding=out_specs)(*args)


def _specs_like(tree: Any) -> Any:
    """``PartitionSpec`` of every array leaf of ``tree`` (replicated where untyped)."""
    from jax.sharding import PartitionSpec

    def spec(x):
        s = _explicit_spec(x)
        return PartitionSpec() if s is None else s

    return jax.tree.map(spec, tree)


def _any_explicit(*trees: Any) -> bool:
    return any(_explicit_spec(x) is not None for t in trees for x in jax.tree.leaves(t))


# -- the transform ----------------------------------------------------------------------------


def quantize_state(inner: GradientTransformation, fmt: str = "int8", *,
                   block_size: int | None = None, min_size: int = 4096,
                   rounding: str = "nearest", keep: str | Sequence[str] = (), seed: int = 0,
                   nonneg_fields: Collection[str] | None = None,
                   chunk_elements: int | None = None) -> GradientTransformation:
    r"""Stores the state of ``inner`` block-wise in 8-bit, 4-bit, FP8 or BF16.

    For every floating state leaf ``x`` with at least ``min_size`` elements, the wrapper keeps
    codes and one fp32 scale per block of ``B`` values (blocks along the trailing axes):

    .. math::

       s_b = \max_{i \in b} |x_i|, \qquad c_i = Q(x_i / s_b), \qquad
       \hat x_i = \mathrm{decode}(c_i)\, s_b ,

    with ``Q`` rounding to the nearest code value, or stochastically
    (:math:`P(\text{up}) = (y - v_{lo}) / (v_{hi} - v_{lo})`, so
    :math:`E[\hat x] = x`). Each step computes
    :math:`(u', S') = \mathrm{inner.update}(g, \hat S, p)` and stores :math:`Q(S')`. The
    update ``u'`` is computed from the float32 state, before it is stored.

    Formats: ``"int8"`` — the dynamic (exponent + linear fraction) map of Dettmers et al.,
    "8-bit Optimizers via Block-wise Quantization" (ICLR 2022), block 256, signed for signed
    state, unsigned and zero-free for non-negative state; ``"int4"`` — block 128, a 4-bit
    signed dynamic map and, for non-negative state, the zero-free linear grid
    :math:`(i+1)/16` (Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States",
    NeurIPS 2023); ``"fp8_e4m3"`` / ``"fp8_e5m2"`` — block-scaled FP8 (block 256, the block
    maximum mapped to 256 / 32768); ``"bf16"`` — a plain cast; ``"fp32"`` — unchanged.

    Non-negative state — leaves under a NamedTuple field named in ``nonneg_fields`` (default
    :data:`NONNEG_FIELDS`: ``nu``, ``sum_of_squares``, ``e_g``, ``e_x``, ``v_row``, ``v_col``,
    ``v``, ...), for optstate's and Optax's states alike — is stored on a grid without zero,
    so a positive second moment never dequantizes to zero.

    Peak memory: when ``inner``'s update is elementwise per parameter (checked on its
    jaxpr: Adam, AdamW, RMSProp, Adagrad, Adadelta, Lion, momentum, weight decay, schedules,
    ``inject_hyperparams``), the updates are computed from the dequantized codes inside
    whatever consumes them (XLA fuses dequantization, the update rule and ``apply_updates``
    into one pass), and the new state of each parameter is computed and stored in place in a
    loop over chunks of about ``chunk_elements`` values (whole blocks), one parameter after
    another, reading a copy of that parameter's old codes. The temporaries are one
    parameter's old codes plus a chunk's float32 values (about 0.5 bytes per parameter on CPU for
    8 leaves of 1024x1024 with int8). Otherwise (global-norm clipping, LAMB, Adafactor, a
    finiteness check inside) the whole state is dequantized for the step, which is correct
    for any transform. Wrap ``apply_if_finite`` around ``quantize_state`` rather than inside
    it to keep the bounded path.

    Args:
      inner: any gradient transformation (optstate's or Optax's).
      fmt: ``"int8"``, ``"int4"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"bf16"`` or ``"fp32"``.
      block_size: values per block (default 256; 128 for ``int4``).
      min_size: leaves with fewer elements stay as they are (as do integer leaves, scalars
        and empty leaves). The decision depends only on a leaf's global shape.
      rounding: ``"nearest"`` or ``"stochastic"`` (randomness from a key kept in the state:
        the same ``seed`` gives bit-identical runs).
      keep: regular expressions; state leaves whose path (``jax.tree_util.keystr`` within the
        inner state, e.g. ``"[0].mu['embed']"``) matches one (``re.search``) stay as they are.
      seed: seed of the stochastic-rounding key.
      nonneg_fields: override of :data:`NONNEG_FIELDS`.
      chunk_elements: about how many values one chunk holds (bounds the step's temporaries).
        Default ``None``: 128K on CPU, 4M on GPU and TPU (:func:`default_chunk_elements`).
        The chunk size changes results only by float32 rounding (XLA fuses each arrangement
        differently); a given size and backend are bit-reproducible. Parameters with fewer than
        ``min(2 * chunk_elements, 65536)`` elements are updated in one piece.

    Returns:
      A :class:`~optstate.GradientTransformation` whose state is :class:`QuantizedState`.

    Raises:
      ValueError: unknown ``fmt`` or ``rounding``, or a bad ``block_size`` (the message lists
        what is accepted).
    """
    block = check_format(fmt, block_size)
    if rounding not in ROUNDINGS:
        raise ValueError(f"quantize_state: unknown rounding {rounding!r}; expected one of "
                         f"{list(ROUNDINGS)}.")
    if isinstance(keep, str):
        keep = (keep,)
    keep = tuple(keep)
    for pattern in keep:
        re.compile(pattern)
    if not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"quantize_state: min_size must be a non-negative integer; got "
                         f"{min_size!r}.")
    if chunk_elements is not None and (not isinstance(chunk_elements, (int, np.integer))
                                       or chunk_elements < 1):
        raise ValueError(f"quantize_state: chunk_elements must be a positive integer; got "
                         f"{chunk_elements!r}.")
    chunk = None if chunk_elements is None else max(int(chunk_elements), 2 * max(block, 1))
    config = _Config(fmt, block, int(min_size), rounding, keep, int(seed),
                     frozenset(NONNEG_FIELDS if nonneg_fields is None else nonneg_fields), chunk)
    inner = with_extra_args_support(inner)

    def init(params):
        inner_state = inner.init(params)
        flat, treedef = jax.tree_util.tree_flatten_with_path(inner_state, is_leaf=_is_leaf)
        fields = field_labels(inner_state)
        leaves = []
        for (path, leaf), field in zip(flat, fields):
            value = _unbox(leaf)
            nonneg = _leaf_decision(config, jax.tree_util.keystr(path), field, value)
            if nonneg is None:
                leaves.append(leaf)
            else:
                # A boxed leaf (a Flax ``Variable``, as ``nnx.Optimizer`` passes parameters) is
                # replaced by the quantized array, which Flax then handles as a pytree node.
                leaves.append(_quantize_leaf(value, fmt, block, nonneg))
        key = jax.random.key_data(jax.random.key(config.seed))
        return QuantizedState(jax.tree_util.tree_unflatten(treedef, leaves), key)

    def update(updates, state, params=None, **extra_args):
        if not isinstance(state, QuantizedState):
            raise ValueError(f"quantize_state: expected a QuantizedState (from this "
                             f"transform's init); got {type(state).__name__}.")
        if _any_explicit(updates, state, params):
            # Same structure in and out: the new state keeps the old state's specs and the
            # updates the gradients' specs.
            out_specs = (_specs_like(updates), _specs_like(state))
            return _run_in_auto_mode(
                lambda u, s, p: _update(u, s, p, **extra_args), (updates, state, params),
                out_specs)
        return _update(updates, state, params, **extra_args)

    def _update(updates, state, params=None, **extra_args):
        cfg = _with_chunk_elements(config)
        s_leaves, s_def = jax.tree.flatten(state.inner_state, is_leaf=is_quantized)
        if cfg.rounding == "stochastic":
            key = jax.random.wrap_key_data(state.key)
            next_key, step_key = jax.random.split(key)
            new_key = jax.random.key_data(next_key)
        else:
            step_key, new_key = None, state.key
        seeds = [None if step_key is None or not is_quantized(x) else _seed_for(step_key, i)
                 for i, x in enumerate(s_leaves)]

        abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in s_leaves]
        owners = None
        if any(is_quantized(x) for x in s_leaves):
            owners = elementwise_owners(
                inner.update, updates, s_def.unflatten(abstract), params, extra_args)
        chunked = _chunked_leaves(cfg, s_leaves, owners, updates)
        if not chunked:
            new_updates, new_leaves = _whole_step(inner, updates, s_leaves, s_def, params,
                                                  extra_args, seeds)
        else:
            new_updates, new_leaves = _chunked_step(cfg, inner, updates, s_leaves, s_def,
                                                    params, extra_args, seeds, chunked)
        return new_updates, QuantizedState(s_def.unflatten(new_leaves), new_key)

    return GradientTransformation(init, update)


def _with_chunk_elements(cfg: _Config) -> _Config:
    """``cfg`` with ``chunk_elements`` resolved for the backend being traced for."""
    if cfg.chunk_elements is not None:
        return cfg
    chunk = max(default_chunk_elements(), 2 * max(cfg.block, 1))
    return dataclasses.replace(cfg, chunk_elements=chunk)


def _quantize_leaf(value: Any, fmt: str, block: int, nonneg: bool) -> QuantizedArray:
    """``quantize_array`` of a freshly initialized state leaf; on an Explicit mesh, in Auto
    mode with the codes typed like the leaf (the last axis unsplit for packed ``int4``) and
    the scales replicated (``init``'s ``out_shardings`` places them)."""
    spec = _explicit_spec(value)
    if spec is None:
        return quantize_array(value, fmt, block_size=block or None, nonneg=nonneg)
    from jax.sharding import PartitionSpec

    entries = tuple(spec) + (None,) * (len(value.shape) - len(tuple(spec)))
    if fmt == "int4":
        entries = entries[:-1] + (None,)
    abstract = jax.eval_shape(
        lambda v: quantize_array(v, fmt, block_size=block or None, nonneg=nonneg), value)
    out = dataclasses.replace(abstract, codes=PartitionSpec(*entries), scales=PartitionSpec())
    return _run_in_auto_mode(
        lambda v: quantize_array(v, fmt, block_size=block or None, nonneg=nonneg), (value,),
        out)


def _chunked_leaves(cfg: _Config, s_leaves: list[Any], owners: list[int | None] | None,
                    updates: Any) -> dict[int, list[int]]:
    """Parameter index -> its state leaves, for the parameters processed in chunks."""
    if owners is None:
        return {}
    u_leaves = jax.tree.leaves(updates)
    members: dict[int, list[int]] = {}
    for s, k in enumerate(owners):
        if k is not None:
            members.setdefault(k, []).append(s)
    out = {}
    for k, ss in members.items():
        qs = [s_leaves[s] for s in ss if is_quantized(s_leaves[s])]
        if not qs:
            continue
        if math.prod(u_leaves[k].shape) < min(2 * cfg.chunk_elements, MIN_LOOP_ELEMENTS):
            continue
        if len({(q.fmt, q.block_size) for q in qs}) != 1:
            continue
        out[k] = ss
    return out


def _whole_step(inner, updates, s_leaves, s_def, params, extra_args, seeds):
    """Dequantize everything, update, quantize everything (any inner transform)."""
    full = [dequantize(x) if is_quantized(x) else x for x in s_leaves]
    new_updates, new_state = inner.update(updates, s_def.unflatten(full), params, **extra_args)
    new_flat = s_def.flatten_up_to(new_state)
    out = []
    for old, new, seed in zip(s_leaves, new_flat, seeds):
        out.append(_requantize(old, new, seed) if is_quantized(old) else new)
    return new_updates, out


def _chunked_step(cfg, inner, updates, s_leaves, s_def, params, extra_args, seeds, chunked):
    """The bounded-memory step for an inner update that is elementwise per parameter."""
    u_leaves, u_def = jax.tree.flatten(updates)
    p_leaves = None if params is None else jax.tree.flatten(params)[0]
    p_def = None if params is None else jax.tree.structure(params)
    chunked_state = {s for ss in chunked.values() for s in ss}

    # 1. The new state of each chunked parameter, in row chunks of whole blocks, stored in
    #    place, one parameter after the other; each loop also hands back the copy of the old
    #    stored state it read from.
    read_leaves = list(s_leaves)
    dependency = None
    loops = []
    for k in sorted(chunked):
        members, old = _chunk_loop(cfg, inner, k, chunked[k], u_leaves, u_def, p_leaves,
                                   p_def, s_leaves, s_def, extra_args, seeds, dependency)
        loops.append(members)
        for s, value in old.items():
            read_leaves[s] = value
        first = members[chunked[k][0]]
        dependency = first.codes if is_quantized(first) else first

    # 2. One call of the inner update on the whole tree, on the old state, gives every update
    #    and the new state of everything not processed in chunks (scalars, small leaves,
    #    unrelated state). The chunked parameters' new state from this call is dropped (never
    #    computed), and their updates are elementwise functions of the gradients, parameters
    #    and dequantized codes, which XLA fuses into whatever consumes them
    #    (``apply_updates``): no float32 copy of their state or update is kept.
    u_rest = list(u_leaves)
    p_rest = None if p_leaves is None else list(p_leaves)
    s_rest = [dequantize(x) if is_quantized(x) else x for x in read_leaves]
    new_u_rest, new_s_rest = inner.update(
        u_def.unflatten(u_rest), s_def.unflatten(s_rest),
        None if p_def is None else p_def.unflatten(p_rest), **extra_args)
    new_u = list(jax.tree.leaves(new_u_rest))
    new_s = list(s_def.flatten_up_to(new_s_rest))
    for s, x in enumerate(s_leaves):
        if s not in chunked_state and is_quantized(x):
            new_s[s] = _requantize(x, new_s[s], seeds[s])

    for members in loops:
        for s, value in members.items():
            new_s[s] = value
    return u_def.unflatten(new_u), new_s


def _zero_from(arrays: Sequence[jax.Array]) -> jax.Array:
    """A ``uint32`` zero computed from the first element of each array (so that whatever uses
    it runs after those arrays are computed); ``min(bits, 0)`` of unsigned bits is always 0 but
    is not folded by the compiler."""
    zero = jnp.zeros((), jnp.uint32)
    for a in arrays:
        first = lax.slice(a.reshape(-1), (0,), (1,)).reshape(())
        nbits = jnp.dtype(first.dtype).itemsize * 8
        bits = lax.bitcast_convert_type(first, jnp.dtype(f"uint{nbits}"))
        zero = zero | jnp.minimum(bits, 0).astype(jnp.uint32)
    return zero


def _plus_zero(x: jax.Array, zero: jax.Array) -> jax.Array:
    """``x`` with a data dependency on ``zero`` (a ``uint32`` zero); bit-exact."""
    nbits = jnp.dtype(x.dtype).itemsize * 8
    utype = jnp.dtype(f"uint{nbits}")
    bits = lax.bitcast_convert_type(x, utype) | zero.astype(utype)
    return lax.bitcast_convert_type(bits, x.dtype)


def _copy_after(x: jax.Array, zero: jax.Array | None) -> jax.Array:
    """A materialized copy of ``x``, computed once ``zero`` (a ``uint32`` zero from
    :func:`_zero_from`) exists (bit-exact)."""
    if zero is None:
        zero = jnp.zeros((), jnp.uint32)
    # Inside a conditional (always taken) so that the compiler neither fuses the copy into
    # its readers nor sinks it into the loop that overwrites ``x``.
    return lax.cond(zero == 0, lambda a: _plus_zero(a, zero), lambda a: a + a, jnp.asarray(x))


def _chunk_loop(cfg, inner, k, members, u_leaves, u_def, p_leaves, p_def, s_leaves, s_def,
                extra_args, seeds, dependency):
    """Runs ``inner.update`` on row chunks of parameter ``k`` and its state ``members``.

    Every other parameter and non-scalar state leaf is passed as an empty placeholder (the
    analysis showed the chunk's outputs do not depend on them); scalars are passed as they are.
    Returns the new values of ``k``'s state leaves (its updates come from the whole-tree
    call) and a copy of their old values (written by the loop as it reads them).
    """
    shape = tuple(u_leaves[k].shape)
    qs = [s_leaves[s] for s in members if is_quantized(s_leaves[s])]
    ch = _chunking(shape, qs[0].block_size, cfg.chunk_elements)
    plain = _plain_cut(ch)

    # The stored arrays of the members, carried through the loop and cut alike.
    arrays0: list[jax.Array] = []
    cuts: list[_ArrayCut] = []
    slots: dict[int, tuple[int, ...]] = {}
    for s in members:
        x = s_leaves[s]
        if is_quantized(x):
            cut = _codes_cut(ch, x)
            idx = [len(arrays0)]
            arrays0.append(jnp.asarray(x.codes).reshape(cut.view))
            cuts.append(cut)
            scut = _scales_cut(ch, x)
            if scut is not None:
                idx.append(len(arrays0))
                arrays0.append(jnp.asarray(x.scales).reshape(scut.view))
                cuts.append(scut)
            slots[s] = tuple(idx)
        else:
            slots[s] = (len(arrays0),)
            arrays0.append(jnp.asarray(x).reshape(plain.view))
            cuts.append(plain)
    # The loop reads the old stored state from a copy and writes the new one in place; the
    # whole-tree call reads the same copy. The copy is made after the previous parameter's
    # loop (one parameter after the other), so only about one parameter's copy is alive.
    n_stored = len(arrays0)
    zero = None if dependency is None else _zero_from([dependency])
    old = [_copy_after(a, zero) for a in arrays0]
    grads3 = jnp.asarray(u_leaves[k]).reshape(plain.view)
    params3 = None if p_leaves is None else jnp.asarray(p_leaves[k]).reshape(plain.view)
    u_place = [_placeholder(x) for x in u_leaves]
    p_place = None if p_leaves is None else [_placeholder(x) for x in p_leaves]
    s_place = [x if len(x.shape) == 0 else _placeholder(jax.ShapeDtypeStruct(x.shape, x.dtype))
               for x in s_leaves]

    def one_chunk(outer, start, rows, remainder, arrays):
        arrays = list(arrays)
        cshape = ch.chunk_shape(rows)
        j = start // ch.rows  # chunk index within the outer index (n_main for the remainder)

        def rows_of(i):
            return cuts[i].rem_rows if remainder else cuts[i].rows

        def start_of(i):
            return start if cuts[i].rows == ch.rows else j * cuts[i].rows

        u_in = list(u_place)
        u_in[k] = _slice_rows(grads3, outer, start, rows).reshape(cshape)
        p_in = None
        if p_place is not None:
            p_in = list(p_place)
            p_in[k] = _slice_rows(params3, outer, start, rows).reshape(cshape)
        # Reads come from the copy, writes go to the carried arrays (never read in the loop),
        # so XLA updates them in place.
        reads = [_slice_rows(old[i], outer, start_of(i), rows_of(i)) for i in range(n_stored)]
        s_in = list(s_place)
        for s in members:
            x, idx = s_leaves[s], slots[s]
            if is_quantized(x):
                scales = reads[idx[1]] if len(idx) > 1 else jnp.zeros((0,), jnp.float32)
                value = dequantize_piece(reads[idx[0]], scales, x.fmt, _piece_view(ch, x, rows),
                                         x.nonneg)
                s_in[s] = value.reshape(cshape).astype(x.dtype)
            else:
                s_in[s] = reads[idx[0]].reshape(cshape)
        new_u_tree, new_s_tree = inner.update(
            u_def.unflatten(u_in), s_def.unflatten(s_in),
            None if p_def is None else p_def.unflatten(p_in), **extra_args)
        del new_u_tree  # this chunk's update is not needed (computed in the whole-tree call)
        new_s_flat = s_def.flatten_up_to(new_s_tree)
        offset = (outer * ch.shape[ch.axis] + start) * ch.inner
        writes: list[Any] = [None] * n_stored
        for s in members:
            x, idx = s_leaves[s], slots[s]
            value = new_s_flat[s]
            if is_quantized(x):
                u = None
                if seeds[s] is not None:
                    u = uniform_from_counter(seeds[s], cshape, offset)
                codes, scales = quantize_piece(value.astype(x.dtype).astype(jnp.float32),
                                               x.fmt, _piece_view(ch, x, rows), x.nonneg, u)
                writes[idx[0]] = codes
                if len(idx) > 1:
                    writes[idx[1]] = scales
            else:
                writes[idx[0]] = value
        for i in range(n_stored):
            arrays[i] = _update_rows(arrays[i], writes[i], outer, start_of(i))
        return arrays

    carry = arrays0
    if ch.n_main:
        def body(i, carry):
            outer = i // ch.n_main
            start = (i % ch.n_main) * ch.rows
            return one_chunk(outer, start, ch.rows, False, carry)

        carry = lax.fori_loop(0, ch.n_outer * ch.n_main, body, carry)
    if ch.rem:
        def rem_body(outer, carry):
            start = jnp.asarray(ch.n_main * ch.rows, jnp.int32)
            return one_chunk(outer, start, ch.rem, True, carry)

        carry = lax.fori_loop(0, ch.n_outer, rem_body, carry)

    def rebuild(arrays):
        out: dict[int, Any] = {}
        for s in members:
            x, idx = s_leaves[s], slots[s]
            if is_quantized(x):
                codes = arrays[idx[0]].reshape(codes_shape(x.fmt, x.shape))
                scales = (arrays[idx[1]].reshape(jnp.shape(x.scales)) if len(idx) > 1
                          else jnp.asarray(x.scales))
                out[s] = dataclasses.replace(x, codes=codes, scales=scales)
            else:
                out[s] = arrays[idx[0]].reshape(x.shape)
        return out

    return rebuild(carry), rebuild(old)
