r"""The stall model's closed forms (Topollai & Choromanska, arXiv 2603.16731, 2026).

An EMA :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2` stored in a float format with
:math:`p` mantissa bits stalls (the stored value does not change) when the increment falls
under about half a unit in the last place. With :math:`\epsilon = 2^{-p}` the model needs only
the precision ratio :math:`\rho = \epsilon \ln 2 / (2 (1 - \beta_2))` and the chi-square(1)
CDF :math:`F(x) = \mathrm{erf}(\sqrt{x/2})`: :func:`stall_probability` (steady state, or step
:math:`j` after a zero start), :func:`startup_window` and :func:`reset_period`. Pure
NumPy/``math``; no SciPy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from optstate.quantization.grids import FormatLike, float_format

_REFERENCE = "Topollai & Choromanska, arXiv 2603.16731, 2026"


def mantissa_bits(fmt: FormatLike) -> int:
    """The number :math:`p` of stored mantissa (fraction) bits of ``fmt``."""
    return float_format(fmt).mantissa_bits


def _check_b2(b2: float, where: str) -> float:
    b2 = float(b2)
    if not 0.0 < b2 < 1.0:
        raise ValueError(f"{where}: expected a decay b2 with 0 < b2 < 1, got {b2}.")
    return b2


def _check_rounding(rounding: str, where: str) -> str:
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(
            f"{where}: expected rounding='nearest' or 'stochastic', got {rounding!r}."
        )
    return rounding


_erf = np.frompyfunc(math.erf, 1, 1)


def _chi2_cdf(x: np.ndarray) -> np.ndarray:
    r"""Chi-square(1) CDF :math:`F(x) = \mathrm{erf}(\sqrt{x/2})` (0 for :math:`x \le 0`)."""
    x = np.maximum(np.asarray(x, np.float64), 0.0)
    return np.asarray(_erf(np.sqrt(x / 2.0)), np.float64)


def _chi2_partial_mean(x: np.ndarray) -> np.ndarray:
    r""":math:`G(x) = \int_0^x z f(z)\,dz = F(x) - \sqrt{2x/\pi}\, e^{-x/2}` for chi-square(1).

    (:math:`z f_1(z) = f_3(z)`, so :math:`G` is the chi-square(3) CDF.)
    """
    x = np.maximum(np.asarray(x, np.float64), 0.0)
    return _chi2_cdf(x) - np.sqrt(2.0 * x / np.pi) * np.exp(-x / 2.0)


def precision_ratio(fmt: FormatLike, b2: float) -> float:
    r"""The precision ratio :math:`\rho` of an EMA with decay ``b2`` stored in ``fmt``.

    .. math:: \rho = \frac{\epsilon \ln 2}{2 (1 - \beta_2)}, \qquad \epsilon = 2^{-p}

    :math:`\rho` compares half the relative grid spacing of the format (averaged over the
    position in a binade) with the EMA's relative step :math:`1-\beta_2`. Under nearest
    rounding a steady-state write stalls when :math:`|z - 1| < \rho` for
    :math:`z = g^2/\sigma^2`; for :math:`\rho \ge 1` the stored value can no longer decrease.

    Args:
      fmt: the storage format (name, mantissa bits or dtype; see :func:`float_format`).
      b2: the EMA decay :math:`\beta_2 \in (0, 1)`.

    Returns:
      :math:`\rho` as a Python float (bf16 at :math:`\beta_2=0.999`: about 2.71).

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
    """
    b2 = _check_b2(b2, "precision_ratio")
    eps = 2.0 ** (-mantissa_bits(fmt))
    return eps * math.log(2.0) / (2.0 * (1.0 - b2))


def _fill_level(b2: float, step: Any) -> np.ndarray:
    """:math:`c_j = 1 - \\beta_2^j` (the expected EMA level after ``j`` steps from zero)."""
    j = np.asarray(step)
    if not np.issubdtype(j.dtype, np.integer):
        if not np.all(np.isfinite(j)) or np.any(j != np.floor(j)):
            raise ValueError(f"stall_probability: expected integer steps j >= 0, got {step!r}.")
    if np.any(j < 0):
        raise ValueError(f"stall_probability: expected steps j >= 0, got {step!r}.")
    return -np.expm1(j.astype(np.float64) * math.log(b2))


def _p_nearest(rho: float, c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, np.float64)
    return _chi2_cdf(c * (1.0 + rho)) - _chi2_cdf(np.maximum(0.0, c * (1.0 - rho)))


def _p_stochastic(rho: float, c: np.ndarray) -> np.ndarray:
    r"""Closed form of :math:`E_z[\max(0, 1 - |z - c| / (2\rho c))]`, :math:`z \sim \chi^2_1`.

    With :math:`a = 2\rho`, :math:`l = \max(0, c(1-a))`, :math:`u = c(1+a)`:

    .. math::
        P = \frac{1}{ac}\Big[(ac - c)(F(c) - F(l)) + G(c) - G(l)
            + (ac + c)(F(u) - F(c)) - G(u) + G(c)\Big].
    """
    c = np.asarray(c, np.float64)
    a = 2.0 * rho
    safe_c = np.where(c > 0, c, 1.0)
    lo = np.maximum(0.0, safe_c * (1.0 - a))
    hi = safe_c * (1.0 + a)
    F, G = _chi2_cdf, _chi2_partial_mean
    total = ((a * safe_c - safe_c) * (F(safe_c) - F(lo)) + (G(safe_c) - G(lo))
             + (a * safe_c + safe_c) * (F(hi) - F(safe_c)) - (G(hi) - G(safe_c)))
    p = total / (a * safe_c)
    return np.where(c > 0, np.clip(p, 0.0, 1.0), 0.0)


def stall_probability(
    fmt: FormatLike,
    b2: float,
    *,
    rounding: str = "nearest",
    step: Any = None,
) -> Any:
    r"""The model's probability that one EMA write stalls (stores the value it had).

    With :math:`\rho` from :func:`precision_ratio`, :math:`z = g^2/\sigma^2 \sim \chi^2_1`
    and :math:`F(x) = \mathrm{erf}(\sqrt{x/2})`, in the steady state (``step=None``):

    .. math::
        P_{nr} &= F(1 + \rho) - F(\max(0, 1 - \rho)), \\
        P_{sr} &= E_z\!\left[\max\!\left(0, 1 - \frac{|z - 1|}{2\rho}\right)\right].

    ``step`` :math:`j` (after a zero start or a reset, when the EMA has absorbed :math:`j`
    writes, :math:`c_j = 1 - \beta_2^j`):

    .. math::
        P_{nr}(j) &= F((1+\rho)\, c_j) - F(\max(0, (1-\rho)\, c_j))
            \quad (= F((1+\rho)(1-\beta_2^j)) \text{ for } \rho \ge 1), \\
        P_{sr}(j) &= E_z\!\left[\max\!\left(0, 1 - \frac{|z - c_j|}{2\rho\, c_j}\right)\right],

    both 0 at :math:`j = 0` (a write into zero always moves it) and tending to the steady
    state. The stochastic-rounding expectation is evaluated exactly, in closed form: with
    :math:`a = 2\rho`, :math:`l = \max(0, c(1-a))`, :math:`u = c(1+a)` and the partial mean
    :math:`G(x) = \int_0^x z f(z)\,dz = F(x) - \sqrt{2x/\pi}\,e^{-x/2}`,
    :math:`P_{sr} = \frac{1}{ac}[(ac-c)(F(c)-F(l)) + G(c)-G(l) + (ac+c)(F(u)-F(c))
    - G(u)+G(c)]`. The step-dependent stochastic form applies the steady-state argument to
    the partially filled EMA (an extension of the paper's nearest-rounding formula).

    Args:
      fmt: the storage format (see :func:`float_format`).
      b2: the EMA decay :math:`\beta_2 \in (0, 1)`.
      rounding: ``"nearest"`` or ``"stochastic"``.
      step: ``None`` for the steady state, or an int (or array of ints) :math:`j \ge 0`.

    Returns:
      A Python float, or a NumPy float64 array shaped like ``step``.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
    """
    rounding = _check_rounding(rounding, "stall_probability")
    rho = precision_ratio(fmt, b2)
    if step is None:
        c: Any = np.float64(1.0)
    else:
        c = _fill_level(float(b2), step)
    p = _p_nearest(rho, c) if rounding == "nearest" else _p_stochastic(rho, c)
    if np.ndim(p) == 0:
        return float(p)
    return p


def startup_window(fmt: FormatLike, b2: float, p0: float, *, p_init: float = 0.0) -> int | None:
    r"""How many steps after a zero start (or a reset) until stalling reaches ``p0``.

    With :math:`P_{nr}(j)` from :func:`stall_probability` (nearest rounding) and a measured
    floor :math:`P_{init}` of elements that stall from the start, the window is

    .. math::
        j^\star = \begin{cases} 0 & P_0 \le P_{init} \\
          \min\{ j \ge 1 : P_{nr}(j) \ge (P_0 - P_{init}) / (1 - P_{init}) \}
          & \text{otherwise,} \end{cases}

    where :math:`P_{nr}(j) = F((1+\rho)(1 - \beta_2^j))` for :math:`\rho \ge 1`. The
    probability rises monotonically with :math:`j`, so the minimum is found by bisection on
    the exact formula.

    Args:
      fmt: the storage format (see :func:`float_format`).
      b2: the EMA decay :math:`\beta_2 \in (0, 1)`.
      p0: the stall probability :math:`P_0 \in [0, 1]` to reach.
      p_init: the floor :math:`P_{init} \in [0, 1)`.

    Returns:
      :math:`j^\star` (an int), or ``None`` when the target exceeds the steady-state stall
      probability and is never reached.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
    """
    b2 = _check_b2(b2, "startup_window")
    p0, p_init = float(p0), float(p_init)
    if not 0.0 <= p0 <= 1.0:
        raise ValueError(f"startup_window: expected 0 <= p0 <= 1, got p0={p0}.")
    if not 0.0 <= p_init < 1.0:
        raise ValueError(f"startup_window: expected 0 <= p_init < 1, got p_init={p_init}.")
    if p0 <= p_init:
        return 0
    target = (p0 - p_init) / (1.0 - p_init)
    rho = precision_ratio(fmt, b2)

    def prob(j: int) -> float:
        return float(_p_nearest(rho, _fill_level(b2, j)))

    if float(_p_nearest(rho, np.float64(1.0))) < target:
        return None
    hi = 1
    while prob(hi) < target:
        if -math.expm1(hi * math.log(b2)) == 1.0:  # the fill level has saturated: never
            return None
        hi *= 2
    lo = hi // 2  # prob(lo) < target (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if prob(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def remaining_benefit(b2: float, k: Any) -> Any:
    r"""The remaining-averaging-benefit curve :math:`E(K) = 2\beta_2^K / (1 + \beta_2^K)`.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
    """
    b2 = _check_b2(b2, "remaining_benefit")
    power = np.exp(np.asarray(k, np.float64) * math.log(b2))
    value = 2.0 * power / (1.0 + power)
    return float(value) if np.ndim(value) == 0 else value


def reset_period(fmt: FormatLike, b2: float, *, s0: float = 0.6) -> int:
    r"""The model's reset period :math:`K^\star` for an EMA with decay ``b2`` in ``fmt``.

    With the normalised staleness :math:`S(j) = P_{nr}(j) / P_{nr}(\infty)`
    (:math:`= P_{nr}(j)/F(1+\rho)` for :math:`\rho \ge 1`), tolerance :math:`s_0`,

    .. math::
        \bar S(K) = \frac{1}{K} \sum_{j=1}^{K} \max\!\left(0, \frac{S(j) - s_0}{1 - s_0}\right),
        \qquad E(K) = \frac{2 \beta_2^K}{1 + \beta_2^K},

    the period is the smallest :math:`K \ge 1` with :math:`\bar S(K) \ge E(K)`: reset when
    the excess staleness accumulated over the cycle outweighs what further averaging can
    still gain.

    Args:
      fmt: the storage format (see :func:`float_format`).
      b2: the EMA decay :math:`\beta_2 \in (0, 1)`.
      s0: the tolerance :math:`s_0 \in [0, 1)` (default 0.6).

    Returns:
      :math:`K^\star` as an int.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
    """
    b2 = _check_b2(b2, "reset_period")
    s0 = float(s0)
    if not 0.0 <= s0 < 1.0:
        raise ValueError(f"reset_period: expected a tolerance 0 <= s0 < 1, got s0={s0}.")
    rho = precision_ratio(fmt, b2)
    steady = float(_p_nearest(rho, np.float64(1.0)))
    total, start, chunk = 0.0, 1, 1024
    while start < 2**50:
        j = np.arange(start, start + chunk, dtype=np.int64)
        s = _p_nearest(rho, _fill_level(b2, j)) / steady
        excess = np.maximum(0.0, (s - s0) / (1.0 - s0))
        sbar = (total + np.cumsum(excess)) / j
        hit = np.nonzero(sbar >= remaining_benefit(b2, j))[0]
        if hit.size:
            return int(j[hit[0]])
        total += float(np.sum(excess))
        start += chunk
        chunk = min(chunk * 2, 1 << 20)
    raise RuntimeError(f"reset_period: no period found below 2**50 steps (b2={b2}).")
