"""The fused kernel per shard: quantize_state's state sharded by optstate.sharding.

Blocks never straddle a shard, so each device can update its own shard of the state with the
kernel. On a 1-D mesh of 4 of the 8 emulated CPU devices (tests/conftest.py):

* inside ``jax.shard_map`` (values are local shards with manual-axis "vma" types), the
  interpret-mode kernel equals the XLA path under the same ``shard_map`` (codes and scales
  equal, updates to rtol 1e-6), and the kernel lowers for GPU (Triton) on the local shards;
* under plain ``jit`` with the state typed as split over an Explicit mesh,
  ``update_and_apply`` runs the kernel per shard under ``shard_map`` (equal to the XLA path,
  stochastic rounding included; Triton reads a shard), and a placement that would cut a block
  takes the XLA path visibly.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optstate
from optstate import sharding
from optstate.quantization.array import is_quantized
from optstate.quantization.fused import KernelFallbackWarning, use_kernel
from optstate.quantization.wrapper import recording_update_paths

N = 4  # devices on the mesh
SHAPE = (8, 4096)  # each device's shard: 2 x 4096 values, whole blocks


def _mesh():
    return jax.make_mesh((N,), ("data",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:N])


def _tx(fmt, rounding="nearest"):
    extra = {"rank1": False} if fmt == "int4" else {}
    return optstate.quantize_state(optstate.adam(1e-2), fmt, min_size=1, rounding=rounding,
                                   **extra)


@functools.cache
def _setup(fmt, rounding, check_vma):
    """The mesh, ``shard_map_update``, zero parameters (so that the new parameters are the
    updates exactly), a gradient, the state after a first step on the XLA path (not all
    zeros), and that step (jitted, traced on the XLA path)."""
    rng = np.random.default_rng(0)
    params = {"w": np.zeros(SHAPE, np.float32)}
    g0, g1 = ({"w": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(2))
    mesh, tx = _mesh(), _tx(fmt, rounding)
    su = sharding.shard_map_update(tx, params, mesh, stage=3)
    with jax.set_mesh(mesh):
        p = jax.device_put(params, su.param_shardings)
        g0, g1 = (jax.device_put(g, NamedSharding(mesh, P())) for g in (g0, g1))
        s = jax.jit(tx.init, out_shardings=su.state_shardings)(p)
        xla = _step(su, mesh, check_vma)
        with use_kernel("off"):
            _, s = xla(g0, s, p)
    return mesh, su, p, g1, s, xla


def _step(su, mesh, check_vma):
    """A jitted shard_map step of ``su.update`` (the gradients replicated: every device reads
    the same whole gradient)."""

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, check_vma=check_vma,
                       in_specs=(P(), su.state_specs, su.param_specs),
                       out_specs=(su.param_specs, su.state_specs))
    def step(g, s, p):
        return su.update(g, s, p)

    return step


def _run(fmt, rounding, mode, *, check_vma=True):
    """One step from :func:`_setup`'s state, traced under ``use_kernel(mode)``: the new
    parameters (the updates), the new state and the recorded update paths."""
    mesh, su, p, g, s, xla = _setup(fmt, rounding, check_vma)
    step = xla if mode == "off" else _step(su, mesh, check_vma)  # traced once per mode
    with jax.set_mesh(mesh), use_kernel(mode), recording_update_paths() as record:
        u, s = step(g, s, p)
    return u, s, record


@pytest.mark.parametrize("fmt,rounding", [("int8", "nearest"), ("bf16", "stochastic")])
def test_kernel_per_shard_equals_xla_path(fmt, rounding):
    want_u, want_s, record = _run(fmt, rounding, "off")
    got_u, got_s, record = _run(fmt, rounding, "interpret")
    assert set(record.values()) == {"kernel"}, record
    np.testing.assert_allclose(got_u["w"], want_u["w"], rtol=1e-6, atol=1e-12)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_s), jax.tree.leaves(want_s)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    mu = got_s.inner_state[0].mu["w"]
    assert mu.codes.sharding.spec[0] == "data"  # the state stayed sharded


def test_kernel_per_shard_without_vma_checks():
    """``shard_map(check_vma=False)``: no manual-axis types; the kernel runs all the same."""
    want_u, want_s, _ = _run("int8", "nearest", "off", check_vma=False)
    got_u, got_s, record = _run("int8", "nearest", "interpret", check_vma=False)
    assert set(record.values()) == {"kernel"}, record
    np.testing.assert_allclose(got_u["w"], want_u["w"], rtol=1e-6, atol=1e-12)
    jax.tree.map(np.testing.assert_array_equal, got_s, want_s)


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_kernel_per_shard_lowers_for_gpu_with_triton(fmt):
    mesh = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:N])
    params = {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float32)}
    tx = optstate.quantize_state(optstate.adamw(1e-3), fmt, min_size=1, rounding="stochastic")
    su = sharding.shard_map_update(tx, params, mesh, stage=1)
    state = jax.eval_shape(tx.init, params)

    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(su.param_specs, su.state_specs, su.param_specs),
                       out_specs=(su.param_specs, su.state_specs))
    def step(g, s, p):
        return su.update(g, s, p)

    with use_kernel("triton"), recording_update_paths() as record:
        text = jax.jit(step).trace(params, state, params).lower(
            lowering_platforms=("cuda",)).as_text()
    assert set(record.values()) == {"kernel"}, record
    assert text.count("__gpu$xla.gpu.triton") == 1
    # the kernel reads this device's codes: 2 x 4096 values, as blocks of 256 (int8) or rows
    # of 1024 (bf16)
    local = "tensor<32x256xui8>" if fmt == "int8" else "tensor<8x1024xui16>"
    call = next(line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line)
    assert local in call.split("->")[-1], call[-300:]


def test_operands_varying_over_different_axes_take_the_xla_path_visibly():
    """A replicated (invariant) state and parameter beside a device-varying gradient: the
    kernel's outputs would all vary, where the XLA path may keep some invariant."""
    mesh = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:N])
    tx = _tx("int8")
    local = (2, 4096)  # each device's gradient shard; the state is of this shape, replicated
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct(local, jnp.float32)})
    s_specs = jax.tree.map(lambda _: P(), state)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), s_specs, P()),
                       out_specs=(P("data"), s_specs))
    def step(g, s, p):
        return tx.update({"w": g}, s, {"w": p})

    with use_kernel("interpret"), recording_update_paths() as record, pytest.warns(
            KernelFallbackWarning, match="different manual axes"), pytest.raises(
            ValueError, match="out_specs"):  # the new state varies: out_specs say replicated
        jax.eval_shape(step, jax.ShapeDtypeStruct(SHAPE, jnp.float32), state,
                       jax.ShapeDtypeStruct(local, jnp.float32))
    assert record and all("vary over different manual axes" in v for v in record.values()), \
        record


