"""The registry of storage formats: every entry is self-consistent, names resolve once, and a
new format is one entry (a format added here trains through quantize_state unchanged)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optstate
from optstate.quantization import formats
from optstate.quantization.block import dequantize, quantize_array


@pytest.mark.parametrize("name", formats.NAMES)
def test_every_entry_is_consistent(name):
    fmt = formats.get(name)
    assert fmt.name == name and formats.get(fmt) is fmt
    if not fmt.quantized:
        assert fmt.default_block_size == 0 and fmt.codes_dtype is None
        return
    x = jnp.linspace(-1.0, 1.0, 4 * 256, dtype=jnp.float32).reshape(4, 256)
    q = quantize_array(x, name)
    assert q.codes.dtype == np.dtype(fmt.codes_dtype)
    assert q.codes.shape == fmt.codes_shape(x.shape)
    # stored bits per value, scales excluded, are what the entry says
    assert q.codes.size * q.codes.dtype.itemsize * 8 == x.size * fmt.bits
    assert (q.scales.size > 0) == fmt.blocked
    if fmt.grid is not None:  # float formats: their grid holds the values they store
        values = np.asarray(dequantize(q) / (q.scales.max() if fmt.blocked else 1.0))
        assert np.all(np.isfinite(values))


def test_unknown_names_list_the_registry():
    with pytest.raises(ValueError, match="int8.*int4.*fp8_e4m3.*fp8_e5m2.*bf16.*fp32"):
        formats.get("int3")
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        optstate.quantize_state(optstate.adam(1e-3), "int3")


def test_dtype_format_names():
    assert formats.dtype_format_name(jnp.float32) == "fp32"
    assert formats.dtype_format_name(jnp.bfloat16) == "bf16"
    assert formats.dtype_format_name("float8_e4m3fn") == "fp8_e4m3"
    assert formats.dtype_format_name(jnp.int32) == "int32"


# Each example below has a new shape: compiled whole, quantization takes about 0.3 s; run
# eagerly it takes seconds (every operation is compiled on its own).
_quantize = jax.jit(quantize_array, static_argnums=1, static_argnames="nonneg")
_dequantize = jax.jit(dequantize)


@settings(deadline=None, max_examples=12)
@given(st.sampled_from(formats.QUANTIZED_NAMES), st.integers(1, 3), st.integers(1, 300),
       st.integers(0, 2**31 - 1))
def test_requantizing_a_stored_array_is_the_identity(name, rows, cols, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    q = _quantize(x, name)
    again = _quantize(_dequantize(q), name)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(again.scales), np.asarray(q.scales))


def test_a_new_format_is_one_registry_entry(monkeypatch):
    """An 8-bit format with blocks of 64: only a registry entry, nothing else touched."""
    int8 = formats.get("int8")
    small_blocks = dataclasses.replace(int8, name="int8_b64", default_block_size=64)
    monkeypatch.setitem(formats.FORMATS, "int8_b64", small_blocks)
    params = {"w": jnp.ones((256, 256)) * 0.1}
    grads = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    tx = optstate.quantize_state(optstate.adam(1e-2), "int8_b64", min_size=1)
    ref = optstate.quantize_state(optstate.adam(1e-2), "int8", block_size=64, min_size=1)
    state, ref_state = jax.jit(tx.init)(params), jax.jit(ref.init)(params)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for _ in range(2):
        updates, state = update(grads, state, params)
        ref_updates, ref_state = ref_update(grads, ref_state, params)
    assert state.inner_state[0].mu["w"].fmt == "int8_b64"
    assert state.inner_state[0].mu["w"].scales.shape == (256, 4)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(ref_updates["w"]))
    assert "int8_b64" in str(optstate.memory.describe(state))


@settings(deadline=None, max_examples=16)
@given(st.sampled_from(formats.QUANTIZED_NAMES), st.integers(1, 128), st.integers(0, 2**31 - 1),
       st.floats(0.0, 1.0))
def test_non_negative_grid_never_changes_a_sign(name, cols, seed, negative_share):
    """``nonneg=True`` is a hint (a field name such as ``nu``), not a promise: a block holding
    a negative value anyway keeps every value within the grid's resolution (before: the
    unsigned grid stored negatives as tiny positives, and FP8/BF16 clamped them to minus the
    smallest subnormal); a block without one uses the zero-free grid (no positive becomes 0)."""
    rng = np.random.default_rng(seed)  # (NumPy: eager jax.random compiles for each shape)
    x = np.abs(rng.standard_normal((1, cols))).astype(np.float32) + np.float32(1e-3)  # a block
    x = np.where(rng.uniform(size=x.shape) < negative_share, -x, x)
    hinted = np.asarray(_dequantize(_quantize(x, name, nonneg=True)))
    # resolution over [-1, 1] relative to the block's largest magnitude: the shifted unsigned
    # code book for int8/int4 (int4's linear grid also stops at -7/8), the float grid otherwise
    resolution = {"int8": 0.01, "int4": 0.13, "fp8_e4m3": 0.07, "bf16": 0.01}.get(name, 0.13)
    np.testing.assert_allclose(hinted, x, atol=resolution * np.abs(x).max())
    if not (x < 0).any():
        assert np.all(hinted > 0)
