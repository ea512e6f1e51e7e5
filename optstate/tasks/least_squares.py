r"""Where stale second moments hurt: mini-batch least squares with shrinking gradients.

A batch of :math:`P` independent problems :math:`\min_x f_k(x)`,

.. math:: f_k(x) = \frac{1}{2m} \lVert A_k x - b_k \rVert^2, \qquad
    A_k \in \mathbb R^{m \times n},\ (A_k)_{ij} = s_j z_{ij},\ z_{ij} \sim \mathcal N(0, 1),

with column scales :math:`s_j` log-spaced from ``scale_low`` to ``scale_high`` (so the
coordinates' gradients differ by orders of magnitude, which is what Adam's second moment
equalises) and :math:`b_k = A_k x^\star_k + \sigma \xi`. Adam (constant learning rate) starts
from :math:`x = 0` and sees the gradient of a mini-batch of ``batch_rows`` rows per step, the
same rows for every configuration. The excess loss :math:`f_k(x) - \min f_k` (the minimum from
a float64 least-squares solve) is averaged over the problems.

Early gradients are large; as :math:`x` converges they shrink to the mini-batch noise, so the
exact EMA :math:`\nu` falls by orders of magnitude. In bf16 with nearest rounding at
:math:`\beta_2 = 0.999` (:math:`\rho = 2^{-7} \ln 2 / (2 \cdot 10^{-3}) = 2.71 > 1`) a write
can lower the stored value by at most :math:`(1-\beta_2)\nu`, less than half a unit in its
last place, so every decrease rounds back: :math:`\nu` freezes near its early peak, the
effective step :math:`\eta / \sqrt{\nu}` stays tiny and convergence stalls. Stochastic
rounding is unbiased and follows the exact EMA; resets restart :math:`\nu` from zero.

Every configuration runs as one jitted ``lax.scan`` over the steps with optstate's own
transforms (``scale_by_adam`` in ``quantize_state`` in ``reset_every_n``), recording every
``record_every`` steps the mean excess loss, the stored :math:`\nu` relative to the exact
float32 EMA of the same gradients (:mod:`optstate.tasks.second_moment`), and the fraction of
stored :math:`\nu` elements the steps left unchanged.

Reference: Topollai & Choromanska, arXiv 2603.16731, 2026 (stalling and resets).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optstate
from optstate.tasks import second_moment as sm


@dataclass(frozen=True)
class LeastSquaresConfig:
    """The least-squares problems and Adam's settings.

    Attributes:
      problems: independent problems :math:`P`, optimised together (one ``(P, n)`` leaf).
      rows, cols: :math:`m \\times n` of each :math:`A_k`.
      scale_low, scale_high: the column scales :math:`s_j`, log-spaced between them.
      noise: :math:`\\sigma`, the residual noise of the targets.
      batch_rows: rows of :math:`A_k` per step (drawn with replacement).
      steps: optimizer steps.
      learning_rate, b1, b2, eps: Adam's (constant) settings.
      record_every: steps between recorded points.
      seed: the data and the batch order.
    """

    problems: int = 64
    rows: int = 100
    cols: int = 50
    scale_low: float = 0.1
    scale_high: float = 10.0
    noise: float = 0.1
    batch_rows: int = 10
    steps: int = 10_000
    learning_rate: float = 3e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    record_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("problems", "rows", "cols", "batch_rows", "steps", "record_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"LeastSquaresConfig.{name}: expected a positive integer, got {value!r}.")
        if self.steps % self.record_every:
            raise ValueError(
                f"LeastSquaresConfig: steps ({self.steps}) must be a multiple of record_every "
                f"({self.record_every}).")


@dataclass(frozen=True)
class LsqVariant:
    """One configuration of the study: how Adam's state is stored and whether it is reset.

    Attributes:
      name: a label, e.g. ``"bf16+reset"``.
      fmt: ``quantize_state`` format (``"fp32"``: plain Adam).
      rounding: ``"nearest"`` or ``"stochastic"``.
      reset_period: reset both moments every so many steps (``None``: never).
    """

    name: str
    fmt: str = "fp32"
    rounding: str = "nearest"
    reset_period: int | None = None


def default_variants(b2: float) -> tuple[LsqVariant, ...]:
    """fp32, bf16 nearest, bf16 stochastic, bf16 with resets at the model's period
    ``reset_period("bf16", b2)``, and fp32 with the same resets (the control: how much of the
    reset's gain is the reset itself rather than a cure of stale state)."""
    period = int(optstate.staleness.reset_period("bf16", b2))
    return (
        LsqVariant("fp32"),
        LsqVariant("bf16", "bf16"),
        LsqVariant("bf16-sr", "bf16", "stochastic"),
        LsqVariant("bf16+reset", "bf16", reset_period=period),
        LsqVariant("fp32+reset", reset_period=period),
    )


class Problems:
    """The data of :class:`LeastSquaresConfig`: ``A (P, m, n)``, ``b (P, m)``, the float64
    solutions and minimal losses."""

    def __init__(self, config: LeastSquaresConfig):
        rng = np.random.default_rng(config.seed)
        p, m, n = config.problems, config.rows, config.cols
        scales = np.geomspace(config.scale_low, config.scale_high, n)
        a = rng.standard_normal((p, m, n)) * scales
        x_true = rng.standard_normal((p, n))
        b = np.einsum("pmn,pn->pm", a, x_true) + config.noise * rng.standard_normal((p, m))
        solution = np.stack([np.linalg.lstsq(a[k], b[k], rcond=None)[0] for k in range(p)])
        residual = np.einsum("pmn,pn->pm", a, solution) - b
        self.a = jnp.asarray(a, jnp.float32)
        self.b = jnp.asarray(b, jnp.float32)
        self.solution = solution
        self.min_loss = 0.5 * np.mean(residual**2, axis=1)  # (P,), float64
        self.scales = scales


def _loss(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    """Per problem :math:`\\frac{1}{2m}\\lVert A x - b\\rVert^2` for ``a (P, m, n)``."""
    residual = jnp.einsum("pmn,pn->pm", a, x) - b
    return 0.5 * jnp.mean(jnp.square(residual), axis=1)


def build_optimizer(variant: LsqVariant, config: LeastSquaresConfig) -> Any:
    """Adam (constant learning rate) whose moments are stored and reset as ``variant`` says.

    ``min_size=1``: the study's one leaf (``P * n`` values) is quantized whatever its size.
    """
    adam = optstate.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)
    if variant.fmt != "fp32":
        adam = optstate.quantize_state(adam, fmt=variant.fmt, rounding=variant.rounding,
                                       min_size=1)
    if variant.reset_period is not None:
        adam = optstate.reset_every_n(adam, variant.reset_period)
    return optstate.chain(adam, optstate.scale_by_learning_rate(config.learning_rate))


def _trajectory(variant: LsqVariant, config: LeastSquaresConfig, problems: Problems):
    """A jitted function of no argument returning the recorded arrays of one run."""
    tx = build_optimizer(variant, config)
    a, b = problems.a, problems.b
    p, m = config.problems, config.rows
    key = jax.random.key(config.seed)
    period = variant.reset_period

    def batch_grad(x, t):
        rows = jax.random.randint(jax.random.fold_in(key, t), (p, config.batch_rows), 0, m)
        a_batch = jnp.take_along_axis(a, rows[:, :, None], axis=1)
        b_batch = jnp.take_along_axis(b, rows, axis=1)
        return jax.grad(lambda x: jnp.sum(_loss(a_batch, b_batch, x)))(x)

    def step(carry, t):
        x, state, exact = carry
        grads = {"x": batch_grad(x, t)}
        updates, new_state = tx.update(grads, state, {"x": x})
        # reset_every_n restarts nu at the start of steps n + 1, 2n + 1, ... (t is 0-based)
        restart = False if period is None else (t > 0) & (t % period == 0)
        exact = sm.exact_ema(exact, sm.grads_like_nu(grads, new_state), config.b2, restart)
        stall = sm.nu_stall_fraction(state, new_state)
        new_x = optstate.apply_updates({"x": x}, updates)["x"]
        return (new_x, new_state, exact), stall

    def record(carry, chunk):
        carry, stalls = jax.lax.scan(step, carry, chunk)
        x, state, exact = carry
        excess = jnp.mean(_loss(a, b, x) - jnp.asarray(problems.min_loss, jnp.float32))
        level = sm.drift(sm.nu_values(state), exact)
        return carry, (excess, level, jnp.mean(stalls))

    @jax.jit
    def run():
        x0 = jnp.zeros((p, config.cols), jnp.float32)
        state = tx.init({"x": x0})
        exact = {path: jnp.zeros_like(v) for path, v in sm.nu_values(state).items()}
        chunks = jnp.arange(config.steps).reshape(-1, config.record_every)
        (x, _, _), out = jax.lax.scan(record, (x0, state, exact), chunks)
        return x, out

    return run


def run_variant(variant: LsqVariant, config: LeastSquaresConfig,
                problems: Problems | None = None) -> dict[str, Any]:
    """Runs one configuration; returns its JSON-ready record.

    Record: ``steps`` (the recorded steps), ``excess_loss`` (mean over problems of
    :math:`f_k(x_t) - \\min f_k`), ``nu_drift`` (mean of stored :math:`\\nu` over the exact
    float32 EMA), ``stall_fraction`` (of the stored :math:`\\nu`, averaged over the steps
    since the previous point), the final values, and the seconds (compilation included).
    """
    problems = problems or Problems(config)
    start = time.perf_counter()
    x, (excess, level, stall) = _trajectory(variant, config, problems)()
    excess, level, stall = (np.asarray(v, np.float64) for v in (excess, level, stall))
    seconds = time.perf_counter() - start
    final_loss = np.asarray(_loss(problems.a, problems.b, x), np.float64)
    steps = np.arange(1, excess.size + 1) * config.record_every
    return {
        **asdict(variant),
        "steps": steps.tolist(),
        "excess_loss": [float(v) for v in excess],
        "nu_drift": [float(v) for v in level],
        "stall_fraction": [float(v) for v in stall],
        "final_excess_loss": float(np.mean(final_loss - problems.min_loss)),
        "final_nu_drift": float(level[-1]),
        "seconds": seconds,
    }


def run_study(config: LeastSquaresConfig = LeastSquaresConfig(),
              variants: tuple[LsqVariant, ...] | None = None,
              log: Any = None) -> dict[str, Any]:
    """Runs every variant (default :func:`default_variants`) on the same problems and batches.

    Returns ``{"config": ..., "model": ..., "runs": {name: record}}`` where ``model`` holds the
    stall model's figures for bf16 at ``config.b2`` (``rho``, steady-state stall probabilities,
    reset period).
    """
    variants = variants or default_variants(config.b2)
    problems = Problems(config)
    runs = {}
    for variant in variants:
        runs[variant.name] = record = run_variant(variant, config, problems)
        if log is not None:
            log(f"least squares {variant.name:>11}: excess loss {record['final_excess_loss']:.3e}"
                f", nu stored/exact {record['final_nu_drift']:.1f} ({record['seconds']:.0f} s)")
    st = optstate.staleness
    return {
        "config": asdict(config),
        "model": {
            "format": "bf16",
            "rho": st.precision_ratio("bf16", config.b2),
            "stall_nearest": st.stall_probability("bf16", config.b2, rounding="nearest"),
            "stall_stochastic": st.stall_probability("bf16", config.b2, rounding="stochastic"),
            "reset_period": int(st.reset_period("bf16", config.b2)),
        },
        "runs": runs,
    }
