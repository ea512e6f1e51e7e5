"""Block-wise quantization of one array: layout of blocks, codes and scales.

Update rule (``int8``/``int4``, Dettmers et al. ICLR 2022; Li et al. NeurIPS 2023): split the
array into blocks of ``B`` values, keep each block's absolute maximum ``s = max |x|`` in fp32
and store ``code = encode(x / s)`` with the format's code book, so ``x ≈ decode(code) * s``.
FP8: ``scale = s / max_finite`` and ``code = fp8(x / scale)``, ``x ≈ float(code) * scale``.
BF16: ``code = bf16(x)``, no scale.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optstate.quantization.codebooks import FLOAT_GRIDS, codebook, uniform_from_counter
from optstate.quantization.array import FORMATS, QuantizedArray

#: Default block size per format (``bf16`` and ``fp32`` have no blocks).
DEFAULT_BLOCK_SIZE = {"int8": 256, "int4": 128, "fp8_e4m3": 256, "fp8_e5m2": 256, "bf16": 0,
                      "fp32": 0}


def check_format(fmt: str, block_size: int | None, *, context: str = "quantize_state") -> int:
    """Validates ``fmt`` and ``block_size``; returns the block size to use.

    Raises:
      ValueError: unknown format (lists the accepted ones) or a block size that is not a
        positive integer (even for ``int4``, which packs two codes per byte).
    """
    if fmt not in FORMATS:
        raise ValueError(f"{context}: unknown format {fmt!r}; expected one of {list(FORMATS)}.")
    if block_size is None:
        return DEFAULT_BLOCK_SIZE[fmt]
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ValueError(f"{context}: block_size must be None or a positive integer "
                         f"(e.g. 64, 128, 256, 2048); got {block_size!r}.")
    block_size = int(block_size)
    if fmt in ("bf16", "fp32"):
        return 0  # no blocks; the argument is ignored
    if block_size < 2 or (fmt == "int4" and block_size % 2):
        raise ValueError(
            f"{context}: block_size for {fmt!r} must be an integer >= 2"
            f"{' and even (two 4-bit codes per byte)' if fmt == 'int4' else ''}; "
            f"got {block_size}. Accepted: None (default {DEFAULT_BLOCK_SIZE[fmt]}) or e.g. "
            f"64, 128, 256, 2048.")
    return block_size


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


def fp8_target(fmt: str) -> float:
    """The value a block's absolute maximum maps to in an FP8 format: the largest power of two
    not above the format's largest finite value."""
    return 2.0 ** math.floor(math.log2(FLOAT_GRIDS[fmt].max_finite))


def codes_shape(fmt: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the stored codes: the logical shape, the last axis halved (rounded up) for
    ``int4``."""
    if fmt == "int4":
        if not shape:
            return (1,)
        return tuple(shape[:-1]) + (-(-shape[-1] // 2),)
    return tuple(shape)


def codes_dtype(fmt: str) -> Any:
    """dtype of the stored codes: ``uint8`` (int8, int4 packed, the bits of FP8 values) or
    ``uint16`` (the bits of BF16 values)."""
    return jnp.dtype(jnp.uint16) if fmt == "bf16" else jnp.dtype(jnp.uint8)


def float_bits(x: jax.Array, fmt: str) -> jax.Array:
    """The bits of FP8 / BF16 values as unsigned integers (free reinterpretation)."""
    return jax.lax.bitcast_convert_type(x.astype(FLOAT_GRIDS[fmt].jnp_dtype), codes_dtype(fmt))


def float_values(bits: jax.Array, fmt: str) -> jax.Array:
    """Inverse of :func:`float_bits`: the FP8 / BF16 values (as float32)."""
    return jax.lax.bitcast_convert_type(bits, FLOAT_GRIDS[fmt].jnp_dtype).astype(jnp.float32)


def pack_int4(codes: jax.Array) -> jax.Array:
    """Packs 4-bit codes two per byte along the last axis: element ``2i`` in the low nibble,
    ``2i + 1`` in the high one; an odd last axis gets a zero padding nibble.

    Each pair of bytes is read as one little-endian ``uint16`` (no strided access)."""
    n = codes.shape[-1]
    if n % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    pairs = codes.astype(jnp.uint8).reshape(codes.shape[:-1] + (codes.shape[-1] // 2, 2))
    both = jax.lax.bitcast_convert_type(pairs, jnp.uint16)  # low byte: element 2i
    return ((both & 0x0F) | ((both >> 4) & 0xF0)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_int4` for a last axis of ``n`` logical elements."""
    p = packed.astype(jnp.uint16)
    both = (p & 0x0F) | ((p >> 4) << 8)
    pairs = jax.lax.bitcast_convert_type(both, jnp.uint8)  # (..., m, 2)
    return pairs.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))[..., :n]


