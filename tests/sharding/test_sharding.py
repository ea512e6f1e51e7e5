"""optstate.sharding: ZeRO stages 0-3 on 8 emulated CPU devices, against the unsharded run.

Every equality test compares a sharded run with the same steps run unsharded on one device
(the independent reference), and every memory test measures the bytes that device 0 really
holds against ZeRO's formulas (Rajbhandari et al., SC 2020).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optstate
from tests import helpers
from optstate import sharding
from optstate import QuantizedArray, dequantize, is_quantized

N = 8
STEPS = 5


def mesh_1d(mode=AxisType.Auto):
    return jax.make_mesh((N,), ("data",), axis_types=(mode,))


def mesh_2d(mode=AxisType.Auto):
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(mode, mode))


def make_params(seed=0):
    """An MLP whose weight matrices are large enough for quantized state, plus a leaf (3,)
    that cannot be split 8 ways."""
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((64, 128)) / 8).astype(np.float32),
        "b1": np.zeros((128,), np.float32),
        "w2": (rng.standard_normal((128, 48)) / 11).astype(np.float32),
        "b2": np.zeros((48,), np.float32),
        "gain": np.ones((3,), np.float32),
    }


def make_batches(seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        x = rng.standard_normal((32, 64)).astype(np.float32)
        out.append((x, np.sin(2.0 * x[:, :48]).astype(np.float32)))
    return out


PARAMS = make_params()
BATCHES = make_batches()


def loss_fn(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    out = jnp.einsum("bh,ho->bo", h, p["w2"]) + p["b2"]
    return jnp.mean((out - y) ** 2) * jnp.mean(p["gain"])


def tp_loss_fn(p, batch):
    """``loss_fn`` written for an Explicit ("data", "model") mesh: the row-parallel matmul
    names its output sharding."""
    x, y = batch
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    mesh = jax.sharding.get_abstract_mesh()
    explicit = bool(mesh.axis_names) and mesh.axis_types[0] == AxisType.Explicit
    out = jnp.einsum("bh,ho->bo", h, p["w2"], out_sharding=P("data") if explicit else None)
    return jnp.mean((out + p["b2"] - y) ** 2) * jnp.mean(p["gain"])


def reference_run(tx, params=PARAMS, loss=loss_fn, steps=STEPS):
    """The unsharded run: everything on one device."""

    @jax.jit
    def step(p, s, batch):
        g = jax.grad(loss)(p, batch)
        u, s = tx.update(g, s, p)
        return optstate.apply_updates(p, u), s

    p, s = jax.tree.map(jnp.asarray, params), tx.init(params)
    for batch in BATCHES[:steps]:
        p, s = step(p, s, batch)
    return jax.tree.map(np.asarray, p), s


def sharded_run(tx, mesh, stage, like=PARAMS, loss=loss_fn, steps=STEPS):
    """The jit path: state_shardings/param_shardings, reduce-scattered gradients (stage >= 2),
    donated state; the forward pass gathers stage-3 parameters (needed on Explicit meshes).

    ``like``: the parameters as the shardings see them (e.g. with tensor-parallel shardings);
    the values are always ``PARAMS``."""
    params = like
    p_sh = sharding.param_shardings(params, mesh, stage=stage)
    s_sh = sharding.state_shardings(tx, params, mesh, stage=stage)
    g_sh = sharding.grad_shardings(params, mesh, stage=stage)
    full_sh = sharding.param_shardings(params, mesh, stage=0)
    b_sh = NamedSharding(mesh, P("data"))

    def step(p, s, batch):
        g = jax.grad(lambda q, b: loss(sharding.constrain(q, full_sh), b))(p, batch)
        g = sharding.reduce_scatter_gradients(g, g_sh)
        u, s = tx.update(g, s, p)
        return optstate.apply_updates(p, u), s

    with jax.set_mesh(mesh):
        p = jax.device_put(PARAMS, p_sh)
        s = jax.jit(tx.init, out_shardings=s_sh)(p)
        f = jax.jit(step, in_shardings=(p_sh, s_sh, (b_sh, b_sh)), out_shardings=(p_sh, s_sh),
                    donate_argnums=(0, 1))
        for batch in BATCHES[:steps]:
            p, s = f(p, s, jax.device_put(batch, b_sh))
    return p, s, s_sh


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    """Sharded against unsharded results, with this file's tolerances."""
    helpers.assert_trees_close(got, want, "sharded result", rtol=rtol, atol=atol,
                               check_dtype=False)


