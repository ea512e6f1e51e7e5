"""Block codecs on kernel tiles: what :mod:`optstate.quantization.codecs` does, operation for
operation, on the ``(tile_rows, width)`` tiles of the fused kernel (:mod:`.kernel`).

Inside a Pallas kernel a code book cannot be a captured constant: its tables arrive as refs,
read with ``table_ref[index]`` gathers (Triton lowers them for power-of-two table sizes), and
``jnp.round`` (which Triton does not lower) is rebuilt from ``floor``. Mosaic TPU lowers no
general gather: there :class:`ArithmeticBook` computes the int8 and int4 code books from their
structure (the decade by comparisons, then a linear index with a one-step fix-up against the
exact midpoints), equal to the tables bit for bit. Columns past the end of
a row (a short last block) are masked out of every block maximum. A block's maximum over the
(even, odd) halves of int4 pairs is the maximum of both halves.

References: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optstate._core.numerics import round_half_even
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


# -- code books by arithmetic (no gathers: what Mosaic TPU lowers) -----------------------------

_ESTIMATE_BIAS = 2.0**-6  # in steps of the local index; far above the estimate's float error


@dataclasses.dataclass(frozen=True)
class _Decade:
    """One group of a code book's magnitudes whose values are linear in the local index ``j``:
    ``value(j) = m(j) * hi + m(j) * lo`` with the exact integer ``m(j) = p + q * j`` (float32)
    and ``hi`` short enough (12 bits) that ``m * hi`` is exact."""

    first: float   # value(0): a value at least this is in this group or a later one
    count: int     # values in the group (a dynamic map's decade ``i``: ``2**i``)
    start: int     # magnitude index of value(0)
    p: int
    hi: float
    lo: float
    rate: float    # 1 / (q * (hi + lo)): the local index of a value is about a * rate - p / q
    next: float    # the value after the group's last (inf after the last group)


@dataclasses.dataclass(frozen=True)
class ArithmeticForm:
    """A code book as a few linear groups (:class:`_Decade`), checked to reproduce its table.

    Dynamic maps: the decades ``i`` (``value = 10**(i - top - 1) (2**(i+1) + 9 + 18 j) /
    2**(i+1)``, ``q = 18``), with zero (signed maps) and the value 1 handled apart. Linear maps:
    one group ``(j + 1) / 2**bits`` (``q = 1``).
    """

    linear: bool
    signed: bool
    k: int          # magnitudes
    q: int
    decades: tuple[_Decade, ...]


def _split(t: float, bits: int = 12) -> tuple[np.float32, np.float32]:
    """``t`` as ``hi + lo`` with ``hi`` of ``bits`` significant bits and ``lo`` float32."""
    e = math.floor(math.log2(t))
    scale = 2.0 ** (bits - 1 - e)
    hi = np.float32(round(t * scale) / scale)
    return hi, np.float32(t - float(hi))


@functools.lru_cache(maxsize=None)
def arithmetic_form(book: codebooks.Codebook) -> ArithmeticForm | None:
    """The arithmetic form of ``book``, or ``None`` for a book that is neither a dynamic nor a
    linear map (such a book needs its tables: gathers). Checked to decode every magnitude bit
    for bit as the table does, with and without a fused multiply-add."""
    mags = np.asarray(book.magnitudes, np.float32)
    k = mags.size
    bits = k.bit_length() - 1
    if k < 2 or k != 1 << bits:
        return None
    if book.linear:
        if book.signed or not np.array_equal(mags, codebooks.linear_magnitudes(bits)):
            return None
        hi, lo = np.float32(1.0 / k), np.float32(0.0)
        form = ArithmeticForm(True, False, k, 1, (_Decade(
            float(mags[0]), k, 0, 1, float(hi), float(lo), float(k), math.inf),))
    else:
        top = bits - 1
        if not np.array_equal(mags, codebooks.dynamic_magnitudes(top, book.signed)):
            return None
        decades = []
        for i in range(1 if book.signed else 0, top + 1):
            t = 10.0 ** (i - top - 1) / 2 ** (i + 1)
            hi, lo = _split(t)
            start = 2**i - 1
            nxt = mags[start + 2**i]  # the next decade's first value, or 1
            decades.append(_Decade(float(mags[start]), 2**i, start, 2 ** (i + 1) + 9,
                                   float(hi), float(lo), 1.0 / (18 * t), float(nxt)))
        form = ArithmeticForm(False, book.signed, k, 18, tuple(decades))
    # exactness: every magnitude, rounding m * lo first or not (a fused multiply-add)
    for d in form.decades:
        j = np.arange(d.count, dtype=np.float64)
        m = np.float32(d.p) + np.float32(form.q) * j.astype(np.float32)
        hi, lo = np.float32(d.hi), np.float32(d.lo)
        want = mags[d.start:d.start + d.count]
        exact = m.astype(np.float64) * np.float64(hi)
        if not np.array_equal(exact, (m * hi).astype(np.float64)):
            raise AssertionError(f"{book.name}: m * hi is not exact")
        plain = m * hi + m * lo
        fused = (exact + m.astype(np.float64) * np.float64(lo)).astype(np.float32)
        if not (np.array_equal(plain, want) and np.array_equal(fused, want)):
            raise AssertionError(f"{book.name}: the arithmetic decoder is not exact")
    mids = ((mags[:-1].astype(np.float64) + mags[1:]) / 2).astype(np.float32)
    if not (np.all(mags[:-1] < mids) and np.all(mids < mags[1:])):
        raise AssertionError(f"{book.name}: values too close for the arithmetic encoder")
    return form


class ArithmeticBook:
    r"""A code book computed from its structure (:func:`arithmetic_form`) instead of read from
    tables: comparisons, selects and float32 arithmetic only, no gathers (what Mosaic TPU
    lowers). Equal to ``Codebook.encode/decode`` bit for bit for every code and every
    non-NaN float32 input (the codecs replace NaN by zero before encoding).

    Decoding magnitude index :math:`n` of a dynamic map: the decade is the exponent of
    :math:`n + 1` (:math:`2^i`, a select over the decades' constants), the value
    :math:`m\,h + m\,l` with :math:`m = 2^{i+1} + 9 + 18 j`, :math:`j = n + 1 - 2^i`.
    Encoding :math:`a = |y|`: the decade by comparisons with each decade's first value, a local
    index estimated low by at most one, :math:`j_0 = \lfloor a\,r - p/q - \delta \rfloor`,
    the three values :math:`v_0 \le a < v_2` from :math:`j_0` on, and then

    * nearest: :math:`n = n_0 + [a > \mathrm{mid}(v_0, v_1)] + [a > \mathrm{mid}(v_1, v_2)]`
      (midpoints rounded to float32 as the tables round them: ties go down);
    * stochastic: the floor :math:`n_0 + [a \ge v_1]`, its value and the next one, and the
      same probability, snap and ``u`` comparison as ``Codebook.encode``.

    Example:
      >>> import jax.numpy as jnp
      >>> from optstate.quantization import codebooks
      >>> book = ArithmeticBook(codebooks.INT8_SIGNED)
      >>> y = jnp.asarray([-1.0, -0.3, 0.0, 0.02, 1.0])
      >>> bool((book.encode(y, None) == codebooks.INT8_SIGNED.encode(y)).all())
      True
    """

    def __init__(self, book: codebooks.Codebook):
        form = arithmetic_form(book)
        if form is None:
            raise ValueError(f"ArithmeticBook: the code book {book.name!r} is neither a dynamic "
                             f"nor a linear map; it has no arithmetic form (use its tables).")
        self.book, self.form = book, form

    def magnitude(self, n: jax.Array) -> jax.Array:
        """The magnitudes of indices ``n`` (int32, in ``[0, k)``), float32."""
        f = self.form
        nf = (n + 1).astype(jnp.float32)
        if f.linear:
            return nf * np.float32(f.decades[0].hi)
        # 2**i, i = floor(log2(n + 1)): the exponent bits of n + 1
        count = lax.bitcast_convert_type(
            lax.bitcast_convert_type(nf, jnp.int32) & np.int32(0x7F800000), jnp.float32)
        hi, lo = np.float32(f.decades[0].hi), np.float32(f.decades[0].lo)
        for d in f.decades[1:]:
            inside = nf >= np.float32(d.count)
            hi = jnp.where(inside, np.float32(d.hi), hi)
            lo = jnp.where(inside, np.float32(d.lo), lo)
        m = np.float32(18.0) * nf - np.float32(16.0) * count + np.float32(9.0)
        value = m * hi + m * lo
        value = jnp.where(n >= f.k - 1, np.float32(1.0), value)
        if f.signed:
            value = jnp.where(n == 0, np.float32(0.0), value)
        return value

    def decode(self, codes: jax.Array) -> jax.Array:
        f = self.form
        c = codes.astype(jnp.int32)
        if not self.book.signed:
            return self.magnitude(jnp.minimum(c, f.k - 1))
        d = c - np.int32(self.book.center)
        mag = self.magnitude(jnp.minimum(jnp.where(d < 0, -d, d), f.k - 1))
        return jnp.where(d <= 0, -mag, mag)  # the table's code of zero holds -0.0

    def _bracket(self, a: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(n0, v0, v1, v2)``: magnitude index ``n0`` of ``v0`` and the values ``v0 < v1 <
        v2`` of indices ``n0, n0 + 1, n0 + 2`` (``v1``/``v2`` ``inf`` past the last), with
        ``v0 <= a < v2`` for ``a`` from the book's smallest value up to 1."""
        f = self.form
        first = f.decades[0]
        q = np.float32(f.q)
        count, hi, lo = np.float32(first.count), np.float32(first.hi), np.float32(first.lo)
        rate, nxt = np.float32(first.rate), np.float32(first.next)
        for d in f.decades[1:]:
            inside = a >= np.float32(d.first)
            count = jnp.where(inside, np.float32(d.count), count)
            hi = jnp.where(inside, np.float32(d.hi), hi)
            lo = jnp.where(inside, np.float32(d.lo), lo)
            rate = jnp.where(inside, np.float32(d.rate), rate)
            nxt = jnp.where(inside, np.float32(d.next), nxt)
        if f.linear:
            p, start = np.float32(first.p), np.float32(first.start)
            offset = np.float32(first.p / f.q + _ESTIMATE_BIAS)
        else:  # decade 2**i = count: p = 2 count + 9, start = count - 1
            p = np.float32(2.0) * count + np.float32(9.0)
            start = count - np.float32(1.0)
            offset = count * np.float32(2.0 / 18.0) + np.float32(9.0 / 18.0 + _ESTIMATE_BIAS)
        j0 = jnp.clip(jnp.floor(a * rate - offset), 0.0, count - np.float32(1.0))
        m0 = p + q * j0
        m1 = m0 + q
        m2 = m1 + q
        v0 = m0 * hi + m0 * lo
        v1 = jnp.where(j0 + np.float32(1.0) >= count, nxt, m1 * hi + m1 * lo)
        v2 = jnp.where(j0 + np.float32(2.0) > count, np.float32(np.inf),
                       jnp.where(j0 + np.float32(2.0) == count, nxt, m2 * hi + m2 * lo))
        n0 = (start + j0).astype(jnp.int32)
        if f.signed:  # below the lowest decade: zero and the decade's first two values
            zero = a < np.float32(first.first)
            v2 = jnp.where(zero, v1, v2)
            v1 = jnp.where(zero, v0, v1)
            v0 = jnp.where(zero, np.float32(0.0), v0)
            n0 = jnp.where(zero, np.int32(0), n0)
        return n0, v0, v1, v2

    def encode(self, y: jax.Array, u: jax.Array | None) -> jax.Array:
        book, f = self.book, self.form
        k = f.k
        a = jnp.abs(y) if book.signed else jnp.maximum(y, 0.0)
        if u is None and f.linear:  # as Codebook.encode: the nearest grid point, ties to even
            n = round_half_even(a * np.float32(k) - 1.0)
            n = jnp.clip(n, 0.0, np.float32(k - 1)).astype(jnp.int32)
        else:
            n0, v0, v1, v2 = self._bracket(a)
            if u is None:
                half = np.float32(0.5)
                n = (n0 + jnp.where(a > (v0 + v1) * half, 1, 0)
                     + jnp.where(a > (v1 + v2) * half, 1, 0))
            else:
                above = a >= v1
                lo = n0 + jnp.where(above, 1, 0)
                v_lo = jnp.where(above, v1, v0)
                v_hi = jnp.where(above, v2, v1)
                p = jnp.clip((a - v_lo) / (v_hi - v_lo), 0.0, 1.0)
                snap = np.float32(codebooks._SNAP)
                p = jnp.where(p < snap, 0.0, jnp.where(p > 1.0 - snap, 1.0, p))
                n = jnp.minimum(lo + jnp.where(u < p, 1, 0), k - 1)
            n = jnp.where(a >= np.float32(1.0), k - 1, n)  # every value from 1 up
        if book.signed:
            sign = jnp.where(y > 0, 1, jnp.where(y < 0, -1, 0))
            n = book.center + sign * n
        return n.astype(jnp.uint8)


def uniform_at(seed: tuple[jax.Array, jax.Array], n: jax.Array) -> jax.Array:
    """Element ``n`` (``uint32``) of the stream of ``seed``: the formula of
    :func:`optstate.quantization.randomness.uniform_from_counter`, element by element."""
    mix = randomness._mix32
    h = mix(n + seed[0])
    h = mix(h ^ seed[1])
    return (h >> 8).astype(jnp.float32) * np.float32(2.0**-24)


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
