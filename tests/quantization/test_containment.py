"""One non-finite or overflowing gradient element damages no more state than float32 would:
block scales ignore non-finite values, and an element whose new state went non-finite keeps
its old state (``optstate.quantization.containment``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optstate
from optstate.quantization import formats
from optstate.quantization.codecs import CodebookCodec

BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 1e20}
SHAPES = {"whole": (4, 256), "chunked": (32, 512)}  # chunked: >= 2 chunks of 4096 values


@functools.lru_cache(maxsize=None)
def _transform(fmt):
    """(jitted init, jitted update): one compilation per format and shape for the whole file
    (eagerly, a quantized init compiles each of its operations on its own: seconds)."""
    tx = optstate.adam(1e-2)
    if fmt != "fp32":
        tx = optstate.quantize_state(tx, fmt, min_size=1, chunk_elements=4096)
    return jax.jit(tx.init), jax.jit(tx.update)


def _run(fmt, shape, bad=None, at=(1, 7), steps=4, seed=0):
    """Updates after ``steps`` Adam steps; the first gradient holds ``bad`` at ``at``."""
    params = {"w": jnp.full(shape, 0.1, jnp.float32)}
    init, step = _transform(fmt)
    state = init(params)
    g0 = jax.random.normal(jax.random.key(seed), shape)
    for t in range(steps):
        g = g0.at[at].set(bad) if (t == 0 and bad is not None) else g0
        updates, state = step({"w": g}, state, params)
    return np.asarray(updates["w"]), state


def _others_damaged(fmt, shape, bad, at=(1, 7)):
    clean, _ = _run(fmt, shape)
    hit, state = _run(fmt, shape, bad, at)
    others = np.ones(shape, bool)
    others[at] = False
    wrong = ~np.isclose(hit[others], clean[others], rtol=0.1, atol=1e-6)
    return int(wrong.sum()), hit[at], state


@pytest.mark.parametrize("path", sorted(SHAPES))
@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("fmt", formats.QUANTIZED_NAMES)
def test_one_bad_element_damages_only_itself(fmt, bad, path):
    """Before: NaN/Inf left the whole block (256 parameters in int8) non-finite for good, and
    1e20 (whose square overflows) froze the block at update 0."""
    damaged, own, state = _others_damaged(fmt, SHAPES[path], BAD[bad])
    assert damaged == 0
    # the element itself recovers: its state skipped the bad step, so its update is finite
    assert np.isfinite(own) and abs(own) < 0.05
    for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))) or leaf.dtype == jnp.uint32


@pytest.mark.parametrize("bad", sorted(BAD))
def test_float32_reference_damages_one_element_too(bad):
    """The reference the formats are held to: float32 Adam damages exactly one element."""
    damaged, own, _ = _others_damaged("fp32", SHAPES["whole"], BAD[bad])
    assert damaged == 0 and not (np.isfinite(own) and own != 0.0)


@settings(deadline=None, max_examples=25)
@given(st.sampled_from(formats.QUANTIZED_NAMES),
       st.sampled_from([np.nan, np.inf, -np.inf, 1e20, -1e30, 3.4e38, 1e-42, -1e-45]),
       st.integers(0, 3), st.integers(0, 255), st.integers(0, 2**16))
def test_property_state_stays_finite_and_other_updates_bounded(fmt, bad, row, col, seed):
    clean, _ = _run(fmt, (4, 256), steps=2, seed=seed)
    hit, state = _run(fmt, (4, 256), bad, (row, col), steps=2, seed=seed)
    others = np.ones((4, 256), bool)
    others[row, col] = False
    assert np.all(np.isfinite(hit[others]))
    assert np.max(np.abs(hit[others])) <= 2 * np.max(np.abs(clean)) + 1e-6
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("fmt", formats.QUANTIZED_NAMES)
def test_codec_scales_ignore_non_finite_values(fmt):
    """``quantize_array`` on its own: a block with NaN and Inf keeps a finite scale and its
    finite values (NaN is stored as NaN where the format has it, else as 0)."""
    from optstate.quantization.block import dequantize, quantize_array

    x = jnp.linspace(-1.0, 1.0, 256, dtype=jnp.float32).at[3].set(jnp.nan).at[9].set(jnp.inf)
    q = quantize_array(x[None, :], fmt)
    assert np.all(np.isfinite(np.asarray(q.scales)))
    back = np.asarray(dequantize(q))[0]
    finite = np.isfinite(np.asarray(x))
    half_step = {"int8": 0.02, "fp8_e4m3": 0.07, "bf16": 0.01}.get(fmt, 0.13)  # at |x| <= 1
    np.testing.assert_allclose(back[finite], np.asarray(x)[finite], atol=half_step)
    assert back[9] >= back[finite].max()  # +inf saturates at the block's top
    if isinstance(formats.get(fmt).codec, CodebookCodec):
        assert back[3] == 0.0


def test_apply_if_finite_outside_skips_the_whole_step_bit_for_bit():
    """With ``apply_if_finite`` around ``quantize_state`` a non-finite gradient skips the step:
    the state is bit-identical (the documented alternative to per-element containment)."""
    params = {"w": jnp.full((4, 256), 0.1)}
    tx = optstate.apply_if_finite(optstate.quantize_state(optstate.adam(1e-2), "int8", min_size=1),
                                  max_consecutive_errors=5)
    update = jax.jit(tx.update)  # one compilation (eagerly: every operation on its own)
    state = jax.jit(tx.init)(params)
    g = jax.random.normal(jax.random.key(0), (4, 256))
    _, state = update({"w": g}, state, params)
    _, after = update({"w": g.at[1, 7].set(jnp.nan)}, state, params)
    for a, b in zip(jax.tree.leaves(after.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