def total_bytes(tree):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device0():
    return jax.devices()[0]


# ---------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------


def specs(tree):
    return jax.tree.map(lambda s: s.spec, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def test_rule_first_dimension_that_divides_scalars_and_counters_replicated():
    params = {"a": np.zeros((16, 30), np.float32), "b": np.zeros((6, 24), np.float32),
              "c": np.zeros((5, 3), np.float32), "d": np.zeros((), np.float32)}
    mesh = mesh_1d()
    got = specs(sharding.state_shardings(optax.adam(1e-3), params, mesh, stage=1))
    assert got[0].count == P()
    for moment in (got[0].mu, got[0].nu):
        assert moment == {"a": P("data"), "b": P(None, "data"), "c": P(), "d": P()}
    # stage 0 replicates everything; structure is that of eval_shape(tx.init, params)
    s0 = sharding.state_shardings(optax.adam(1e-3), params, mesh, stage=0)
    assert jax.tree.structure(s0) == jax.tree.structure(
        jax.eval_shape(optax.adam(1e-3).init, params))
    assert all(s.spec == P() for s in jax.tree.leaves(s0))
    # parameters: replicated below stage 3, sharded by the same rule at stage 3
    for stage in (0, 1, 2):
        assert all(s.spec == P() for s in
                   jax.tree.leaves(sharding.param_shardings(params, mesh, stage=stage)))
    assert specs(sharding.param_shardings(params, mesh, stage=3)) == {
        "a": P("data"), "b": P(None, "data"), "c": P(), "d": P()}
    assert specs(sharding.grad_shardings(params, mesh, stage=1))["a"] == P()
    assert specs(sharding.grad_shardings(params, mesh, stage=2))["a"] == P("data")


def test_integer_and_key_state_is_replicated():
    """Counters and PRNG keys never get split, even where their size divides the axis."""
    params = {"w": np.zeros((16, 8), np.float32)}

    def init(p):
        return {"counts": jnp.zeros((16,), jnp.int32), "key": jax.random.key_data(
            jax.random.key(0)), "m": jax.tree.map(jnp.zeros_like, p)}

    tx = optstate.GradientTransformation(init, lambda u, s, p=None, **kw: (u, s))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    got = specs(sharding.state_shardings(tx, params, mesh, stage=1))
    assert got == {"counts": P(), "key": P(), "m": {"w": P("data")}}


def test_tensor_parallel_axes_survive_on_a_2d_mesh():
    mesh = mesh_2d()
    tp = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P(),
          "gain": P()}
    params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, tp[k]))
              for k, v in PARAMS.items()}
    got = specs(sharding.state_shardings(optax.adamw(1e-3), params, mesh, stage=1))
    # "model" is kept where the parameter has it and "data" (size 4) goes on the first other
    # dimension that divides by 4: w1 dim 0, w2 dim 1 (48); b1 has no other dimension and
    # gain (3,) does not divide, so both stay replicated over "data"
    assert got[0].mu == {"w1": P("data", "model"), "b1": P("model"),
                         "w2": P("model", "data"), "b2": P("data"), "gain": P()}
    p3 = specs(sharding.param_shardings(params, mesh, stage=3))
    assert p3 == got[0].mu
    p1 = specs(sharding.param_shardings(params, mesh, stage=1))
    assert p1 == {"w1": P(None, "model"), "b1": P("model"), "w2": P("model"), "b2": P(),
                  "gain": P()}


