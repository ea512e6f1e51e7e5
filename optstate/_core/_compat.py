"""Every probe of the JAX version in one place, and the only module that may touch JAX internals.

Written for and tested with JAX 0.7 to 0.10 (see ``pyproject.toml``). Each function says what
it probes and what it falls back to; nothing else in optstate reads private attributes of JAX
objects or imports ``jax._src``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def explicit_axis_type() -> Any:
    """``jax.sharding.AxisType.Explicit``, or ``None`` on a JAX without sharding-in-types."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    return None if axis_type is None else getattr(axis_type, "Explicit", None)


def typed_sharding(x: Any) -> Any:
    """The sharding in ``x``'s type (``jax.typeof(x).sharding``), or ``None`` where the JAX
    version has no ``jax.typeof`` or ``x`` is not an array."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return None
    try:
        return getattr(typeof(x), "sharding", None)
    except TypeError:
        return None


def mesh_axis_types(mesh: Any) -> tuple[Any, ...]:
    """The axis types of ``mesh`` (empty where the JAX version has none)."""
    return tuple(getattr(mesh, "axis_types", ()) or ())


def auto_axes(fn: Callable[..., Any], out_sharding: Any) -> Callable[..., Any]:
    """``jax.sharding.auto_axes(fn, out_sharding=...)``: ``fn`` run with the mesh's Explicit
    axes switched to Auto. Raises where the JAX version lacks it (Explicit axes do too)."""
    return jax.sharding.auto_axes(fn, out_sharding=out_sharding)


def with_weak_type(x: jax.Array) -> jax.Array:
    """``x`` marked weakly typed (as a Python scalar is), same dtype and value.

    JAX has no public constructor for a weakly typed array from an existing one. Adding the
    array to a weakly typed zero of its own dtype would give a strongly typed result, so the
    one route is ``lax``'s conversion with ``weak_type=True``, which lives in ``jax._src``.

    Raises:
      RuntimeError: the JAX version moved that function; the message says how to proceed.
    """
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError as error:  # pragma: no cover - depends on the JAX version
        raise RuntimeError(
            "optstate._core._compat.with_weak_type: this JAX version has no "
            "jax._src.lax.lax._convert_element_type, which restores weak types. Pin jax to a "
            "version listed in optstate's pyproject.toml, or restore with a target whose "
            "leaves are not weakly typed.") from error
    return _convert_element_type(x, weak_type=True)
