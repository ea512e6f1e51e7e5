r"""Emulating a low-precision EMA: :func:`round_to_format` and :func:`simulate_ema_stalls`, the
controlled experiment the stall model (:mod:`optstate.staleness.model`) is checked against.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optstate.quantization.grids import FloatFormat, FormatLike, float_format
from optstate.staleness.model import _check_b2, _check_rounding


def round_to_format(
    x: Any,
    fmt: FormatLike,
    *,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    r"""Rounds float32 values onto the grid of ``fmt`` (returned as float32 grid values).

    For :math:`|x|` in the binade :math:`[2^e, 2^{e+1})` (with :math:`e` clamped below at
    :math:`e_{\min}`, giving subnormals) the grid spacing is :math:`u = 2^{e - p}`; with
    :math:`s = |x|/u`,

    .. math::
        \mathrm{nearest}(x) = \mathrm{sign}(x)\, u\, \mathrm{round\_half\_even}(s), \qquad
        \mathrm{stochastic}(x) = \mathrm{sign}(x)\, u\, (\lfloor s \rfloor
            + [U < s - \lfloor s \rfloor]),\ U \sim \mathcal U[0, 1),

    then saturated at the format's largest value. Nearest matches the hardware casts
    (``astype(jnp.bfloat16)``, ``astype(jnp.float8_e4m3fn)``, ...) inside the range;
    stochastic rounding is unbiased, :math:`E[\mathrm{stochastic}(x)] = x`. ``fp4_e2m2`` has
    no JAX dtype and exists only here.

    Args:
      x: values (cast to float32).
      fmt: the target format (see :func:`float_format`).
      rounding: ``"nearest"`` or ``"stochastic"``.
      key: a PRNG key, required for stochastic rounding.

    Returns:
      A float32 array of values representable in ``fmt``.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026 (the formats); Gupta et al.,
    "Deep Learning with Limited Numerical Precision", ICML 2015 (stochastic rounding).
    """
    rounding = _check_rounding(rounding, "round_to_format")
    x = jnp.asarray(x, jnp.float32)
    u = None
    if rounding == "stochastic":
        if key is None:
            raise ValueError("round_to_format: rounding='stochastic' needs a PRNG key, got None.")
        u = jax.random.uniform(key, x.shape, jnp.float32)
    return float_format(fmt).round(x, u)


class EmaSimulation(NamedTuple):
    """Result of :func:`simulate_ema_stalls`, one entry per step (NumPy float64 arrays).

    Attributes:
      stall_fraction: fraction of the elements whose stored value the step left unchanged.
      level: mean over elements of the stored :math:`v_t` divided by its exact-arithmetic
        expectation :math:`\\sigma^2 (1 - \\beta_2^t)` (zero start) or :math:`\\sigma^2`
        (steady start): 1 means unbiased, above 1 an upward drift.
    """

    stall_fraction: np.ndarray
    level: np.ndarray


def simulate_ema_stalls(
    fmt: FormatLike,
    b2: float,
    *,
    steps: int,
    size: int = 4096,
    rounding: str = "nearest",
    start: str = "zero",
    seed: int = 0,
) -> EmaSimulation:
    r"""The controlled experiment: an EMA of squared Gaussian gradients stored in ``fmt``.

    Element :math:`i` sees :math:`g_{t,i} \sim \mathcal N(0, \sigma_i^2)` with scales
    :math:`\sigma_i^2 = 2^{U_i}`, :math:`U_i \sim \mathcal U[0, 1)` (log-uniform over one
    binade, so that the stored values sit at all positions in a binade, as the model's
    averaged spacing assumes), and every step stores

    .. math:: v_t = \mathrm{round}_{fmt}(\beta_2 v_{t-1} + (1 - \beta_2) g_t^2)

    with nearest or stochastic rounding (:func:`round_to_format`), the arithmetic in float32.
    A step stalls an element when :math:`v_t = v_{t-1}`. One ``lax.scan``; deterministic
    given ``seed``.

    Args:
      fmt: the storage format (see :func:`float_format`).
      b2: the EMA decay :math:`\beta_2`.
      steps: number of steps.
      size: number of independent elements.
      rounding: ``"nearest"`` or ``"stochastic"``.
      start: ``"zero"`` (:math:`v_0 = 0`, as after init or a reset) or ``"steady"``
        (:math:`v_0 = \mathrm{round}(\sigma^2)`).
      seed: the PRNG seed.

    Returns:
      An :class:`EmaSimulation` of per-step stall fractions and mean levels.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
    """
    b2 = _check_b2(b2, "simulate_ema_stalls")
    rounding = _check_rounding(rounding, "simulate_ema_stalls")
    if start not in ("zero", "steady"):
        raise ValueError(f"simulate_ema_stalls: expected start='zero' or 'steady', got {start!r}.")
    if int(steps) < 1 or int(size) < 1:
        raise ValueError(
            f"simulate_ema_stalls: expected steps >= 1 and size >= 1, got {steps} and {size}."
        )
    stall, level = _simulate(float_format(fmt), b2, int(steps), int(size), rounding, start,
                             int(seed))
    return EmaSimulation(np.asarray(stall, np.float64), np.asarray(level, np.float64))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _simulate_jit(spec: FloatFormat, b2: float, steps: int, size: int, rounding: str,
                  start: str, key: jax.Array):
    k_scale, k_run = jax.random.split(key)
    sigma2 = jnp.exp2(jax.random.uniform(k_scale, (size,), jnp.float32))
    v0 = (round_to_format(sigma2, spec) if start == "steady"
          else jnp.zeros((size,), jnp.float32))
    b2_f = jnp.float32(b2)

    def body(carry, t):
        v, decay_power = carry
        k_g, k_r = jax.random.split(jax.random.fold_in(k_run, t))
        g = jnp.sqrt(sigma2) * jax.random.normal(k_g, (size,), jnp.float32)
        exact = b2_f * v + (1 - b2_f) * g * g
        v_new = round_to_format(exact, spec, rounding=rounding,
                                key=k_r if rounding == "stochastic" else None)
        decay_power = decay_power * b2_f
        expected = sigma2 if start == "steady" else sigma2 * (1 - decay_power)
        out = (jnp.mean((v_new == v).astype(jnp.float32)), jnp.mean(v_new / expected))
        return (v_new, decay_power), out

    _, (stall, level) = jax.lax.scan(body, (v0, jnp.float32(1.0)), jnp.arange(steps))
    return stall, level


def _simulate(spec, b2, steps, size, rounding, start, seed):
    return _simulate_jit(spec, b2, steps, size, rounding, start, jax.random.key(seed))
