"""The bounded-memory step of ``quantize_state``: one parameter at a time, in row chunks, and
small parameters a group at a time.

When the inner update is elementwise per parameter (:mod:`optstate.quantization.elementwise`),
the new state of each large parameter is computed in chunks of whole blocks and stored in
place, one parameter after another; parameters under the loop's size (and those with a rank-1
normalised leaf) are updated whole, packed into groups of at most ``chunk_elements`` values,
one group after another. So the step never holds more than about one chunk's or one group's
state in float32, whatever the mix of leaf sizes: its temporaries are bounded by the chunk
size, and its peak falls with the stored state.

How the step is arranged, and why (XLA on CPU, checked with its memory analysis):

* The update ``u`` of a chunked parameter comes from one call of the inner update on the
  whole tree: an elementwise function of gradients, parameters and dequantized codes, which
  XLA fuses into ``apply_updates`` (no float32 update or moment is materialized). Computing
  ``u`` inside the chunk loop instead would materialize a float32 array per parameter.
* The loop writes the new codes in place (the donated buffers) and reads the old ones from a
  copy, made after the previous parameter's loop (or group) so that one copy is alive at a
  time (:mod:`optstate.quantization.ordering`). The whole-tree call reads each copy only once
  that loop or group is done, so its updates can take the buffers of donated gradients
  (which the loop reads) instead of XLA copying every gradient up front.
* Stochastic rounding draws from a counter-based stream (:mod:`optstate.quantization.randomness`),
  so a chunk rounds exactly as the whole leaf would.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optstate._core.base import GradientTransformation
from optstate.quantization.array import QuantizedArray, is_quantized
from optstate.quantization.block import (
    View,
    block_layout,
    dequantize,
    dequantize_piece,
    quantize_piece,
    requantize_like,
)
from optstate.quantization.containment import keep_finite, keep_finite_leaves
from optstate.quantization.ordering import copy_after, plus_zero, zero_from
from optstate.quantization.randomness import uniform_from_counter

#: Parameters with at least this many elements (or two chunks, if fewer) get their state
#: updated by the row-chunk loop; smaller ones whole, in groups of at most ``chunk_elements``
#: values updated one after another.
MIN_LOOP_ELEMENTS = 1 << 16


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
        step = 1
        rows = max(1, chunk_elements // inner)
    else:
        step = block // math.gcd(inner, block) if block > 0 else 1
        rows = max(step, (chunk_elements // inner) // step * step)
    if rows * 2 > shape[k] >= 2 * step:
        # at least two iterations: XLA unrolls a loop of one, and the update of a donated
        # array outside a loop is a copy, not in place
        rows = max(step, (shape[k] // 2) // step * step)
    rows = _dividing(min(rows, shape[k]), shape[k], step)
    return _Chunking(shape, k, rows, math.prod(shape[:k]), shape[k] // rows, shape[k] % rows)


def _dividing(rows: int, total: int, step: int) -> int:
    """``rows``, or the largest multiple of ``step`` down to half of it that divides
    ``total``: without a remainder chunk every row goes through the loop, whose carried
    arrays XLA updates in place (a remainder of one iteration is unrolled by XLA, and its
    update of a donated parameter is then a copy)."""
    for r in range(rows, max(step, rows // 2) - 1, -step):
        if total % r == 0:
            return r
    return rows


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
    k = q.format.values_per_code
    if k == 1:
        return _plain_cut(ch)
    last = ch.shape[-1]
    packed = -(-last // k)
    if ch.axis < len(ch.shape) - 1:
        width = ch.inner // last * packed
        return _ArrayCut((ch.n_outer, ch.shape[ch.axis], width), ch.rows, ch.rem)
    # chunks along the last axis: rows is a multiple of k (the block is) or the whole row
    return _ArrayCut((ch.n_outer, packed, 1), -(-ch.rows // k), -(-ch.rem // k))


def _scales_cut(ch: _Chunking, q: QuantizedArray) -> _ArrayCut | None:
    if not q.format.blocked:
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
    if not q.format.blocked:
        return View(1, n, 0, n)
    if lay.axis == -1 or ch.axis < lay.axis:
        row_len = lay.row_len
    else:
        row_len = n
    pack_len = ch.shape[-1] if ch.axis < len(ch.shape) - 1 else rows
    return View(n // row_len, row_len, q.block_size, pack_len)


def _as_bits(x: jax.Array) -> jax.Array:
    """A floating array narrower than 32 bits (bf16, fp16, fp8) as unsigned integers of its
    bits (free: a bitcast). The loop slices and updates such arrays as integers: XLA on CPU
    computes in float32 what it holds in bf16, and would otherwise convert a whole bf16
    gradient or parameter to float32 before the loop (a float32 copy of each)."""
    dtype = jnp.dtype(x.dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * dtype.itemsize}"))
    return x


def _bits_after(x: Any, view: tuple[int, ...], zero: jax.Array | None) -> jax.Array:
    """``x`` reshaped to ``view`` as :func:`_as_bits`; a view that XLA materializes (a narrow
    float) is made once ``zero`` exists (:mod:`optstate.quantization.ordering`)."""
    x = jnp.asarray(x).reshape(view)
    if zero is not None and _as_bits(x).dtype != x.dtype:
        x = plus_zero(x, zero)
    return _as_bits(x)


def _from_bits(x: jax.Array, dtype: Any) -> jax.Array:
    """The inverse of :func:`_as_bits` for values of ``dtype``."""
    return x if x.dtype == jnp.dtype(dtype) else lax.bitcast_convert_type(x, dtype)


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


def chunked_leaves(chunk_elements: int, s_leaves: list[Any], owners: list[int | None] | None,
                    updates: Any) -> dict[int, list[int]]:
    """Parameter index -> its state leaves, for the parameters whose quantized state the
    bounded step updates: every parameter owning a quantized leaf, when the inner update is
    elementwise per parameter (``owners`` known). Large ones go through the row-chunk loop,
    the others in groups (:func:`loops_in_chunks`)."""
    if owners is None:
        return {}
    members: dict[int, list[int]] = {}
    for s, k in enumerate(owners):
        if k is not None:
            members.setdefault(k, []).append(s)
    return {k: ss for k, ss in members.items() if any(is_quantized(s_leaves[s]) for s in ss)}


def loops_in_chunks(chunk_elements: int, size: int, stored: list[Any]) -> bool:
    """Whether a parameter of ``size`` elements whose state leaves are ``stored`` is updated
    by the row-chunk loop (else it is updated whole, in a group): it has at least
    ``min(2 * chunk_elements, MIN_LOOP_ELEMENTS)`` elements, one format and block size, and no
    rank-1 normalised leaf."""
    qs = [x for x in stored if is_quantized(x)]
    return (size >= min(2 * chunk_elements, MIN_LOOP_ELEMENTS)
            and len({(q.fmt, q.block_size) for q in qs}) == 1
            # rank-1 scales span whole rows and columns: whole, in a group of its own
            and not any(q.format.rank1 and q.ndim >= 2 for q in qs))


def small_groups(chunk_elements: int, sizes: dict[int, int]) -> list[list[int]]:
    """Parameters (index -> elements) packed, in index order, into groups of at most
    ``chunk_elements`` elements (a parameter larger than that is a group of its own)."""
    groups: list[list[int]] = []
    total = 0
    for k in sorted(sizes):
        if groups and total + sizes[k] <= chunk_elements:
            groups[-1].append(k)
            total += sizes[k]
        else:
            groups.append([k])
            total = sizes[k]
    return groups


def chunked_step(chunk_elements: int, inner: GradientTransformation, updates, s_leaves, s_def,
                 params, extra_args, seeds, chunked, owners, apply: bool = False):
    """The bounded-memory step for an inner update that is elementwise per parameter.

    Returns ``(new_updates, new_state_leaves)``; with ``apply`` (``optstate.update_and_apply``,
    ``params`` given) ``(new_params, new_state_leaves)``: each row-chunk loop then also computes
    its parameter's update and writes ``p + u`` in place of ``p``, so no float32 update of a
    looped parameter and no copy of its old state is ever materialized (groups of small
    parameters stay as they are: their updates fuse into ``p + u`` in the whole-tree call).
    """
    u_leaves, u_def = jax.tree.flatten(updates)
    p_leaves = None if params is None else jax.tree.flatten(params)[0]
    p_def = None if params is None else jax.tree.structure(params)
    apply = apply and p_leaves is not None
    chunked_state = {s for ss in chunked.values() for s in ss}
    applied: dict[int, jax.Array] = {}  # with apply: parameter index -> its new value

    # 1. The new state of each large parameter, in row chunks of whole blocks, stored in
    #    place, one parameter after the other, then that of the small parameters, a group of
    #    at most ``chunk_elements`` values at a time; each loop or group also hands back the
    #    copy of the old stored state it read from.
    read_leaves = list(s_leaves)
    dependency: list[Any] | None = None
    if apply:
        # Parameters are written in place: no loop may start before every gradient exists,
        # i.e. before the backward pass (inside a train step) has read the parameters for
        # the last time; else XLA copies a parameter to keep it for those reads.
        dependency = [jnp.asarray(g) for g in u_leaves if g is not None and jnp.size(g)]
    loops = []
    sizes = {k: math.prod(u_leaves[k].shape) for k in chunked}
    in_loop = [k for k in sorted(chunked)
               if loops_in_chunks(chunk_elements, sizes[k], [s_leaves[s] for s in chunked[k]])]
    small = {k: n for k, n in sizes.items() if k not in in_loop}
    for k in in_loop:
        members, old = _chunk_loop(chunk_elements, inner, k, chunked[k], u_leaves, u_def, p_leaves,
                                   p_def, s_leaves, s_def, extra_args, seeds, dependency, apply)
        loops.append(members)
        dependency = _stored_arrays(members.values())
        if apply:
            applied[k] = old  # the new parameter; no copy of the old state was made
            dependency.append(old)
        else:
            _read_after(read_leaves, old, dependency)
    for group in small_groups(chunk_elements, small):
        members, old = _group_step(inner, {k: chunked[k] for k in group}, u_leaves, u_def,
                                   p_leaves, p_def, s_leaves, s_def, extra_args, seeds,
                                   dependency)
        loops.append(members)
        dependency = _stored_arrays(members.values())
        # with apply too, a group's updates come from the whole-tree call, fused into p + u
        # (computed in the group, a float32 update of a whole leaf would be materialized)
        _read_after(read_leaves, old, dependency)

    # 2. One call of the inner update on the whole tree, on the old state, gives every update
    #    and the new state of everything not processed above (scalars, leaves of parameters
    #    without quantized state, unrelated state). The new state of the parameters processed
    #    above from this call is dropped (never computed), and their updates are elementwise
    #    functions of the gradients, parameters and dequantized codes, which XLA fuses into
    #    whatever consumes them (``apply_updates``): no float32 copy of their state or update
    #    is kept. With ``apply`` the looped parameters are left out of this call.
    u_rest = list(u_leaves)
    p_rest = None if p_leaves is None else list(p_leaves)
    s_rest = [dequantize(x) if is_quantized(x) else x for x in read_leaves]
    if apply:  # the processed parameters' updates are not needed: empty stand-ins
        for k in applied:
            u_rest[k] = _placeholder(u_leaves[k])
            p_rest[k] = _placeholder(p_leaves[k])
            for s in chunked[k]:
                s_rest[s] = _placeholder(jax.ShapeDtypeStruct(s_rest[s].shape, s_rest[s].dtype))
    new_u_rest, new_s_rest = inner.update(
        u_def.unflatten(u_rest), s_def.unflatten(s_rest),
        None if p_def is None else p_def.unflatten(p_rest), **extra_args)
    new_u = list(jax.tree.leaves(new_u_rest))
    new_s = list(s_def.flatten_up_to(new_s_rest))
    rest = [s for s in range(len(s_leaves)) if s not in chunked_state]
    kept = keep_finite_leaves([s_leaves[s] for s in rest], [s_rest[s] for s in rest],
                              [new_s[s] for s in rest],
                              None if owners is None else [owners[s] for s in rest])
    for s, value in zip(rest, kept):
        x = s_leaves[s]
        new_s[s] = requantize_like(x, value, seeds[s]) if is_quantized(x) else value

    for members in loops:
        for s, value in members.items():
            new_s[s] = value
    if apply:
        new_p = [applied[k] if k in applied else _apply_leaf(p, u)
                 for k, (p, u) in enumerate(zip(p_leaves, new_u))]
        return p_def.unflatten(new_p), new_s
    return u_def.unflatten(new_u), new_s


def _apply_leaf(p: Any, u: Any) -> Any:
    """``p + u`` in ``p``'s dtype (what ``apply_updates`` does to one leaf)."""
    return None if p is None else jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def _stored_arrays(values: Any) -> list[jax.Array]:
    """The codes of quantized leaves and plain leaves themselves, to order work after them."""
    return [x.codes if is_quantized(x) else x for x in values]


