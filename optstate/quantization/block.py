"""Block-wise quantization of one array: the layout of blocks, and codes and scales of pieces.

A format's codec (:mod:`optstate.quantization.codecs`) turns one block of values into codes
and a scale; this module decides which values form a block and applies the codec to whole
arrays or to row chunks of them (the bounded-memory step quantizes a leaf a chunk at a time).

Layout (:func:`block_layout`): blocks run along the flattened trailing axes of the array and
never cross its first axis (a 1-D array is one row). With ``a`` the largest axis such that
``prod(shape[a:]) >= B``, the array is viewed as ``(prod(shape[:a]), prod(shape[a:]))`` rows,
each cut into ``ceil(row / B)`` blocks (the last one may be short), and ``scales`` has shape
``(*shape[:a], n_blocks)``. If even ``prod(shape[1:]) < B`` (e.g. ``(4096, 3)``), a block is a
group of ``g`` consecutive rows of the first axis, ``g`` the largest power of two with
``g * prod(shape[1:]) <= B`` that divides ``shape[0]``; ``scales`` has shape
``(shape[0] // g, 1)``. Either way ``codes`` and ``scales`` split alike along the first axis.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from optstate.quantization import formats
from optstate.quantization.array import QuantizedArray, is_quantized
from optstate.quantization.formats import StorageFormat
from optstate.quantization.randomness import uniform_from_counter


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an array of ``shape`` is cut into blocks.

    ``n_rows`` x ``row_len`` is the 2-D view (a free reshape in row-major order); each row
    holds ``n_blocks`` blocks of ``block`` values (the last one possibly short);
    ``scales_shape`` is the shape of the stored scales (``n_rows * n_blocks`` values).
    ``axis`` is ``a`` (blocks span ``shape[a:]``), or ``-1`` for groups of ``group`` rows.
    """

    shape: tuple[int, ...]
    block: int
    n_rows: int
    row_len: int
    n_blocks: int
    scales_shape: tuple[int, ...]
    axis: int
    group: int


def block_layout(shape: tuple[int, ...], block: int) -> Layout:
    """The block layout of an array of ``shape`` with blocks of ``block`` values."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return Layout(shape, block, 1, 1, 1, (1,), 0, 1)
    if block <= 0:  # no blocks (bf16): rows of the last axis, no scales
        last = shape[-1]
        return Layout(shape, 0, math.prod(shape[:-1]), last, 0, (0,), len(shape) - 1, 1)
    if len(shape) >= 2 and math.prod(shape[1:]) < block:
        inner = math.prod(shape[1:])
        g = 1
        while (2 * g) * inner <= block and shape[0] % (2 * g) == 0:
            g *= 2
        n_rows = shape[0] // g
        return Layout(shape, block, n_rows, g * inner, 1, (n_rows, 1), -1, g)
    a = 0
    for k in range(len(shape) - 1, -1, -1):
        if math.prod(shape[k:]) >= block:
            a = k
            break
    n_rows = math.prod(shape[:a])
    row_len = math.prod(shape[a:])
    n_blocks = -(-row_len // block) if row_len else 0
    return Layout(shape, block, n_rows, row_len, n_blocks, shape[:a] + (n_blocks,), a, 1)


# -- the 2-D kernels --------------------------------------------------------------------------


def _blocked(x2: jax.Array, block: int) -> tuple[jax.Array, int]:
    """``(rows, row_len)`` -> ``(rows, n_blocks, block)``, zero-padding a short last block."""
    rows, row_len = x2.shape
    n_blocks = -(-row_len // block)
    pad = n_blocks * block - row_len
    if pad:
        x2 = jnp.pad(x2, ((0, 0), (0, pad)))
    return x2.reshape(rows, n_blocks, block), pad


def quantize_2d(x2: jax.Array, fmt: StorageFormat, block: int, nonneg: bool,
                u2: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Quantizes a ``(rows, row_len)`` float32 view block-wise along its rows.

    Returns ``(codes2, scales2)``: unpacked codes ``(rows, row_len)`` and scales
    ``(rows, n_blocks)`` (empty for a format without blocks). ``u2`` (same shape as ``x2``,
    uniform in ``[0, 1)``) selects stochastic rounding.
    """
    x2 = x2.astype(jnp.float32)
    if not fmt.blocked:
        return fmt.codec.encode(x2, nonneg, u2)
    rows, row_len = x2.shape
    x3, pad = _blocked(x2, block)
    u3 = None if u2 is None else _blocked(u2, block)[0]
    codes3, scales = fmt.codec.encode(x3, nonneg, u3)
    codes2 = codes3.reshape(rows, -1)
    if pad:
        codes2 = codes2[:, :row_len]
    return codes2, scales


