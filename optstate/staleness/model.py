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

    **How it is computed, and how exactly.** :math:`S(j)` rises with :math:`j`, so the
    excess :math:`e(j) = \max(0, (S(j) - s_0)/(1 - s_0))` is 0 up to a step :math:`j_0`,
    rises, and is exactly 1 in float64 from a step :math:`j_1` on; its running mean
    :math:`\bar S` rises and :math:`E` falls, so the condition, once met, stays met. Both
    boundaries are found by bisection, and the steps are then scanned in the same chunks
    and with the same float64 operations as a plain step-by-step scan, except that chunks
    where :math:`e` is exactly 0 or exactly 1 are summed without evaluating :math:`S`: the
    answer is then **identical to the step-by-step scan**. That is the case whenever at
    most :math:`2^{20}` steps lie between :math:`j_0` and the answer (or :math:`j_1`),
    :math:`1 - \beta_2 \ge 2^{-46} \approx 1.4 \cdot 10^{-14}` and
    :math:`\rho \ge 10^{-8}`: every format with up to about 13 mantissa bits (bf16, fp16,
    fp8, fp4) for :math:`\beta_2 \le 1 - 1.4 \cdot 10^{-14}`, and every named format
    (fp32 included) for :math:`\beta_2 \le 0.99999`. Like the scan, it decides a tie between
    :math:`\bar S(K)` and :math:`E(K)` within float64 rounding as the rounding falls.

    Otherwise the condition is evaluated in the equivalent form
    :math:`D(K) \le K \tanh(K\lambda/2)`, :math:`\lambda = -\ln\beta_2`, with the deficit
    :math:`D(K) = \sum_{j \le K} (1 - e(j))` (no cancellation between two numbers near 1):
    its first 4096 terms after :math:`j_0` are summed one by one, the rest by Euler-Maclaurin
    (the integral by Gauss-Legendre quadrature on geometric panels), with a relative error
    under :math:`10^{-12}`; :math:`K^\star` is then found by exponential search and bisection
    over :math:`K`. The result is exact unless the two sides of the condition are within that
    error of each other, and always within a relative :math:`10^{-12}` of the exact period.
    This path serves wide formats with :math:`\beta_2` very close to 1 (where a scan would
    need millions to billions of steps); :math:`1 - \beta_2 < 2^{-46}` (where both sides of
    the scan's test differ from 1 by amounts that change by under 64 units in the last place
    per step, so that its float64 sums cannot single out the first step); and
    :math:`\rho < 10^{-8}` (formats of about 27 or more mantissa bits, where the scan's
    :math:`F((1+\rho)c) - F((1-\rho)c)` loses most of its digits and its periods are
    rounding artefacts: 10 instead of 18 for 52 bits, :math:`\beta_2 = 0.9`,
    :math:`s_0 = 0.95`). Either way the time is bounded (well under a second) for every
    :math:`\beta_2 \in (0, 1)`.

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
    estimate = _quadrature_reset_period(rho, b2, s0)  # milliseconds, for any b2
    if 1.0 - b2 < _SCAN_MIN_GAP or rho < _SCAN_MIN_RHO:
        return estimate  # where the scan's float64 arithmetic cannot give the exact period
    period = _scan_reset_period(rho, b2, s0, _SCAN_BUDGET, estimate)
    return estimate if period is None else period


# ---------------------------------------------------------------------------------------------
# reset period: the exact scan (chunks of exactly-0 or exactly-1 excess summed, not evaluated)
# ---------------------------------------------------------------------------------------------

_SCAN_MIN_GAP = 2.0**-46
"""The smallest ``1 - b2`` for the scan. Near the period both sides of the scan's test are
close to 1 and move apart by about ``1 - b2`` per step; below 64 units in the last place of 1
the rounding of its sums can move the first step that passes by several steps."""
_SCAN_MIN_RHO = 1e-8
"""The smallest precision ratio for the scan: its :math:`P_{nr}(j) = F((1+\\rho)c) -
F((1-\\rho)c)` is a difference of nearly equal numbers that keeps about
:math:`16 + \\log_{10}\\rho` digits (none for 52 mantissa bits at b2 = 0.9)."""
_SCAN_BUDGET = 1 << 20
"""Stall probabilities the exact scan may evaluate one by one before the quadrature is used."""
_MAX_CHUNKS = 1 << 17
"""Chunks the exact scan may walk through (each O(1) when skipped) before the quadrature."""
_FIRST_CHUNK, _LAST_CHUNK = 1024, 1 << 20
_MARGIN = 1024
"""Steps evaluated on each side of the bisected boundaries j0 and j1 (rounding guard)."""


