"""The fused Pallas kernel of quantize_state and optstate.update_and_apply.

The kernel runs in Pallas interpret mode on CPU and must equal the XLA path (the chunked /
whole-leaf step): codes equal except at most one code step, scales within one ulp, updates to
rtol 1e-6; it must lower for GPU (Triton) and TPU (Mosaic) on this CPU machine; and
``update_and_apply`` must equal ``update`` followed by ``apply_updates``.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from optstate.quantization import codebooks, formats, kernel, tile_codecs
from optstate.quantization.fused import KernelFallbackWarning, use_kernel
from optstate.quantization.kernel import geometry
from optstate.quantization.randomness import uniform_from_counter
from optstate.quantization.wrapper import recording_update_paths


def _trees(shapes, seed):
    keys = jax.random.split(jax.random.key(seed), 2 * len(shapes))
    p = {n: jax.random.normal(keys[2 * i], s) for i, (n, s) in enumerate(shapes.items())}
    g = {n: jax.random.normal(keys[2 * i + 1], s) for i, (n, s) in enumerate(shapes.items())}
    return p, g


def _ulps(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b) / np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float32))


def _assert_state_close(got, want, fmt):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        name = jax.tree_util.keystr(path)
        a, b = np.asarray(a), np.asarray(b)
        if name.endswith(".scales"):
            assert np.all(_ulps(a, b) <= 1), name
        elif name.endswith(".codes"):
            if fmt == "int4":  # two codes per byte
                a = np.stack([a & 15, a >> 4], -1)
                b = np.stack([b & 15, b >> 4], -1)
            steps = np.abs(a.astype(np.int64) - b.astype(np.int64))
            assert steps.max() <= 1, name
            assert np.mean(steps > 0) <= 0.01, name  # only values next to a midpoint
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


# (format, rounding, shape): together every format and rounding, a partial row tile, a short
# last block (600 = 256 + 256 + 88; 130 = 128 + 2), several row tiles, one block, one element.
CASES = [("int8", "nearest", (3, 600)), ("int8", "stochastic", (1,)),
         ("int4", "nearest", (7, 130)), ("int4", "stochastic", (40, 512)),
         ("fp8_e4m3", "nearest", (256,)), ("fp8_e4m3", "stochastic", (3, 600)),
         ("bf16", "nearest", (7, 130)), ("bf16", "stochastic", (40, 512))]


@pytest.mark.parametrize("fmt,rounding,shape", CASES)
def test_kernel_equals_xla_path(fmt, rounding, shape):
    _check_kernel_equals_xla_path(fmt, rounding, shape)


@pytest.mark.parametrize("fmt,rounding,shape", [CASES[0], CASES[3]])  # int8 / int4
def test_kernel_with_arithmetic_code_books_equals_xla_path(fmt, rounding, shape, monkeypatch):
    # the code books of Mosaic TPU tiles (no gathers), run in interpret mode (their equality
    # with the tables, bit for bit: test_arithmetic_code_book_equals_its_tables)
    monkeypatch.setattr(kernel, "ARITHMETIC_BOOK_BACKENDS", ("mosaic", "interpret"))
    _check_kernel_equals_xla_path(fmt, rounding, shape)


def _check_kernel_equals_xla_path(fmt, rounding, shape):
    params, grads = _trees({"w": shape}, seed=0)
    # int4's rank-1 normalised second moment takes the whole-leaf step; test its plain grid
    extra = {"rank1": False} if fmt == "int4" else {}
    tx = optstate.quantize_state(optstate.adam(1e-2), fmt, min_size=1, rounding=rounding,
                                 **extra)
    xla_update = jax.jit(lambda *a: tx.update(*a))
    state = xla_update(grads, jax.jit(tx.init)(params), params)[1]  # not all zeros
    grads = jax.tree.map(lambda g: 0.5 * g + 0.25, grads)
    want_u, want_s = xla_update(grads, state, params)
    with use_kernel("interpret"), recording_update_paths() as record:
        got_u, got_s = jax.jit(lambda *a: tx.update(*a))(grads, state, params)
    assert set(record.values()) == {"kernel"}, record
    np.testing.assert_allclose(got_u["w"], want_u["w"], rtol=1e-6, atol=1e-12)
    _assert_state_close(got_s, want_s, fmt)


def _near_every_decision_point(book, rng):
    """Every value and midpoint of ``book`` and the 8 floats either side, specials (0, 1, 2,
    subnormals, the largest float, inf) and random values, both signs."""
    mags = np.asarray(book.magnitudes, np.float32)
    mids = ((mags[:-1].astype(np.float64) + mags[1:]) / 2).astype(np.float32)
    points = np.concatenate([mags, mids, [0, 1, 2, 1e-45, 1e-38, 2**-32, 3.4e38]])
    bits = points.astype(np.float32).view(np.int32)[:, None] + np.arange(-8, 9, dtype=np.int32)
    near = bits[bits >= 0].view(np.float32)
    rand = np.concatenate([rng.uniform(0, 1, 4096), 10 ** rng.uniform(-9, 0.2, 4096)])
    a = np.concatenate([near, rand.astype(np.float32), [np.inf]]).astype(np.float32)
    return np.concatenate([a, -a])


@pytest.mark.parametrize("book", [codebooks.INT8_SIGNED, codebooks.INT8_UNSIGNED,
                                  codebooks.INT4_SIGNED, codebooks.INT4_UNSIGNED],
                         ids=lambda b: b.name)
def test_arithmetic_code_book_equals_its_tables(book):
    # Mosaic TPU tiles compute code books without gathers; codes and values must be the
    # tables' bit for bit: every code, every input near a decision point, nearest and
    # stochastic (u random, 0 and just below 1: the same probability, compared alike)
    arithmetic = tile_codecs.ArithmeticBook(book)
    rng = np.random.default_rng(0)
    y = jnp.asarray(_near_every_decision_point(book, rng))
    us = [rng.uniform(0, 1, y.shape), np.zeros(y.shape), np.full(y.shape, 1 - 2.0**-24)]

    @jax.jit
    def both(y, u):
        return (book.encode(y), arithmetic.encode(y, None), book.encode(y, u),
                arithmetic.encode(y, u))

    for u in us:
        want, got, want_u, got_u = both(y, jnp.asarray(u, jnp.float32))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_u, want_u)
    codes = jnp.arange(256 if book.num_codes > 16 else 16, dtype=jnp.uint8)
    want = np.asarray(book.decode(codes)).view(np.uint32)  # -0.0 included
    np.testing.assert_array_equal(np.asarray(jax.jit(arithmetic.decode)(codes)).view(np.uint32),
                                  want)


def test_a_code_book_without_arithmetic_form_is_refused():
    odd = codebooks.Codebook("odd", (0.0, 0.3, 0.5, 1.0), True, 3)
    assert tile_codecs.arithmetic_form(odd) is None
    with pytest.raises(ValueError, match="no arithmetic form"):
        tile_codecs.ArithmeticBook(odd)


def _planned_paths(tx, shape, mode, fallback=None):
    """The update path of each state leaf when ``tx`` updates a ``shape`` parameter under
    ``use_kernel(mode)`` (traced abstractly); with ``fallback``, the kernel warning it raises."""
    p = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    warns = (pytest.warns(KernelFallbackWarning, match=fallback) if fallback
             else contextlib.nullcontext())
    with use_kernel(mode), recording_update_paths() as record, warns:
        jax.eval_shape(tx.update, p, jax.eval_shape(tx.init, p), p)
    return record


def test_int4_with_an_odd_last_axis_takes_the_xla_path_visibly():
    tx = optstate.quantize_state(optstate.adam(1e-3), "int4", min_size=1, rank1=False)
    record = _planned_paths(tx, (9, 7), "interpret", "odd last axis")
    assert all("no kernel: int4 codes of an odd last axis" in v for v in record.values())


def test_kernel_stochastic_stream_matches_counter_stream():
    seed = jnp.asarray([12345, 678], jnp.uint32)
    n = jnp.arange(1000, dtype=jnp.uint32) + 77
    np.testing.assert_array_equal(tile_codecs.uniform_at((seed[0], seed[1]), n),
                                  uniform_from_counter(seed, (1000,), 77))


def test_round_half_even_matches_jnp_round():
    v = jnp.asarray(np.concatenate([np.arange(-2, 17, 0.25), np.random.default_rng(0)
                                    .uniform(-1, 16, 1000)]).astype(np.float32))
    np.testing.assert_array_equal(tile_codecs.round_half_even(v), jnp.round(v))


def test_geometry_reasons():
    int4, int8, bf16 = (formats.get(n) for n in ("int4", "int8", "bf16"))
    assert "odd last axis" in geometry((9, 7), int4, 128, "triton")
    assert "Mosaic" in geometry((3, 600), int8, 256, "mosaic")
    g = geometry((3, 600), int8, 256, "triton")
    assert (g.rows, g.row_len, g.n_blocks, g.width) == (3, 600, 3, 256)
    g = geometry((40, 512), int8, 256, "mosaic")  # whole blocks: one block per view row
    assert (g.rows, g.row_len, g.n_blocks, g.tile_rows % 8) == (80, 256, 1, 0)
    assert geometry((5, 3000), bf16, 0, "triton").width == 1024


def _lower(tx, shape, backend):
    p = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    s = jax.eval_shape(tx.init, p)

    def step(g, s, p):
        return optstate.update_and_apply(tx, g, s, p)

    with use_kernel(backend), recording_update_paths() as record:
        if backend == "mosaic":
            device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                 platform="tpu")
            mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
            with jax.sharding.use_abstract_mesh(mesh):
                text = jax.jit(step, donate_argnums=(1, 2)).trace(p, s, p).lower(
                    lowering_platforms=("tpu",)).as_text()
        else:
            text = jax.jit(step, donate_argnums=(1, 2)).trace(p, s, p).lower(
                lowering_platforms=("cuda",)).as_text()
    assert set(record.values()) == {"kernel"}, record
    return text


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "bf16"])
def test_kernel_lowers_for_gpu_with_triton(fmt):
    extra = {"rank1": False} if fmt == "int4" else {}
    tx = optstate.quantize_state(optstate.adamw(1e-3), fmt, rounding="stochastic", **extra)
    text = _lower(tx, (64, 1024), "triton")
    assert text.count("__gpu$xla.gpu.triton") == 1  # one kernel: the parameter's whole step
    # the new parameter (output 0), codes and scales are written in place of their operands
    aliases = text[text.index("output_operand_aliases"):].split("]}")[0]
    assert aliases.count("output_operand_alias<") == (5 if fmt != "bf16" else 3)


@pytest.mark.parametrize("fmt,rounding", [("int8", "nearest"), ("int4", "stochastic"),
                                          ("fp8_e4m3", "stochastic"), ("bf16", "stochastic")])
def test_kernel_lowers_for_tpu_with_mosaic(fmt, rounding):
    # int8 and int4: code books by arithmetic (no gathers); int4 nibbles in int32
    extra = {"rank1": False} if fmt == "int4" else {}
    tx = optstate.quantize_state(optstate.adamw(1e-3), fmt, rounding=rounding, **extra)
    text = _lower(tx, (64, 1024), "mosaic")
    assert text.count("tpu_custom_call") == 1


def test_code_books_take_the_kernel_on_tpu_and_short_blocks_fall_back_visibly():
    for fmt in ("int8", "int4"):
        tx = optstate.quantize_state(optstate.adam(1e-3), fmt, min_size=1, rank1=False)
        record = _planned_paths(tx, (8, 256), "mosaic")
        assert set(record.values()) == {"kernel"}, (fmt, record)
    # a row whose last block is short still takes the XLA path on TPU, and says why
    tx = optstate.quantize_state(optstate.adam(1e-3), "int8", min_size=1)
    record = _planned_paths(tx, (3, 600), "mosaic", "short")
    assert all("no kernel: a row whose last block is short" in v for v in record.values())


def test_kernel_is_not_used_on_cpu_by_default():
    tx = optstate.quantize_state(optstate.adam(1e-3), "int8")
    p = {"w": jax.ShapeDtypeStruct((512, 512), jnp.float32)}
    with recording_update_paths() as record:
        jax.eval_shape(tx.update, p, jax.eval_shape(tx.init, p), p)
    assert set(record.values()) == {"chunked"}


# -- update_and_apply ---------------------------------------------------------------------------

ALIASES = {
    "sgd": lambda: optstate.sgd(0.1, momentum=0.9), "adam": lambda: optstate.adam(1e-2),
    "adamw": lambda: optstate.adamw(1e-2, weight_decay=0.1),
    "adam_l2": lambda: optstate.adam_l2(1e-2, 0.1), "rmsprop": lambda: optstate.rmsprop(1e-2),
    "adagrad": lambda: optstate.adagrad(1e-1), "adadelta": lambda: optstate.adadelta(1.0),
    "lamb": lambda: optstate.lamb(1e-2), "lion": lambda: optstate.lion(1e-3),
    "adafactor": lambda: optstate.adafactor(1e-2),
    "optax.adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "int8"])
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_update_and_apply_equals_update_then_apply(name, quantized):
    tx = ALIASES[name]()
    if quantized:
        tx = optstate.quantize_state(tx, "int8", min_size=64)
    params, grads = _trees({"w": (16, 32), "b": (32,)}, seed=1)
    state = jax.jit(tx.init)(params)

    def both(g, s, p):
        updates, new_state = tx.update(g, s, p)
        return (optstate.apply_updates(p, updates), new_state), optstate.update_and_apply(
            tx, g, s, p)

    (want, want_state), (got, got_state) = jax.jit(both)(grads, state, params)
    if quantized:
        # the bounded step computes the update inside its loop, in another XLA fusion than
        # the whole-tree call (scalar work such as bias corrections may be recomputed per
        # element): the same arithmetic to float32 rounding, as for the kernel below
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                     got, want)
    else:
        jax.tree.map(np.testing.assert_array_equal, got, want)
    jax.tree.map(np.testing.assert_array_equal, got_state, want_state)


def test_update_and_apply_with_the_kernel_equals_update_then_apply():
    tx = optstate.quantize_state(optstate.adamw(1e-2, weight_decay=0.1), "int8", min_size=1,
                                 rounding="stochastic")
    params, grads = _trees({"w": (5, 300)}, seed=2)
    state = jax.jit(tx.init)(params)

    def reference(g, s, p):
        u, s = tx.update(g, s, p)
        return optstate.apply_updates(p, u), s

    want_p, want_s = jax.jit(reference)(grads, state, params)
    with use_kernel("interpret"), recording_update_paths() as record:
        got_p, got_s = jax.jit(lambda g, s, p: optstate.update_and_apply(tx, g, s, p),
                               donate_argnums=(1, 2))(grads, state, dict(params))
    assert set(record.values()) == {"kernel"}, record
    # p + u rounds alike up to one ulp of p (the update is ~1e-2: atol 1e-8)
    np.testing.assert_allclose(got_p["w"], want_p["w"], rtol=1e-6, atol=1e-8)
    _assert_state_close(got_s, want_s, "int8")


# -- compensated_params inside the kernel; primitives a backend does not lower -----------------


def test_compensated_residual_rides_in_the_kernel():
    """``quantize_state(compensated_params(adamw))`` on bf16 parameters: the int8 residual is a
    plain integer leaf carried through the tile, and the wrapper's rounding is integer
    arithmetic (Triton lowers it): interpret mode equals the XLA path bit for bit, and the
    step lowers for GPU as one Triton call."""
    tx = optstate.quantize_state(optstate.compensated_params(optstate.adamw(1e-3), "int8"),
                                 "int8", min_size=1)
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"w": (0.5 * jax.random.normal(k1, (8, 512))).astype(jnp.bfloat16)}
    grads = {"w": (0.01 * jax.random.normal(k2, (8, 512))).astype(jnp.bfloat16)}
    state = jax.jit(tx.init)(params)

    def step(g, s, p):
        return optstate.update_and_apply(tx, g, s, p)

    # a new function for each jit: the kernel choice is made when a step is traced
    want = jax.jit(lambda *a: step(*a))(grads, state, params)
    with use_kernel("interpret"), recording_update_paths() as record:
        got = jax.jit(lambda *a: step(*a))(grads, state, params)
    assert set(record.values()) == {"kernel"}, record
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert np.any(np.asarray(got[1].inner_state.residual["w"]) != 0)
    with use_kernel("triton"):
        text = jax.jit(lambda *a: step(*a)).trace(grads, state, params).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_a_primitive_the_backend_does_not_lower_takes_the_xla_path_visibly():
    def init(p):
        return {"m": jax.tree.map(jnp.zeros_like, p)}

    def update(g, s, p=None):  # jnp.round: no Triton lowering in JAX 0.10
        m = jax.tree.map(lambda m, g: jnp.round(0.9 * m + g), s["m"], g)
        return m, {"m": m}

    tx = optstate.quantize_state(optstate.GradientTransformation(init, update), "int8",
                                 min_size=1)
    params = {"w": jnp.ones((8, 512))}
    state = tx.init(params)
    with use_kernel("triton"), recording_update_paths() as record, pytest.warns(
            KernelFallbackWarning, match="does not lower"):
        jax.jit(tx.update).trace(params, state, params).lower(lowering_platforms=("cuda",))
    assert "triton does not lower ['round']" in record["['m']['w']"]
