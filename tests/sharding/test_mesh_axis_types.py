"""The README's sharding recipe with ``quantize_state`` on every kind of mesh.

``jax.make_mesh((8,), ("data",))`` makes Explicit axes by default (JAX 0.10), and a user may
or may not enter ``jax.set_mesh``. The recipe (``state_shardings``, ``jax.jit(tx.init,
out_shardings=...)``, a donated step jitted with in/out shardings) must give the unsharded
run's state and parameters on Explicit and Auto meshes, with and without ``jax.set_mesh``, at
stage 1 (state sharded) and stage 3 (parameters sharded too, so ``init`` quantizes sharded
leaves). Before the fix, an Explicit mesh without ``jax.set_mesh`` failed deep inside the
dequantization with "Resource axis: data ... not found in mesh: ()".
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optstate
from optstate import sharding
from tests import helpers

N = 8
STEPS = 3
FORMATS = ["int8", "int4"]
# name: (axis type, None for jax.make_mesh's default (Explicit); enter jax.set_mesh)
MESHES = {
    "explicit-no-set_mesh": (None, False),
    "explicit-set_mesh": (None, True),
    "auto-no-set_mesh": (AxisType.Auto, False),
    "auto-set_mesh": (AxisType.Auto, True),
}


def _params():
    rng = np.random.default_rng(0)
    return {"w": (rng.standard_normal((64, 512)) / 8).astype(np.float32),
            "b": np.zeros((512,), np.float32)}


PARAMS = _params()
_rng = np.random.default_rng(1)
GRADS = [{k: (_rng.standard_normal(v.shape) / 10).astype(np.float32) for k, v in PARAMS.items()}
         for _ in range(STEPS)]


def make_mesh(axis_type):
    if axis_type is None:  # exactly as a user writes it
        return jax.make_mesh((N,), ("data",))
    return jax.make_mesh((N,), ("data",), axis_types=(axis_type,))


def make_tx(fmt):
    return optstate.quantize_state(optstate.adamw(1e-2, weight_decay=0.1), fmt)


def step(tx, p, s, g):
    u, s = tx.update(g, s, p)
    return optstate.apply_updates(p, u), s


@functools.cache
def reference(fmt):
    """The unsharded run: the initial state, then the parameters and state after STEPS."""
    tx = make_tx(fmt)
    p = jax.tree.map(jnp.asarray, PARAMS)
    s = s0 = jax.jit(tx.init)(p)
    f = jax.jit(lambda p, s, g: step(tx, p, s, g))
    for g in GRADS:
        p, s = f(p, s, g)
    return s0, p, s


def recipe(tx, mesh, stage, set_mesh):
    """The README recipe: returns the initial state, the final parameters and state, and the
    state shardings."""
    p_sh = sharding.param_shardings(PARAMS, mesh, stage=stage)
    s_sh = sharding.state_shardings(tx, PARAMS, mesh, stage=stage)
    g_sh = sharding.grad_shardings(PARAMS, mesh, stage=stage)
    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
        p = jax.device_put(PARAMS, p_sh)
        s0 = jax.jit(tx.init, out_shardings=s_sh)(p)
        s0_host = jax.tree.map(np.asarray, s0)  # s0 is donated below
        f = jax.jit(lambda p, s, g: step(tx, p, s, g), in_shardings=(p_sh, s_sh, g_sh),
                    out_shardings=(p_sh, s_sh), donate_argnums=(0, 1))
        s = s0
        for g in GRADS:
            p, s = f(p, s, jax.device_put(g, g_sh))
    return s0_host, p, s, s_sh


def test_default_mesh_is_explicit():
    """The premise of the issue: the default mesh of this JAX has Explicit axes, so the
    ``explicit-*`` cases below, which make the mesh as a user does, test an Explicit mesh."""
    assert tuple(make_mesh(None).axis_types) == (AxisType.Explicit,)


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mesh_kind", list(MESHES))
def test_recipe_equals_unsharded(mesh_kind, fmt, stage):
    axis_type, set_mesh = MESHES[mesh_kind]
    mesh = make_mesh(axis_type)
    tx = make_tx(fmt)
    want_s0, want_p, want_s = reference(fmt)
    s0, p, s, s_sh = recipe(tx, mesh, stage, set_mesh)
    helpers.assert_trees_identical(s0, jax.tree.map(np.asarray, want_s0), "initial state")
    helpers.assert_trees_close(p, want_p, "parameters", rtol=1e-5, atol=1e-6)
    helpers.assert_trees_close(s, want_s, "state", rtol=1e-5, atol=1e-6)
    # the state kept the shardings of the recipe, so it really is sharded 8 ways
    for leaf, sh in zip(jax.tree.leaves(s), jax.tree.leaves(s_sh)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    codes = s.inner_state[0].mu["w"].codes
    assert codes.addressable_shards[0].data.shape[0] * N == codes.shape[0]


def test_eager_calls_on_explicit_arrays_without_set_mesh():
    """``tx.init`` and ``tx.update`` called outside ``jit`` on arrays sharded over an
    Explicit axis (stage-3 parameters, the recipe's state), no ``jax.set_mesh``: the initial
    state equals the unsharded one bit for bit, the step's updates and state equal the
    unsharded step."""
    mesh = make_mesh(None)
    tx = make_tx("int8")
    p_sh = sharding.param_shardings(PARAMS, mesh, stage=3)
    s_sh = sharding.state_shardings(tx, PARAMS, mesh, stage=3)
    p = jax.device_put(PARAMS, p_sh)
    s0 = tx.init(p)
    helpers.assert_trees_identical(jax.tree.map(np.asarray, s0),
                                   jax.tree.map(np.asarray, reference("int8")[0]), "init")
    u, s = tx.update(jax.device_put(GRADS[0], p_sh), jax.device_put(s0, s_sh), p)
    want_u, want_s = jax.jit(tx.update)(GRADS[0], tx.init(PARAMS), PARAMS)
    helpers.assert_trees_close(u, want_u, "updates", rtol=1e-5, atol=1e-7)
    helpers.assert_trees_close(s, want_s, "state", rtol=1e-5, atol=1e-7)


def test_arrays_on_two_meshes_are_refused_in_one_line():
    """Gradients on one Explicit mesh and state on another: an error that names both meshes
    and says to put them on one, before any tracing of the inner update."""
    tx = make_tx("int8")
    mesh = make_mesh(AxisType.Explicit)
    other = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    s = jax.device_put(tx.init(PARAMS), sharding.state_shardings(tx, PARAMS, mesh, stage=1))
    g = jax.device_put(GRADS[0], NamedSharding(other, P("data")))
    with pytest.raises(ValueError, match="quantize_state: .*different meshes") as info:
        tx.update(g, s, None)
    assert "\n" not in str(info.value)