def _excess(rho: float, steady: float, b2: float, s0: float, j: np.ndarray) -> np.ndarray:
    """:math:`e(j) = \\max(0, (S(j) - s_0)/(1 - s_0))`, by the step-by-step scan's float64 ops."""
    s = _p_nearest(rho, _fill_level(b2, j)) / steady
    return np.maximum(0.0, (s - s0) / (1.0 - s0))


def _first_step(pred: Any, what: str) -> int:
    """The smallest ``j >= 1`` with ``pred(j)``, for a predicate that is false, then true:
    exponential search, then bisection (at most about 2 * 64 calls)."""
    hi = 1
    while not pred(hi):
        hi *= 2
        if hi > 2**62:  # pragma: no cover - every predicate used here holds by then
            raise RuntimeError(f"reset_period: no step found for {what}.")
    lo = hi // 2  # pred(lo) is false (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _chunk_end(k: int) -> int:
    """The last step of the step-by-step scan's chunk that holds step ``k``."""
    start, chunk = 1, _FIRST_CHUNK
    while chunk < _LAST_CHUNK and start + chunk <= k:
        start, chunk = start + chunk, chunk * 2
    return start + ((k - start) // chunk + 1) * chunk - 1


def _scan_reset_period(rho: float, b2: float, s0: float, budget: int,
                       estimate: int | None = None) -> int | None:
    """The period by the step-by-step scan's arithmetic (identical result), evaluating at most
    ``budget`` stall probabilities; ``None`` when that (or :data:`_MAX_CHUNKS`) is not enough,
    or would not be given the period ``estimate`` (then nothing is scanned).

    The step-by-step scan walks chunks of 1024, 2048, ... up to :math:`2^{20}` steps, keeps
    ``total`` (the sum of the excess over the previous chunks) and tests
    ``(total + cumsum(excess)) / j >= E(j)`` in each. Here the steps before ``j0 - margin``
    have excess exactly 0 and those from ``j1 + margin`` on exactly 1, so their values are
    known without evaluating :math:`S`, and a whole such chunk is skipped in O(1) when the
    condition cannot hold at its last step (it rises with ``j``; a tolerance of 1e-12 covers
    the rounding of the O(1) test): the chunk that holds the answer is always evaluated with
    the scan's own array operations.
    """
    steady = float(_p_nearest(rho, np.float64(1.0)))
    log_b2 = math.log(b2)

    def excess_at(j: int) -> float:
        return float(_excess(rho, steady, b2, s0, np.array([j], np.int64))[0])

    def saturated(j: int) -> bool:  # the fill level is exactly 1.0 in float64
        return bool(_fill_level(b2, np.array([j], np.int64))[0] == 1.0)

    j0 = _first_step(lambda j: excess_at(j) > 0.0, "a positive excess")
    if rho >= 1.0:
        # S(j) = F((1+rho) c_j) / F(1+rho) <= 1 rises with j: from the first j with e(j) = 1
        # on, e(j) is exactly 1.
        j1 = _first_step(lambda j: excess_at(j) >= 1.0, "a saturated excess")
    else:
        # F((1+rho)c) - F((1-rho)c) is rounded differently for every c < 1; only a fill
        # level of exactly 1.0 pins e(j) to exactly 1.
        j1 = _first_step(saturated, "a saturated fill level")
    zero_end, one_start = j0 - _MARGIN, j1 + _MARGIN
    if estimate is not None:
        needed = min(one_start, _chunk_end(max(estimate, j0)) + 1) - max(1, zero_end)
        if needed > budget:
            return None

    total, start, chunk, evaluated = 0.0, 1, _FIRST_CHUNK, 0
    for _ in range(_MAX_CHUNKS):
        stop = start + chunk  # the chunk is [start, stop)
        last = stop - 1
        lo, hi = max(start, zero_end), min(stop, one_start)  # steps whose excess is evaluated
        if hi <= lo:
            if stop <= zero_end:  # excess 0: the mean is 0, and E(j) > 0 unless b2^j underflows
                skip = last * log_b2 > -700.0
                chunk_sum = 0.0
            else:  # excess exactly 1 throughout the chunk
                power = math.exp(last * log_b2)
                benefit = 2.0 * power / (1.0 + power)
                skip = (total + float(chunk)) / float(last) < benefit - 1e-12
                chunk_sum = float(chunk)
            if skip:
                total += chunk_sum
                start, chunk = stop, min(chunk * 2, _LAST_CHUNK)
                continue
        elif evaluated + (hi - lo) > budget:
            return None
        j = np.arange(start, stop, dtype=np.int64)
        excess = np.zeros(chunk, np.float64)
        if stop > one_start:
            excess[max(one_start, start) - start:] = 1.0
        if hi > lo:
            excess[lo - start:hi - start] = _excess(rho, steady, b2, s0, j[lo - start:hi - start])
            evaluated += hi - lo
        sbar = (total + np.cumsum(excess)) / j
        hit = np.nonzero(sbar >= remaining_benefit(b2, j))[0]
        if hit.size:
            return int(j[hit[0]])
        total += float(np.sum(excess))
        start, chunk = stop, min(chunk * 2, _LAST_CHUNK)
    return None


# ---------------------------------------------------------------------------------------------
# reset period: the deficit form, by Euler-Maclaurin summation and Gauss-Legendre quadrature
# ---------------------------------------------------------------------------------------------

_DIRECT_TERMS = 4096
"""Deficit terms after j0 summed one by one before Euler-Maclaurin takes over."""
_PANEL_PARTS = 8
_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)
_T_X, _T_W = np.polynomial.legendre.leggauss(24)
_erfc = np.frompyfunc(math.erfc, 1, 1)


