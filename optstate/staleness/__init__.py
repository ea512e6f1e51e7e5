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

from optstate._core.base import GradientTransformation, with_extra_args_support  # noqa: F401
from optstate._core.types import PyTree  # noqa: F401
from optstate.quantization.grids import FLOAT_FORMATS, FloatFormat, float_format
from optstate.quantization.grids import FormatLike  # noqa: F401
from optstate.staleness.measure import TrackStalenessState, stall_fraction, track_staleness
from optstate.staleness.measure import param_stall_fraction
from optstate.staleness.model import (
    mantissa_bits,
    precision_ratio,
    remaining_benefit,
    reset_period,
    stall_probability,
    startup_window,
)
from optstate.staleness.simulate import EmaSimulation, round_to_format, simulate_ema_stalls

#: Names of the float formats the model knows (``float_format`` also takes mantissa widths).
FORMAT_NAMES: tuple[str, ...] = tuple(FLOAT_FORMATS)

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
    "param_stall_fraction",
    "track_staleness",
    "TrackStalenessState",
    "round_to_format",
    "simulate_ema_stalls",
    "EmaSimulation",
]