@pytest.mark.parametrize("bad_stage", [-1, 4, 1.0, "1", True, None])
def test_bad_stage_is_a_value_error(bad_stage):
    mesh = mesh_1d()
    for call in (lambda: sharding.state_shardings(optax.adam(1e-3), PARAMS, mesh,
                                                  stage=bad_stage),
                 lambda: sharding.param_shardings(PARAMS, mesh, stage=bad_stage),
                 lambda: sharding.grad_shardings(PARAMS, mesh, stage=bad_stage),
                 lambda: sharding.shard_map_update(optax.adam(1e-3), PARAMS, mesh,
                                                   stage=bad_stage),
                 lambda: sharding.pmap_update(optax.adam(1e-3), PARAMS, N, stage=bad_stage)):
        with pytest.raises(ValueError, match=r"stage must be one of \(0, 1, 2, 3\).*got"):
            call()


def test_mesh_without_the_axis_is_a_value_error():
    mesh = jax.make_mesh((N,), ("batch",), axis_types=(AxisType.Auto,))
    for call in (lambda: sharding.state_shardings(optax.adam(1e-3), PARAMS, mesh),
                 lambda: sharding.param_shardings(PARAMS, mesh, stage=3),
                 lambda: sharding.grad_shardings(PARAMS, mesh),
                 lambda: sharding.tree_shardings({}, PARAMS, mesh),
                 lambda: sharding.shard_map_update(optax.adam(1e-3), PARAMS, mesh)):
        with pytest.raises(ValueError, match=r"no axis 'data'.*axes are \('batch',\)"):
            call()
    with pytest.raises(ValueError, match="no axis 'model'"):
        sharding.state_shardings(optax.adam(1e-3), PARAMS, mesh_1d(), axis="model")
    with pytest.raises(ValueError, match="expected a jax.sharding.Mesh"):
        sharding.state_shardings(optax.adam(1e-3), PARAMS, "data")


def test_parameter_on_foreign_axes_is_a_value_error():
    other = jax.make_mesh((N,), ("tensor",), axis_types=(AxisType.Auto,))
    params = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32,
                                        sharding=NamedSharding(other, P(None, "tensor")))}
    with pytest.raises(ValueError, match=r"parameter \['w'\].*\['tensor'\]"):
        sharding.state_shardings(optax.adam(1e-3), params, mesh_1d())


def test_zero_bytes_formulas():
    assert sharding.zero_bytes(80, 40, 160, 8, stage=0) == (80, 40, 160)
    assert sharding.zero_bytes(80, 40, 160, 8, stage=1) == (80, 40, 20)
    assert sharding.zero_bytes(80, 40, 160, 8, stage=2) == (80, 5, 20)
    assert sharding.zero_bytes(80, 40, 160, 8, stage=3) == (10, 5, 20)
    with pytest.raises(ValueError, match="n_devices"):
        sharding.zero_bytes(1, 1, 1, 0, stage=1)


# ---------------------------------------------------------------------------------------
# jit path: memory and equality with the unsharded run
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_stage1_fp32_adamw_memory_and_equality(mode):
    tx = optstate.adamw(1e-2, weight_decay=0.1)
    want, want_state = reference_run(tx)
    got, state, s_sh = sharded_run(tx, mesh_1d(mode), stage=1)
    assert_trees_close(got, want)
    assert_trees_close(state, want_state)
    full = total_bytes(state)
    on0 = sharding.bytes_on_device(state, device0())
    assert on0 <= full / N * 1.15, (on0, full)
    # parameters replicated at stage 1
    assert sharding.bytes_on_device(got, device0()) == total_bytes(PARAMS)
    # the state kept its shardings through the donated steps
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(s_sh)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_stage3_params_sharded_8_ways_and_equality(mode):
    tx = optax.adamw(1e-2, weight_decay=0.1)
    want, _ = reference_run(tx)
    got, state, _ = sharded_run(tx, mesh_1d(mode), stage=3)
    assert_trees_close(got, want)
    for name, leaf in got.items():
        shard = leaf.addressable_shards[0].data
        if name == "gain":  # (3,) cannot be split 8 ways
            assert shard.shape == (3,)
        else:
            assert math.prod(shard.shape) * N == math.prod(leaf.shape), name
    expected = sharding.zero_bytes(total_bytes(PARAMS), total_bytes(PARAMS),
                                   total_bytes(state), N, stage=3)
    splittable = total_bytes({k: v for k, v in PARAMS.items() if k != "gain"})
    assert sharding.bytes_on_device(got, device0()) == splittable / N + 12
    assert sharding.bytes_on_device(state, device0()) <= expected.state * 1.15


