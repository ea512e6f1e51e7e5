"""Checksums of global arrays computed on their devices, independent of their sharding.

Every element's bits (as 32-bit words; 64-bit elements give two words, complex numbers their
real and imaginary parts) are combined with the element's *global* position (flat index times
words per element plus the word), in two different ways, each followed by a 32-bit hash
finaliser (a bijection), and each of the two lanes is summed modulo 2**32. Modular addition
is associative and commutative, so the two sums do not depend on how the array is split into
shards or in which order XLA reduces them: the same
global array gives the same 64-bit checksum on 1, 4 or 8 devices, in one process or several.
The reduction is compiled (``jax.jit``) and runs where the shards live (an all-reduce across
processes); only the two resulting words come back to the host. Nothing is gathered.

A flipped bit changes one word and, through the mixing, each lane's sum with probability
1 - 2**-32; a value moved to another position changes its index term.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optstate.checkpoint.encoding import _UINT_OF_WIDTH, _bit_width

#: Name of the algorithm, recorded in the sidecar.
ALGORITHM = "mix32x2-global-index"


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bits as uint32 words, shape ``x.shape + (k,)``."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)[..., None]
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.concatenate([_words(jnp.real(x)), _words(jnp.imag(x))], axis=-1)
    width = _bit_width(x.dtype)
    if width == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
    if width == 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)[..., None]
    narrow = jax.lax.bitcast_convert_type(x, jnp.dtype(_UINT_OF_WIDTH[width]))
    return narrow.astype(jnp.uint32)[..., None]


def _fmix(h: jax.Array, m1: int, m2: int) -> jax.Array:
    """A 32-bit hash finaliser (xor-shift, multiply): every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * np.uint32(m1)
    h = h ^ (h >> 13)
    h = h * np.uint32(m2)
    return h ^ (h >> 16)


@jax.jit
def _digest(x: jax.Array) -> jax.Array:
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    for axis, size in enumerate(w.shape):
        index = index * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
    a = _fmix(w ^ (index * np.uint32(0x9E3779B1)), 0x85EBCA6B, 0xC2B2AE35)
    key = index * np.uint32(0x1B873593) + np.uint32(0x7F4A7C15)
    b = _fmix((w * np.uint32(0xCC9E2D51)) ^ key, 0x7FEB352D, 0x846CA68B)
    return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


def _read(words: jax.Array) -> str:
    host = np.asarray(words.addressable_data(0)) if isinstance(words, jax.Array) else words
    return f"{int(host[0]):08x}{int(host[1]):08x}"


def checksums(arrays: Sequence[jax.Array]) -> list[str]:
    """The checksum (16 hex digits) of each array, all dispatched before any is read.

    Collective in a multi-process run: every process must call it with the same global
    arrays in the same order.
    """
    pending = [None if x.size == 0 else _digest(x) for x in arrays]
    return ["0" * 16 if d is None else _read(d) for d in pending]


