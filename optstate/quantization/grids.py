r"""Binary floating-point grids: what values a float format can hold, and rounding onto them.

A :class:`FloatFormat` is the grid of a binary float with :math:`p` stored mantissa bits, the
smallest normal exponent :math:`e_{\min}` and a largest finite value. Inside a binade
:math:`[2^e, 2^{e+1})` (with :math:`e` clamped below at :math:`e_{\min}`, giving subnormals)
the spacing is :math:`u = 2^{e - p}`; with :math:`s = |x| / u`,

.. math::
    \mathrm{nearest}(x) = \mathrm{sign}(x)\, u\, \mathrm{round\_half\_even}(s), \qquad
    \mathrm{stochastic}(x) = \mathrm{sign}(x)\, u\, \lfloor s + U \rfloor,\
    U \sim \mathcal U[0, 1),

saturated at the largest finite value. Nearest rounding matches the hardware casts
(``astype(jnp.bfloat16)``, ``astype(jnp.float8_e4m3fn)``) inside the range; stochastic rounding
is unbiased, :math:`E[\mathrm{stochastic}(x)] = x` (Gupta et al., "Deep Learning with Limited
Numerical Precision", ICML 2015). :meth:`FloatFormat.round` is the one implementation of both,
used by the quantized state (:mod:`optstate.quantization.codecs`) and by the staleness
emulation (:func:`optstate.staleness.round_to_format`).

Grids named here: ``fp32``, ``bf16``, ``fp16``, ``fp8_e4m3``, ``fp8_e5m2`` and ``fp4_e2m2`` (an
unsigned 4-bit float of the staleness paper with no JAX dtype); :func:`float_format` also
accepts a number of mantissa bits or a floating dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: What :func:`float_format` accepts: a name, a number of mantissa bits, a floating dtype or a
#: :class:`FloatFormat`.
FormatLike = Any

_F32_MAX = float(np.finfo(np.float32).max)


def _pow2(exponent: jax.Array) -> jax.Array:
    """``2.0 ** exponent`` (float32) for integer exponents in ``[-126, 127]``, built from bits."""
    return lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def _scale_pow2(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """``x * 2**exponent``, exact, for exponents in ``[-252, 254]`` (two normal factors)."""
    half = exponent // 2
    return x * _pow2(half) * _pow2(exponent - half)


class FloatFormat(NamedTuple):
    r"""A binary floating-point grid.

    Attributes:
      name: the format's name (``"bf16"``, ``"fp8_e4m3"``, ... or ``"m<p>"`` for an explicit
        mantissa width).
      mantissa_bits: :math:`p`, the stored fraction bits; the relative spacing of the grid
        inside a binade :math:`[2^e, 2^{e+1})` is :math:`\epsilon = 2^{-p}`.
      min_exponent: :math:`e_{\min}`, the exponent of the smallest normal number; below
        :math:`2^{e_{\min}}` the grid is uniform with spacing :math:`2^{e_{\min} - p}`
        (subnormals).
      max_value: the largest finite value; larger magnitudes saturate to it.
    """

    name: str
    mantissa_bits: int
    min_exponent: int
    max_value: float

    @property
    def epsilon(self) -> float:
        """The relative spacing :math:`2^{-p}` inside a binade."""
        return 2.0 ** -self.mantissa_bits

    @property
    def smallest_subnormal(self) -> float:
        r"""The smallest positive value, :math:`2^{e_{\min} - p}`."""
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    def round(self, x: Any, u: jax.Array | None = None) -> jax.Array:
        """``x`` (cast to float32) rounded onto this grid, as float32 grid values.

        Args:
          x: values.
          u: ``None`` for nearest rounding (ties to even), else uniform numbers in ``[0, 1)``
            of ``x``'s shape for unbiased stochastic rounding.
        """
        x = jnp.asarray(x, jnp.float32)
        a = jnp.abs(x)
        exponent = ((lax.bitcast_convert_type(a, jnp.int32) >> 23) & 0xFF) - 127
        spacing = jnp.maximum(exponent, self.min_exponent) - self.mantissa_bits
        s = _scale_pow2(a, -spacing)
        q = jnp.round(s) if u is None else jnp.floor(s + u)
        r = jnp.minimum(_scale_pow2(q, spacing), np.float32(min(self.max_value, _F32_MAX)))
        return jnp.where(x < 0, -r, r)


FLOAT_FORMATS: dict[str, FloatFormat] = {
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
        if key in FLOAT_FORMATS:
            return FLOAT_FORMATS[key]
        if key.isdigit():
            return float_format(int(key))
        raise ValueError(
            f"format: unknown format {fmt!r}; expected one of {sorted(FLOAT_FORMATS)} or an int "
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
        f"format: expected a format name {sorted(FLOAT_FORMATS)}, an int number of mantissa bits "
        f"or a floating dtype, got {fmt!r} of type {type(fmt).__name__}."
    )
