"""Stall-prone state (running sums, slow EMAs on the int4 grid): found on the update's
derivative, stored with stochastic rounding or in float32, shown by describe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

import optstate
from optstate import dequantize, is_quantized, quantize_state
from optstate._core.leaves import leaves_with_paths, path_str
from optstate.quantization.running_sums import is_running_sum, self_coefficients

PARAMS = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((4096,))}


def _coefficients(tx, params=PARAMS):
    """``{path: coefficient}`` of every floating state leaf of at least 4096 elements."""
    state = jax.eval_shape(tx.init, params)
    leaves = jax.tree.leaves(state)
    paths = [path_str(p) for p, _ in leaves_with_paths(state)]
    idx = [i for i, x in enumerate(leaves)
           if jnp.issubdtype(x.dtype, jnp.floating) and x.size >= 4096]
    found = self_coefficients(tx.update, params, state, params, {}, idx)
    return {paths[i]: c for i, c in found.items()}


def _sums(tx):
    return sorted(p for p, c in _coefficients(tx).items() if is_running_sum(c))


# -- the analysis, against the update rules written out --------------------------------------


@pytest.mark.parametrize("make,expected", [
    (lambda: optax.adagrad(0.1), ["[0].sum_of_squares['b']", "[0].sum_of_squares['w']"]),
    (lambda: optstate.adagrad(0.1), ["[0].sum_of_squares['b']", "[0].sum_of_squares['w']"]),
    # Yogi: v' = v - (1 - b2) sign(v - g^2) g^2, additive with no decay
    (lambda: optax.yogi(0.1), ["[0].nu['b']", "[0].nu['w']"]),
    # SM3 (b2 = 1): a 1-D parameter's accumulator is a plain sum of squares
    (lambda: optax.sm3(0.1), ["[0].mu['b'][0]"]),
    (lambda: contrib.schedule_free_adamw(0.1), [".z['b']", ".z['w']"]),
    # an accumulated sum, reset to zero at each boundary by a select
    (lambda: optstate.multi_steps(optstate.adam(0.1), 4, use_grad_mean=False),
     [".acc_grads['b']", ".acc_grads['w']"]),
    # EMAs, AMSGrad's max, Welford's mean (coefficient m / (m + 1)): not running sums
    (lambda: optax.adam(0.1), []),
    (lambda: optax.amsgrad(0.1), []),
    (lambda: optstate.multi_steps(optstate.adam(0.1), 4), []),
    (lambda: optax.lion(0.1), []),
    (lambda: optax.adafactor(0.1), []),
])
def test_running_sums_found_on_the_derivative(make, expected):
    assert _sums(make()) == expected


def test_ema_decays_are_read_off_as_constants():
    found = _coefficients(optax.adan(0.1, b1=0.98, b2=0.92, b3=0.99))
    assert found["[0].m['w']"] == pytest.approx(0.98)
    assert found["[0].v['w']"] == pytest.approx(0.92)
    assert found["[0].n['w']"] == pytest.approx(0.99)
    assert found["[0].g['w']"] is None  # the previous gradient: replaced, not decayed
    adam = _coefficients(optstate.adamw(0.1, b1=0.8, b2=0.95))
    assert adam["[0].mu['w']"] == pytest.approx(0.8)
    assert adam["[0].nu['w']"] == pytest.approx(0.95)


def test_a_custom_running_sum_whatever_its_name():
    """Not by field name: a hand-written accumulator named like a moment is found."""
    def init(params):
        return {"mu": jax.tree.map(jnp.zeros_like, params)}

    def update(updates, state, params=None):
        new = jax.tree.map(lambda m, g: m + jnp.abs(g), state["mu"], updates)
        return updates, {"mu": new}

    assert _sums(optstate.GradientTransformation(init, update)) == ["['mu']['b']",
                                                                    "['mu']['w']"]


def test_an_update_that_cannot_be_linearized_has_no_running_sums():
    def init(params):
        return {"acc": jax.tree.map(jnp.zeros_like, params)}

    def update(updates, state, params=None):
        # integer round trip: not differentiable, so nothing is known about it
        new = jax.tree.map(lambda a, g: (a.astype(jnp.int32) + 1).astype(a.dtype), state["acc"],
                           updates)
        return updates, {"acc": new}

    assert _sums(optstate.GradientTransformation(init, update)) == []


# -- storage: a running sum under bf16 --------------------------------------------------------


def _accumulate(tx, steps, grads):
    params = {"w": jnp.zeros_like(grads)}

    def body(state, _):
        _, state = tx.update({"w": grads}, state, params)
        return state, None

    state, _ = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(tx.init(params))
    return state


def test_bf16_running_sum_stalls_with_nearest_and_grows_by_default():
    """Adagrad's sum of squares of g = 1 after 600 steps is 600; bf16 with nearest rounding
    stops at 256 (257 is a tie, rounded to even 256), the default stochastic rounding is
    unbiased (per-element spread: about 1 per step squared from 256 to 512, where the grid
    step is 2, and 3 per step beyond, where it is 4: a standard deviation near 23), float32
    exact."""
    grads = jnp.ones((4096,))
    nearest = _accumulate(quantize_state(optax.adagrad(0.1, initial_accumulator_value=0.0), "bf16", stalling=None), 600, grads)
    default = _accumulate(quantize_state(optax.adagrad(0.1, initial_accumulator_value=0.0), "bf16"), 600, grads)
    exact = _accumulate(quantize_state(optax.adagrad(0.1, initial_accumulator_value=0.0), "bf16", stalling="fp32"), 600, grads)
    assert np.all(np.asarray(dequantize(nearest.inner_state[0].sum_of_squares["w"])) == 256.0)
    sr = np.asarray(dequantize(default.inner_state[0].sum_of_squares["w"]))
    assert abs(sr.mean() - 600.0) < 3.0 and 15.0 < sr.std() < 32.0
    kept = exact.inner_state[0].sum_of_squares["w"]
    assert not is_quantized(kept) and np.all(np.asarray(kept) == 600.0)


def test_describe_shows_the_rounding_of_each_leaf():
    params = {"w": jnp.zeros((64, 128))}
    tx = quantize_state(optax.chain(optax.scale_by_rss(0.0), optax.trace(0.9)), "int8")
    text = str(optstate.memory.describe(jax.eval_shape(tx.init, params), params, tx=tx))
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert rows[".inner_state[0].sum_of_squares['w']"].endswith("stochastic: running sum")
    assert rows[".inner_state[1].trace['w']"].endswith("nearest")
    tx = quantize_state(optax.adagrad(0.1), "int8", stalling="fp32")
    text = str(optstate.memory.describe(jax.eval_shape(tx.init, params), params, tx=tx))
    assert "fp32: running sum" in text and "int8" not in text


def test_int4_slow_emas_round_stochastically():
    params = {"w": jnp.zeros((64, 128))}
    tx = quantize_state(optax.adam(0.1, b1=0.9, b2=0.99), "int4")
    rows = optstate.memory.describe(jax.eval_shape(tx.init, params), params, tx=tx).rows
    rounding = {r.path: r.rounding for r in rows if r.rounding}
    assert rounding == {".inner_state[0].mu['w']": "nearest",
                        ".inner_state[0].nu['w']": "stochastic: decay 0.99"}
    # int8's grid is fine enough: only running sums are stall-prone there
    tx = quantize_state(optax.adam(0.1, b1=0.9, b2=0.99), "int8")
    rows = optstate.memory.describe(jax.eval_shape(tx.init, params), params, tx=tx).rows
    assert {r.rounding for r in rows if r.rounding} == {"nearest"}


def test_nothing_stall_prone_keeps_nearest_results_and_key():
    """With no stall-prone leaf the step is what it was: the key does not move and the
    stored state equals ``stalling=None``'s bit for bit."""
    params = {"w": jnp.linspace(-1.0, 1.0, 8192).reshape(64, 128)}
    a, b = (quantize_state(optax.adam(0.1), "int8", stalling=s) for s in ("stochastic", None))
    sa, sb = jax.jit(a.init)(params), jax.jit(b.init)(params)
    _, na = jax.jit(a.update)(params, sa, params)
    _, nb = jax.jit(b.update)(params, sb, params)
    assert np.array_equal(na.key, sa.key)
    for x, y in zip(jax.tree.leaves(na), jax.tree.leaves(nb)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_stochastic_stall_rounding_is_reproducible_and_advances_the_key():
    grads = jnp.ones((4096,))
    one = _accumulate(quantize_state(optax.adagrad(0.1, initial_accumulator_value=0.0), "bf16"), 300, grads)
    two = _accumulate(quantize_state(optax.adagrad(0.1, initial_accumulator_value=0.0), "bf16"), 300, grads)
    assert np.array_equal(one.inner_state[0].sum_of_squares["w"].codes,
                          two.inner_state[0].sum_of_squares["w"].codes)
    fresh = jax.random.key_data(jax.random.key(0))  # the key init stores (seed 0)
    assert not np.array_equal(one.key, fresh)


def test_bad_stalling_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"stalling='sometimes'.*'stochastic', 'fp32', None"):
        quantize_state(optax.adagrad(0.1), "int8", stalling="sometimes")


