r"""Codecs: how a block of float32 values becomes small integer codes and back.

Each storage format of :mod:`optstate.quantization.formats` carries one codec. A *blocked*
codec sees values cut into blocks (``(rows, n_blocks, block)``) and keeps one float32 scale
per block; an unblocked one sees rows and keeps no scale.

* :class:`CodebookCodec` (``int8``, ``int4``): the block's absolute maximum :math:`s` is the
  scale and :math:`\mathrm{code} = \mathrm{encode}(x / s)` with a code book, signed for signed
  state and unsigned, zero-free for non-negative state; a block of "non-negative" state (so
  named by its field) that holds a negative value anyway is stored on the unsigned grid shifted
  to cover [-1, 1] and says so by a negative scale, so a wrong guess never corrupts a value
  (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022; Li, Chen, Zhu,
  "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023).
* :class:`ScaledFloatCodec` (FP8): :math:`\mathrm{scale} = s / t` with :math:`t` the largest
  power of two not above the format's largest finite value, so the scale is exact and
  re-quantizing an unchanged block returns the same codes; the code is the bits of the FP8
  value of :math:`x / \mathrm{scale}`.
* :class:`FloatCodec` (BF16): the code is the bits of the value cast to the format, no scale.

Float codes are kept as raw unsigned bits (``lax.bitcast_convert_type``) because XLA on CPU
computes FP8/BF16 in float32 and would convert whole arrays where the step updates them in
place. Non-negative state never stores zero for a positive value: a zero second moment in a
denominator blows the update up.

One non-finite value never poisons its block: scales are maxima over the finite values, an
infinity saturates at the block's largest magnitude, and NaN is stored as NaN where the format
has it (FP8, BF16) and as zero in a code book (which has none).

:func:`pack_int4` / :func:`unpack_int4` store two 4-bit codes per byte; they are the one
implementation used by the quantized state and by the stall measurement.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from optstate.quantization.codebooks import Codebook
from optstate.quantization.grids import FloatFormat


class Codec(Protocol):
    """What a storage format needs to turn values into codes and back.

    ``blocked`` codecs get ``x`` shaped ``(rows, n_blocks, block)`` and return scales shaped
    ``(rows, n_blocks)``; unblocked ones get ``(rows, row_len)`` and return an empty scale array.
    ``u`` (``x``'s shape, uniform in ``[0, 1)``) selects stochastic rounding.
    """

    blocked: bool

    def encode(self, x: jax.Array, nonneg: bool, u: jax.Array | None
               ) -> tuple[jax.Array, jax.Array]: ...

    def decode(self, codes: jax.Array, scales: jax.Array, nonneg: bool) -> jax.Array: ...


def _absmax(x3: jax.Array) -> jax.Array:
    """Per-block absolute maximum over the finite values, keeping the block axis
    (``(rows, n_blocks, 1)``): one NaN or infinity cannot make its block's scale non-finite."""
    magnitude = jnp.abs(x3)
    return jnp.max(jnp.where(magnitude < jnp.inf, magnitude, 0.0), axis=-1, keepdims=True)


def _normalized(x3: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x3 * inverse`` with NaN replaced by 0: a code book has no NaN (an infinity needs no
    care: the encoder saturates it at the largest code)."""
    y = x3 * inverse
    return jnp.where(y == y, y, 0.0)


def _safe_inverse(absmax: jax.Array, numerator: float = 1.0) -> jax.Array:
    """``numerator / absmax``, and 0 for an all-zero block (whose codes then encode 0)."""
    return jnp.where(absmax > 0, numerator / jnp.where(absmax > 0, absmax, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class CodebookCodec:
    """Block-wise absmax scaling plus a code book per sign class (``int8``, ``int4``)."""

    signed: Codebook
    unsigned: Codebook
    blocked: bool = True

    def book(self, nonneg: bool) -> Codebook:
        return self.unsigned if nonneg else self.signed

    def encode(self, x3, nonneg, u3):
        absmax = _absmax(x3)
        y = _normalized(x3, _safe_inverse(absmax))
        if not nonneg:
            return self.signed.encode(y, u3), absmax[..., 0]
        # State expected to be non-negative (by its field name) uses the unsigned, zero-free
        # grid. A block that holds a negative value anyway is stored on the same grid shifted
        # to cover [-1, 1], y -> (y + 1) / 2, and says so by a negative scale: one encoder, and
        # a wrong guess costs precision in that block, never a sign.
        negative = jnp.min(x3, axis=-1, keepdims=True) < 0
        codes3 = self.unsigned.encode(jnp.where(negative, (y + 1.0) * 0.5, y), u3)
        return codes3, jnp.where(negative, -absmax, absmax)[..., 0]

    def decode(self, codes3, scales, nonneg):
        scales = scales[..., None]
        if not nonneg:
            return self.signed.decode(codes3) * scales
        values = self.unsigned.decode(codes3)
        return jnp.where(scales < 0, 2.0 * values - 1.0, values) * jnp.abs(scales)


def float_bits(x: jax.Array, dtype: jnp.dtype, codes_dtype: jnp.dtype) -> jax.Array:
    """The bits of ``x`` cast to the float ``dtype``, as unsigned ``codes_dtype`` integers."""
    return jax.lax.bitcast_convert_type(x.astype(dtype), codes_dtype)


def float_values(bits: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Inverse of :func:`float_bits`: the values (as float32)."""
    return jax.lax.bitcast_convert_type(bits, dtype).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ScaledFloatCodec:
    """Block-wise scaling onto a low-precision float grid (FP8)."""

    grid: FloatFormat
    dtype: str          # the JAX dtype of the values, e.g. "float8_e4m3fn"
    codes_dtype: str    # the unsigned type of their bits
    blocked: bool = True

    @property
    def target(self) -> float:
        """What a block's absolute maximum maps to: the largest power of two not above the
        grid's largest finite value (256 for e4m3, 32768 for e5m2)."""
        return 2.0 ** math.floor(math.log2(self.grid.max_value))

    def encode(self, x3, nonneg, u3):
        absmax = _absmax(x3)
        target = np.float32(self.target)
        limit = np.float32(self.grid.max_value)
        # NaN stays NaN (the format has it: that one element, as in float32); an infinity
        # saturates at the largest finite value; the scale ignores both.
        y = jnp.clip(x3 * _safe_inverse(absmax, target), -limit, limit)
        if u3 is not None:
            y = self.grid.round(y, u3)
        if nonneg:  # a positive value never rounds to 0; negative values stay as they are
            y = jnp.where(x3 > 0, jnp.maximum(y, np.float32(self.grid.smallest_subnormal)), y)
        scales = absmax[..., 0] * np.float32(1.0 / target)
        return float_bits(y, jnp.dtype(self.dtype), jnp.dtype(self.codes_dtype)), scales

    def decode(self, codes3, scales, nonneg):
        return float_values(codes3, jnp.dtype(self.dtype)) * scales[..., None]


@dataclasses.dataclass(frozen=True)
class FloatCodec:
    """A plain cast to a low-precision float, no blocks and no scale (BF16)."""

    grid: FloatFormat
    dtype: str
    codes_dtype: str
    blocked: bool = False

    def encode(self, x2, nonneg, u2):
        dtype = jnp.dtype(self.dtype)
        values = (x2 if u2 is None else self.grid.round(x2, u2)).astype(dtype)
        if nonneg:  # a positive value never rounds to 0; negative values stay as they are
            tiny = jnp.asarray(self.grid.smallest_subnormal, dtype)
            values = jnp.where(x2 > 0, jnp.maximum(values, tiny), values)
        bits = jax.lax.bitcast_convert_type(values, jnp.dtype(self.codes_dtype))
        return bits, jnp.zeros((0,), jnp.float32)

    def decode(self, codes2, scales, nonneg):
        del scales, nonneg
        return float_values(codes2, jnp.dtype(self.dtype))


# -- two 4-bit codes per byte ------------------------------------------------------------------


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