def test_stage2_gradients_are_reduce_scattered():
    """The stage-2 constraint leaves each device with 1/8 of every splittable gradient, and
    the values equal the unsharded gradient."""
    mesh = mesh_1d()
    g_sh = sharding.grad_shardings(PARAMS, mesh, stage=2)
    b_sh = NamedSharding(mesh, P("data"))
    p_sh = sharding.param_shardings(PARAMS, mesh, stage=2)

    def grads(p, batch):
        return sharding.reduce_scatter_gradients(jax.grad(loss_fn)(p, batch), g_sh)

    with jax.set_mesh(mesh):
        g = jax.jit(grads)(jax.device_put(PARAMS, p_sh), jax.device_put(BATCHES[0], b_sh))
    want = jax.jit(jax.grad(loss_fn))(PARAMS, BATCHES[0])
    assert_trees_close(g, want, rtol=1e-5, atol=1e-7)
    splittable = total_bytes({k: v for k, v in PARAMS.items() if k != "gain"})
    assert sharding.bytes_on_device(g, device0()) == splittable / N + 12
    for name in ("w1", "b1", "w2", "b2"):
        assert g[name].sharding.spec == g_sh[name].spec


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_two_axis_mesh_keeps_tensor_parallelism_and_equals_unsharded(mode):
    mesh = mesh_2d(mode)
    tp = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P(),
          "gain": P()}
    params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, tp[k]))
              for k, v in PARAMS.items()}
    tx = optax.adamw(1e-2, weight_decay=0.1)
    want, _ = reference_run(tx, loss=tp_loss_fn)
    for stage in (1, 3):
        got, state, _ = sharded_run(tx, mesh, stage, like=params, loss=tp_loss_fn)
        assert_trees_close(got, want)
        assert state[0].mu["w1"].sharding.spec == P("data", "model")
        assert got["w1"].sharding.spec == (P("data", "model") if stage == 3
                                           else P(None, "model"))


def test_partition_and_masked_states():
    """Frozen groups hold no state; the trainable groups' state is sharded; equality."""
    labels = {"w1": "frozen", "b1": "frozen", "w2": "adam", "b2": "sgd", "gain": "sgd"}
    for tx in (
        optstate.partition({"adam": optstate.adamw(1e-2), "sgd": optstate.sgd(0.1, 0.9),
                            "frozen": optstate.set_to_zero()}, labels),
        optax.partition({"adam": optax.adamw(1e-2), "sgd": optax.sgd(0.1, 0.9),
                         "frozen": optax.set_to_zero()}, labels),
        optstate.masked(optax.adam(1e-2), {k: k.startswith("w") for k in PARAMS}),
    ):
        want, _ = reference_run(tx)
        got, state, s_sh = sharded_run(tx, mesh_1d(), stage=1)
        assert_trees_close(got, want)
        assert jax.tree.structure(s_sh) == jax.tree.structure(jax.eval_shape(tx.init, PARAMS))
        assert sharding.bytes_on_device(state, device0()) <= total_bytes(state) / N * 1.15