class _Deficit:
    r"""The deficit :math:`d(x) = 1 - e(x) = (1 - S(x)) / (1 - s_0)` at real steps
    :math:`x \ge j_0` (where :math:`S > s_0`), computed without cancellation.

    With :math:`c = 1 - \beta_2^x` (``-expm1``) and :math:`1 - c = \beta_2^x`:
    for :math:`\rho \ge 1`, :math:`1 - S = (\mathrm{erfc}\sqrt{ac/2} - \mathrm{erfc}\sqrt{a/2})
    / \mathrm{erf}\sqrt{a/2}` with :math:`a = 1 + \rho`; for :math:`\rho < 1`, substituting
    :math:`z = c t^2` in :math:`P(c) = \int_{(1-\rho)c}^{(1+\rho)c} f(z)\,dz`,

    .. math:: 1 - S = \frac{\int_{\sqrt{1-\rho}}^{\sqrt{1+\rho}} e^{-t^2/2}
        \left(-\mathrm{expm1}\!\left(\tfrac12 \ln c + (1-c)\, t^2/2\right)\right) dt}
        {\int_{\sqrt{1-\rho}}^{\sqrt{1+\rho}} e^{-t^2/2}\, dt},

    both integrals by 24-point Gauss-Legendre (smooth integrands on an interval of width
    at most :math:`\sqrt 2`), so that a tiny :math:`\rho` loses nothing to
    :math:`F(1+\rho) - F(1-\rho)`.
    """

    def __init__(self, rho: float, b2: float, s0: float):
        self.rho, self.scale = rho, 1.0 / (1.0 - s0)
        self.lam = -math.log(b2)
        if rho >= 1.0:
            self.a = 1.0 + rho
            self.q_inf = math.erfc(math.sqrt(self.a / 2.0))
            self.f_inf = math.erf(math.sqrt(self.a / 2.0))
        else:
            lo, hi = math.sqrt(1.0 - rho), math.sqrt(1.0 + rho)
            self.t2 = (0.5 * (hi - lo) * _T_X + 0.5 * (hi + lo)) ** 2
            self.w = 0.5 * (hi - lo) * _T_W * np.exp(-self.t2 / 2.0)
            self.norm = float(np.sum(self.w))

    def __call__(self, x: Any) -> np.ndarray:
        x = np.asarray(x, np.float64)
        fill = -np.expm1(-self.lam * x)
        if self.rho >= 1.0:
            tail = np.asarray(_erfc(np.sqrt(self.a * fill / 2.0)), np.float64)
            one_minus_s = (tail - self.q_inf) / self.f_inf
        else:
            gap = np.exp(-self.lam * x)
            arg = 0.5 * np.log(fill)[..., None] + gap[..., None] * (self.t2 / 2.0)
            one_minus_s = (-np.expm1(arg)) @ self.w / self.norm
        return one_minus_s * self.scale


