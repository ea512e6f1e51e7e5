"""Every probe of the JAX version in one place, and the only module that may touch JAX internals.

Written for and tested with JAX 0.10 (pinned in ``pyproject.toml``). Each function says what
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


def varying_axes(x: Any) -> frozenset | None:
    """The manual mesh axes over which ``x`` varies inside ``shard_map``, or ``None`` where
    JAX does not track them (older versions, ``check_vma=False``, or ``x`` not a JAX value).

    Read from the type of ``x``: ``jax.typeof(x).vma`` on current JAX, the ``varying`` set of
    its manual-axis type (``mat`` or ``manual_axis_type``) on the versions that named it so.
    """
    try:
        aval = jax.typeof(x)
    except Exception:  # noqa: BLE001 - not a JAX value, or a JAX without jax.typeof
        return None
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", None)
    return None if vma is None else frozenset(vma)


def pcast_varying(x: Any, axis: str) -> Any:
    """``x`` retyped as varying over the manual mesh axis ``axis`` inside ``shard_map``:
    ``jax.lax.pcast(x, axis, to="varying")``, or ``jax.lax.pvary`` on the versions before
    ``pcast``. The values are unchanged; only the type (and so autodiff's transpose) is."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axis, to="varying")
    return jax.lax.pvary(x, axis)


def key_impl_name(leaf: Any) -> str:
    """The name of the PRNG implementation of a typed key array or of its abstract value
    (``"threefry2x32"``, ``"rbg"``, ...).

    ``jax.random.key_impl`` answers for concrete key arrays only; for a
    ``jax.ShapeDtypeStruct`` target the key dtype's implementation is the one route, read from
    its (private) ``_impl`` attribute here and nowhere else.
    """
    try:
        return str(jax.random.key_impl(leaf))
    except TypeError:
        impl = getattr(leaf.dtype, "_impl", None)
        if impl is None or not hasattr(impl, "name"):  # pragma: no cover - JAX moved it
            raise RuntimeError(
                "optstate._core._compat.key_impl_name: this JAX version hides the PRNG "
                "implementation of a key dtype; pin jax to a version listed in optstate's "
                "pyproject.toml.") from None
        return str(impl.name)