def test_flax_nnx_optimizer_state():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, 128, rngs=rngs)
            self.l2 = nnx.Linear(128, 48, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    def loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def step(model, opt, x, y):
        grads = nnx.grad(loss)(model, x, y)
        opt.update(model, grads)

    tx = optstate.adamw(1e-2, weight_decay=0.1)
    ref_model = MLP(nnx.Rngs(0))
    ref_opt = nnx.Optimizer(ref_model, tx, wrt=nnx.Param)
    for x, y in BATCHES[:3]:
        step(ref_model, ref_opt, x, y)

    mesh = mesh_1d()
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    opt_state = nnx.state(opt, nnx.optimizer.OptState)
    sh = sharding.tree_shardings(opt_state, params, mesh, stage=1)
    got_specs = {jax.tree_util.keystr(p): s.spec
                 for p, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    assert got_specs["['opt_state'][0]['mu']['l1']['kernel'].value"] == P("data")
    assert got_specs["['opt_state'][0]['nu']['l2']['kernel'].value"] == P("data")
    assert got_specs["['opt_state'][0]['count'].value"] == P()
    nnx.update(opt, jax.device_put(opt_state, sh))
    placed = nnx.state(opt, nnx.optimizer.OptState)
    assert sharding.bytes_on_device(placed, device0()) <= total_bytes(placed) / N * 1.15
    b_sh = NamedSharding(mesh, P("data"))
    for x, y in BATCHES[:3]:
        step(model, opt, jax.device_put(x, b_sh), jax.device_put(y, b_sh))
    # atol: Adam divides by sqrt(v) + 1e-8, so an element whose gradient is ~1e-8 amplifies
    # the rounding of the (differently ordered) batch sum; 2e-5 is 0.2% of one step (lr 1e-2)
    assert_trees_close(jax.tree.map(np.asarray, nnx.state(model, nnx.Param)),
                       jax.tree.map(np.asarray, nnx.state(ref_model, nnx.Param)), atol=2e-5)
    after = nnx.state(opt, nnx.optimizer.OptState)
    assert sharding.bytes_on_device(after, device0()) <= total_bytes(after) / N * 1.15


# ---------------------------------------------------------------------------------------
# shard_map and pmap paths
# ---------------------------------------------------------------------------------------


def shard_map_run(tx, mesh, stage, *, use_gather=True):
    su = sharding.shard_map_update(tx, PARAMS, mesh, stage=stage)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(su.param_specs, su.state_specs, P("data")),
                       out_specs=(su.param_specs, su.state_specs))
    def step(p, s, batch):
        full = su.gather_params(p) if use_gather else p
        grads = jax.grad(loss_fn)(full, batch)
        return su.update(grads, s, p)

    b_sh = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh):
        p = jax.device_put(PARAMS, su.param_shardings)
        s = jax.jit(tx.init, out_shardings=su.state_shardings)(p)
        for batch in BATCHES:
            p, s = step(p, s, jax.device_put(batch, b_sh))
    return p, s


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shard_map_path_equals_jit_path(stage):
    tx = optstate.adamw(1e-2, weight_decay=0.1)
    mesh = mesh_1d(AxisType.Explicit)
    want, want_state, _ = sharded_run(tx, mesh, stage)
    got, state = shard_map_run(tx, mesh, stage)
    assert_trees_close(got, jax.tree.map(np.asarray, want))
    assert_trees_close(state, want_state)
    expect = total_bytes(state) if stage == 0 else total_bytes(state) / N * 1.15
    assert sharding.bytes_on_device(state, device0()) <= expect


def test_shard_map_without_gather_params_still_equal():
    """Replicated parameters used directly: shard_map's autodiff all-reduces their gradients
    first; the update notices and does not sum twice."""
    tx = optstate.adamw(1e-2, weight_decay=0.1)
    mesh = mesh_1d()
    want, _ = reference_run(tx)
    got, _ = shard_map_run(tx, mesh, 1, use_gather=False)
    assert_trees_close(got, want)


@pytest.mark.parametrize("stage", [1, 3])
def test_pmap_path_equals_unsharded(stage):
    tx = optstate.adamw(1e-2, weight_decay=0.1)
    want, want_state = reference_run(tx)
    pu = sharding.pmap_update(tx, PARAMS, N, stage=stage)

    def step(p, s, batch):
        grads = jax.grad(loss_fn)(pu.gather_params(p), batch)
        return pu.update(grads, s, p)

    step = jax.pmap(step, axis_name="data", donate_argnums=(0, 1))
    p, s = pu.split_params(PARAMS), pu.split_state(tx.init(PARAMS))
    # each device holds its shard of the state only
    per_device = sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in jax.tree.leaves(s))
    assert per_device <= total_bytes(want_state) / N * 1.15
    for x, y in BATCHES:
        p, s = step(p, s, (x.reshape(N, -1, x.shape[-1]), y.reshape(N, -1, y.shape[-1])))
    assert_trees_close(pu.merge_params(p), want)
    assert_trees_close(pu.merge_state(s), want_state)