def dequantize_2d(codes2: jax.Array, scales2: jax.Array, fmt: StorageFormat, block: int,
                  nonneg: bool) -> jax.Array:
    """Inverse of :func:`quantize_2d`: float32 ``(rows, row_len)``."""
    if not fmt.blocked:
        return fmt.codec.decode(codes2, scales2, nonneg)
    rows, row_len = codes2.shape
    c3, pad = _blocked(codes2, block)
    x2 = fmt.codec.decode(c3, scales2, nonneg).reshape(rows, -1)
    if pad:
        x2 = x2[:, :row_len]
    return x2


# -- rank-1 normalisation (Li, Chen, Zhu, NeurIPS 2023) ----------------------------------------


def rank1_scales_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Scales of a rank-1 normalised leaf: the maxima along each axis, concatenated."""
    return (sum(int(d) for d in shape),)


def _rank1_normalizer(maxima: list[jax.Array], shape: tuple[int, ...]) -> jax.Array:
    r""":math:`N_{i_1 \ldots i_k} = \min_d m^{(d)}_{i_d}`, broadcast to ``shape``."""
    ndim = len(shape)
    out = None
    for d, m in enumerate(maxima):
        view = m.reshape((1,) * d + (shape[d],) + (1,) * (ndim - d - 1))
        out = view if out is None else jnp.minimum(out, view)
    return jnp.broadcast_to(out, shape)


def _split_maxima(scales: jax.Array, shape: tuple[int, ...]) -> list[jax.Array]:
    bounds = [0]
    for d in shape:
        bounds.append(bounds[-1] + int(d))
    return [scales[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def quantize_rank1(x: jax.Array, fmt: StorageFormat, nonneg: bool,
                   u: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    r"""Codes (packed as ``fmt`` packs them) and scales of ``x`` (at least 2-D) under rank-1
    normalisation: with :math:`m^{(d)}` the maxima of :math:`|x|` over all axes but
    :math:`d`, each value is divided by :math:`N = \min_d m^{(d)}_{i_d}` (never below
    :math:`|x|`, and much closer to it than a block's maximum when rows or columns differ in
    scale) and encoded with the format's code book. Scales: the maxima, concatenated.

    A "non-negative" leaf that holds a negative value is stored on the unsigned grid shifted to
    cover [-1, 1] and says so by negated scales, as the block codec does per block.
    """
    shape = tuple(x.shape)
    x = x.astype(jnp.float32)
    magnitude = jnp.abs(x)
    magnitude = jnp.where(magnitude < jnp.inf, magnitude, 0.0)  # NaN/inf: not in the scale
    axes = range(len(shape))
    maxima = [jnp.max(magnitude, axis=tuple(a for a in axes if a != d)) for d in axes]
    norm = _rank1_normalizer(maxima, shape)
    y = jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)
    y = jnp.clip(jnp.where(y == y, y, 0.0), -1.0, 1.0)
    scales = jnp.concatenate(maxima)
    codec = fmt.codec
    if nonneg:
        negative = jnp.any(x < 0)
        codes = codec.unsigned.encode(jnp.where(negative, (y + 1.0) * 0.5, y), u)
        scales = jnp.where(negative, -scales, scales)
    else:
        codes = codec.signed.encode(y, u)
    codes = fmt.pack(codes.reshape(-1, shape[-1])) if fmt.values_per_code > 1 else codes
    return codes.reshape(fmt.codes_shape(shape)), scales


def dequantize_rank1(codes: jax.Array, scales: jax.Array, fmt: StorageFormat,
                     shape: tuple[int, ...], nonneg: bool) -> jax.Array:
    """Inverse of :func:`quantize_rank1`: float32 values of ``shape``."""
    if fmt.values_per_code > 1:
        codes = fmt.unpack(codes.reshape(-1, codes.shape[-1]), shape[-1])
    codes = codes.reshape(shape)
    norm = _rank1_normalizer(_split_maxima(jnp.abs(scales), shape), shape)
    if not nonneg:
        return fmt.codec.signed.decode(codes) * norm
    values = fmt.codec.unsigned.decode(codes)
    return jnp.where(jnp.any(scales < 0), 2.0 * values - 1.0, values) * norm


def uses_rank1(fmt: StorageFormat, shape: tuple[int, ...]) -> bool:
    """Whether a leaf of ``shape`` in ``fmt`` is rank-1 normalised (at least 2-D; 1-D leaves
    of a rank-1 format are stored block-wise, as in the paper)."""
    return fmt.rank1 and len(shape) >= 2


# -- whole arrays and chunks --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class View:
    """How a (piece of an) array maps onto the 2-D block view: ``rows x row_len`` values in
    row-major order, blocks of ``block`` along rows; ``pack_len`` is the length of the runs
    along which int4 codes are packed (the logical last axis, or the piece's length when the
    piece is part of one last-axis row)."""

    rows: int
    row_len: int
    block: int
    pack_len: int


def full_view(shape: tuple[int, ...], block: int) -> View:
    lay = block_layout(shape, block)
    last = shape[-1] if shape else 1
    return View(lay.n_rows, lay.row_len, block, last)


def quantize_piece(x: jax.Array, fmt: StorageFormat, view: View, nonneg: bool,
                   u: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Codes and scales (flat, row-major) of ``x`` (any shape with ``view.rows * row_len``
    elements). Packed codes (int4) come packed along runs of ``view.pack_len``."""
    x2 = x.reshape(view.rows, view.row_len)
    u2 = None if u is None else u.reshape(view.rows, view.row_len)
    codes2, scales2 = quantize_2d(x2, fmt, view.block, nonneg, u2)
    if fmt.values_per_code > 1:
        codes2 = fmt.pack(codes2.reshape(-1, view.pack_len))
    return codes2, scales2


