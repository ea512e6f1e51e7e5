"""Code books: construction (the papers' maps), nearest and stochastic rounding, RNG streams."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optstate.quantization import codebooks as cb
from optstate.quantization import formats
from optstate.quantization.randomness import uniform_from_counter

BOOKS = [cb.INT8_SIGNED, cb.INT8_UNSIGNED, cb.INT4_SIGNED, cb.INT4_UNSIGNED]


def _paper_dynamic_map(top, lowest):
    """Dettmers et al. (2022): decade i-top holds 2**i linearly spaced values, the midpoints of
    linspace(0.1, 1, 2**i + 1) scaled by 10**(i - top)."""
    out = []
    for i in range(lowest, top + 1):
        edges = np.linspace(0.1, 1.0, 2**i + 1)
        out.extend(10.0 ** (i - top) * (edges[:-1] + edges[1:]) / 2)
    return np.asarray(out)


def test_unsigned_int8_map_is_the_dynamic_map_without_zero():
    values = cb.INT8_UNSIGNED.values()
    assert values.size == 256
    expected = np.append(_paper_dynamic_map(7, 0), 1.0)
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert values.min() > 0  # zero-free: a positive second moment never decodes to 0
    assert np.all(np.diff(values) > 0)


def test_signed_maps_are_symmetric_with_zero_and_one():
    for book, top in [(cb.INT8_SIGNED, 6), (cb.INT4_SIGNED, 2)]:
        values = book.values()
        mags = np.concatenate([[0.0], _paper_dynamic_map(top, 1), [1.0]])
        np.testing.assert_allclose(values, np.concatenate([-mags[::-1], mags[1:]]), rtol=1e-6)
        assert np.all(np.diff(values) > 0)
        assert values[book.center] == 0.0 and values[0] == -1.0 and values[-1] == 1.0
    assert cb.INT8_SIGNED.num_codes == 255 and cb.INT4_SIGNED.num_codes == 15


def test_int4_unsigned_is_the_zero_free_linear_grid():
    np.testing.assert_array_equal(cb.INT4_UNSIGNED.values(), (np.arange(16) + 1) / 16)


def _inputs(signed, n=40000, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([rng.uniform(0, 1, n), 10 ** rng.uniform(-12, 0, n), [0.0, 1.0]])
    if signed:
        y = y * rng.choice([-1.0, 1.0], y.size)
    return y.astype(np.float32)


@pytest.mark.parametrize("book", BOOKS, ids=lambda b: b.name)
def test_nearest_matches_brute_force_argmin(book):
    values = book.values().astype(np.float64)
    y = _inputs(book.signed)
    codes = np.asarray(jax.jit(book.encode)(jnp.asarray(y))).astype(int)
    err = np.abs(y - values[codes])
    best = np.min(np.abs(y[:, None].astype(np.float64) - values[None, :]), axis=1)
    assert np.all(err <= best + 1e-7 * np.abs(y) + 1e-30)
    # decode is exact and re-encoding a stored value returns its code
    np.testing.assert_array_equal(np.asarray(book.decode(jnp.asarray(codes, jnp.uint8))),
                                  values[codes].astype(np.float32))
    all_codes = np.arange(book.num_codes)
    back = book.encode(book.decode(jnp.asarray(all_codes, jnp.uint8)))
    np.testing.assert_array_equal(np.asarray(back), all_codes)


@pytest.mark.parametrize("book", BOOKS, ids=lambda b: b.name)
def test_stochastic_rounding_is_unbiased_between_neighbours(book):
    values = book.values().astype(np.float64)
    rng = np.random.default_rng(1)
    lo = values.min()
    y = rng.uniform(lo, 1.0, 64).astype(np.float32)
    n = 4000
    u = jax.random.uniform(jax.random.key(0), (64, n))
    codes = book.encode(jnp.broadcast_to(jnp.asarray(y)[:, None], (64, n)), u)
    got = values[np.asarray(codes).astype(int)]
    # only the two neighbouring values occur
    below = np.array([values[values <= v].max() for v in y])
    above = np.array([values[values >= v].min() for v in y])
    assert np.all((got == below[:, None]) | (got == above[:, None]))
    # unbiased: |mean - y| within 5 standard errors of a two-point distribution
    sd = np.sqrt((y - below) * (above - y)) / np.sqrt(n)
    assert np.all(np.abs(got.mean(axis=1) - y) <= 5 * sd + 1e-7)
    # a stored value is returned as is whatever u
    stored = book.decode(jnp.arange(book.num_codes, dtype=jnp.uint8))
    again = book.encode(stored, jnp.full(stored.shape, 0.999999, jnp.float32))
    np.testing.assert_array_equal(np.asarray(again), np.arange(book.num_codes))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "bf16"])
def test_float_grid_stochastic_rounding(name):
    grid = formats.get(name).grid
    dtype = jnp.dtype(formats.get(name).codec.dtype)
    rng = np.random.default_rng(2)
    top = min(grid.max_value, 1e4)
    x = (rng.uniform(-1, 1, 48) * 10 ** rng.uniform(-3, 0, 48) * top).astype(np.float32)
    n = 4000
    u = jax.random.uniform(jax.random.key(1), (48, n))
    r = np.asarray(grid.round(jnp.broadcast_to(jnp.asarray(x)[:, None], (48, n)), u))
    # every result is exactly representable, and is one of the two neighbours of x
    as_dtype = np.asarray(jnp.asarray(r).astype(dtype).astype(jnp.float32))
    np.testing.assert_array_equal(r, as_dtype)
    near = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))
    spacing = 2.0 ** (np.maximum(np.floor(np.log2(np.abs(x))), grid.min_exponent)
                      - grid.mantissa_bits)
    assert np.all(np.abs(r - x[:, None]) < spacing[:, None])
    assert np.all(np.abs(near - x) <= spacing / 2)
    np.testing.assert_allclose(r.mean(axis=1), x, atol=0, rtol=0.02 * 2.0 ** -grid.mantissa_bits
                               + 6 * np.sqrt(0.25 / n) * 2.0 ** -grid.mantissa_bits)


def test_uniform_stream_is_chunk_independent_and_uniform():
    seed = jnp.asarray([12345, 678], jnp.uint32)
    full = np.asarray(uniform_from_counter(seed, (64, 100)))
    piece = np.asarray(uniform_from_counter(seed, (10, 100), offset=30 * 100))
    np.testing.assert_array_equal(piece, full[30:40])
    assert full.min() >= 0.0 and full.max() < 1.0
    assert abs(full.mean() - 0.5) < 0.02 and abs(full.var() - 1 / 12) < 0.01
    other = np.asarray(uniform_from_counter(seed + 1, (64, 100)))
    assert np.mean(other == full) < 0.01
