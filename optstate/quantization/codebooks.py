"""Code books: how a normalised value in ``[-1, 1]`` (or ``[0, 1]``) becomes a small integer code.

* :func:`dynamic_map` — the *dynamic* (exponent + linear fraction) map of 8-bit block-wise
  optimizers (Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise
  Quantization", ICLR 2022). Level ``i`` holds ``2**i`` values spread linearly over one
  decade: ``10**(i - top) * (0.1 + 0.9 * (j + 0.5) / 2**i)`` for ``j < 2**i``, i.e. ``i``
  fraction bits, the remaining bits saying which decade (the exponent). Magnitude index ``n``
  satisfies ``n + 1 = 2**i + j``: "the leading one marks the exponent, the bits after it are
  the fraction".

  - *unsigned* (non-negative state): levels ``0..top`` and the value ``1``; **no zero**, so a
    positive value never decodes to zero (a zero second moment in a denominator blows the
    update up). ``int8``: ``top = 7``, 255 level values plus 1, smallest ``5.5e-8``.
  - *signed*: zero, ``±`` levels ``1..top`` and ``±1``; symmetric, so that re-quantizing a
    stored block (whose absolute maximum decodes to exactly ``±1``) returns the same codes.
    ``int8``: ``top = 6`` (255 of 256 codes used), ``int4``: ``top = 2`` (15 of 16).

* :func:`linear_map` — the zero-free unsigned linear grid ``(n + 1) / 2**bits`` used for the
  4-bit second moment (Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States",
  NeurIPS 2023): ``int4`` values ``1/16, 2/16, ..., 1``.

Codes of a signed map are ``center + sign(y) * n`` with ``center = len(magnitudes) - 1``, so
codes ascend with values. Decoding is one table lookup. Encoding avoids a binary search: the
top bits of ``|y|``'s float32 representation (exponent and ``bucket_bits`` fraction bits) pick
a bucket narrow enough to hold at most one decision point, a precomputed table gives the code
at the bucket's lower edge, and one comparison finishes:

* nearest: ``n = T[b] + (|y| > mid[T[b]])`` with ``mid`` the midpoints between neighbouring
  values (ties go down);
* stochastic: with ``lo`` the largest value ``<= |y|`` and ``hi`` the next one,
  ``n = lo + (u < (|y| - v_lo) / (v_hi - v_lo))``, ``u ~ U[0, 1)``, so ``E[value] = |y|``
  for every ``|y|`` between the smallest and largest value (below the smallest value of a
  zero-free map, the smallest value is returned).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_E0 = 95  # buckets cover |y| >= 2**(_E0 - 127) = 2**-32; below that, bucket 0
_SNAP = 1e-3


def _lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
    """``table[index]`` for indices known to be in range (no clamping)."""
    return jnp.asarray(table).at[index].get(mode="promise_in_bounds")


def dynamic_magnitudes(top: int, signed: bool) -> np.ndarray:
    """Magnitudes of the dynamic map (float64 construction, rounded to float32, ascending)."""
    lowest = 1 if signed else 0
    out = [0.0] if signed else []
    for i in range(lowest, top + 1):
        out += [10.0 ** (i - top) * (0.1 + 0.9 * (j + 0.5) / 2**i) for j in range(2**i)]
    out.append(1.0)
    return np.asarray(out, dtype=np.float32)


def linear_magnitudes(bits: int) -> np.ndarray:
    """The zero-free linear grid ``(n + 1) / 2**bits``."""
    return ((np.arange(2**bits, dtype=np.float64) + 1) / 2**bits).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Codebook:
    """A code book: ascending non-negative ``magnitudes`` (mirrored with their signs when
    ``signed``) and the bucket resolution of its encoder."""

    name: str
    magnitudes: tuple[float, ...]
    signed: bool
    bucket_bits: int
    linear: bool = False  # magnitudes (n + 1) / len: nearest encoding is arithmetic

    @property
    def center(self) -> int:
        """Signed maps: the code of zero."""
        return len(self.magnitudes) - 1

    @property
    def num_codes(self) -> int:
        k = len(self.magnitudes)
        return 2 * k - 1 if self.signed else k

    def values(self) -> np.ndarray:
        """The value of every code in use, indexed by code (ascending, float32)."""
        mags = np.asarray(self.magnitudes, np.float32)
        if not self.signed:
            return mags
        return np.concatenate([-mags[::-1], mags[1:]]).astype(np.float32)

    def decode(self, codes: jax.Array) -> jax.Array:
        """float32 values of ``codes`` (unsigned integers); one table lookup."""
        table = _tables(self)["decode"]
        return _lookup(table, codes.astype(jnp.int32))

    def encode(self, y: jax.Array, u: jax.Array | None = None) -> jax.Array:
        """Codes (uint8) of ``y`` in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned).

        ``u=None``: nearest value (ties towards the smaller magnitude). Otherwise ``u``
        (uniform in ``[0, 1)``, ``y``'s shape) gives unbiased stochastic rounding between the
        two neighbouring values.
        """
        tabs = _tables(self)
        y = y.astype(jnp.float32)
        a = jnp.abs(y) if self.signed else jnp.maximum(y, 0.0)
        bits = lax.bitcast_convert_type(a, jnp.int32) >> (23 - self.bucket_bits)
        bucket = jnp.clip(bits - (_E0 << self.bucket_bits), 0, tabs["n_buckets"] - 1)
        if u is None:
            if self.linear:
                n = jnp.clip(jnp.round(a * np.float32(len(self.magnitudes)) - 1.0), 0.0,
                             np.float32(len(self.magnitudes) - 1)).astype(jnp.int32)
            else:
                t = _lookup(tabs["nearest"], bucket)
                mid = _lookup(tabs["threshold"], bucket)
                n = t + (a > mid).astype(jnp.int32)
        else:
            mags = jnp.asarray(tabs["mags"])  # padded with one value above the top
            lo = jnp.take(jnp.asarray(tabs["floor"]), bucket, mode="clip")
            lo = lo + (a >= jnp.take(mags, lo + 1, mode="clip")).astype(jnp.int32)
            v_lo = jnp.take(mags, lo, mode="clip")
            v_hi = jnp.take(mags, lo + 1, mode="clip")
            p = jnp.clip((a - v_lo) / (v_hi - v_lo), 0.0, 1.0)
            # A value within 1e-3 of a step from a code value is that code value (float32
            # error of a stored value re-read): re-quantizing unchanged state is the identity.
            p = jnp.where(p < _SNAP, 0.0, jnp.where(p > 1.0 - _SNAP, 1.0, p))
            n = lo + (u < p).astype(jnp.int32)
            n = jnp.minimum(n, len(self.magnitudes) - 1)
        if self.signed:
            n = self.center + jnp.sign(y).astype(jnp.int32) * n
        return n.astype(jnp.uint8)


@functools.lru_cache(maxsize=None)
def _tables(book: Codebook) -> dict:
    """Lookup tables of ``book`` (numpy; built once), checked to be exact."""
    mags = np.asarray(book.magnitudes, np.float32)
    k = len(mags)
    m = book.bucket_bits
    n_buckets = (128 - _E0) << m
    b = np.arange(n_buckets, dtype=np.uint32)
    lo_edge = ((b + (_E0 << m)) << (23 - m)).view(np.float32)
    hi_edge = ((b + 1 + (_E0 << m)) << (23 - m)).view(np.float32)
    mids = ((mags[:-1].astype(np.float64) + mags[1:]) / 2).astype(np.float32)
    nearest = np.searchsorted(mids, lo_edge, side="left").astype(np.int32)  # mids < edge
    mids_pad = np.append(mids, np.float32(np.inf)).astype(np.float32)
    floor = np.maximum(np.searchsorted(mags, lo_edge, side="right") - 1, 0).astype(np.int32)
    mags_pad = np.append(mags, np.float32(2 * mags[-1])).astype(np.float32)
    # exactness: at most one decision point inside every bucket
    second_mid = mids_pad[np.minimum(nearest + 1, k - 1)]
    second_val = np.append(mags_pad, np.float32(np.inf))[np.minimum(floor + 2, k + 1)]
    if not (np.all(second_mid >= hi_edge) and np.all(second_val >= hi_edge)):
        raise AssertionError(f"{book.name}: bucket_bits={m} too coarse for its values")
    if mids.size and mids[0] <= lo_edge[0]:
        raise AssertionError(f"{book.name}: values below the lowest bucket")
    values = book.values()
    decode = np.concatenate([values, np.full(256 - values.size, values[-1], np.float32)])
    threshold = mids_pad[nearest]
    return {"decode": decode, "nearest": nearest, "threshold": threshold, "floor": floor,
            "mags": mags_pad, "n_buckets": n_buckets}


def dynamic_map(bits: int, signed: bool) -> Codebook:
    """The dynamic map with ``2**bits`` codes (``top = 6`` / ``7`` for 8-bit signed / unsigned,
    ``top = 2`` for 4-bit signed)."""
    top = {(8, True): 6, (8, False): 7, (4, True): 2}[(bits, signed)]
    mags = dynamic_magnitudes(top, signed)
    bucket_bits = {(8, True): 6, (8, False): 7, (4, True): 3}[(bits, signed)]
    kind = "signed" if signed else "unsigned"
    return Codebook(f"dynamic_{kind}_{bits}bit", tuple(float(v) for v in mags), signed,
                    bucket_bits)


def linear_map(bits: int) -> Codebook:
    """The zero-free unsigned linear map ``(n + 1) / 2**bits``."""
    mags = linear_magnitudes(bits)
    return Codebook(f"linear_unsigned_{bits}bit", tuple(float(v) for v in mags), False,
                    bits + 1, linear=True)


INT8_SIGNED = dynamic_map(8, True)
INT8_UNSIGNED = dynamic_map(8, False)
INT4_SIGNED = dynamic_map(4, True)
INT4_UNSIGNED = linear_map(4)
