"""Counter-based uniform random numbers for stochastic rounding of quantized state.

Element ``n`` of a stream named by a seed is a hash of ``n``, so any chunk of an array draws
its own numbers and the draws do not depend on how the array is chunked: the bounded-memory
step and the whole-leaf step round a value alike, and a run resumed from a checkpoint (which
keeps the seed's key in the state) draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit avalanche mixer (xor-shift-multiply rounds)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return x


def uniform_from_counter(seed: jax.Array, shape: tuple[int, ...], offset: jax.Array | int = 0
                         ) -> jax.Array:
    """Uniform float32 numbers in ``[0, 1)`` (24-bit resolution) for elements
    ``offset, offset + 1, ...`` (row-major over ``shape``) of a stream named by ``seed``
    (``uint32[2]``).

    A counter-based hash: element ``n`` of the stream is ``mix(mix(n + s0) ^ s1)``, so any chunk
    of an array can be drawn on its own and the draws do not depend on how the array is
    chunked. Cheap (a few integer operations per element), deterministic and reproducible.
    """
    size = math.prod(shape)
    counter = lax.iota(jnp.uint32, size) + jnp.asarray(offset).astype(jnp.uint32)
    h = _mix32(counter + seed[0])
    h = _mix32(h ^ seed[1])
    u = (h >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    return u.reshape(shape)
