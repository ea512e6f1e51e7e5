"""Ordering devices: data dependencies that make XLA run one array's work after another's.

The bounded-memory step (:mod:`optstate.quantization.chunked`) updates the state of one
parameter after another, each in a loop that reads a copy of the parameter's old codes and
writes the new ones in place. XLA schedules by data dependencies only: left alone it may make
every parameter's copy at the start (all copies alive at once: the peak the loop exists to
avoid), fuse a copy into its readers (so the loop reads the buffer it overwrites) or sink it into
the loop. These three functions create the dependencies that forbid that, at the cost of one
element read per array:

* :func:`zero_from` computes a ``uint32`` zero from the first element of arrays, so that
  whatever uses it waits for them;
* :func:`plus_zero` makes a value depend on such a zero without changing a bit of it;
* :func:`copy_after` materializes a copy of an array once the zero exists, inside a
  ``lax.cond`` that the compiler can neither fuse into the copy's readers nor move into a loop.

If XLA stopped honouring them, the step's peak memory would rise by the state of every
parameter but one; ``tests/quantization/test_ordering.py`` measures it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def zero_from(arrays: Sequence[jax.Array]) -> jax.Array:
    """A ``uint32`` zero computed from the first element of each array (so that whatever uses
    it runs after those arrays are computed); ``min(bits, 0)`` of unsigned bits is always 0 but
    is not folded by the compiler."""
    zero = jnp.zeros((), jnp.uint32)
    for a in arrays:
        first = lax.slice(a.reshape(-1), (0,), (1,)).reshape(())
        nbits = jnp.dtype(first.dtype).itemsize * 8
        bits = lax.bitcast_convert_type(first, jnp.dtype(f"uint{nbits}"))
        zero = zero | jnp.minimum(bits, 0).astype(jnp.uint32)
    return zero


def plus_zero(x: jax.Array, zero: jax.Array) -> jax.Array:
    """``x`` with a data dependency on ``zero`` (a ``uint32`` zero); bit-exact."""
    nbits = jnp.dtype(x.dtype).itemsize * 8
    utype = jnp.dtype(f"uint{nbits}")
    bits = lax.bitcast_convert_type(x, utype) | zero.astype(utype)
    return lax.bitcast_convert_type(bits, x.dtype)


def copy_after(x: jax.Array, zero: jax.Array | None) -> jax.Array:
    """A materialized copy of ``x``, computed once ``zero`` (a ``uint32`` zero from
    :func:`zero_from`) exists (bit-exact)."""
    if zero is None:
        zero = jnp.zeros((), jnp.uint32)
    # Inside a conditional (always taken) so that the compiler neither fuses the copy into
    # its readers nor sinks it into the loop that overwrites ``x``.
    return lax.cond(zero == 0, lambda a: plus_zero(a, zero), lambda a: a + a, jnp.asarray(x))
