r"""The fused Pallas kernel of ``quantize_state``: one pass over one parameter's state.

For a parameter whose inner update is elementwise (:mod:`optstate.quantization.elementwise`),
one ``pallas_call`` per parameter reads, tile by tile, the gradient, the parameter (when the
rule reads it), the codes and scales of the parameter's state leaves, and writes the new codes
and scales in place (``input_output_aliases``) plus the update, or with ``apply=True`` the new
parameter (``p + u`` in the parameter's dtype, in place). Per tile it computes

.. math::

   \hat S = \mathrm{decode}(c)\, s, \qquad (u, S') = \mathrm{inner.update}(g, \hat S, p),
   \qquad (c', s') = \mathrm{encode}(S'),

calling the inner transform's own update on the tile, so Optax's transforms take the kernel
too. Tiles hold whole blocks: a tile is ``tile_rows`` rows of one block each of the leaf's 2-D
block view (:func:`optstate.quantization.block.block_layout`), so a block's maximum is a
reduction inside the tile (the reduce-then-broadcast pattern XLA's GPU fusion does not make
into one pass). The tile codecs (:mod:`optstate.quantization.tile_codecs`) mirror
:mod:`optstate.quantization.codecs` operation for operation, and the inner update's scalar
work runs once outside the kernel (:mod:`optstate.quantization.tile_program`); the tests check
codes, scales and updates against the XLA path.

Backends (selected explicitly: JAX 0.10's Pallas defaults to Mosaic GPU on GPU, which has no
gathers): ``"triton"`` (GPU; code books are read with ``table_ref[index]`` gathers from
power-of-two tables), ``"mosaic"`` (TPU; Mosaic lowers no general gather, so int8 and int4
code books are computed by arithmetic and comparisons instead,
:class:`~optstate.quantization.tile_codecs.ArithmeticBook`, equal to the tables bit for bit),
``"interpret"`` (any backend, for tests on CPU; tables, as Triton).

Stochastic rounding draws element ``n`` (row-major index in the leaf) of the same
counter-based stream as the XLA path (:mod:`optstate.quantization.randomness`), so both round
a value alike.

References: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from optstate._core import _compat
from optstate.quantization import codebooks
from optstate.quantization.array import is_quantized
from optstate.quantization.block import block_layout
from optstate.quantization.codecs import CodebookCodec
from optstate.quantization.formats import StorageFormat
from optstate.quantization.tile_codecs import (
    ArithmeticBook,
    Book,
    decode,
    encode,
    pow2_ceil,
    tables_of,
    uniform_at,
)
from optstate.quantization.tile_program import Program

BACKENDS = ("triton", "mosaic", "interpret")

#: Values per tile the kernel aims at (a power of two): large enough to amortize the per-tile
#: work on GPU, small enough that a tile of every operand fits in registers / VMEM.
TILE_ELEMENTS = 1 << 13

_UNBLOCKED_WIDTH = 1024  # tile width of a format without blocks (BF16)

#: Primitives a backend's Pallas lowering lacks (JAX 0.10): an inner update that binds one on
#: its tiles takes the XLA path, with the reason shown by ``describe``, instead of failing
#: when the step compiles.
UNLOWERED: dict[str, frozenset[str]] = {
    "triton": frozenset({"reduce_precision", "round"}),
    "mosaic": frozenset({"reduce_precision"}),
}

#: Backends whose tiles compute code books by arithmetic (:class:`ArithmeticBook`, no gathers)
#: instead of reading their tables: Mosaic TPU lowers no general gather.
ARITHMETIC_BOOK_BACKENDS = ("mosaic",)


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


# -- geometry -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a leaf of ``shape`` is tiled.

    The leaf is viewed as ``rows x row_len`` values (a free row-major reshape); scales as
    ``rows x n_blocks``. The grid is ``(cdiv(rows, tile_rows), n_blocks)``; tile ``(i, j)``
    holds rows ``i * tile_rows ...`` and columns ``j * block ... + width`` (``width >= block``,
    a power of two where the backend needs it; columns past ``row_len`` are padding, masked).
    ``pairs``: int4, values read as (even, odd) pairs, two codes per byte.
    """

    shape: tuple[int, ...]
    rows: int
    row_len: int
    block: int
    width: int
    n_blocks: int
    tile_rows: int
    pairs: bool
    blocked: bool

    @property
    def grid(self) -> tuple[int, int]:
        return (-(-self.rows // self.tile_rows), self.n_blocks)


def geometry(shape: tuple[int, ...], fmt: StorageFormat, block: int, backend: str
             ) -> Geometry | str:
    """The tiling of a leaf of ``shape`` stored in ``fmt`` with blocks of ``block``, or why the
    kernel cannot take it (a short reason)."""
    shape = tuple(int(d) for d in shape)
    if not shape or math.prod(shape) == 0:
        return "an empty or scalar leaf"
    pairs = fmt.values_per_code == 2
    if pairs and shape[-1] % 2:
        return "int4 codes of an odd last axis (padding nibbles break the pairing)"
    if fmt.values_per_code not in (1, 2):
        return f"{fmt.values_per_code} values per code"
    if not fmt.blocked:
        size = math.prod(shape)
        rows, row_len = ((size // _UNBLOCKED_WIDTH, _UNBLOCKED_WIDTH)
                         if size % _UNBLOCKED_WIDTH == 0 else
                         (math.prod(shape[:-1]), shape[-1]))
        b = min(row_len, _UNBLOCKED_WIDTH)
        if backend == "mosaic" and row_len > _UNBLOCKED_WIDTH and row_len % 128:
            return "a last axis neither short nor a multiple of 128 (Mosaic tiles)"
        width = b if backend == "mosaic" else pow2_ceil(b)
        block = b if backend == "mosaic" else width
        n_blocks = -(-row_len // block)
    else:
        lay = block_layout(shape, block)
        rows, row_len, n_blocks = lay.n_rows, lay.row_len, lay.n_blocks
        b = min(block, row_len)
        if row_len % b == 0:  # whole blocks: one block per view row
            rows, row_len, n_blocks = rows * (row_len // b), b, 1
        elif backend == "mosaic":
            return "a row whose last block is short (Mosaic needs (8, 128)-aligned scale tiles)"
        elif b & (b - 1):
            return f"blocks of {b} values, not a power of two, with a short last block"
        width = b if backend == "mosaic" else pow2_ceil(b)
        block = b
    if backend == "mosaic" and width % 128 and width != row_len:
        return "a block of a width Mosaic cannot tile (neither a multiple of 128 nor the row)"
    if pairs and (block % 2 or width % 2):
        return "an odd int4 block"
    target = max(1, TILE_ELEMENTS // width)
    tile_rows = _pow2_floor(target)
    if rows <= tile_rows:
        tile_rows = rows if backend == "mosaic" else pow2_ceil(rows)
    elif backend == "mosaic":
        tile_rows = max(8, tile_rows)
    return Geometry(shape, rows, row_len, block, width, n_blocks, tile_rows, pairs, fmt.blocked)


# -- the kernel ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter's problem: which leaves of the flattened trees it touches.

    ``k``: the parameter (update/param leaf index); ``members``: its state leaves (indices into
    the flattened state, each a ``QuantizedArray`` of one format, or a plain array of the
    parameter's shape); ``scalars``: ``(tree, index)`` of every rank-0 leaf (``"u"``, ``"s"``,
    ``"p"``) and ``("x", name)`` of every extra argument, passed as they are.
    """

    k: int
    members: tuple[int, ...]


def fused_parameter(inner_update: Callable[..., Any], leaf: Leaf, geo: Geometry, *,
                    u_leaves: list[Any], u_def: Any, s_leaves: list[Any], s_def: Any,
                    p_leaves: list[Any] | None, p_def: Any, extra_args: dict[str, Any],
                    seeds: list[Any], backend: str, apply: bool, counter_offset: Any = None
                    ) -> tuple[jax.Array, dict[int, Any]]:
    """Runs the fused kernel for one parameter.

    ``counter_offset``: a ``uint32`` scalar added to every element's counter in the
    stochastic-rounding stream, for a shard of a leaf (its first element's row-major index in
    the whole leaf), so that a shard draws what the whole leaf draws there.

    Returns ``(out, new_members)``: ``out`` is the parameter's update (or, with ``apply``, its
    new value ``p + u`` in the parameter's dtype, written in place of ``p``) and
    ``new_members`` the new state leaves (``QuantizedArray`` with the new codes and scales,
    written in place of the old ones).
    """
    if backend not in BACKENDS:
        raise ValueError(f"fused_parameter: unknown backend {backend!r}; expected one of "
                         f"{list(BACKENDS)}.")
    k, members = leaf.k, leaf.members
    qs = [s_leaves[s] for s in members if is_quantized(s_leaves[s])]
    fmt, nonneg_of = qs[0].format, {s: s_leaves[s].nonneg for s in members
                                    if is_quantized(s_leaves[s])}
    stochastic = any(seeds[s] is not None for s in members)
    rows, row_len, pairs = geo.rows, geo.row_len, geo.pairs
    half = 2 if pairs else 1
    bw = geo.width // half  # tile columns (pairs: pair columns)
    tr = geo.tile_rows
    grid = geo.grid
    mosaic = backend == "mosaic"

    # -- the update on one tile, its scalar work done once outside ------------------------------
    scalar_keys: list[tuple[str, Any]] = []
    scalar_values: list[jax.Array] = []
    for tree, leaves in (("u", u_leaves), ("s", s_leaves), ("p", p_leaves or [])):
        for t, x in enumerate(leaves):
            if not is_quantized(x) and not jnp.shape(x):
                scalar_keys.append((tree, t))
                scalar_values.append(jnp.asarray(x))
    for name, x in extra_args.items():
        scalar_keys.append(("x", name))
        scalar_values.append(jnp.asarray(x))
    u_dtype = _update_dtype(inner_update, u_leaves, u_def, s_leaves, s_def, p_leaves, p_def,
                            extra_args, k)
    out_dtype = jnp.asarray(p_leaves[k]).dtype if apply else u_dtype
    tile = (tr, bw)
    has_p = p_leaves is not None

    def tile_fn(scalar_vals, tiles):
        scalars = dict(zip(scalar_keys, scalar_vals))
        g, rest = tiles[0], tiles[1:]
        p = rest[0] if has_p else None
        olds = dict(zip(members, rest[1:] if has_p else rest))

        def arg(tree, t, x, own):
            if (tree, t) in scalars:
                return scalars[(tree, t)]
            if own is not None:
                return own
            return jnp.zeros(tile, x.dtype if is_quantized(x) else jnp.asarray(x).dtype)

        u_in = [arg("u", t, x, g if t == k else None) for t, x in enumerate(u_leaves)]
        s_in = [arg("s", t, x, olds.get(t)) for t, x in enumerate(s_leaves)]
        p_tree = None
        if has_p:
            p_tree = p_def.unflatten([arg("p", t, x, p if t == k else None)
                                      for t, x in enumerate(p_leaves)])
        extra = {name: scalars[("x", name)] for name in extra_args}
        new_u, new_s = inner_update(u_def.unflatten(u_in), s_def.unflatten(s_in), p_tree,
                                    **extra)
        u = jax.tree.leaves(new_u)[k]
        new_s_flat = s_def.flatten_up_to(new_s)
        # keep_finite: an element whose new state is non-finite in any leaf keeps its old state
        # in every leaf (optstate.quantization.containment)
        bad = None
        for s in members:
            nonfinite = ~jnp.isfinite(new_s_flat[s])
            bad = nonfinite if bad is None else bad | nonfinite
        news = [jnp.where(bad, olds[s].astype(new_s_flat[s].dtype), new_s_flat[s])
                for s in members]
        out = (p + u).astype(p.dtype) if apply else u.astype(out_dtype)
        return [out] + news

    def tile_aval(x):
        dtype = x.dtype if is_quantized(x) else jnp.asarray(x).dtype
        return jax.ShapeDtypeStruct(tile, dtype)

    tile_avals = [tile_aval(u_leaves[k])] + ([tile_aval(p_leaves[k])] if has_p else [])
    tile_avals += [tile_aval(s_leaves[s]) for s in members]
    program = Program(tile_fn, [jax.ShapeDtypeStruct((), x.dtype) for x in scalar_values],
                       tile_avals)
    unlowered = program.tile_primitives() & UNLOWERED.get(backend, frozenset())
    if unlowered:  # raised while tracing: the parameter takes the XLA path, saying why
        raise NotImplementedError(f"{backend} does not lower {sorted(unlowered)}")
    carried = program.scalars(scalar_values)
    carried_dtypes = [v.aval.dtype for v in program.carried]
    scalar_args = [(x.astype(jnp.int32) if x.dtype == jnp.bool_ else x).reshape((1,))
                   for x in carried]

    def view(x: Any, dtype: Any = None) -> jax.Array:
        x = jnp.asarray(x)
        x = x.reshape((rows, row_len // half, half) if pairs else (rows, row_len))
        return x if dtype is None else x.astype(dtype)

    if pairs:
        value_spec = pl.BlockSpec((tr, bw, 2), lambda i, j: (i, j, 0))
    else:
        value_spec = pl.BlockSpec((tr, bw), lambda i, j: (i, j))
    codes_spec = pl.BlockSpec((tr, bw), lambda i, j: (i, j))
    scales_spec = pl.BlockSpec((tr, 1), lambda i, j: (i, j))
    if mosaic:
        from jax.experimental.pallas import tpu as pltpu
        scalar_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    else:
        scalar_spec = None

    inputs: list[jax.Array] = []
    in_specs: list[Any] = []

    def add_input(x: jax.Array, spec: Any) -> int:
        inputs.append(x)
        in_specs.append(spec)
        return len(inputs) - 1

    def whole_spec(n: int) -> Any:
        return scalar_spec if mosaic else pl.BlockSpec((n,), lambda i, j: (0,))

    scalar_pos = [add_input(x, whole_spec(1)) for x in scalar_args]
    seed_pos = None
    if stochastic:
        seed_arr = jnp.concatenate([
            jnp.asarray(seeds[s], jnp.uint32) if seeds[s] is not None
            else jnp.zeros((2,), jnp.uint32) for s in members]
            + ([] if counter_offset is None else
               [jnp.reshape(jnp.asarray(counter_offset, jnp.uint32), (1,))]))
        n_seed = seed_arr.size if mosaic else pow2_ceil(seed_arr.size)
        seed_arr = jnp.pad(seed_arr, (0, n_seed - seed_arr.size))
        seed_pos = add_input(seed_arr, whole_spec(n_seed))
    books: dict[bool, tuple[codebooks.Codebook, dict[str, int] | None, int]] = {}
    if isinstance(fmt.codec, CodebookCodec):
        for nonneg in sorted(set(nonneg_of.values())):
            book = fmt.codec.book(nonneg)
            if backend in ARITHMETIC_BOOK_BACKENDS:
                books[nonneg] = (book, None, 0)  # no tables: ArithmeticBook
                continue
            tabs = tables_of(book)
            pos = {name: add_input(jnp.asarray(tabs[name]), whole_spec(tabs[name].size))
                   for name in ("decode", "nearest", "threshold", "floor", "mags")}
            books[nonneg] = (book, pos, tabs["n_buckets"])
    g_pos = add_input(view(u_leaves[k]), value_spec)
    p_pos = None if p_leaves is None else add_input(view(p_leaves[k]), value_spec)
    member_pos: dict[int, tuple[int, int | None]] = {}
    for s in members:
        x = s_leaves[s]
        if is_quantized(x):
            c = jnp.asarray(x.codes).reshape(rows, -1)
            c_pos = add_input(c, codes_spec)
            sc_pos = None
            if geo.blocked:
                sc_pos = add_input(jnp.asarray(x.scales).reshape(rows, geo.n_blocks),
                                   scales_spec)
            member_pos[s] = (c_pos, sc_pos)
        else:
            member_pos[s] = (add_input(view(x), value_spec), None)

    # inside shard_map every operand is this device's shard: type them all, and the outputs, as
    # varying over the same manual axes (what pallas_call checks under check_vma)
    varying = _varying_union(inputs)
    # JAX 0.10's Pallas interpreter cannot evaluate a kernel on device-varying values (its
    # grid indices and the kernel's constants are invariant): interpret mode gathers the
    # shards and interprets every device's kernel on its own shard (_interpret_per_shard)
    gathered = backend == "interpret" and bool(varying)
    if not gathered:
        inputs = [_as_varying(x, varying) for x in inputs]

    def out_struct(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return _shape_dtype(shape, dtype, () if gathered else varying)

    # -- outputs -------------------------------------------------------------------------------
    out_shapes = [out_struct(view(u_leaves[k]).shape, out_dtype)]
    out_specs = [value_spec]
    aliases: dict[int, int] = {}
    if apply:
        aliases[p_pos] = 0
    for s in members:
        c_pos, sc_pos = member_pos[s]
        aliases[c_pos] = len(out_shapes)
        out_shapes.append(out_struct(inputs[c_pos].shape, inputs[c_pos].dtype))
        out_specs.append(in_specs[c_pos])
        if sc_pos is not None:
            aliases[sc_pos] = len(out_shapes)
            out_shapes.append(out_struct(inputs[sc_pos].shape, inputs[sc_pos].dtype))
            out_specs.append(scales_spec)

    # -- the body ------------------------------------------------------------------------------
    n_in = len(inputs)

    def body(*refs):
        in_refs, out_refs = refs[:n_in], refs[n_in:]
        i, j = pl.program_id(0), pl.program_id(1)
        carried_vals = [in_refs[pos][0].astype(dtype)
                        for pos, dtype in zip(scalar_pos, carried_dtypes)]
        row = i * tr + lax.broadcasted_iota(jnp.int32, tile, 0)
        col0 = j * geo.block + half * lax.broadcasted_iota(jnp.int32, tile, 1)
        cols = [col0 + h for h in range(half)]
        # columns past the row (a short last block, or a tile wider than the block) are padding
        masks = [(c < row_len) & (c < (j + 1) * geo.block) for c in cols]

        def parts_of(ref):
            return [ref[:, :, h] for h in range(2)] if pairs else [ref[...]]

        def put_parts(ref, parts):
            if pairs:
                for h in range(2):
                    ref[:, :, h] = parts[h]
            else:
                ref[...] = parts[0]

        book_objs = {nn: ArithmeticBook(b) if poss is None else
                     Book(b, {name: in_refs[pos] for name, pos in poss.items()}, nb)
                     for nn, (b, poss, nb) in books.items()}
        grads = parts_of(in_refs[g_pos])
        params = None if p_pos is None else parts_of(in_refs[p_pos])
        old: dict[int, list[jax.Array]] = {}
        for s in members:
            x = s_leaves[s]
            c_pos, sc_pos = member_pos[s]
            if is_quantized(x):
                codes = in_refs[c_pos][...]
                scales = None if sc_pos is None else in_refs[sc_pos][...]
                book = book_objs.get(x.nonneg)
                if pairs:
                    wide = codes.astype(jnp.int32)  # nibbles in int32: no 8-bit ALU work
                    split = [wide & 0x0F, wide >> 4]
                else:
                    split = [codes]
                old[s] = [decode(x.format, x.nonneg, book, c, scales).astype(x.dtype)
                          for c in split]
            else:
                old[s] = parts_of(in_refs[c_pos])

        outs, news = [], {s: [] for s in members}
        for h in range(half):
            tiles = [grads[h]] + ([params[h]] if params is not None else [])
            tiles += [old[s][h] for s in members]
            results = program.tiles(carried_vals, tiles)
            outs.append(results[0])
            for s, value in zip(members, results[1:]):
                news[s].append(value)
        put_parts(out_refs[0], outs)

        o = 1
        for m, s in enumerate(members):
            x = s_leaves[s]
            c_pos, sc_pos = member_pos[s]
            if not is_quantized(x):
                put_parts(out_refs[o], [v.astype(x.dtype) for v in news[s]])
                o += 1
                continue
            us: list[Any] = [None] * half
            if seeds[s] is not None:
                seed = (in_refs[seed_pos][2 * m], in_refs[seed_pos][2 * m + 1])
                n0 = (jnp.uint32(0) if counter_offset is None
                      else in_refs[seed_pos][2 * len(members)])
                us = [uniform_at(seed, (row * row_len + c).astype(jnp.uint32) + n0)
                      for c in cols]
            values = [v.astype(x.dtype).astype(jnp.float32) for v in news[s]]
            codes, scales = encode(x.format, x.nonneg, book_objs.get(x.nonneg), values, masks,
                                    us)
            if pairs:
                low, high = (c.astype(jnp.int32) for c in codes)
                stored = (low | (high << 4)).astype(jnp.uint8)
            else:
                stored = codes[0]
            out_refs[o][...] = stored
            o += 1
            if sc_pos is not None:
                out_refs[o][...] = scales
                o += 1

    call = pl.pallas_call(
        body, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
        input_output_aliases=aliases, interpret=backend == "interpret",
        compiler_params=_compiler_params(backend), name="optstate_fused_update")
    results = _interpret_per_shard(call, inputs, varying) if gathered else call(*inputs)
    out = results[0].reshape(u_leaves[k].shape)
    new_members: dict[int, Any] = {}
    o = 1
    for s in members:
        x = s_leaves[s]
        c_pos, sc_pos = member_pos[s]
        if not is_quantized(x):
            new_members[s] = results[o].reshape(x.shape)
            o += 1
            continue
        codes = results[o].reshape(jnp.shape(x.codes))
        o += 1
        scales = jnp.asarray(x.scales)
        if sc_pos is not None:
            scales = results[o].reshape(jnp.shape(x.scales))
            o += 1
        new_members[s] = dataclasses.replace(x, codes=codes, scales=scales)
    return out, new_members


def _varying_union(values: list[Any]) -> tuple[str, ...]:
    """The manual mesh axes (inside ``shard_map``) over which any of ``values`` varies; empty
    outside ``shard_map`` or where JAX does not track them (``check_vma=False``)."""
    axes: set[str] = set()
    for x in values:
        axes |= _compat.varying_axes(x) or frozenset()
    return tuple(sorted(axes))


def _as_varying(x: Any, axes: tuple[str, ...]) -> Any:
    """``x`` typed as varying over every one of ``axes`` (a no-op outside ``shard_map``)."""
    missing = tuple(a for a in axes if a not in (_compat.varying_axes(x) or frozenset()))
    return _compat.pcast_varying(x, missing) if missing else x


def _interpret_per_shard(call: Callable[..., Any], inputs: list[Any], axes: tuple[str, ...]
                         ) -> list[jax.Array]:
    """``call(*inputs)`` in interpret mode inside ``shard_map``, where ``inputs`` vary over the
    manual axes ``axes``: the varying operands are all-gathered (a leading axis of one shard
    per device), the kernel is interpreted on every shard (``vmap``, one shard each, the same
    tiles as on a device) and each device keeps its own results. Slow and for tests only, as
    interpret mode is; the compiled backends run on the local shards directly."""
    stacked, in_axes = [], []
    for x in inputs:
        if _compat.varying_axes(x):
            x = _as_varying(x, axes)
            stacked.append(lax.all_gather(x, axes, axis=0, tiled=False, to="invarying"))
            in_axes.append(0)
        else:
            stacked.append(x)
            in_axes.append(None)
    results = jax.vmap(call, in_axes=in_axes)(*stacked)
    me = lax.axis_index(axes)
    return [lax.dynamic_index_in_dim(r, me, axis=0, keepdims=False) for r in results]


def _shape_dtype(shape: tuple[int, ...], dtype: Any, axes: tuple[str, ...]
                 ) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` output of ``shape`` and ``dtype`` varying over the manual axes
    ``axes``: under ``shard_map(check_vma=True)`` pallas_call needs the outputs' manual-axis
    type (``jax.sharding.ManualAxisType``); elsewhere it is ignored."""
    manual = getattr(jax.sharding, "ManualAxisType", None)
    if manual is None:  # a JAX that names it otherwise: pallas_call takes untyped outputs
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual(varying=frozenset(axes)))


def _compiler_params(backend: str) -> Any:
    if backend == "triton":
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams()
    if backend == "mosaic":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    return None


def _update_dtype(inner_update, u_leaves, u_def, s_leaves, s_def, p_leaves, p_def, extra_args,
                  k) -> Any:
    """The dtype of parameter ``k``'s update (read off an abstract trace)."""
    def abstract(x):
        if is_quantized(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype if not hasattr(
            x, "dtype") else x.dtype)

    def run(u, s, p):
        return inner_update(u, s, p, **extra_args)[0]

    out = jax.eval_shape(
        run, u_def.unflatten([abstract(x) for x in u_leaves]),
        s_def.unflatten([abstract(x) for x in s_leaves]),
        None if p_leaves is None else p_def.unflatten([abstract(x) for x in p_leaves]))
    return jax.tree.leaves(out)[k].dtype


__all__ = ["BACKENDS", "TILE_ELEMENTS", "Geometry", "Leaf", "fused_parameter", "geometry"]
