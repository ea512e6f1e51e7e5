"""optstate with Flax NNX: ``nnx.Optimizer`` driving AdamW whose state is stored in 8 bits.

Trains a small byte-level transformer (``optstate.tasks``) on Python's own stdlib sources for
a few hundred steps and prints the loss falling, then the optimizer state's size per leaf
next to what fp32 AdamW would hold. Runs in well under a minute on a CPU:

    python examples/flax_nnx.py [--steps 150] [--format int8]
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

import optstate
from optstate.tasks import ModelConfig, TransformerLM, load_corpus, next_token_loss

MODEL = ModelConfig(seq_len=64, d_model=64, num_heads=2, num_layers=2)
BATCH = 16


def init_on_arrays(tx: optstate.GradientTransformation) -> optstate.GradientTransformation:
    """``tx`` with ``init`` applied to the plain arrays of an ``nnx.State``.

    ``nnx.Optimizer`` calls ``init`` on ``nnx.Param`` variables; a quantized state leaf would
    then sit inside a variable, which ``Optimizer.update`` cannot write back. Initialising on
    the arrays keeps the codes and scales as ordinary optimizer-state arrays.
    """
    return optstate.GradientTransformation(lambda params: tx.init(nnx.as_pure(params)), tx.update)


def make_optimizer(model: TransformerLM, fmt: str, steps: int) -> nnx.Optimizer:
    """AdamW (warm-up + cosine schedule) with its moments stored in ``fmt``."""
    schedule = optstate.schedules.warmup_cosine_decay(0.0, 3e-3, steps // 10, steps)
    tx = optstate.quantize_state(optstate.adamw(schedule, b2=0.99, weight_decay=0.01), fmt=fmt)
    return nnx.Optimizer(model, init_on_arrays(tx), wrt=nnx.Param)


@nnx.jit
def train_step(model: TransformerLM, optimizer: nnx.Optimizer, windows: jax.Array) -> jax.Array:
    """One AdamW step on next-byte prediction; returns the batch's loss."""

    def loss_fn(m: TransformerLM) -> jax.Array:
        return next_token_loss(m(windows[:, :-1]), windows[:, 1:])

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def state_report(optimizer: nnx.Optimizer, model: TransformerLM) -> None:
    """Prints the optimizer state's bytes per storage format, and what fp32 AdamW would take."""
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    description = optstate.memory.describe(optimizer.opt_state, params)
    by_format: dict[str, list[int]] = {}
    for row in description.rows:
        by_format.setdefault(row.format, []).append(row.bytes)
    for fmt, sizes in sorted(by_format.items()):
        print(f"  {fmt:>6} state: {len(sizes):3d} leaves, {sum(sizes):9,} bytes")
    fp32_state = jax.eval_shape(optstate.adamw(1e-3).init, params)
    fp32_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(fp32_state))
    print(f"{description.num_params:,} parameters: optimizer state {description.total_bytes:,} "
          f"bytes ({description.bytes_per_param:.2f} B/param) instead of {fp32_bytes:,} in fp32 "
          f"({fp32_bytes / description.num_params:.2f} B/param); small leaves (biases, layer "
          "norms) stay fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--format", default="int8",
                        help="state format: int8, int4, bf16, fp8_e4m3, fp8_e5m2 or fp32")
    args = parser.parse_args()

    corpus = load_corpus()
    model = TransformerLM(MODEL, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, args.format, args.steps)
    heldout = corpus.eval_batches("heldout", 1, 64, MODEL.seq_len)[0]
    evaluate = nnx.jit(lambda m, w: next_token_loss(m(w[:, :-1]), w[:, 1:]))
    print(f"AdamW with {args.format} state; held-out loss at start "
          f"{float(evaluate(model, heldout)):.3f} nats/byte")
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, corpus.train_batch(0, step, BATCH, MODEL.seq_len))
        if step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  train loss {float(loss):.3f}  "
                  f"held-out loss {float(evaluate(model, heldout)):.3f}")
    state_report(optimizer, model)


if __name__ == "__main__":
    main()
