"""The ordering devices of the chunked step (``optstate.quantization.ordering``) keep one
parameter's copy of old codes alive at a time; this measures it with XLA's memory analysis,
and measures that without them the copies are all alive at once (so the check can fail)."""

import jax
import jax.numpy as jnp
import optax

import optstate
from optstate.memory import compiled_memory
from optstate.quantization import chunked

LEAVES, SIDE = 8, 512
PARAMS = {f"w{i}": jax.ShapeDtypeStruct((SIDE, SIDE), jnp.float32) for i in range(LEAVES)}


def _step_temporaries() -> int:
    tx = optstate.quantize_state(optstate.adamw(1e-3), "int8", chunk_elements=16384)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = jax.eval_shape(tx.init, PARAMS)
    return compiled_memory(jax.jit(step, donate_argnums=(1,)), PARAMS, state, PARAMS).temporaries


def _one_parameters_codes() -> int:
    """Bytes of one parameter's stored moments (mu and nu codes plus scales)."""
    tx = optstate.quantize_state(optstate.adamw(1e-3), "int8")
    state = jax.eval_shape(tx.init, {"w": PARAMS["w0"]})
    return optstate.memory.state_bytes(state)


def test_old_codes_are_copied_one_parameter_at_a_time():
    per_parameter = _one_parameters_codes()
    assert _step_temporaries() < 2 * per_parameter


def test_without_the_ordering_every_copy_is_alive_at_once(monkeypatch):
    monkeypatch.setattr(chunked, "zero_from", lambda arrays: jnp.zeros((), jnp.uint32))
    per_parameter = _one_parameters_codes()
    assert _step_temporaries() > (LEAVES - 2) * per_parameter