# -- the 2-D kernels --------------------------------------------------------------------------


def _blocked(x2: jax.Array, block: int) -> tuple[jax.Array, int]:
    """``(rows, row_len)`` -> ``(rows, n_blocks, block)``, zero-padding a short last block."""
    rows, row_len = x2.shape
    n_blocks = -(-row_len // block)
    pad = n_blocks * block - row_len
    if pad:
        x2 = jnp.pad(x2, ((0, 0), (0, pad)))
    return x2.reshape(rows, n_blocks, block), pad


def quantize_2d(x2: jax.Array, fmt: str, block: int, nonneg: bool,
                u2: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Quantizes a ``(rows, row_len)`` float32 view block-wise along its rows.

    Returns ``(codes2, scales2)``: unpacked codes ``(rows, row_len)`` (uint8 code indices, or
    the bits of the FP8 / BF16 values) and scales ``(rows, n_blocks)`` (empty for ``bf16``). ``u2`` (same
    shape as ``x2``, uniform in ``[0, 1)``) selects stochastic rounding.
    """
    x2 = x2.astype(jnp.float32)
    rows, row_len = x2.shape
    if fmt == "bf16":
        grid = FLOAT_GRIDS["bf16"]
        r = x2 if u2 is None else grid.round_stochastic(x2, u2)
        codes = r.astype(jnp.bfloat16)
        if nonneg:  # never store 0 for a positive value (underflow below ~1e-40)
            tiny = jnp.asarray(grid.smallest_subnormal, jnp.bfloat16)
            codes = jnp.maximum(codes, tiny * jnp.sign(x2).astype(jnp.bfloat16))
        return float_bits(codes, fmt), jnp.zeros((0,), jnp.float32)
    x3, pad = _blocked(x2, block)
    u3 = None if u2 is None else _blocked(u2, block)[0]
    absmax = jnp.max(jnp.abs(x3), axis=-1, keepdims=True)
    if fmt in ("int8", "int4"):
        book = codebook(fmt, nonneg)
        inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
        y = x3 * inv
        codes3 = book.encode(y, u3)
        scales = absmax[..., 0]
    else:
        # The block maximum maps to target = the largest power of two <= max_finite (256 for
        # e4m3, 32768 for e5m2), so scale = absmax / target is exact and dequantizing then
        # re-quantizing an unchanged block gives back the same codes and scale bit for bit.
        grid = FLOAT_GRIDS[fmt]
        target = np.float32(fp8_target(fmt))
        scale = absmax * np.float32(1.0 / target)
        inv = jnp.where(absmax > 0, target / jnp.where(absmax > 0, absmax, 1.0), 0.0)
        y = jnp.clip(x3 * inv, -grid.max_finite, grid.max_finite)
        if u3 is not None:
            y = grid.round_stochastic(y, u3)
        if nonneg:
            y = jnp.maximum(y, np.float32(grid.smallest_subnormal) * jnp.sign(x3))
        codes3 = float_bits(y, fmt)
        scales = scale[..., 0]
    codes2 = codes3.reshape(rows, -1)
    if pad:
        codes2 = codes2[:, :row_len]
    return codes2, scales


def dequantize_2d(codes2: jax.Array, scales2: jax.Array, fmt: str, block: int,
                  nonneg: bool) -> jax.Array:
    """Inverse of :func:`quantize_2d`: float32 ``(rows, row_len)``."""
    if fmt == "bf16":
        return float_values(codes2, fmt)
    rows, row_len = codes2.shape
    c3, pad = _blocked(codes2, block)
    if fmt in ("int8", "int4"):
        values = codebook(fmt, nonneg).decode(c3)
    else:
        values = float_values(c3, fmt)
    x2 = (values * scales2[..., None]).reshape(rows, -1)
    if pad:
        x2 = x2[:, :row_len]
    return x2


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


def quantize_piece(x: jax.Array, fmt: str, view: View, nonneg: bool,
                   u: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Codes and scales (flat, row-major) of ``x`` (any shape with ``view.rows * row_len``
    elements). int4 codes come packed along runs of ``view.pack_len``."""
    x2 = x.reshape(view.rows, view.row_len)
    u2 = None if u is None else u.reshape(view.rows, view.row_len)
    codes2, scales2 = quantize_2d(x2, fmt, view.block, nonneg, u2)
    if fmt == "int4":
        codes2 = pack_int4(codes2.reshape(-1, view.pack_len))
    return codes2, scales2


def dequantize_piece(codes: jax.Array, scales: jax.Array, fmt: str, view: View,
                     nonneg: bool) -> jax.Array:
    """float32 values, shape ``(view.rows, view.row_len)``, of a piece's codes and scales."""
    if fmt == "int4":
        codes = unpack_int4(codes.reshape(-1, -(-view.pack_len // 2)), view.pack_len)
    codes2 = codes.reshape(view.rows, view.row_len)
    scales2 = scales.reshape(view.rows, -1) if fmt != "bf16" else scales
    return dequantize_2d(codes2, scales2, fmt, view.block, nonneg)


def quantize_array(x: jax.Array, fmt: str, *, block_size: int | None = None,
                   nonneg: bool = False, key_data: jax.Array | None = None) -> QuantizedArray:
    """Stores ``x`` (floating, at least 1-D, non-empty) as a :class:`QuantizedArray`.

    Args:
      x: the array.
      fmt: one of ``"int8"``, ``"int4"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"bf16"``.
      block_size: values per block (default: the format's, 256 or 128).
      nonneg: ``x >= 0`` (a second moment): use the unsigned, zero-free grid.
      key_data: ``uint32[2]`` seed for stochastic rounding; ``None`` rounds to nearest.
    """
    block = check_format(fmt, block_size, context="quantize_array")
    if fmt == "fp32" or fmt not in FORMATS:
        raise ValueError(f"quantize_array: expected a quantized format, one of "
                         f"{list(FORMATS[:-1])}; got {fmt!r}.")
    x = jnp.asarray(x)
    shape = tuple(x.shape)
    if not shape or math.prod(shape) == 0:
        raise ValueError(f"quantize_array: expected a non-empty array of at least one "
                         f"dimension; got shape {shape}.")
    view = full_view(shape, block)
    u = None
    if key_data is not None:
        u = uniform_from_counter(jnp.asarray(key_data, jnp.uint32), shape)
    codes, scales = quantize_piece(x, fmt, view, nonneg, u)
    lay = block_layout(shape, block) if fmt != "bf16" else None
    return QuantizedArray(
        codes=codes.reshape(codes_shape(fmt, shape)),
        scales=scales.reshape(lay.scales_shape) if lay is not None else scales,
        fmt=fmt, shape=shape, dtype=jnp.dtype(x.dtype), block_size=block, nonneg=bool(nonneg))


def dequantize_array(q: QuantizedArray) -> jax.Array:
    """The logical array of ``q`` (shape ``q.shape``, dtype ``q.dtype``)."""
    view = full_view(q.shape, q.block_size)
    x2 = dequantize_piece(jnp.asarray(q.codes), jnp.asarray(q.scales), q.fmt, view, q.nonneg)
    return x2.reshape(q.shape).astype(q.dtype)
