"""Rank-1 normalisation of int4 second moments (Li, Chen, Zhu, NeurIPS 2023), against the
paper's formula computed with NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate import dequantize, quantize_state
from optstate.quantization import codebooks
from optstate.quantization.block import quantize_array

GRID = np.asarray(codebooks.INT4_UNSIGNED.values(), np.float64)  # (i + 1) / 16


def _round_trip(x, fmt, nonneg=True, key_data=None):
    """``dequantize(quantize_array(...))`` in one compiled call (and the scales)."""
    def run(x, key_data):
        q = quantize_array(x, fmt, nonneg=nonneg, key_data=key_data)
        return dequantize(q), q.scales
    return jax.jit(run)(jnp.asarray(x), key_data)


def _scaled(shape, seed=0):
    """Positive values whose rows and columns differ in scale by decades (what rank-1
    normalisation is for)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 1.0, shape)
    for axis, n in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = n
        x = x * np.exp(rng.standard_normal(n) * 1.5).reshape(view)
    return x.astype(np.float32)


def _normalizer(x):
    """N = min over axes d of max(|x|) over all other axes (the paper's rank-1 scale)."""
    a = np.abs(x)
    out = None
    for d in range(x.ndim):
        m = a.max(axis=tuple(k for k in range(x.ndim) if k != d), keepdims=True)
        out = m if out is None else np.minimum(out, m)
    return np.broadcast_to(out, x.shape)


@pytest.mark.parametrize("shape", [(96, 40), (6, 10, 24)])
def test_codes_are_the_nearest_grid_value_of_x_over_the_rank1_normalizer(shape):
    x = _scaled(shape)
    got, scales = _round_trip(x, "int4_rank1")
    assert scales.shape == (sum(shape),)
    np.testing.assert_allclose(np.asarray(scales),
                               np.concatenate([np.abs(x).max(axis=tuple(
                                   k for k in range(x.ndim) if k != d)) for d in range(x.ndim)]))
    n = _normalizer(x)
    y = x / n
    nearest = GRID[np.argmin(np.abs(y[..., None] - GRID), axis=-1)]
    np.testing.assert_allclose(np.asarray(got), nearest * n, rtol=1e-6)


def test_rank1_is_closer_than_blocks_where_rows_and_columns_differ_in_scale():
    x = _scaled((256, 64))
    errors = {}
    for fmt in ("int4", "int4_rank1"):
        got = np.asarray(_round_trip(x, fmt)[0])
        errors[fmt] = np.mean(np.abs(got - x) / x)
    assert errors["int4_rank1"] < errors["int4"] / 3


def test_stochastic_rank1_rounding_is_unbiased():
    """Unbiased on the grid's range; below its smallest value N / 16 the zero-free grid
    rounds up (a second moment never decodes to zero)."""
    x = _scaled((64, 32))
    keys = jnp.stack([jnp.arange(200, dtype=jnp.uint32), jnp.full(200, 7, jnp.uint32)], 1)
    draws = jax.jit(jax.vmap(lambda k: dequantize(quantize_array(
        jnp.asarray(x), "int4_rank1", nonneg=True, key_data=k))))(keys)
    mean = np.mean(np.asarray(draws), axis=0)
    spacing = _normalizer(x) / 16
    inside = x >= spacing
    # each draw is off by less than one grid step; over 200 draws the mean is within ~0.1
    assert inside.mean() > 0.5
    assert np.max(np.abs(mean - x)[inside] / spacing[inside]) < 0.3


