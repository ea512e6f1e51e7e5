r"""State staleness: measure it, predict it, and choose when to reset.

A step *stalls* a stored state element when the value stored after the write equals the value
stored before it. An exponential moving average

.. math:: v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2

kept in a float format with :math:`p` mantissa bits stalls whenever the increment
:math:`(1-\beta_2)(g_t^2 - v_{t-1})` is smaller than about half a unit in the last place of
:math:`v_{t-1}`: the optimizer's memory stops following the gradients and goes stale. This
module implements the stall model of Topollai & Choromanska (arXiv 2603.16731, 2026):

* :func:`precision_ratio`, :func:`stall_probability` (steady state or ``step`` :math:`j`
  after a zero start), :func:`startup_window` and :func:`reset_period` are the model's
  closed forms (pure NumPy/``math``; no SciPy);
* :func:`stall_fraction` and :func:`track_staleness` measure stalling on a real state tree
  (jittable, usable inside ``lax.scan``; a quantized leaf counts once, by its stored codes);
* :func:`round_to_format` and :func:`simulate_ema_stalls` emulate a low-precision EMA with
  nearest or stochastic rounding, the controlled experiment the model is checked against.

Formats: ``"bf16"`` (:math:`p=7`), ``"fp8_e4m3"`` (:math:`p=3`), ``"fp8_e5m2"`` and
``"fp4_e2m2"`` (:math:`p=2`), plus ``"fp16"`` (10) and ``"fp32"`` (23); an ``int`` is an
explicit number of mantissa bits (with float32's exponent range), and a JAX/NumPy floating
dtype stands for itself.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.base import GradientTransformation, OptState, with_extra_args_support

PyTree = Any
FormatLike = Any  # str | int | dtype

__all__ = [
    "FloatFormat",
    "float_format",
    "mantissa_bits",
    "precision_ratio",
    "stall_probability",
    "startup_window",
    "reset_period",
    "remaining_benefit",
    "stall_fraction",
    "track_staleness",
    "TrackStalenessState",
    "round_to_format",
    "simulate_ema_stalls",
    "EmaSimulation",
]

_REFERENCE = "Topollai & Choromanska, arXiv 2603.16731, 2026"


# ------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------


class FloatFormat(NamedTuple):
    """A binary floating-point storage format.

    Attributes:
      name: the format's name (``"bf16"``, ``"fp8_e4m3"``, ... or ``"m<p>"`` for an explicit
        mantissa width).
      mantissa_bits: :math:`p`, the stored fraction bits; the relative spacing of the grid
        inside a binade :math:`[2^e, 2^{e+1})` is :math:`\\epsilon = 2^{-p}`.
      min_exponent: :math:`e_{\\min}`, the exponent of the smallest normal number; below
        :math:`2^{e_{\\min}}` the grid is uniform with spacing :math:`2^{e_{\\min} - p}`
        (subnormals).
      max_value: the largest finite value; larger magnitudes saturate to it.
    """

    name: str
    mantissa_bits: int
    min_exponent: int
    max_value: float


_F32_MAX = float(np.finfo(np.float32).max)

_FORMATS: dict[str, FloatFormat] = {
    "fp32": FloatFormat("fp32", 23, -126, _F32_MAX),
    "bf16": FloatFormat("bf16", 7, -126, float(jnp.finfo(jnp.bfloat16).max)),
    "fp16": FloatFormat("fp16", 10, -14, 65504.0),
    "fp8_e4m3": FloatFormat("fp8_e4m3", 3, -6, 448.0),  # OCP E4M3 ("fn": no infinities)
    "fp8_e5m2": FloatFormat("fp8_e5m2", 2, -14, 57344.0),
    # Unsigned 4-bit float for non-negative state: 2 exponent bits (bias 1), 2 mantissa bits.
    # Values 0, 0.25, ..., 0.75 (subnormal), 1, 1.25, ..., 7.
    "fp4_e2m2": FloatFormat("fp4_e2m2", 2, 0, 7.0),
}
_ALIASES = {
    "float32": "fp32", "f32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16", "f16": "fp16",
    "float8_e4m3fn": "fp8_e4m3", "float8_e4m3": "fp8_e4m3", "e4m3": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2", "e5m2": "fp8_e5m2",
    "e2m2": "fp4_e2m2",
}

FORMAT_NAMES: tuple[str, ...] = tuple(_FORMATS)


def float_format(fmt: FormatLike) -> FloatFormat:
    """Resolves ``fmt`` to a :class:`FloatFormat`.

    Args:
      fmt: a format name (``"bf16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp4_e2m2"``,
        ``"fp16"``, ``"fp32"``), a positive ``int`` number of mantissa bits (float32's
        exponent range is assumed), or a floating JAX/NumPy dtype.

    Raises:
      ValueError: unknown name, or a non-positive mantissa width.
      TypeError: anything else.
    """
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, (bool, np.bool_)):
        raise TypeError(f"format: expected a format name or a number of mantissa bits, got {fmt!r}.")
    if isinstance(fmt, (int, np.integer)):
        bits = int(fmt)
        if bits < 1 or bits > 52:
            raise ValueError(
                f"format: expected a number of mantissa bits between 1 and 52, got {bits}."
            )
        return FloatFormat(f"m{bits}", bits, -126, _F32_MAX)
    if isinstance(fmt, str):
        key = fmt.strip().lower()
        key = _ALIASES.get(key, key)
        if key in _FORMATS:
            return _FORMATS[key]
        if key.isdigit():
            return float_format(int(key))
        raise ValueError(
            f"format: unknown format {fmt!r}; expected one of {sorted(_FORMATS)} or an int "
            f"number of mantissa bits."
        )
    try:
        dtype = jnp.dtype(fmt)
    except TypeError:
        dtype = None
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        info = jnp.finfo(dtype)
        return FloatFormat(str(dtype), int(info.nmant), int(info.minexp), float(info.max))
    raise TypeError(
        f"format: expected a format name {sorted(_FORMATS)}, an int number of mantissa bits or "
        f"a floating dtype, got {fmt!r} of type {type(fmt).__name__}."
    )


def mantissa_bits(fmt: FormatLike) -> int:
    """The number :math:`p` of stored mantissa (fraction) bits of ``fmt``."""
    return float_format(fmt).mantissa_bits


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# Measurement on state trees
# ------------------------------------------------------------------------------------------


def _is_quantized_fn() -> Callable[[Any], bool]:
    """``optstate.quantization.array.is_quantized`` when the quantization module is present."""
    try:
        from optstate.quantization.array import is_quantized
    except ImportError:  # pragma: no cover - the quantization module is part of the package
        return lambda x: False
    return is_quantized


def _variable_types() -> tuple[type, ...]:
    """Flax NNX ``Variable`` (a pytree node wrapping one array) when Flax NNX is loaded."""
    nnx = sys.modules.get("flax.nnx")
    variable = getattr(nnx, "Variable", None) if nnx is not None else None
    return (variable,) if isinstance(variable, type) else ()


def _unwrap(x: Any) -> Any:
    """The array inside a Flax NNX ``Variable`` (``nnx.Optimizer`` calls ``init`` on
    ``Variable``-wrapped parameters and ``update`` on plain arrays); ``x`` otherwise."""
    types = _variable_types()
    if types and isinstance(x, types):
        return x.get_value() if hasattr(x, "get_value") else x.value
    return x


def _logical_leaves(tree: PyTree) -> list[tuple[tuple, Any]]:
    """``(path, leaf)`` pairs; a quantized array and a Flax NNX ``Variable`` each count as
    one leaf at their own path, so paths are the same whether or not NNX wrapped the arrays."""
    is_q = _is_quantized_fn()
    types = _variable_types()
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or is_q(x) or (bool(types) and isinstance(x, types))
    )
    return flat


def _stored_array(leaf: Any) -> Any:
    """The array whose elements are the stored values: a quantized leaf's ``codes``."""
    leaf = _unwrap(leaf)
    if _is_quantized_fn()(leaf):
        return _unwrap(leaf.codes)
    return leaf