# -- quality: the optimizers that lagged in int4 ----------------------------------------------


def _least_squares(tx, steps=300):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1024, 128)) / np.sqrt(128), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
    y = x @ w_true + 0.1 * jnp.asarray(rng.standard_normal((1024, 64)), jnp.float32)
    batches = jnp.asarray(rng.integers(0, 1024, (steps, 64)))
    loss = lambda w, xb, yb: jnp.mean((xb @ w - yb) ** 2)  # noqa: E731
    w0 = {"w": jnp.zeros((128, 64))}

    def step(carry, idx):
        w, state = carry
        g = jax.grad(lambda p: loss(p["w"], x[idx], y[idx]))(w)
        u, state = tx.update(g, state, w)
        return (optax.apply_updates(w, u), state), None

    (w, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, batches))((w0, tx.init(w0)))
    return float(loss(w["w"], x, y)), float(jnp.mean(y ** 2))


@pytest.mark.parametrize("name,make", [("lion", lambda: optax.lion(1e-2)),
                                       ("adan", lambda: optax.adan(3e-2))])
def test_int4_slow_ema_optimizers_train_like_fp32(name, make):
    """Lion's (b2 = 0.99) and Adan's (0.98, 0.99) moments froze under nearest rounding on
    the 4-bit grid (bench/catalogue.py: 108% and 25% of the way short of fp32); stored with
    stochastic rounding they cover all but a few percent of the way, as the table's 30% int4
    limit asks, and nearest rounding for them (``stalling=None``) is still far behind."""
    ref, start = _least_squares(make())
    fixed, _ = _least_squares(quantize_state(make(), "int4", min_size=1024))
    frozen, _ = _least_squares(quantize_state(make(), "int4", min_size=1024, stalling=None))
    shortfall = lambda loss: (loss - ref) / (start - ref)  # noqa: E731
    assert shortfall(fixed) < 0.10
    assert shortfall(frozen) > 2 * shortfall(fixed) + 0.05
