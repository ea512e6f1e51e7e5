"""optstate with Flax Linen: a ``TrainState`` whose AdamW state is stored in 4 or 8 bits.

``flax.training.train_state.TrainState`` accepts any Optax-shaped transform, so an optstate
transform (here AdamW wrapped in ``quantize_state``) drops in unchanged. The model is a small
Linen MLP that predicts the next byte of Python stdlib source from the previous eight.
Prints the loss falling and the state's bytes per parameter; runs in well under a minute:

    python examples/linen_train_state.py [--steps 300] [--format int4]
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

import optstate
from optstate.tasks import load_corpus

CONTEXT = 8
BATCH = 128


class NextByteMLP(nn.Module):
    """Embeds the previous ``CONTEXT`` bytes and predicts the next one."""

    width: int = 256

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        x = nn.Embed(256, 32)(context).reshape(context.shape[0], -1)
        x = nn.gelu(nn.Dense(self.width)(x))
        x = nn.gelu(nn.Dense(self.width)(x))
        return nn.Dense(256)(x)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None], axis=-1))


@jax.jit
def train_step(state: train_state.TrainState, windows: jax.Array) -> tuple[Any, jax.Array]:
    """One step: windows of ``CONTEXT + 1`` bytes, the last one the target."""

    def loss_fn(params: Any) -> jax.Array:
        logits = state.apply_fn({"params": params}, windows[:, :-1])
        return cross_entropy(logits, windows[:, -1].astype(jnp.int32))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def create_state(fmt: str, steps: int) -> train_state.TrainState:
    """A ``TrainState`` with AdamW whose moments are stored in ``fmt``."""
    model = NextByteMLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))["params"]
    schedule = optstate.schedules.warmup_cosine_decay(0.0, 3e-3, steps // 10, steps)
    tx = optstate.quantize_state(optstate.adamw(schedule, b2=0.99, weight_decay=0.01), fmt=fmt)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--format", default="int4",
                        help="state format: int4, int8, bf16, fp8_e4m3, fp8_e5m2 or fp32")
    args = parser.parse_args()

    corpus = load_corpus()
    state = create_state(args.format, args.steps)
    count = sum(p.size for p in jax.tree.leaves(state.params))
    state_bytes = optstate.memory.state_bytes(state.opt_state)
    print(f"{count:,} parameters; AdamW state in {args.format}: {state_bytes:,} bytes "
          f"= {state_bytes / count:.2f} bytes/param (fp32 AdamW: 8.00)")
    recent = []
    for step in range(1, args.steps + 1):
        state, loss = train_step(state, corpus.train_batch(0, step, BATCH, CONTEXT))
        recent.append(loss)
        if step % 50 == 0 or step == args.steps:
            mean = float(jnp.mean(jnp.stack(recent)))
            print(f"step {step:4d}  mean training loss of the last {len(recent)} steps "
                  f"{mean:.3f} nats/byte")
            recent = []
    heldout = corpus.eval_batches("heldout", 1, 4096, CONTEXT)[0]
    logits = state.apply_fn({"params": state.params}, heldout[:, :-1])
    print(f"held-out loss {float(cross_entropy(logits, heldout[:, -1].astype(jnp.int32))):.3f} "
          f"nats/byte (a uniform guess: {float(jnp.log(256.0)):.3f})")


if __name__ == "__main__":
    main()
