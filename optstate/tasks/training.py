"""A functional training loop for :class:`~optstate.tasks.transformer.TransformerLM`.

The model's parameters are an ``nnx.State`` pytree; the optimizer is any
``GradientTransformation`` (optstate's or Optax's). The train step is one ``jax.jit`` with the
parameters and optimizer state donated, so that XLA can update them in place and its memory
analysis of the step is the memory a real training step needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optstate.tasks.stdlib_text import ByteCorpus
from optstate.tasks.transformer import ModelConfig, TransformerLM, next_token_loss

Params = Any
OptState = Any
TrainStep = Callable[[Params, OptState, jax.Array], tuple[Params, OptState, jax.Array]]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run of the embedded task.

    Attributes:
      steps: optimizer steps.
      batch_size: sequences per step.
      seed: drives the parameter initialisation and the training batches.
      eval_batches: batches of ``batch_size`` fixed windows for each evaluation.
      eval_points: how many times the held-out loss is measured during the run (evenly
        spaced, always including the last step).
      model: sizes of the transformer (its ``seq_len`` is the training window).
    """

    steps: int = 400
    batch_size: int = 8
    seed: int = 0
    eval_batches: int = 16
    eval_points: int = 4
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batches", "eval_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}: expected a positive integer, got {value!r}.")

    def eval_steps(self) -> list[int]:
        """The (1-based) steps after which the held-out loss is measured."""
        points = np.linspace(0, self.steps, num=self.eval_points + 1)[1:]
        return sorted({max(1, int(round(p))) for p in points})


def init_model(config: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """A fresh model for ``seed``: its graph definition and its ``nnx.Param`` arrays.

    The parameters are returned as plain arrays (``nnx.as_pure``), as ``nnx.Optimizer`` hands
    them to an optimizer, so that optimizer state holds arrays rather than Flax variables.
    """
    model = TransformerLM(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.as_pure(params)


def num_params(params: Params) -> int:
    """The number of scalar parameters in ``params``."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[Params, jax.Array], jax.Array]:
    """``loss(params, windows)``: next-byte cross-entropy of windows ``(batch, seq_len + 1)``."""

    def loss(params: Params, windows: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        logits = model(windows[:, :-1])
        return next_token_loss(logits, windows[:, 1:])

    return loss


def make_train_step(graphdef: nnx.GraphDef, tx: Any, update_and_apply: Callable) -> Any:
    """A jitted ``step(params, opt_state, windows) -> (params, opt_state, loss)``.

    ``params`` and ``opt_state`` are donated. ``update_and_apply`` is
    :func:`optstate.update_and_apply` (passed in so that this module has no optimizer
    import): ``tx.update`` and ``apply_updates``, with ``quantize_state``'s state and the
    parameters written in place, chunk by chunk.
    """
    loss_fn = make_loss_fn(graphdef)

    def step(params: Params, opt_state: OptState, windows: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        params, opt_state = update_and_apply(tx, grads, opt_state, params)
        return params, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_fn(graphdef: nnx.GraphDef) -> Callable[[Params, jax.Array], jax.Array]:
    """A jitted ``evaluate(params, batches)``: mean loss over ``(num_batches, batch, seq+1)``."""
    loss_fn = make_loss_fn(graphdef)

    def evaluate(params: Params, batches: jax.Array) -> jax.Array:
        return jnp.mean(jax.lax.map(lambda windows: loss_fn(params, windows), batches))

    return jax.jit(evaluate)


@dataclass
class RunResult:
    """What one training run produced.

    Attributes:
      train_losses: the loss of every step's batch, in order.
      heldout_curve: ``(step, held-out loss)`` pairs at :meth:`TrainConfig.eval_steps`.
      final_train_loss: loss on fixed training windows after the last step.
      final_heldout_loss: loss on the fixed held-out windows after the last step.
      seconds: wall time of the loop (compilation of the first step included).
      params: the trained parameters.
      opt_state: the final optimizer state.
    """

    train_losses: np.ndarray
    heldout_curve: list[tuple[int, float]]
    final_train_loss: float
    final_heldout_loss: float
    seconds: float
    params: Params
    opt_state: OptState


ProgressFn = Callable[[int, jax.Array], None]


def run_training(
    corpus: ByteCorpus,
    config: TrainConfig,
    train_step: TrainStep,
    evaluate: Callable[[Params, jax.Array], jax.Array],
    params: Params,
    opt_state: OptState,
    progress: ProgressFn | None = None,
) -> RunResult:
    """Runs ``config.steps`` steps of ``train_step`` from ``(params, opt_state)``.

    ``params`` and ``opt_state`` are donated to the first step: do not use them afterwards.
    ``progress(step, loss)`` is called after each step with the step's (device) loss.
    """
    seq_len = config.model.seq_len
    sizes = (config.eval_batches, config.batch_size, seq_len)
    heldout = jnp.asarray(corpus.eval_batches("heldout", *sizes))
    train_eval = jnp.asarray(corpus.eval_batches("train", *sizes))
    eval_at = set(config.eval_steps())
    losses: list[jax.Array] = []
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        windows = corpus.train_batch(config.seed, step, config.batch_size, seq_len)
        params, opt_state, loss = train_step(params, opt_state, windows)
        losses.append(loss)
        if progress is not None:
            progress(step, loss)
        if step in eval_at:
            curve.append((step, float(evaluate(params, heldout))))
    final_train = float(evaluate(params, train_eval))
    seconds = time.perf_counter() - start
    return RunResult(
        train_losses=np.asarray(jax.device_get(losses), dtype=np.float64),
        heldout_curve=curve,
        final_train_loss=final_train,
        final_heldout_loss=curve[-1][1],
        seconds=seconds,
        params=params,
        opt_state=opt_state,
    )
