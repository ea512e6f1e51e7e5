r"""Stale second moments on the embedded transformer: stalling against the model, and drift.

AdamW (``optstate compare``'s, :func:`optstate.tasks.configs.build_optimizer`) trains a small
byte-level transformer with :math:`\beta_2 = 0.999` for a few thousand steps, its state in
fp32, bf16 with nearest rounding, or bf16 with stochastic rounding. Every step records the
fraction of stored second-moment elements (of the leaves ``quantize_state`` stores in bf16,
among those a gradient has reached) that the write left unchanged, to be compared with the
stall model's probability (:func:`optstate.staleness.stall_probability`), and at each
recorded point the stored
:math:`\nu` relative to the exact float32 EMA of the same gradients
(:mod:`optstate.tasks.second_moment`). The held-out loss is measured at a few points, so the
diagnostics can be read against the loss gap to fp32 (and, with several seeds, its noise).

Steps run in a jitted ``lax.scan`` over ``record_every`` steps at a time, with the parameters
and the optimizer state donated.

Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import optstate
from optstate.tasks import second_moment as sm
from optstate.tasks.configs import Hyperparameters, build_optimizer, parse_config
from optstate.tasks.stdlib_text import ByteCorpus
from optstate.tasks.training import init_model, make_eval_fn, make_loss_fn
from optstate.tasks.transformer import ModelConfig

DIAGNOSTIC_MODEL = ModelConfig(seq_len=32, d_model=64, num_heads=4, num_layers=2, mlp_ratio=4)
"""A transformer small enough for thousands of steps on a CPU: every weight matrix still has
at least 4096 elements, so its state is stored in the format under study."""


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Settings of the transformer diagnostics.

    Attributes:
      steps: optimizer steps per run (a multiple of ``record_every``).
      b2: Adam's second-moment decay.
      configs: ``optstate compare`` configuration names; ``fp32`` first.
      seeds: seeds of the initial parameters and batches; every configuration runs each.
      batch_size: sequences per step.
      record_every: steps between recorded points (drift, stall fraction, train loss).
      eval_points: held-out evaluations per run.
      eval_batches: batches of fixed held-out windows per evaluation.
      window: the last steps over which the measured stall fraction is averaged.
      model: the transformer's sizes.
    """

    steps: int = 5000
    b2: float = 0.999
    configs: tuple[str, ...] = ("fp32", "bf16", "bf16-sr")
    seeds: tuple[int, ...] = (0, 1)
    batch_size: int = 8
    record_every: int = 50
    eval_points: int = 10
    eval_batches: int = 4
    window: int = 1000
    model: ModelConfig = field(default_factory=lambda: DIAGNOSTIC_MODEL)

    def __post_init__(self) -> None:
        if self.steps % self.record_every or self.window > self.steps:
            raise ValueError(
                f"DiagnosticsConfig: steps ({self.steps}) must be a multiple of record_every "
                f"({self.record_every}) and at least window ({self.window}).")


def _chunk_fn(graphdef: Any, tx: Any, b2: float, min_size: int) -> Callable:
    """``chunk(params, state, exact, batches) -> (params, state, exact), (loss, stall, drift)``:
    ``batches.shape[0]`` train steps in one ``lax.scan``."""
    loss_fn = make_loss_fn(graphdef)

    def step(carry, windows):
        params, state, exact = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, new_state = tx.update(grads, state, params)
        grads_nu = sm.grads_like_nu(grads, new_state, min_size=min_size)
        exact = sm.exact_ema(exact, grads_nu, b2)
        # only elements a gradient has reached: the others (embedding rows of bytes that never
        # occur) stay at zero in any format and are no stall of the kind the model describes
        reached = {path: value > 0 for path, value in exact.items()}
        stall = sm.nu_stall_fraction(state, new_state, min_size=min_size, where=reached)
        return (optstate.apply_updates(params, updates), new_state, exact), (loss, stall)

    def chunk(params, state, exact, batches):
        carry, (losses, stalls) = jax.lax.scan(step, (params, state, exact), batches)
        stored = sm.nu_values(carry[1], min_size=min_size)
        level = jnp.stack([sm.drift(stored, carry[2]), sm.drift_median(stored, carry[2])])
        return carry, (jnp.mean(losses), stalls, level)

    return jax.jit(chunk, donate_argnums=(0, 1, 2))


_EVAL = "<evaluate>"