def _deficit_sum(rho: float, b2: float, s0: float) -> tuple[int, Any]:
    r"""``(j0, D)``: the first step :math:`j_0` with :math:`S(j_0) > s_0`, and the function
    :math:`D(K) = (j_0 - 1) + \sum_{j=j_0}^{K} d(j)` for integers :math:`K \ge j_0`.

    The first :data:`_DIRECT_TERMS` terms are summed one by one, the rest by Euler-Maclaurin,
    :math:`\sum_{j=A+1}^{K} d(j) = \int_A^K d + \frac{d(K) - d(A)}{2}
    + \frac{d'(K) - d'(A)}{12}` (:math:`d'` by central differences; the next term,
    :math:`d^{(3)}/720`, is below :math:`10^{-15}` of the sum for :math:`A \ge 4096`), the
    integral by 16-point Gauss-Legendre on panels :math:`[A 2^i, A 2^{i+1}]` cut in 8 parts.
    """
    d = _Deficit(rho, b2, s0)
    j0 = _first_step(lambda j: float(d(float(j))) < 1.0, "a staleness above s0")
    prefix = np.cumsum(d(np.arange(j0, j0 + _DIRECT_TERMS, dtype=np.float64)))
    anchor = float(j0 + _DIRECT_TERMS - 1)
    panels: list[float] = []

    def integral(a: float, b: float) -> float:
        edges = np.linspace(a, b, _PANEL_PARTS + 1)
        half, mid = np.diff(edges) / 2.0, (edges[:-1] + edges[1:]) / 2.0
        x = mid[:, None] + half[:, None] * _GL_X
        return float(np.sum((d(x.ravel()).reshape(x.shape) @ _GL_W) * half))

    def tail(k: float) -> float:  # the integral of d over [anchor, k]
        total, a, i = 0.0, anchor, 0
        while 2.0 * a <= k:
            if i == len(panels):
                panels.append(integral(a, 2.0 * a))
            total, a, i = total + panels[i], 2.0 * a, i + 1
        return total + (integral(a, k) if k > a else 0.0)

    def ends(x: float) -> float:  # the Euler-Maclaurin end terms at x
        value, below, above = (float(v) for v in d(np.array([x, x - 1.0, x + 1.0])))
        return value / 2.0 + (above - below) / 24.0

    def deficit(k: int) -> float:
        n = k - j0 + 1
        if n <= _DIRECT_TERMS:
            return (j0 - 1) + float(prefix[n - 1])
        return (j0 - 1) + float(prefix[-1]) + tail(float(k)) + ends(float(k)) - ends(anchor)

    return j0, deficit


def _quadrature_reset_period(rho: float, b2: float, s0: float) -> int:
    r"""The period from :math:`D(K) \le K \tanh(K\lambda/2)` (equivalent to
    :math:`\bar S(K) \ge E(K)`, as :math:`1 - E(K) = \tanh(K\lambda/2)`), with :math:`D`
    from :func:`_deficit_sum`: exponential search, then bisection, over :math:`K \ge j_0`
    (below :math:`j_0`, :math:`\bar S = 0` and the condition fails)."""
    lam = -math.log(b2)
    j0, deficit = _deficit_sum(rho, b2, s0)

    def holds(m: int) -> bool:
        k = j0 - 1 + m
        return deficit(k) <= k * math.tanh(k * lam / 2.0)

    return j0 - 1 + _first_step(holds, "the reset condition")