def _is_measured(leaf: Any) -> bool:
    """Whether ``leaf`` is stored state that can stall: floating arrays and quantized leaves.

    Integer leaves (counters), booleans, PRNG keys and ``None`` are not.
    """
    leaf = _unwrap(leaf)
    if leaf is None:
        return False
    if _is_quantized_fn()(leaf):
        return int(np.prod(jnp.shape(_unwrap(leaf.codes)))) > 0
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        if isinstance(leaf, float):
            return True
        return False
    try:
        floating = jnp.issubdtype(dtype, jnp.inexact)
    except TypeError:  # extended dtypes such as typed PRNG keys
        return False
    return bool(floating) and int(np.prod(jnp.shape(leaf))) > 0


def _unchanged(old: Any, new: Any) -> tuple[jax.Array, int]:
    """(number of stored elements equal before and after, number of stored elements).

    A quantized leaf compares its codes; 4-bit codes are packed two per byte along the last
    axis (element ``2i`` in the low nibble, ``2i+1`` in the high one) and are compared nibble
    by nibble, the padding nibble of an odd last axis excluded.
    """
    old, new = _unwrap(old), _unwrap(new)
    a = jnp.asarray(_stored_array(old))
    b = jnp.asarray(_stored_array(new))
    if _is_quantized_fn()(old) and getattr(old, "fmt", None) == "int4":
        logical = tuple(old.shape)
        n = logical[-1] if logical else 1

        def nibbles(packed):
            both = jnp.stack([packed & 0x0F, packed >> 4], axis=-1)
            return both.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))[..., :n]

        same = jnp.sum(nibbles(a) == nibbles(b), dtype=jnp.int32)
        return same, int(np.prod(logical))
    same = a == b
    if jnp.issubdtype(a.dtype, jnp.inexact):
        same = same | (jnp.isnan(a) & jnp.isnan(b))
    return jnp.sum(same, dtype=jnp.int32), int(np.prod(a.shape))