def run_one(name: str, seed: int, corpus: ByteCorpus, config: DiagnosticsConfig,
            hyper: Hyperparameters, compiled: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains configuration ``name`` from ``seed``; returns its JSON-ready record.

    ``compiled`` caches the jitted chunk per configuration across seeds.
    """
    compiled = {} if compiled is None else compiled
    graphdef, params = init_model(config.model, seed)
    if name not in compiled:
        tx = build_optimizer(parse_config(name), hyper, config.steps)
        compiled[name] = (tx, _chunk_fn(graphdef, tx, hyper.b2, hyper.min_size))
    if _EVAL not in compiled:  # one evaluation for every configuration (the same graph)
        compiled[_EVAL] = make_eval_fn(graphdef)
    (tx, chunk), evaluate = compiled[name], compiled[_EVAL]
    state = jax.jit(tx.init)(params)
    exact = {p: jnp.zeros_like(v)
             for p, v in sm.nu_values(state, min_size=hyper.min_size).items()}
    seq = config.model.seq_len
    heldout = jnp.asarray(corpus.eval_batches("heldout", config.eval_batches, config.batch_size,
                                              seq))
    every = config.record_every
    eval_every = max(every, config.steps // config.eval_points // every * every)
    train_loss, stall, drift, heldout_curve = [], [], [], []
    start = time.perf_counter()
    for first in range(1, config.steps + 1, every):
        batches = np.stack([corpus.train_batch(seed, t, config.batch_size, seq)
                            for t in range(first, first + every)])
        (params, state, exact), (loss, stalls, level) = chunk(params, state, exact, batches)
        train_loss.append(loss)
        stall.append(stalls)
        drift.append(level)
        last = first + every - 1
        if last % eval_every == 0 or last == config.steps:
            heldout_curve.append((last, float(evaluate(params, heldout))))
    stall_steps = np.concatenate(jax.device_get(stall)).astype(np.float64)
    drift = np.asarray(jax.device_get(drift), np.float64)  # (points, [mean, median])
    return {
        "config": name,
        "seed": seed,
        "steps": (np.arange(1, len(drift) + 1) * every).tolist(),
        "train_loss": [round(float(v), 5) for v in jax.device_get(train_loss)],
        "stall_fraction": [float(v) for v in stall_steps.reshape(-1, every).mean(axis=1)],
        "nu_drift": [float(v) for v in drift[:, 0]],
        "nu_drift_median": [float(v) for v in drift[:, 1]],
        "heldout_curve": [[s, round(v, 5)] for s, v in heldout_curve],
        "final_heldout_loss": heldout_curve[-1][1],
        "window_stall_fraction": float(stall_steps[-config.window:].mean()),
        "final_nu_drift": float(drift[-1, 0]),
        "final_nu_drift_median": float(drift[-1, 1]),
        "seconds": time.perf_counter() - start,
    }


def run_diagnostics(corpus: ByteCorpus, config: DiagnosticsConfig = DiagnosticsConfig(),
                    hyper: Hyperparameters | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs every configuration for every seed; returns runs, per-configuration summaries
    (stall fraction over the last ``window`` steps against the model, drift, loss gap to fp32
    with its spread over seeds) and the settings."""
    hyper = replace(hyper or Hyperparameters(), b2=config.b2)
    compiled: dict[str, Any] = {}
    runs = []
    for seed in config.seeds:
        for name in config.configs:
            run = run_one(name, seed, corpus, config, hyper, compiled)
            runs.append(run)
            if log is not None:
                log(f"transformer {name:>8} seed {seed}: held-out {run['final_heldout_loss']:.4f}"
                    f", stall {run['window_stall_fraction']:.3f}, nu stored/exact "
                    f"{run['final_nu_drift']:.2f} ({run['seconds']:.0f} s)")
    return {
        "config": {**asdict(config), "model": asdict(config.model)},
        "hyperparameters": asdict(hyper),
        "summary": summarize(runs, config),
        "runs": runs,
    }


def summarize(runs: list[dict[str, Any]], config: DiagnosticsConfig) -> dict[str, Any]:
    """Per configuration: mean measured stall fraction (last ``window`` steps) and the model's
    steady-state and end-of-run probabilities, final drift, and the held-out loss gap to fp32
    per seed (paired: same initial parameters and batches) with the seed-to-seed spread of
    fp32's own loss as the noise scale."""
    st = optstate.staleness
    by = {(r["config"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    fp32 = np.array([by[("fp32", s)]["final_heldout_loss"] for s in seeds])
    noise = float(np.std(fp32, ddof=1)) if len(seeds) > 1 else None
    out = {}
    for name in dict.fromkeys(r["config"] for r in runs):
        parsed = parse_config(name)
        mine = [by[(name, s)] for s in seeds]
        gaps = [r["final_heldout_loss"] - by[("fp32", r["seed"])]["final_heldout_loss"]
                for r in mine]
        entry = {
            "stall_measured": float(np.mean([r["window_stall_fraction"] for r in mine])),
            "nu_drift": float(np.mean([r["final_nu_drift"] for r in mine])),
            "nu_drift_median": float(np.mean([r["final_nu_drift_median"] for r in mine])),
            "heldout_loss": float(np.mean([r["final_heldout_loss"] for r in mine])),
            "gaps": gaps,
            "gap_mean": float(np.mean(gaps)),
            "seed_noise": noise,
            "gap_within_noise": None if noise is None else bool(abs(np.mean(gaps)) <= 2 * noise),
        }
        if parsed.fmt != "fp32":
            entry.update(
                stall_model_steady=st.stall_probability(parsed.fmt, config.b2,
                                                        rounding=parsed.rounding),
                stall_model_at_end=float(np.mean(st.stall_probability(
                    parsed.fmt, config.b2, rounding=parsed.rounding,
                    step=np.arange(config.steps - config.window, config.steps)))),
            )
        out[name] = entry
    return out
