"""Block-wise quantization of one array: layout, codes against a numpy reference, edge shapes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optstate.quantization import formats
from optstate.quantization.array import QuantizedArray, is_quantized
from optstate.quantization.block import block_layout, dequantize, dequantize_array, quantize_array
from optstate.quantization.codecs import pack_int4, unpack_int4


def check_format(fmt, block_size):
    """The block size the registry gives ``fmt`` for a requested ``block_size``."""
    return formats.get(fmt).block_size(block_size)

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=4).map(tuple)


@functools.partial(jax.jit, static_argnames=("fmt", "nonneg"))
def _round_trip(x, fmt, nonneg=False):
    """(QuantizedArray, dequantized array), compiled once per shape and format."""
    q = quantize_array(x, fmt, nonneg=nonneg)
    return q, dequantize(q)


@settings(max_examples=200, deadline=None)
@given(shape=shapes, block=st.sampled_from([2, 8, 64, 128, 256]))
def test_layout_covers_the_array_and_never_crosses_the_first_axis(shape, block):
    lay = block_layout(shape, block)
    size = math.prod(shape)
    assert lay.n_rows * lay.row_len == size
    assert math.prod(lay.scales_shape) == lay.n_rows * lay.n_blocks
    assert lay.n_blocks == -(-lay.row_len // block)
    if len(shape) >= 2:
        # blocks of a row of the 2-D view belong to one index of the first axis (or a group of
        # g whole ones): splitting shape[0] k ways splits codes and scales alike
        assert shape[0] % lay.scales_shape[0] == 0
        rows_per_scale_row = shape[0] // lay.scales_shape[0]
        assert rows_per_scale_row == lay.group
        assert lay.group * math.prod(shape[1:]) <= max(block, math.prod(shape[1:]))


def _reference_int(x2, values, block):
    """numpy: per row, blocks of `block`; absmax scale; nearest code value (argmin)."""
    out = np.empty_like(x2, dtype=np.float64)
    scale = np.empty_like(out)
    for r in range(x2.shape[0]):
        for s in range(0, x2.shape[1], block):
            b = x2[r, s:s + block].astype(np.float64)
            m = np.abs(b).max()
            scale[r, s:s + block] = m
            if m == 0:
                out[r, s:s + block] = 0
                continue
            idx = np.argmin(np.abs(b[:, None] / m - values[None, :]), axis=1)
            out[r, s:s + block] = values[idx] * m
    return out, scale


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 700), fmt=st.sampled_from(["int8", "int4"]),
       nonneg=st.booleans(), seed=st.integers(0, 2**16), log_range=st.floats(0, 8))
def test_integer_formats_match_a_numpy_reference(rows, cols, fmt, nonneg, seed, log_range):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * 10 ** rng.uniform(-log_range, 0, (rows, cols))
    if nonneg:
        x = np.abs(x)
    x = x.astype(np.float32)
    block = 256 if fmt == "int8" else 128
    q, ours = _round_trip(jnp.asarray(x), fmt, nonneg)
    assert q.codes.dtype == jnp.uint8
    assert q.codes.shape == ((rows, cols) if fmt == "int8" else (rows, -(-cols // 2)))
    values = formats.get(fmt).codec.book(nonneg).values().astype(np.float64)
    ours = np.asarray(ours).astype(np.float64)
    if rows > 1 and cols < block:  # blocks are groups of whole rows
        lay = block_layout((rows, cols), block)
        ref, scale = _reference_int(x.reshape(lay.n_rows, lay.row_len), values, block)
        ref, scale = ref.reshape(x.shape), scale.reshape(x.shape)
    else:
        ref, scale = _reference_int(x, values, block)
    err_ours, err_ref = np.abs(ours - x), np.abs(ref - x)
    # equal up to float32 rounding of x / absmax (which may flip an exact tie)
    assert np.all(err_ours <= err_ref + 4e-7 * scale + 1e-30)
    if nonneg:
        assert np.all(ours[x > 0] > 0)


@settings(max_examples=15, deadline=None)
@given(shape=shapes, fmt=st.sampled_from(["int8", "int4", "fp8_e4m3", "fp8_e5m2", "bf16"]),
       seed=st.integers(0, 2**16))
def test_nonneg_state_never_dequantizes_to_zero(shape, fmt, seed):
    rng = np.random.default_rng(seed)
    x = (10.0 ** rng.uniform(-30, 2, shape)).astype(np.float32)  # positive, huge dynamic range
    d = np.asarray(_round_trip(jnp.asarray(x), fmt, True)[1])
    assert d.shape == x.shape and d.dtype == np.float32
    assert np.all(d > 0) and np.all(np.isfinite(d))


@pytest.mark.parametrize("fmt,rel", [("fp8_e4m3", 2**-4), ("fp8_e5m2", 2**-3), ("bf16", 2**-8)])
def test_float_formats_round_to_nearest_relative_to_the_block(fmt, rel):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 1000)) * 10 ** rng.uniform(-2, 0, (8, 1000))).astype(np.float32)
    q = quantize_array(jnp.asarray(x), fmt)
    d = np.asarray(dequantize(q))
    if fmt == "bf16":
        np.testing.assert_array_equal(d, np.asarray(jnp.asarray(x).astype(jnp.bfloat16)
                                                    .astype(jnp.float32)))
        assert q.scales.size == 0 and q.codes.dtype == jnp.uint16  # the bf16 bits
        np.testing.assert_array_equal(
            np.asarray(q.codes), np.asarray(jnp.asarray(x).astype(jnp.bfloat16)).view(np.uint16))
        return
    assert q.scales.shape == (8, 4)
    # normal range: relative error at most half a step
    big = np.abs(x) > np.abs(x).max() * 1e-2
    assert np.all(np.abs(d - x)[big] <= rel * np.abs(x)[big] + 1e-12)
    # the block maximum is stored exactly, so quantizing again is the identity
    q2 = quantize_array(dequantize(q), fmt)
    np.testing.assert_array_equal(np.asarray(q2.codes), np.asarray(q.codes))
    assert q.codes.dtype == jnp.uint8  # the bits of the FP8 values
    np.testing.assert_array_equal(np.asarray(q2.scales), np.asarray(q.scales))


@settings(max_examples=20, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_int4_packing_round_trips(shape, seed):
    codes = np.random.default_rng(seed).integers(0, 16, shape).astype(np.uint8)
    packed = np.asarray(pack_int4(codes))
    assert packed.shape == shape[:-1] + (-(-shape[-1] // 2),)
    np.testing.assert_array_equal(packed[..., 0] & 0x0F, codes[..., 0])  # element 0: low nibble
    if shape[-1] > 1:
        np.testing.assert_array_equal(packed[..., 0] >> 4, codes[..., 1])
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, shape[-1])), codes)


@pytest.mark.parametrize("shape,fmt", [((4096, 3), "int8"), ((1000, 3), "int4"), ((300,), "int4"),
                                       ((7, 513), "int8"), ((512, 8, 64), "int4"), ((5,), "int8"),
                                       ((2, 3, 50000), "int8")])
def test_edge_shapes(shape, fmt):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    q, d = _round_trip(jnp.asarray(x), fmt)
    assert isinstance(q, QuantizedArray) and is_quantized(q)
    assert q.shape == shape and q.size == x.size and q.dtype == jnp.float32
    lay = block_layout(shape, q.block_size)
    assert q.scales.shape == lay.scales_shape
    np.testing.assert_array_equal(np.asarray(dequantize_array(q)), np.asarray(d))
    d = np.asarray(d)
    # error bounded by half the largest gap of the map, relative to each block's maximum
    gap = np.diff(formats.get(fmt).codec.book(False).values()).max() / 2
    err = np.abs(d - x).reshape(lay.n_rows, lay.row_len)
    scale = np.abs(x).reshape(lay.n_rows, lay.row_len).max()
    assert err.max() <= gap * scale + 1e-6
    # storage: codes plus scales
    assert q.nbytes == q.codes.size * q.codes.dtype.itemsize + q.scales.size * 4


def test_small_last_axis_groups_rows_into_blocks():
    lay = block_layout((4096, 3), 256)
    assert (lay.group, lay.scales_shape, lay.row_len) == (64, (64, 1), 192)
    assert quantize_array(jnp.ones((4096, 3)), "int8").nbytes == 4096 * 3 + 64 * 4


def test_bf16_and_fp16_inputs_keep_their_dtype():
    for dtype in (jnp.bfloat16, jnp.float16):
        x = jnp.linspace(-1, 1, 1000, dtype=dtype)
        q = quantize_array(x, "int8")
        assert q.dtype == dtype and dequantize(q).dtype == dtype
        np.testing.assert_allclose(np.asarray(dequantize(q), np.float32), np.asarray(x, np.float32),
                                   atol=0.01)


def test_bad_inputs_raise_value_errors_listing_what_is_accepted():
    with pytest.raises(ValueError, match="int8.*int4.*fp8_e4m3.*fp8_e5m2.*bf16.*fp32"):
        check_format("int3", None)
    with pytest.raises(ValueError, match="block_size.*positive integer"):
        check_format("int8", 0.5)
    with pytest.raises(ValueError, match="even"):
        check_format("int4", 127)
    with pytest.raises(ValueError, match=">= 2"):
        check_format("int8", 1)
    with pytest.raises(ValueError, match="non-empty"):
        quantize_array(jnp.zeros((0, 4)), "int8")
    with pytest.raises(ValueError, match="at least one"):
        quantize_array(jnp.zeros(()), "int8")
    assert check_format("int8", None) == 256 and check_format("int4", None) == 128