def test_negative_values_in_a_nonneg_leaf_keep_their_sign_class():
    """Sign safety: a "non-negative" leaf holding negative values is stored on the shifted
    grid, y -> (y + 1) / 2 (negated scales say so): its values 2 (i + 1) / 16 - 1 run from
    -7/8 to 1 in steps of 1/8, so each value is within N / 8 of itself (N / 16 inside)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((48, 64)) * np.exp(rng.standard_normal((48, 1)))).astype(np.float32)
    got, scales = _round_trip(x, "int4_rank1")
    assert np.all(np.asarray(scales) <= 0)
    got = np.asarray(got)
    n = _normalizer(x)
    assert np.all(np.abs(got - x) <= n / 8 * (1 + 1e-5))
    inside = x / n >= -7 / 8
    assert np.all(np.abs(got - x)[inside] <= n[inside] / 16 * (1 + 1e-5))


def test_int4_adam_stores_2d_second_moments_rank1_and_the_rest_blockwise():
    params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros((8192,))}
    state = jax.jit(quantize_state(optax.adam(1e-3), "int4").init)(params)
    adam = state.inner_state[0]
    assert (adam.nu["w"].fmt, adam.nu["b"].fmt, adam.mu["w"].fmt) == ("int4_rank1", "int4",
                                                                       "int4")
    n = sum(p.size for p in params.values())
    assert optstate.memory.state_bytes(state) / n < 1.07  # no more than block-wise int4
    off = jax.eval_shape(quantize_state(optax.adam(1e-3), "int4", rank1=False).init, params)
    assert off.inner_state[0].nu["w"].fmt == "int4"


def test_rank1_leaves_take_the_whole_leaf_step_and_match_optax():
    """Rank-1 scales are maxima over whole rows and columns: that parameter's state is updated
    in one piece (``describe`` says so), and the step is Optax's on the stored state."""
    params = {"w": jnp.asarray(_scaled((256, 128), seed=2)), "b": jnp.ones((8192,))}
    grads = jax.tree.map(lambda p: p * 0.1 - 0.03, params)
    tx = quantize_state(optax.adam(1e-2, b2=0.99), "int4", chunk_elements=4096)
    state = jax.jit(tx.init)(params)
    rows = {r.path: r.step for r in optstate.memory.describe(state, params, tx=tx).rows}
    assert rows[".inner_state[0].nu['w']"].startswith("whole: rank-1 normalisation")
    assert rows[".inner_state[0].mu['w']"].startswith("whole: rank-1 normalisation")
    assert rows[".inner_state[0].nu['b']"] == "chunked"
    update = jax.jit(tx.update)
    _, state = update(grads, state, params)
    stored = jax.tree.map(lambda x: dequantize(x) if optstate.is_quantized(x) else x,
                          state.inner_state, is_leaf=optstate.is_quantized)
    updates, _ = update(grads, state, params)
    expect, _ = jax.jit(optax.adam(1e-2, b2=0.99).update)(grads, stored, params)
    for k in params:
        np.testing.assert_allclose(updates[k], expect[k], rtol=1e-5, atol=1e-9)


def test_rank1_is_refused_where_the_format_has_none():
    with pytest.raises(ValueError, match=r"rank1=True is available for \['int4'\]"):
        quantize_state(optax.adam(1e-3), "int8", rank1=True)


def test_a_parameter_whose_only_quantized_leaf_is_rank1_is_not_cut_into_row_chunks():
    """RMSProp keeps only ``nu``: one format, large enough for the row-chunk loop, whose
    block-wise cuts would be wrong for rank-1 scales; it is updated whole instead."""
    params = {"w": jnp.asarray(_scaled((256, 128), seed=3))}
    grads = {"w": params["w"] * 0.2 - 0.1}
    inner = optax.rmsprop(1e-2)
    tx = quantize_state(inner, "int4", chunk_elements=4096)
    update = jax.jit(tx.update)
    _, state = update(grads, jax.jit(tx.init)(params), params)
    stored = jax.tree.map(lambda x: dequantize(x) if optstate.is_quantized(x) else x,
                          state.inner_state, is_leaf=optstate.is_quantized)
    _, new_state = update(grads, state, params)
    _, expect = jax.jit(inner.update)(grads, stored, params)
    want = jax.jit(lambda x: dequantize(quantize_array(x, "int4_rank1", nonneg=True)))(
        expect[0].nu["w"])
    np.testing.assert_allclose(dequantize(new_state.inner_state[0].nu["w"]), want, rtol=1e-5)