def dequantize_piece(codes: jax.Array, scales: jax.Array, fmt: StorageFormat, view: View,
                     nonneg: bool) -> jax.Array:
    """float32 values, shape ``(view.rows, view.row_len)``, of a piece's codes and scales."""
    if fmt.values_per_code > 1:
        packed_len = -(-view.pack_len // fmt.values_per_code)
        codes = fmt.unpack(codes.reshape(-1, packed_len), view.pack_len)
    codes2 = codes.reshape(view.rows, view.row_len)
    scales2 = scales.reshape(view.rows, -1) if fmt.blocked else scales
    return dequantize_2d(codes2, scales2, fmt, view.block, nonneg)


def quantize_array(x: jax.Array, fmt: str | StorageFormat, *, block_size: int | None = None,
                   nonneg: bool = False, key_data: jax.Array | None = None) -> QuantizedArray:
    """Stores ``x`` (floating, at least 1-D, non-empty) as a :class:`QuantizedArray`.

    Args:
      x: the array.
      fmt: a quantized format of the registry (:mod:`optstate.quantization.formats`):
        ``"int8"``, ``"int4"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"bf16"``.
      block_size: values per block (default: the format's, 256 or 128).
      nonneg: ``x >= 0`` (a second moment): use the unsigned, zero-free grid.
      key_data: ``uint32[2]`` seed for stochastic rounding; ``None`` rounds to nearest.
    """
    fmt = formats.get(fmt, context="quantize_array")
    block = fmt.block_size(block_size, context="quantize_array")
    if not fmt.quantized:
        raise ValueError(f"quantize_array: expected a quantized format, one of "
                         f"{list(formats.QUANTIZED_NAMES)}; got {fmt.name!r}.")
    x = jnp.asarray(x)
    shape = tuple(x.shape)
    if not shape or math.prod(shape) == 0:
        raise ValueError(f"quantize_array: expected a non-empty array of at least one "
                         f"dimension; got shape {shape}.")
    u = None
    if key_data is not None:
        u = uniform_from_counter(jnp.asarray(key_data, jnp.uint32), shape)
    if uses_rank1(fmt, shape):
        codes, scales = quantize_rank1(x, fmt, bool(nonneg), u)
        return QuantizedArray(codes=codes, scales=scales, fmt=fmt.name, shape=shape,
                              dtype=jnp.dtype(x.dtype), block_size=block, nonneg=bool(nonneg))
    view = full_view(shape, block)
    codes, scales = quantize_piece(x, fmt, view, nonneg, u)
    if fmt.blocked:
        scales = scales.reshape(block_layout(shape, block).scales_shape)
    return QuantizedArray(
        codes=codes.reshape(fmt.codes_shape(shape)), scales=scales, fmt=fmt.name, shape=shape,
        dtype=jnp.dtype(x.dtype), block_size=block, nonneg=bool(nonneg))


def dequantize_array(q: QuantizedArray) -> jax.Array:
    """The logical array of ``q`` (shape ``q.shape``, dtype ``q.dtype``)."""
    if uses_rank1(q.format, q.shape):
        x = dequantize_rank1(jnp.asarray(q.codes), jnp.asarray(q.scales), q.format, q.shape,
                             q.nonneg)
        return x.astype(q.dtype)
    view = full_view(q.shape, q.block_size)
    x2 = dequantize_piece(jnp.asarray(q.codes), jnp.asarray(q.scales), q.format, view, q.nonneg)
    return x2.reshape(q.shape).astype(q.dtype)


def dequantize(q: QuantizedArray) -> jax.Array:
    """The logical array stored in ``q``: shape ``q.shape``, dtype ``q.dtype``.

    ``int8``/``int4``: ``x = codebook[code] * absmax_block``; FP8: ``x = float(code) * scale``;
    ``bf16``: ``x = float(code)``. Anything that is not a :class:`QuantizedArray` is returned
    as a ``jnp`` array.
    """
    if not is_quantized(q):
        return jnp.asarray(q)
    return dequantize_array(q)


def requantize_like(q: QuantizedArray, x: jax.Array, key_data: jax.Array | None = None
                    ) -> QuantizedArray:
    """``x`` stored with ``q``'s format, block size, sign class and logical dtype."""
    new = quantize_array(x.astype(q.dtype), q.format, block_size=q.block_size or None,
                         nonneg=q.nonneg, key_data=key_data)
    return dataclasses.replace(new, dtype=q.dtype)