def _check_pair(old_state: PyTree, new_state: PyTree, context: str):
    old_flat = _logical_leaves(old_state)
    new_flat = _logical_leaves(new_state)
    old_paths = [jax.tree_util.keystr(p) for p, _ in old_flat]
    new_paths = [jax.tree_util.keystr(p) for p, _ in new_flat]
    if old_paths != new_paths:
        missing = sorted(set(old_paths) - set(new_paths))
        extra = sorted(set(new_paths) - set(old_paths))
        raise ValueError(
            f"{context}: new_state does not have the structure of old_state "
            f"(leaves only in old_state: {missing[:5]}, only in new_state: {extra[:5]})."
        )
    for path, (_, o), (_, n) in zip(old_paths, old_flat, new_flat):
        so, sn = jnp.shape(_stored_array(o)), jnp.shape(_stored_array(n))
        if so != sn:
            raise ValueError(
                f"{context}: leaf {path} is stored with shape {sn} in new_state; expected "
                f"{so} as in old_state."
            )
    return old_paths, old_flat, new_flat


def stall_fraction(old_state: PyTree, new_state: PyTree) -> dict[str, jax.Array]:
    r"""Per state leaf, the fraction of stored elements that a step left unchanged.

    .. math:: s_\ell = \frac{1}{n_\ell} \sum_{i=1}^{n_\ell} [\tilde x_{\ell,i}^{new} =
        \tilde x_{\ell,i}^{old}]

    where :math:`\tilde x` is what is stored: the array itself for a plain floating leaf,
    the codes for a quantized leaf (``optstate.quantization.array.QuantizedArray``), which counts once,
    at its own path (e.g. ``"[0].nu['w']"``), over its logical elements (packed 4-bit codes
    are compared nibble by nibble); its float32 per-block scales are not counted. Integer leaves (step counters), booleans, PRNG
    keys, ``None`` and empty leaves are skipped. Two NaNs count as equal. Jittable and usable
    inside ``lax.scan``; the keys depend only on the tree structure.

    Args:
      old_state: a state before a step.
      new_state: the state after it (same structure and stored shapes).

    Returns:
      ``{jax.tree_util.keystr(path): float32 scalar}`` in leaf order.

    Raises:
      ValueError: the two states differ in structure or in a leaf's stored shape (the message
        names the leaf).

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026 (stalling).
    """
    paths, old_flat, new_flat = _check_pair(old_state, new_state, "stall_fraction")
    out: dict[str, jax.Array] = {}
    for path, (_, o), (_, n) in zip(paths, old_flat, new_flat):
        if not (_is_measured(o) and _is_measured(n)):
            continue
        same, size = _unchanged(o, n)
        out[path] = (same.astype(jnp.float32) / jnp.float32(size)).astype(jnp.float32)
    return out


