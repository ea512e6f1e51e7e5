"""How fast can an int8 AdamW step be on this CPU with XLA? A best case, not the library.

A hand-written step for 8 leaves of 2048 x 2048 that does everything ``quantize_state`` cannot
do through the ``(init, update)`` protocol: one loop per leaf over chunks of whole blocks that
decodes both moments, updates them, encodes them *and writes the new parameters in place*
(no separate ``apply_updates`` pass, no copy of the old codes). Two encodings are compared,
interleaved with Optax's fp32 AdamW:

* ``dynamic map``: the real ``int8`` codes (optstate's code books: table decode, bucketed
  nearest encode), i.e. a ceiling for ``quantize_state(..., "int8")`` on this machine;
* ``minifloat``: a sign + 4-bit exponent + 3-bit mantissa code (unsigned: 4 + 4) made with a
  few integer operations on the float's bits, *not* the dynamic map: what the same loop costs
  when encoding is nearly free.

The gap between the two is the encoder's arithmetic: on CPU the step is compute-bound, not
memory-bound. ``python bench/int8_cpu_ceiling.py [--rows 128] [--repeats 9]``
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optstate.quantization import formats
from optstate.tasks.timing import time_interleaved

BLOCK = 256
B1, B2, EPS, LR, WD = 0.9, 0.999, 1e-8, 1e-3, 1e-4


def _minifloat_signed_encode(y: jax.Array) -> jax.Array:
    bits = lax.bitcast_convert_type(jnp.abs(y), jnp.int32)
    magnitude = jnp.clip(((bits + (1 << 19)) >> 20) - ((127 - 15) << 3), 0, 127)
    return (magnitude | (jnp.signbit(y).astype(jnp.int32) << 7)).astype(jnp.uint8)


def _minifloat_signed_decode(codes: jax.Array) -> jax.Array:
    c = codes.astype(jnp.int32)
    magnitude = c & 127
    value = lax.bitcast_convert_type((magnitude + ((127 - 15) << 3)) << 20, jnp.float32)
    value = jnp.where(magnitude == 0, 0.0, value)
    return jnp.where(c >= 128, -value, value)


def _minifloat_unsigned_encode(y: jax.Array) -> jax.Array:
    bits = lax.bitcast_convert_type(y, jnp.int32)
    return jnp.clip(((bits + (1 << 18)) >> 19) - ((127 - 15) << 4), 0, 255).astype(jnp.uint8)


def _minifloat_unsigned_decode(codes: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type((codes.astype(jnp.int32) + ((127 - 15) << 4)) << 19,
                                    jnp.float32)


def _dynamic_map_coders():
    int8 = formats.get("int8").codec
    signed, unsigned = int8.book(False), int8.book(True)
    return signed.encode, signed.decode, unsigned.encode, unsigned.decode


def _minifloat_coders():
    return (_minifloat_signed_encode, _minifloat_signed_decode, _minifloat_unsigned_encode,
            _minifloat_unsigned_decode)


def _fused_step(coders, rows: int):
    """``(params, state, grads) -> (params, state)`` with the update done chunk by chunk."""
    enc_m, dec_m, enc_v, dec_v = coders

    def leaf(p, g, state, bc1, bc2):
        m_codes, m_scales, v_codes, v_scales = state
        n_rows, n_cols = p.shape
        per_row = n_cols // BLOCK

        def body(i, carry):
            p, m_codes, m_scales, v_codes, v_scales = carry
            r0 = i * rows

            def rows_of(x, width):
                return lax.dynamic_slice_in_dim(x, r0 * width, rows * width, 0)

            def put(x, piece, width):
                return lax.dynamic_update_slice_in_dim(
                    x, piece.reshape((rows * width,) + x.shape[1:]).astype(x.dtype), r0 * width, 0)

            g_b = rows_of(g, 1).reshape(-1, BLOCK)
            p_b = rows_of(p, 1).reshape(-1, BLOCK)
            m = dec_m(rows_of(m_codes, 1).reshape(-1, BLOCK)) * rows_of(m_scales, per_row)[:, None]
            v = dec_v(rows_of(v_codes, 1).reshape(-1, BLOCK)) * rows_of(v_scales, per_row)[:, None]
            m = B1 * m + (1 - B1) * g_b
            v = B2 * v + (1 - B2) * g_b * g_b
            m_max = jnp.max(jnp.abs(m), axis=1)
            v_max = jnp.max(v, axis=1)
            new_m = enc_m(m / jnp.where(m_max == 0, 1.0, m_max)[:, None])
            new_v = enc_v(v / jnp.where(v_max == 0, 1.0, v_max)[:, None])
            new_p = p_b - LR * ((m / bc1) / (jnp.sqrt(v / bc2) + EPS) + WD * p_b)
            return (put(p, new_p, 1), put(m_codes, new_m, 1), put(m_scales, m_max, per_row),
                    put(v_codes, new_v, 1), put(v_scales, v_max, per_row))

        out = lax.fori_loop(0, n_rows // rows, body, (p, *state))
        return out[0], out[1:]

    def step(params, state, grads):
        leaves, count = state
        count = count + 1
        t = count.astype(jnp.float32)
        bc1, bc2 = 1 - B1**t, 1 - B2**t
        new = {k: leaf(params[k], grads[k], leaves[k], bc1, bc2) for k in params}
        return {k: v[0] for k, v in new.items()}, ({k: v[1] for k, v in new.items()}, count)

    return step


def _fused_init(params):
    def leaf(p):
        blocks = p.size // BLOCK
        zeros = jnp.zeros(p.shape, jnp.uint8)
        return (zeros + 127, jnp.zeros((blocks,), jnp.float32), zeros,
                jnp.zeros((blocks,), jnp.float32))

    return {k: leaf(p) for k, p in params.items()}, jnp.zeros((), jnp.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="rows of 2048 values per chunk")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 8)
    params = {f"w{i}": 0.1 * jax.random.normal(k, (2048, 2048)) for i, k in enumerate(keys)}
    grads = jax.tree.map(lambda p: 0.01 * p, params)
    tx = optax.adamw(LR, weight_decay=WD)

    def optax_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    candidates = {"optax fp32": (optax_step, tx.init),
                  "dynamic map": (_fused_step(_dynamic_map_coders(), args.rows), _fused_init),
                  "minifloat": (_fused_step(_minifloat_coders(), args.rows), _fused_init)}
    runs = {}
    for name, (step, init) in candidates.items():
        jitted = jax.jit(step, donate_argnums=(0, 1))
        box = [jax.tree.map(jnp.copy, params), init(params)]

        def run(jitted=jitted, box=box):
            box[0], box[1] = jitted(box[0], box[1], grads)
            jax.block_until_ready(box[0])

        runs[name] = run
    timings = time_interleaved(runs, repeats=args.repeats, warmup=2)
    base = statistics.median(timings["optax fp32"])
    print(f"Fused int8 AdamW loop (params written in place, chunks of {args.rows} rows), "
          f"33.6M params, device {jax.devices()[0].device_kind}")
    for name, t in timings.items():
        print(f"  {name:12s} {statistics.median(t) * 1e3:7.1f} ms  ratio "
              f"{statistics.median(t) / base:.2f}")


if __name__ == "__main__":
    main()