def _read_after(read_leaves: list[Any], old: dict[int, Any], dependency: list[jax.Array]
                ) -> None:
    """Makes the whole-tree call read the old stored state ``old`` only after ``dependency``
    (the loop's or group's new state) exists: its updates are then computed after the loop
    or group has read the gradients, so that with donated gradients XLA can write the updates
    into the gradients' buffers instead of copying every gradient up front."""
    zero = zero_from(dependency)
    for s, value in old.items():
        if is_quantized(value):
            read_leaves[s] = dataclasses.replace(value, codes=plus_zero(value.codes, zero))
        else:
            read_leaves[s] = plus_zero(value, zero)


def _group_step(inner, group, u_leaves, u_def, p_leaves, p_def, s_leaves, s_def, extra_args,
                seeds, dependency):
    """Runs ``inner.update`` once on the small parameters of ``group`` (parameter index -> its
    state leaves), whole, every other array leaf passed as an empty placeholder.

    The group's old stored state is copied once ``dependency`` (the previous loop's or group's
    new state) exists, so that groups run one after another and their float32 values are
    never all alive at once. Returns the new values of the group's state leaves (its updates
    come from the whole-tree call) and the copy of their old values.
    """
    zero = None if dependency is None else zero_from(dependency)
    old: dict[int, Any] = {}
    for ss in group.values():
        for s in ss:
            x = s_leaves[s]
            if is_quantized(x):
                old[s] = dataclasses.replace(x, codes=copy_after(x.codes, zero),
                                             scales=copy_after(x.scales, zero))
            else:
                old[s] = copy_after(x, zero)
    u_in = [_placeholder(x) for x in u_leaves]
    p_in = None if p_leaves is None else [_placeholder(x) for x in p_leaves]
    s_in = [x if len(x.shape) == 0 else _placeholder(jax.ShapeDtypeStruct(x.shape, x.dtype))
            for x in s_leaves]
    for k, ss in group.items():
        u_in[k] = u_leaves[k]
        if p_in is not None:
            p_in[k] = p_leaves[k]
        for s in ss:
            s_in[s] = dequantize(old[s]) if is_quantized(old[s]) else old[s]
    _, new_s_tree = inner.update(
        u_def.unflatten(u_in), s_def.unflatten(s_in),
        None if p_def is None else p_def.unflatten(p_in), **extra_args)
    new_s_flat = s_def.flatten_up_to(new_s_tree)
    new: dict[int, Any] = {}
    for ss in group.values():
        kept = keep_finite([new_s_flat[s] for s in ss], [s_in[s] for s in ss])
        for s, value in zip(ss, kept):
            x = s_leaves[s]
            new[s] = requantize_like(x, value, seeds[s]) if is_quantized(x) else value
    return new, old