# ---------------------------------------------------------------------------------------
# Quantized state (optstate.quantize_state)
# ---------------------------------------------------------------------------------------


def int8_adamw():
    return optstate.quantize_state(optstate.adamw(1e-2, weight_decay=0.1), "int8")


def recorded_gradients(tx):
    """The unsharded run, keeping the gradient of every step."""
    grad_fn = jax.jit(jax.grad(loss_fn))

    @jax.jit
    def apply(g, s, p):
        u, s = tx.update(g, s, p)
        return optstate.apply_updates(p, u), s

    p, s, grads = jax.tree.map(jnp.asarray, PARAMS), tx.init(PARAMS), []
    for batch in BATCHES:
        grads.append(jax.tree.map(np.asarray, grad_fn(p, batch)))
        p, s = apply(grads[-1], s, p)
    return grads, jax.tree.map(np.asarray, p), s


def sharded_updates(tx, mesh, stage, grads):
    """The jit path's optimizer step alone, fed the recorded gradients."""
    p_sh = sharding.param_shardings(PARAMS, mesh, stage=stage)
    s_sh = sharding.state_shardings(tx, PARAMS, mesh, stage=stage)
    g_sh = sharding.grad_shardings(PARAMS, mesh, stage=stage)

    def apply(g, s, p):
        u, s = tx.update(g, s, p)
        return optstate.apply_updates(p, u), s

    with jax.set_mesh(mesh):
        p = jax.device_put(PARAMS, p_sh)
        s = jax.jit(tx.init, out_shardings=s_sh)(p)
        f = jax.jit(apply, in_shardings=(g_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh),
                    donate_argnums=(1, 2))
        for g in grads:
            p, s = f(jax.device_put(g, g_sh), s, p)
    return p, s


@pytest.mark.parametrize("stage", [1, 3])
def test_int8_state_memory_and_equality(stage):
    """int8 AdamW at ZeRO ``stage``: (a) given the same gradients, the sharded steps equal the
    unsharded ones; (b) whole training steps equal plain data parallelism (stage 0, state
    replicated) on the same devices.

    Whole steps are not compared with the single-device run: the batch sum is added in
    another order there, and int8 state turns such a last-bit difference into a different
    code now and then (a few elements in 10^4, up to a few percent of a step)."""
    tx = int8_adamw()
    grads, want, want_state = recorded_gradients(tx)
    got, state = sharded_updates(tx, mesh_1d(), stage, grads)
    assert_trees_close(got, want)
    assert_trees_close(state, want_state)
    full = total_bytes(state)
    assert full < 3 * sum(v.size for v in PARAMS.values())  # really int8: ~2 B/param
    assert sharding.bytes_on_device(state, device0()) <= full / N * 1.15
    s_sh = sharding.state_shardings(tx, PARAMS, mesh_1d(), stage=stage)
    quantized = [x for x in jax.tree.leaves(s_sh, is_leaf=is_quantized) if is_quantized(x)]
    assert quantized, "expected quantized leaves in the int8 state"
    for q in quantized:  # codes and scales split on the same (first) dimension
        assert tuple(q.codes.spec)[0] == tuple(q.scales.spec)[0] == "data", q

    dp, dp_state, _ = sharded_run(tx, mesh_1d(), 0)
    got, state, _ = sharded_run(tx, mesh_1d(), stage)
    assert_trees_close(got, jax.tree.map(np.asarray, dp))
    assert_trees_close(state, dp_state)


dequantize_jit = jax.jit(dequantize)


