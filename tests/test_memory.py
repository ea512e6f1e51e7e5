"""optstate.memory: bytes and the per-leaf table."""

import jax
import jax.numpy as jnp
import optax

import optstate
from optstate.memory import Description, describe, format_name, state_bytes


def _state(fmt):
    params = {"w": jnp.zeros((256, 64)), "b": jnp.zeros((64,))}
    return params, jax.jit(optstate.quantize_state(optax.adam(1e-3), fmt).init)(params)


def test_state_bytes_is_the_sum_of_the_arrays_sizes():
    for fmt in ["int8", "int4", "fp8_e5m2", "bf16", "fp32"]:
        params, state = _state(fmt)
        assert state_bytes(state) == sum(x.nbytes for x in jax.tree.leaves(state))
        # abstract states (no allocation) give the same figure
        assert state_bytes(jax.eval_shape(lambda s: s, state)) == state_bytes(state)


def test_describe_rows_and_total():
    params, state = _state("int8")
    d = describe(state, params=params)
    assert isinstance(d, Description)
    rows = {r.path: r for r in d.rows}
    mu_w = rows[".inner_state[0].mu['w']"]
    # one row per logical leaf: codes (256*64 bytes) plus 256 * ceil(64/256) fp32 scales
    assert mu_w.shape == (256, 64) and mu_w.format == "int8"
    assert mu_w.bytes == 256 * 64 + 64 * 4  # (256, 64) with 64 < 256: groups of 4 rows
    assert abs(mu_w.bytes_per_value - mu_w.bytes / (256 * 64)) < 1e-12
    assert rows[".inner_state[0].mu['b']"].format == "fp32"  # below min_size
    assert rows[".inner_state[0].count"].format == "int32"
    assert rows[".key"].bytes == 8
    assert d.total_bytes == state_bytes(state) == sum(r.bytes for r in d.rows)
    assert d.num_params == 256 * 64 + 64
    assert abs(d.bytes_per_param - d.total_bytes / d.num_params) < 1e-12
    text = str(d)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "shape", "format", "bytes", "bytes/value"]
    assert lines[-1].startswith("total") and "bytes/parameter" in lines[-1]
    assert len(lines) == len(d.rows) + 2
    assert describe(state).bytes_per_param is None


def test_format_names():
    assert format_name(jnp.zeros(3, jnp.bfloat16)) == "bf16"
    assert format_name(jnp.zeros(3, jnp.float32)) == "fp32"
    assert format_name(jax.ShapeDtypeStruct((2,), jnp.float8_e4m3fn)) == "fp8_e4m3"
    assert format_name(jnp.zeros(3, jnp.int32)) == "int32"
    assert optstate.memory is not None  # reachable as an attribute