def _measured_paths(state: PyTree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, leaf in _logical_leaves(state) if _is_measured(leaf)]


class TrackStalenessState(NamedTuple):
    """State of :func:`track_staleness`.

    Attributes:
      inner_state: the wrapped transform's state.
      stall: ``{leaf path in inner_state: float32 scalar}``, the fraction of stored elements
        of each floating (or quantized) leaf that the last update left unchanged; 0 before
        the first update.
    """

    inner_state: OptState
    stall: dict[str, jax.Array]


def track_staleness(inner: GradientTransformation) -> GradientTransformation:
    r"""Wraps ``inner`` and records, per state leaf, the stall fraction of the last update.

    .. math:: (u, s') = \mathrm{inner}(u, s), \qquad
        \mathrm{stall}_\ell = \mathrm{stall\_fraction}(s, s')_\ell

    The updates are those of ``inner``, unchanged. The record is a dict of float32 scalars
    whose keys are fixed at ``init`` (the paths of the floating and quantized leaves of
    ``inner``'s state), so the state structure never changes and the record can be logged,
    checkpointed and read inside ``jit``.

    Args:
      inner: any gradient transformation (optstate's or Optax's), e.g. a quantized Adam.

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`TrackStalenessState`.

    Reference: Topollai & Choromanska, arXiv 2603.16731, 2026.
    """
    inner = with_extra_args_support(inner)

    def init(params):
        inner_state = inner.init(params)
        stall = {path: jnp.zeros((), jnp.float32) for path in _measured_paths(inner_state)}
        return TrackStalenessState(inner_state=inner_state, stall=stall)

    def update(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        stall = stall_fraction(state.inner_state, new_inner)
        if set(stall) != set(state.stall):
            raise ValueError(
                f"track_staleness: the inner state's measured leaves changed from "
                f"{sorted(state.stall)} to {sorted(stall)}; the state structure must be fixed."
            )
        return new_updates, TrackStalenessState(inner_state=new_inner, stall=stall)

    return GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------
# Emulation: rounding to a format and the controlled EMA experiment
# ------------------------------------------------------------------------------------------


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
    spec = float_format(fmt)
    x = jnp.asarray(x, jnp.float32)
    a = jnp.abs(x)
    _, exponent = jnp.frexp(a)  # a = m * 2**exponent, m in [0.5, 1)
    e = jnp.maximum(exponent - 1, spec.min_exponent)
    shift = spec.mantissa_bits - e
    s = jnp.ldexp(a, shift)
    if rounding == "nearest":
        q = jnp.round(s)
    else:
        if key is None:
            raise ValueError("round_to_format: rounding='stochastic' needs a PRNG key, got None.")
        floor = jnp.floor(s)
        q = floor + (jax.random.uniform(key, s.shape, jnp.float32) < s - floor)
    r = jnp.minimum(jnp.ldexp(q, -shift), jnp.float32(min(spec.max_value, _F32_MAX)))
    return jnp.where(x < 0, -r, r)


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