def _local_dequantized(q):
    """Dequantizes every device's shard of ``q`` on its own: (index, local, device).

    Each shard's codes and scales are copied to the host first, so that the dequantization
    compiles once per local shape rather than once per device holding it."""
    scales_by_device = {s.device: np.asarray(s.data) for s in q.scales.addressable_shards}
    out = []
    for shard in q.codes.addressable_shards:
        codes = np.asarray(shard.data)
        local_shape = list(codes.shape)
        packed = q.format.values_per_code > 1
        if packed:  # packed last axis: logical length from the split factor
            k = q.codes.shape[-1] // codes.shape[-1]
            local_shape[-1] = q.shape[-1] // k
        local = QuantizedArray(codes, scales_by_device[shard.device], fmt=q.fmt,
                               shape=tuple(local_shape), dtype=q.dtype,
                               block_size=q.block_size, nonneg=q.nonneg)
        index = shard.index if not packed else shard.index[:-1] + (
            slice(None) if shard.index[-1] == slice(None) else slice(
                shard.index[-1].start * 2, shard.index[-1].stop * 2),)
        out.append((index, np.asarray(dequantize_jit(local)), shard.device))
    return out


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
def test_quantized_blocks_never_straddle_a_shard(fmt):
    """Each device's codes and scales, dequantized on their own, give exactly that device's
    slice of the whole leaf: no block is cut by a shard boundary. Leaves that would need a
    cut block stay replicated."""
    rng = np.random.default_rng(3)
    shapes = {"rows": (64, 128), "flat": (8192,), "grouped": (4096, 3), "ragged": (5000,),
              "odd_groups": (1000, 8), "deep": (2, 8, 512)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tx = optstate.quantize_state(optstate.adam(1e-2), fmt)
    grads = jax.tree.map(lambda p: np.float32(0.1) * p + 0.01, params)
    # non-trivial moments (init under jit: eager init quantizes op by op, ~20 s for int4)
    _, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    mesh = mesh_1d()
    s_sh = sharding.tree_shardings(state, params, mesh, stage=1)
    placed = jax.device_put(state, s_sh)
    nodes = [(jax.tree_util.keystr(p), x) for p, x in
             jax.tree_util.tree_flatten_with_path(placed.inner_state[0].nu,
                                                  is_leaf=is_quantized)[0]
             if is_quantized(x)]
    assert len(nodes) == len(shapes)  # nu (unsigned grid) of every leaf: all >= min_size
    split = set()
    for path, q in nodes:
        whole = np.asarray(dequantize_jit(q))
        for index, local, device in _local_dequantized(q):
            np.testing.assert_array_equal(local, whole[index], err_msg=f"{path} on {device}")
        if len(q.codes.addressable_shards[0].data.flatten()) < q.codes.size:
            split.add(path.split("'")[-2])
    if fmt == "bf16":  # a plain cast, no blocks: every leaf splits like an fp32 one
        assert split == set(shapes), split
    elif fmt == "int4":
        # int4 second moments of >= 2 axes use rank-1 normalisation (row and column maxima
        # over the whole leaf): they stay replicated; the 1-D ones are block-wise
        assert all(x.fmt == "int4_rank1" for p, x in nodes if len(x.shape) >= 2)
        assert split == {"flat"}, split
    else:
        assert split == {"rows", "flat", "grouped", "deep"}, split


def concentrated_on_device_0(g):
    """``(N, ...)`` per-device gradients: ``N * g`` on device 0, zeros elsewhere, so their
    mean over the devices is ``g`` exactly."""
    return jax.tree.map(lambda x: np.concatenate(
        [x[None] * N, np.zeros((N - 1,) + x.shape, x.dtype)]), g)


def run_shard_map_stage1(tx, params, grads):
    """Stage-1 ``shard_map`` steps on the 1-D mesh, each fed ``concentrated_on_device_0(g)``;
    returns the final parameters and state."""
    mesh = mesh_1d()
    su = sharding.shard_map_update(tx, params, mesh, stage=1)
    g_specs = jax.tree.map(lambda _: P("data"), params)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(g_specs, su.state_specs,
                                                           su.param_specs),
                       out_specs=(su.param_specs, su.state_specs))
    def sm_step(g, s, p):
        return su.update(jax.tree.map(lambda x: x[0], g), s, p)

    with jax.set_mesh(mesh):
        p = jax.device_put(params, su.param_shardings)
        s = jax.jit(tx.init, out_shardings=su.state_shardings)(p)
        for g in grads:
            p, s = sm_step(concentrated_on_device_0(g), s, p)
    return p, s


