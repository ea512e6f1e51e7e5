"""Flax NNX's Optimizer and Linen's TrainState accept optstate transforms unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx
from flax.training import train_state

import optstate


def _regression_data(seed=0, n=64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 2)) + 0.1).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def _nnx_losses(tx, steps=30):
    x, y = _regression_data()
    model = _Mlp(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    return np.array([float(step(model, optimizer)) for _ in range(steps)]), optimizer


def test_nnx_optimizer_trains_with_optstate_adamw_like_optax():
    ours, optimizer = _nnx_losses(optstate.adamw(1e-2, weight_decay=1e-3))
    ref, _ = _nnx_losses(optax.adamw(1e-2, weight_decay=1e-3))
    assert ours[-1] < 0.5 * ours[0]
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=1e-6)
    assert int(optimizer.step[...]) == 30


def test_linen_train_state_trains_with_optstate_adamw_like_optax():
    x, y = _regression_data(seed=1)
    model = linen.Dense(2)
    params = model.init(jax.random.key(0), x)

    def run(tx):
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

        @jax.jit
        def step(state):
            loss, grads = jax.value_and_grad(
                lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(state.params)
            return state.apply_gradients(grads=grads), loss

        losses = []
        for _ in range(30):
            state, loss = step(state)
            losses.append(float(loss))
        return np.array(losses), state

    ours, state = run(optstate.adamw(5e-2))
    ref, _ = run(optax.adamw(5e-2))
    assert ours[-1] < 0.5 * ours[0]
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=1e-6)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(
        optstate.adamw(5e-2).init(params))
