"""Block codecs on kernel tiles: what :mod:`optstate.quantization.codecs` does, operation for
operation, on the ``(tile_rows, width)`` tiles of the fused kernel (:mod:`.kernel`).

Inside a Pallas kernel a code book cannot be a captured constant: its tables arrive as refs,
read with ``table_ref[index]`` gathers (Triton lowers them for power-of-two table sizes), and
``jnp.round`` (which Triton does not lower) is rebuilt from ``floor``. Columns past the end of
a row (a short last block) are masked out of every block maximum. A block's maximum over the
(even, odd) halves of int4 pairs is the maximum of both halves.

References: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optstate.quantization import codebooks, randomness
from optstate.quantization.codecs import CodebookCodec, FloatCodec, ScaledFloatCodec
from optstate.quantization.formats import StorageFormat


def pow2_ceil(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def tables_of(book: codebooks.Codebook) -> dict[str, np.ndarray]:
    """The lookup tables of ``book``, padded with their last entry to power-of-two lengths
    (Triton tensors must have power-of-two sizes; indices never reach the padding)."""
    tabs = codebooks._tables(book)
    out = {}
    for name in ("decode", "nearest", "threshold", "floor", "mags"):
        t = np.asarray(tabs[name])
        n = pow2_ceil(t.size)
        out[name] = np.concatenate([t, np.full(n - t.size, t[-1], t.dtype)])
    out["n_buckets"] = int(tabs["n_buckets"])
    return out


class Book:
    """A code book read through refs inside the kernel (mirrors ``Codebook.encode/decode``)."""

    def __init__(self, book: codebooks.Codebook, refs: dict[str, Any], n_buckets: int):
        self.book, self.refs, self.n_buckets = book, refs, n_buckets

    def decode(self, codes: jax.Array) -> jax.Array:
        return self.refs["decode"][codes.astype(jnp.int32)]

    def encode(self, y: jax.Array, u: jax.Array | None) -> jax.Array:
        book, refs = self.book, self.refs
        k = len(book.magnitudes)
        a = jnp.abs(y) if book.signed else jnp.maximum(y, 0.0)
        bits = lax.bitcast_convert_type(a, jnp.int32) >> (23 - book.bucket_bits)
        bucket = jnp.clip(bits - (codebooks._E0 << book.bucket_bits), 0,
                          self.n_buckets - 1)
        if u is None:
            if book.linear:
                n = round_half_even(a * np.float32(k) - 1.0)
                n = jnp.clip(n, 0.0, np.float32(k - 1)).astype(jnp.int32)
            else:
                n = refs["nearest"][bucket] + (a > refs["threshold"][bucket]).astype(jnp.int32)
        else:
            top = k  # mags has k + 1 entries (one above the top); jnp.take clips to it
            lo = refs["floor"][bucket]
            lo = lo + (a >= refs["mags"][jnp.minimum(lo + 1, top)]).astype(jnp.int32)
            lo = jnp.minimum(lo, top)
            v_lo = refs["mags"][lo]
            v_hi = refs["mags"][jnp.minimum(lo + 1, top)]
            p = jnp.clip((a - v_lo) / (v_hi - v_lo), 0.0, 1.0)
            snap = np.float32(codebooks._SNAP)
            p = jnp.where(p < snap, 0.0, jnp.where(p > 1.0 - snap, 1.0, p))
            n = lo + (u < p).astype(jnp.int32)
            n = jnp.minimum(n, k - 1)
        if book.signed:
            n = book.center + jnp.sign(y).astype(jnp.int32) * n
        return n.astype(jnp.uint8)


def uniform_at(seed: tuple[jax.Array, jax.Array], n: jax.Array) -> jax.Array:
    """Element ``n`` (``uint32``) of the stream of ``seed``: the formula of
    :func:`optstate.quantization.randomness.uniform_from_counter`, element by element."""
    mix = randomness._mix32
    h = mix(n + seed[0])
    h = mix(h ^ seed[1])
    return (h >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def round_half_even(v: jax.Array) -> jax.Array:
    """``jnp.round`` (ties to even) from ``floor`` (Triton has no ``round``); exact for
    ``|v| < 2**22``."""
    f = jnp.floor(v)
    d = v - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    return f + jnp.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


def _absmax(parts: list[jax.Array], masks: list[jax.Array]) -> jax.Array:
    """Per-row (block) maximum of the finite magnitudes, ``(tile_rows, 1)``."""
    out = None
    for x, m in zip(parts, masks):
        a = jnp.abs(x)
        a = jnp.where((a < jnp.inf) & m, a, 0.0)
        r = jnp.max(a, axis=-1, keepdims=True)
        out = r if out is None else jnp.maximum(out, r)
    return out


def _safe_inverse(absmax: jax.Array, numerator: float = 1.0) -> jax.Array:
    return jnp.where(absmax > 0, np.float32(numerator) / jnp.where(absmax > 0, absmax, 1.0),
                     0.0)


def encode(fmt: StorageFormat, nonneg: bool, book: Book | None, parts: list[jax.Array],
            masks: list[jax.Array], us: list[jax.Array | None]
            ) -> tuple[list[jax.Array], jax.Array | None]:
    """Codes of each part (one per value, unpacked) and the tile's scales ``(rows, 1)``."""
    codec = fmt.codec
    parts = [jnp.where(m, x, 0.0) for x, m in zip(parts, masks)]
    if isinstance(codec, FloatCodec):
        dtype = jnp.dtype(codec.dtype)
        out = []
        for x, u in zip(parts, us):
            values = (x if u is None else codec.grid.round(x, u)).astype(dtype)
            if nonneg:
                tiny = jnp.asarray(codec.grid.smallest_subnormal, dtype)
                values = jnp.where(x > 0, jnp.maximum(values, tiny), values)
            out.append(lax.bitcast_convert_type(values, jnp.dtype(codec.codes_dtype)))
        return out, None
    absmax = _absmax(parts, masks)
    if isinstance(codec, ScaledFloatCodec):
        target = np.float32(codec.target)
        limit = np.float32(codec.grid.max_value)
        inverse = _safe_inverse(absmax, float(target))
        out = []
        for x, u in zip(parts, us):
            y = jnp.clip(x * inverse, -limit, limit)
            if u is not None:
                y = codec.grid.round(y, u)
            if nonneg:
                y = jnp.where(x > 0, jnp.maximum(y, np.float32(codec.grid.smallest_subnormal)), y)
            bits = lax.bitcast_convert_type(y.astype(jnp.dtype(codec.dtype)),
                                            jnp.dtype(codec.codes_dtype))
            out.append(bits)
        return out, absmax * np.float32(1.0 / target)
    assert isinstance(codec, CodebookCodec) and book is not None
    inverse = _safe_inverse(absmax)
    ys = []
    for x in parts:
        y = x * inverse
        ys.append(jnp.where(y == y, y, 0.0))  # noqa: PLR0124 - NaN -> 0, as the codec
    if not nonneg:
        return [book.encode(y, u) for y, u in zip(ys, us)], absmax
    negative = None
    for x in parts:  # padding is 0 here, never negative
        r = jnp.min(x, axis=-1, keepdims=True) < 0
        negative = r if negative is None else negative | r
    codes = [book.encode(jnp.where(negative, (y + 1.0) * 0.5, y), u) for y, u in zip(ys, us)]
    return codes, jnp.where(negative, -absmax, absmax)


def decode(fmt: StorageFormat, nonneg: bool, book: Book | None, codes: jax.Array,
            scales: jax.Array | None) -> jax.Array:
    codec = fmt.codec
    if isinstance(codec, (FloatCodec, ScaledFloatCodec)):
        values = lax.bitcast_convert_type(codes, jnp.dtype(codec.dtype)).astype(jnp.float32)
        return values if scales is None else values * scales
    assert book is not None
    values = book.decode(codes)
    if not nonneg:
        return values * scales
    return jnp.where(scales < 0, 2.0 * values - 1.0, values) * jnp.abs(scales)