# -- plain jit, the state typed as split over an Explicit mesh ---------------------------------


def _explicit_step(step, mesh, g, s, p, mode):
    with jax.set_mesh(mesh), use_kernel(mode), recording_update_paths() as record:
        out = step(g, s, p)
    return out, record


def test_update_and_apply_on_an_explicit_mesh_runs_the_kernel_per_shard():
    """Stage 1 (the state split, the parameters replicated), stochastic rounding: the kernel
    runs per shard under shard_map, each shard drawing the whole leaf's counters there."""
    mesh, tx = _mesh(), _tx("int8", "stochastic")
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal(SHAPE).astype(np.float32)}
    g0, g1 = ({"w": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(2))
    s_sh = sharding.state_shardings(tx, params, mesh, stage=1)
    p_sh = sharding.param_shardings(params, mesh, stage=1)
    with jax.set_mesh(mesh):
        p, g0, g1 = (jax.device_put(x, p_sh) for x in (params, g0, g1))
        s = jax.jit(tx.init, out_shardings=s_sh)(p)
    xla, kernel = (jax.jit(lambda g, s, p: optstate.update_and_apply(tx, g, s, p))
                   for _ in range(2))  # traced once each: one under each use_kernel mode
    (p, s), _ = _explicit_step(xla, mesh, g0, s, p, "off")
    (want_p, want_s), _ = _explicit_step(xla, mesh, g1, s, p, "off")
    (got_p, got_s), record = _explicit_step(kernel, mesh, g1, s, p, "interpret")
    assert set(record.values()) == {"kernel"}, record
    np.testing.assert_allclose(got_p["w"], want_p["w"], rtol=1e-6, atol=1e-8)
    jax.tree.map(np.testing.assert_array_equal, got_s, want_s)
    for leaf, sh in zip(jax.tree.leaves(got_s), jax.tree.leaves(s_sh)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


def _explicit_abstract(tx, mesh, shape, codes_spec=None, scales_spec=None):
    """Abstract parameters (replicated) and state on ``mesh``: the state placed by
    ``state_shardings``, or its codes and scales by the given specs."""
    rep = NamedSharding(mesh, P())
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rep)}
    s_sh = sharding.state_shardings(tx, params, mesh, stage=1)
    if codes_spec is not None:
        s_sh = jax.tree.map(
            lambda x: dataclasses.replace(x, codes=NamedSharding(mesh, codes_spec),
                                          scales=NamedSharding(mesh, scales_spec))
            if is_quantized(x) else rep, s_sh, is_leaf=is_quantized)
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                         jax.eval_shape(tx.init, params), s_sh)
    return params, state


@pytest.mark.parametrize("apply", [True, False], ids=["update_and_apply", "update"])
def test_kernel_per_shard_on_an_explicit_mesh_lowers_for_gpu_with_triton(apply):
    mesh, tx = _mesh(), _tx("int8", "stochastic")
    params, state = _explicit_abstract(tx, mesh, SHAPE)
    step = ((lambda g, s, p: optstate.update_and_apply(tx, g, s, p)) if apply
            else (lambda g, s, p: tx.update(g, s, p)))
    with use_kernel("triton"), recording_update_paths() as record:
        text = jax.jit(step, donate_argnums=(1, 2)).trace(params, state, params).lower(
            lowering_platforms=("cuda",)).as_text()
    assert set(record.values()) == {"kernel"}, record
    assert text.count("__gpu$xla.gpu.triton") == 1
    call = next(line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line)
    assert "tensor<32x256xui8>" in call.split("->")[-1], call[-300:]  # a shard: 2 x 4096


def test_a_shard_that_would_cut_a_block_takes_the_xla_path_visibly():
    """Codes of an (8, 512) leaf split 4 ways on the block axis: 128 values a shard, half a
    block of 256 (optstate.sharding never places state so; a hand-made placement may)."""
    mesh, tx = _mesh(), _tx("int8")
    params, state = _explicit_abstract(tx, mesh, (8, 512), P(None, "data"), P())
    with use_kernel("interpret"), recording_update_paths() as record, pytest.warns(
            KernelFallbackWarning, match="cut a block"):
        jax.eval_shape(lambda g, s, p: optstate.update_and_apply(tx, g, s, p), params, state,
                       params)
    assert record and all("would cut a block" in v for v in record.values()), record
