"""Where optstate mirrors Optax, Optax (0.2.8) is the reference: issue 12's five behaviours.

One test (parametrised where a behaviour has cases) per behaviour, each run side by side with
Optax on the same inputs:

1. complex parameters: second moments average :math:`|g|^2` (Adam family, RMSProp, Adagrad,
   LAMB, Adafactor, RMS clipping), Adadelta keeps Optax's plain :math:`g^2`;
2. ``scale_by_lion``'s ``mode`` / ``smooth_beta``;
3. ``inject_hyperparams``: hyperparameter dtypes follow the parameters, typed arrays keep
   theirs, a PRNG key argument works under ``jit``;
4. ``masked`` under ``optax.tree.map_params``, and a callable pytree used as a mask;
5. ``add_decayed_weights(...).update(None, state, params)`` passes ``None`` through.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate
from tests import helpers

STEPS = 6


# --- 1. complex parameters -------------------------------------------------------------------


def _complex_params():
    ks = jax.random.split(jax.random.key(12), 6)
    def c(a, b, shape):
        return (jax.random.normal(a, shape) + 1j * jax.random.normal(b, shape)
                ).astype(jnp.complex64)

    return {"w": c(ks[0], ks[1], (8, 6)), "b": c(ks[2], ks[3], (6,)) * 0.1,
            "s": c(ks[4], ks[5], ())}


def _complex_grads(params, i):
    """A gradient that depends on the parameters (trajectories feed back) and on the step."""
    target = jnp.asarray(0.3 - 0.2j, jnp.complex64)
    return {k: helpers.CURVATURE[k] * (p - target) + 0.05j * jnp.cos(i + p.real)
            for k, p in params.items()}


def _run_complex(tx):
    params = _complex_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        updates, state = tx.update(_complex_grads(params, i), state, params)
        return optax.apply_updates(params, updates), state, updates

    first = None
    for i in range(STEPS):
        params, state, updates = step(params, state, i)
        first = updates if first is None else first
    return params, state, first


def _real_imag(tree):
    """Complex leaves as (real, imag) pairs, so the float32 comparison sees both parts."""
    return jax.tree.map(lambda x: (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else x,
                        tree)


_COMPLEX_CASES = {
    "adam": lambda m: m.adam(0.05),
    "adam_eps_root": lambda m: m.adam(0.05, b1=0.8, b2=0.99, eps_root=1e-6),
    "nadam": lambda m: m.adam(0.05, nesterov=True),
    "adamw": lambda m: m.adamw(0.05, weight_decay=0.1),
    "rmsprop": lambda m: m.rmsprop(0.01),
    "rmsprop_bias_corrected_eps_outside": lambda m: m.rmsprop(
        0.01, eps_in_sqrt=False, bias_correction=True),
    "rmsprop_centered": lambda m: m.rmsprop(0.005, centered=True, eps=1e-4),
    "adagrad": lambda m: m.adagrad(0.1),
    "adadelta": lambda m: m.adadelta(1.0, eps=1e-4),
    "lamb": lambda m: m.lamb(0.02, weight_decay=0.01),
    "lion": lambda m: m.lion(0.003),
    "adafactor_factored": lambda m: m.adafactor(0.05, min_dim_size_to_factor=4),
    "adafactor_unfactored": lambda m: m.adafactor(0.05, factored=False),
    "sgd_nesterov_clipped": lambda m: m.chain(m.clip_by_global_norm(0.5),
                                              m.sgd(0.05, momentum=0.9, nesterov=True)),
    "block_rms_clip": lambda m: m.chain(m.clip_by_block_rms(0.1), m.sgd(0.1)),
}


def test_issue_example_adam_on_one_complex_parameter():
    p = jnp.array([1 + 1j], jnp.complex64)
    got, _ = optstate.adam(0.1).update(p, optstate.adam(0.1).init(p), p)
    want, _ = optax.adam(0.1).update(p, optax.adam(0.1).init(p), p)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got), [-0.1 / np.sqrt(2) * (1 + 1j)], rtol=1e-5)


@pytest.mark.parametrize("case", sorted(_COMPLEX_CASES))
def test_complex_parameters_match_optax(case):
    ours_p, ours_s, ours_u = _run_complex(_COMPLEX_CASES[case](optstate))
    their_p, their_s, their_u = _run_complex(_COMPLEX_CASES[case](optax))
    # Same state dtypes leaf for leaf (complex moments stay complex, as Optax keeps them).
    assert ([str(x.dtype) for x in jax.tree.leaves(ours_s)]
            == [str(x.dtype) for x in jax.tree.leaves(their_s)])
    assert all(jnp.iscomplexobj(x) for x in jax.tree.leaves(ours_p))
    helpers.assert_trees_close(_real_imag(ours_u), _real_imag(their_u), f"{case} first update")
    helpers.assert_trees_close(_real_imag(ours_p), _real_imag(their_p), f"{case} params",
                               rtol=1e-4, atol=1e-5)
    helpers.assert_trees_close(_real_imag(ours_s), _real_imag(their_s), f"{case} state",
                               rtol=1e-4, atol=1e-5, check_structure=False)


# --- 2. Lion's modes ------------------------------------------------------------------------


_LION_MODES = [("hard", 1.0), ("smooth", 1.0), ("smooth", 4.0), ("refined", 1.0)]


@pytest.mark.parametrize("mode,smooth_beta", _LION_MODES)
def test_lion_modes_match_optax(mode, smooth_beta):
    kw = {"mode": mode, "smooth_beta": smooth_beta}
    ours = optstate.chain(optstate.scale_by_lion(0.8, 0.95, **kw), optstate.scale(-0.01))
    theirs = optax.chain(optax.scale_by_lion(0.8, 0.95, **kw), optax.scale(-0.01))
    params = helpers.params(seed=4)
    noise = helpers.noise(seed=5)
    (p1, s1), (p2, s2) = helpers.run_pair(ours, theirs, params, noise)
    helpers.assert_trees_close(p1, p2, f"lion {mode} params")
    helpers.assert_trees_close(s1, s2, f"lion {mode} state", check_structure=False)
    # The first direction of each mode, against its formula (mu starts at zero: c = 0.2 g).
    g = helpers.grads(params, jax.tree.map(lambda n: n[0], noise))
    u, _ = optstate.scale_by_lion(0.8, 0.95, **kw).update(
        g, optstate.scale_by_lion(**kw).init(params))
    phi = {"hard": np.sign, "smooth": lambda c: np.tanh(smooth_beta * c),
           "refined": lambda c: np.where(np.abs(c) < 1.0, c, np.sign(c))}[mode]
    for k in g:
        np.testing.assert_allclose(u[k], phi(0.2 * np.asarray(g[k])), rtol=1e-6, atol=1e-7)
    # Optax's defaults; arguments are checked where the user wrote them (Optax would fail
    # at the first update on a bad mode).
    sig = inspect.signature(optstate.scale_by_lion).parameters
    assert (sig["mode"].default, sig["smooth_beta"].default) == ("hard", 1.0)
    with pytest.raises(ValueError, match=r"scale_by_lion: mode must be one of .*'soft'"):
        optstate.scale_by_lion(mode="soft")
    with pytest.raises(ValueError, match=r"scale_by_lion: smooth_beta"):
        optstate.scale_by_lion(mode="smooth", smooth_beta=0.0)


# --- 3. inject_hyperparams dtypes and keys ----------------------------------------------------


def _dtypes(hyperparams):
    return {k: str(jnp.result_type(v)) for k, v in hyperparams.items()}


def _inject_adamw(lib):
    # A Python float (b2), an explicitly typed array (b1, float16), a NumPy array (eps), a
    # weakly typed JAX scalar (eps_root) and an Optax schedule whose output is typed float32.
    return lib.inject_hyperparams(lib.adamw)(
        learning_rate=optax.schedules.linear_schedule(0.05, 0.01, 10), b1=jnp.float16(0.9),
        b2=0.99, eps=np.array(1e-6), eps_root=jnp.asarray(0.0), weight_decay=0.1)


def _steps(tx, params, n=3):
    state = tx.init(params)
    init_dtypes = _dtypes(state.hyperparams)
    step = jax.jit(tx.update)
    for i in range(n):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)).astype(p.dtype), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state, init_dtypes


def test_inject_hyperparams_dtypes_and_keys_match_optax():
    # bfloat16 parameters: bfloat16 hyperparameters, explicitly typed arrays keep their dtype.
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), helpers.params(seed=6))
    ours_p, ours_s, ours_init = _steps(_inject_adamw(optstate), params)
    their_p, their_s, their_init = _steps(_inject_adamw(optax), params)
    assert ours_init == their_init
    assert _dtypes(ours_s.hyperparams) == _dtypes(their_s.hyperparams) == their_init
    assert ours_init["b2"] == "bfloat16" and ours_init["b1"] == "float16"
    helpers.assert_trees_close(ours_s.hyperparams, their_s.hyperparams, "hyperparams",
                               rtol=0, atol=0)
    helpers.assert_trees_close(ours_p, their_p, "bf16 params", rtol=1e-2, atol=1e-2)
    # hyperparam_dtype overrides the parameters' dtype, as in Optax.
    for lib in (optstate, optax):
        state = lib.inject_hyperparams(lib.adam, hyperparam_dtype=jnp.float32)(
            learning_rate=0.1).init(params)
        assert state.hyperparams["learning_rate"].dtype == jnp.float32

    # A typed PRNG key argument is stored as it is and works under jit.
    def noisy(lib):
        return lib.inject_hyperparams(optax.add_noise)(eta=0.01, gamma=0.55,
                                                       key=jax.random.key(3))
    params32 = helpers.params(seed=6)
    ours_p, ours_s, _ = _steps(noisy(optstate), params32)
    their_p, their_s, _ = _steps(noisy(optax), params32)
    assert jax.dtypes.issubdtype(ours_s.hyperparams["key"].dtype, jax.dtypes.prng_key)
    helpers.assert_trees_identical(ours_s.hyperparams, their_s.hyperparams, "hyperparams")
    helpers.assert_trees_identical(ours_p, their_p, "params")


# --- 4. masked: map_params and callable pytree masks ----------------------------------------


def _flat(tree: Any, **kw):
    flat = jax.tree_util.tree_flatten_with_path(tree, **kw)[0]
    return [jax.tree_util.keystr(p) for p, _ in flat], [x for _, x in flat]


@jax.tree_util.register_pytree_node_class
class Module:
    """An Equinox-like module: a pytree (fields w and b) that is also callable."""

    def __init__(self, w, b):
        self.w, self.b = w, b

    def __call__(self, x):
        return self.w * x + self.b

    def tree_flatten(self):
        return (self.w, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)


@pytest.mark.parametrize("case", ["map_params_chain", "map_params_adamw",
                                  "map_params_partition", "module_mask"])
def test_masked_matches_optax(case):
    if case.startswith("map_params"):
        params = helpers.params(seed=7)
        mask = {"w": True, "b": False, "s": True}

        def build(lib):
            if case == "map_params_adamw":
                return lib.adamw(0.1, weight_decay=0.1, mask=mask)
            if case == "map_params_partition":
                labels = {"w": "adam", "b": "sgd", "s": "adam"}
                return lib.partition({"adam": lib.adam(0.1), "sgd": lib.sgd(0.1, 0.9)}, labels)
            return lib.chain(lib.masked(lib.scale_by_adam(), mask),
                             lib.add_decayed_weights(0.1, mask))

        results = []
        for lib in (optstate, optax):
            tx = build(lib)
            state = tx.init(params)
            _, state = tx.update(params, state, params)
            mapped = optax.tree.map_params(tx, lambda x: 2.0 * x + 1.0, state,
                                           transform_non_params=lambda x: -x)
            results.append(_flat(mapped))
        (ours_paths, ours_leaves), (their_paths, their_leaves) = results
        assert ours_paths == their_paths
        helpers.assert_trees_close(ours_leaves, their_leaves, f"{case} mapped state")
        return
    # A callable pytree of bools is a mask tree (Optax calls mask only when all its leaves
    # are callable), never called on the parameters.
    params = Module(jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0]))
    grads = Module(jnp.array([0.1, 0.2]), jnp.array([0.3, 0.4]))
    mask = Module(True, False)
    out = []
    for lib in (optstate, optax):
        tx = lib.masked(lib.add_decayed_weights(0.5), mask)
        out.append(tx.update(grads, tx.init(params), params)[0])
    helpers.assert_trees_close(out[0], out[1], "module mask")
    np.testing.assert_allclose(out[0].w, [0.6, -0.8])
    np.testing.assert_allclose(out[0].b, [0.3, 0.4])


# --- 5. None updates through add_decayed_weights --------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.1, 0.0, "schedule"])
def test_add_decayed_weights_passes_none_updates_through(weight_decay):
    params = helpers.params(seed=8)
    results = []
    for lib in (optstate, optax):
        wd = (optax.schedules.linear_schedule(0.1, 0.0, 4) if weight_decay == "schedule"
              else weight_decay)
        tx = lib.add_decayed_weights(wd)
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(None, state, params)
            assert updates is None
        results.append(state)
    assert jax.tree.leaves(results[0]) == jax.tree.leaves(results[1])
    if weight_decay == "schedule":
        assert int(results[0].count) == 2
    with pytest.raises(ValueError, match="needs the current parameters"):
        optstate.add_decayed_weights(0.1).update(None, optstate.EmptyState(), None)