def _chunk_loop(chunk_elements, inner, k, members, u_leaves, u_def, p_leaves, p_def, s_leaves, s_def,
                extra_args, seeds, dependency, apply=False):
    """Runs ``inner.update`` on row chunks of parameter ``k`` and its state ``members``.

    Every other parameter and non-scalar state leaf is passed as an empty placeholder (the
    analysis showed the chunk's outputs do not depend on them); scalars are passed as they are.
    Returns the new values of ``k``'s state leaves (its updates come from the whole-tree
    call) and a copy of their old values (written by the loop as it reads them). With
    ``apply``, the loop reads the old state from the very arrays it updates (nothing else
    reads it), also writes ``p + u`` in place of the parameter's chunk, and returns the new
    parameter in place of the copy.
    """
    shape = tuple(u_leaves[k].shape)
    qs = [s_leaves[s] for s in members if is_quantized(s_leaves[s])]
    ch = _chunking(shape, qs[0].block_size, chunk_elements)
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
            arrays0.append(_as_bits(jnp.asarray(x).reshape(plain.view)))
            cuts.append(plain)
    # The loop reads the old stored state from a copy and writes the new one in place; the
    # whole-tree call reads the same copy. The copy is made after the previous parameter's
    # loop (one parameter after the other), so only about one parameter's copy is alive.
    n_stored = len(arrays0)
    # XLA on CPU makes the integer view of a bf16 gradient or parameter (see _as_bits) a
    # copy: made once the previous parameter is done, so that one such copy is alive at a time
    zero = None if dependency is None else zero_from(dependency)
    g_dtype = jnp.asarray(u_leaves[k]).dtype
    grads3 = _bits_after(u_leaves[k], plain.view, zero)
    p_dtype = None if p_leaves is None else jnp.asarray(p_leaves[k]).dtype
    params3 = None if p_leaves is None else _bits_after(p_leaves[k], plain.view, zero)
    if apply:  # the parameter is carried and written too; the old state read where it lies
        arrays0.append(params3)
        cuts.append(plain)
        old = None
    else:
        old = [copy_after(a, zero) for a in arrays0]
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
        u_in[k] = _from_bits(_slice_rows(grads3, outer, start, rows), g_dtype).reshape(cshape)
        p_in = None
        if p_place is not None:
            p_in = list(p_place)
            source = arrays[n_stored] if apply else params3
            p_in[k] = _from_bits(_slice_rows(source, outer, start, rows), p_dtype
                                 ).reshape(cshape)
        # Reads come from the copy, writes go to the carried arrays (never read in the loop),
        # so XLA updates them in place; with ``apply`` each chunk is read, then overwritten.
        source = arrays if apply else old
        reads = [_slice_rows(source[i], outer, start_of(i), rows_of(i)) for i in range(n_stored)]
        s_in = list(s_place)
        for s in members:
            x, idx = s_leaves[s], slots[s]
            if is_quantized(x):
                scales = reads[idx[1]] if len(idx) > 1 else jnp.zeros((0,), jnp.float32)
                value = dequantize_piece(reads[idx[0]], scales, x.format,
                                         _piece_view(ch, x, rows), x.nonneg)
                s_in[s] = value.reshape(cshape).astype(x.dtype)
            else:
                s_in[s] = _from_bits(reads[idx[0]], x.dtype).reshape(cshape)
        new_u_tree, new_s_tree = inner.update(
            u_def.unflatten(u_in), s_def.unflatten(s_in),
            None if p_def is None else p_def.unflatten(p_in), **extra_args)
        if apply:
            new_p = _as_bits(_apply_leaf(p_in[k], jax.tree.leaves(new_u_tree)[k]))
            arrays[n_stored] = _update_rows(arrays[n_stored], new_p, outer, start)
        # without apply, this chunk's update is not needed (computed in the whole-tree call)
        new_s_flat = s_def.flatten_up_to(new_s_tree)
        kept = keep_finite([new_s_flat[s] for s in members], [s_in[s] for s in members])
        offset = (outer * ch.shape[ch.axis] + start) * ch.inner
        writes: list[Any] = [None] * n_stored
        for s, value in zip(members, kept):
            x, idx = s_leaves[s], slots[s]
            if is_quantized(x):
                u = None
                if seeds[s] is not None:
                    u = uniform_from_counter(seeds[s], cshape, offset)
                codes, scales = quantize_piece(value.astype(x.dtype).astype(jnp.float32),
                                               x.format, _piece_view(ch, x, rows), x.nonneg, u)
                writes[idx[0]] = codes
                if len(idx) > 1:
                    writes[idx[1]] = scales
            else:
                writes[idx[0]] = _as_bits(value.astype(x.dtype))
        for i in range(n_stored):
            arrays[i] = _update_rows(arrays[i], writes[i], outer, start_of(i))
        return arrays

    # 0, made from ``zero`` with ``apply``: the loops then wait for ``dependency``
    first = (zero.astype(jnp.int32) if apply and zero is not None
             else jnp.zeros((), jnp.int32))
    # The remainder chunks first: read after the main loop, the gradients would be live past
    # it, and XLA would copy them (a float32 copy of the parameter) when they are donated.
    carry = arrays0
    if ch.rem:
        def rem_body(outer, carry):
            start = jnp.asarray(ch.n_main * ch.rows, jnp.int32)
            return one_chunk(outer, start, ch.rem, True, carry)

        carry = lax.fori_loop(first, first + ch.n_outer, rem_body, carry)
    if ch.n_main:
        def body(i, carry):
            outer = i // ch.n_main
            start = (i % ch.n_main) * ch.rows
            return one_chunk(outer, start, ch.rows, False, carry)

        carry = lax.fori_loop(first, first + ch.n_outer * ch.n_main, body, carry)

    def rebuild(arrays):
        out: dict[int, Any] = {}
        for s in members:
            x, idx = s_leaves[s], slots[s]
            if is_quantized(x):
                codes = arrays[idx[0]].reshape(x.format.codes_shape(x.shape))
                scales = (arrays[idx[1]].reshape(jnp.shape(x.scales)) if len(idx) > 1
                          else jnp.asarray(x.scales))
                out[s] = dataclasses.replace(x, codes=codes, scales=scales)
            else:
                out[s] = _from_bits(arrays[idx[0]], x.dtype).reshape(x.shape)
        return out

    if apply:
        return rebuild(carry[:n_stored]), _from_bits(carry[n_stored], p_dtype).reshape(shape)
    return rebuild(carry), rebuild(old)