def test_int8_shard_map_and_pmap_paths_equal_unsharded():
    """Fed the recorded gradients as per-device gradients that sum exactly (all of it on
    device 0, zeros elsewhere), the shard_map (stage 1) and pmap (stage 3) updates equal the
    unsharded int8 steps."""
    tx = int8_adamw()
    grads, want, want_state = recorded_gradients(tx)

    p, s = run_shard_map_stage1(tx, PARAMS, grads)
    assert_trees_close(p, want)
    assert_trees_close(s, want_state)

    pu = sharding.pmap_update(tx, PARAMS, N, stage=3)
    pm_step = jax.pmap(lambda g, s, p: pu.update(g, s, p), axis_name="data")
    p, s = pu.split_params(PARAMS), pu.split_state(tx.init(PARAMS))
    for g in grads:
        p, s = pm_step(concentrated_on_device_0(g), s, p)
    assert_trees_close(pu.merge_params(p), want)
    assert_trees_close(pu.merge_state(s), want_state)


def test_int8_on_a_two_axis_mesh():
    """Tensor parallelism survives on quantized state where it splits whole blocks: w2's
    state keeps "model" on dim 0 and cannot take "data" (dim 1 is the block axis); w1's
    blocks are groups of rows, so its state cannot keep "model" on dim 1 and takes "data"
    on dim 0. Whole steps equal plain data parallelism on the same mesh."""
    mesh = mesh_2d(AxisType.Auto)
    tp = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P(),
          "gain": P()}
    params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, tp[k]))
              for k, v in PARAMS.items()}
    tx = int8_adamw()
    s_sh = sharding.state_shardings(tx, params, mesh, stage=1)
    mu = s_sh.inner_state[0].mu
    assert (mu["w1"].codes.spec, mu["w1"].scales.spec) == (P("data"), P("data"))
    assert (mu["w2"].codes.spec, mu["w2"].scales.spec) == (P("model"), P("model"))
    assert (mu["b1"].spec, mu["b2"].spec) == (P("model"), P("data"))
    dp, _, _ = sharded_run(tx, mesh, 0, like=params, loss=tp_loss_fn)
    got, state, _ = sharded_run(tx, mesh, 1, like=params, loss=tp_loss_fn)
    assert_trees_close(got, jax.tree.map(np.asarray, dp))
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(s_sh)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


def test_int8_state_on_an_explicit_mesh_equals_the_auto_mesh():
    """int8 AdamW state sharded at stage 1 on an Explicit mesh (block reshapes of sharded
    codes run in Auto mode inside ``quantize_state``): five steps equal the Auto-mesh run, and
    the state keeps its shardings."""
    tx = int8_adamw()
    want, want_state, _ = sharded_run(tx, mesh_1d(AxisType.Auto), 1)
    got, state, s_sh = sharded_run(tx, mesh_1d(AxisType.Explicit), 1)
    assert_trees_close(got, jax.tree.map(np.asarray, want))
    assert_trees_close(state, want_state)
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(s_sh)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


def test_int8_shard_map_with_chunked_leaves_equals_unsharded():
    """A 1024x1024 leaf is large enough that each device's state shard (128x1024) is updated
    in chunks inside ``shard_map``, where the loop carries device-varying values: three
    shard_map steps (stage 1) equal the unsharded ones."""
    rng = np.random.default_rng(7)
    params = {"w": (rng.standard_normal((1024, 1024)) / 32).astype(np.float32),
              "b": np.zeros((1024,), np.float32)}
    grads = [{k: (rng.standard_normal(v.shape) / 100).astype(np.float32)
              for k, v in params.items()} for _ in range(3)]
    tx = int8_adamw()

    @jax.jit
    def apply(g, s, p):
        u, s = tx.update(g, s, p)
        return optstate.apply_updates(p, u), s

    want, want_state = jax.tree.map(jnp.asarray, params), tx.init(params)
    for g in grads:
        want, want_state = apply(g, want_state, want)

    p, s = run_shard_map_stage1(tx, params, grads)
    assert_trees_close(p, jax.tree.map(np.asarray, want))
    assert_trees_close(s, want_state)
