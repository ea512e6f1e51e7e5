"""Checks of the arguments users write: hyperparameters, dtypes, transforms and states.

Every alias, building block, wrapper and schedule checks what it was given here, at the line
the user wrote, so that a wrong argument is an error naming that argument and its value
instead of a silent wrong result or a JAX error three frames deep. Messages say what was
expected, what was given, where, and how to fix it.

What is checked when:

* A concrete Python or NumPy number is checked for type, finiteness and range.
* A JAX array (a traced value under ``jit``, or a hyperparameter that
  :func:`optstate.inject_hyperparams` keeps in the state) is checked for its shape and dtype
  only, both static: its value is never read, so nothing here syncs with the device or costs
  anything inside a jitted step.
* A schedule (a callable) is accepted where the argument allows one and never called.
* A state is checked by its Python type only (at trace time), see :func:`check_state`.

The context named in a message is the function the user called: the building blocks name
themselves, and an alias that builds them reports under its own name (:func:`called_as`),
so ``adam(b1=1.5)`` says ``adam: b1 ...``, not ``scale_by_adam: b1 ...``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "called_as", "check_dtype", "check_int", "check_learning_rate", "check_scalar",
    "check_state", "check_transform", "describe", "is_transform",
]

_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "optstate_checks_caller", default=None)


@contextlib.contextmanager
def called_as(name: str) -> Iterator[None]:
    """Within the block, argument errors name ``name`` (e.g. ``"adam"``) as the function the
    user called, instead of the building block that found them. The outermost name wins."""
    token = _CALLER.set(_CALLER.get() or name)
    try:
        yield
    finally:
        _CALLER.reset(token)


def _where(context: str) -> str:
    """The prefix of a message: the function the user called (see :func:`called_as`)."""
    return _CALLER.get() or context


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message (type and value or shape)."""
    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)):
        return f"the bool {bool(value)}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
        return f"a gradient transformation ({type(value).__name__})"
    if isinstance(value, (jax.Array, np.ndarray)):
        return f"an array of shape {tuple(np.shape(value))} and dtype {value.dtype}"
    if isinstance(value, (int, float, complex, np.number)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, type):
        return f"the class {value.__name__}"
    if callable(value):
        return f"the function {getattr(value, '__name__', repr(value))}"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return f"a {type(value).__name__} (fields {', '.join(value._fields) or 'none'})"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _interval(low: float | None, high: float | None, low_inclusive: bool,
              high_inclusive: bool) -> str:
    """``"in [0, 1)"``, ``">= 0"``, ``"> 0"`` or ``""`` (any finite value)."""
    fmt = lambda x: f"{x:g}"  # noqa: E731
    if low is not None and high is not None:
        return (f"in {'[' if low_inclusive else '('}{fmt(low)}, {fmt(high)}"
                f"{']' if high_inclusive else ')'}")
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {fmt(low)}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {fmt(high)}"
    return ""


def _compute_dtype() -> np.dtype:
    """The dtype a step computes Python-float hyperparameters in (float32 unless x64)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def check_scalar(name: str, value: Any, *, context: str, low: float | None = None,
                 high: float | None = None, low_inclusive: bool = True,
                 high_inclusive: bool = True, finite: bool = True, allow_none: bool = False,
                 allow_schedule: bool = False, hint: str = "") -> None:
    """Raises unless ``value`` is a real scalar in the given range.

    A Python or NumPy number (or 0-d NumPy array) must be real, not NaN, finite when
    ``finite``, and within ``[low, high]`` (ends open where ``*_inclusive`` is ``False``).
    An exclusive end is also checked in the dtype the step computes in (float32 unless x64),
    since ``b1=1 - 1e-9`` is 1.0 there and turns Adam's bias correction into a division by
    zero. A JAX array (possibly traced) must be 0-d with a real dtype; its value is not read.

    Args:
      name: the argument's name as in the user's call (``"b1"``).
      value: the value given.
      context: the function checking it (``"scale_by_adam"``).
      low, high: the bounds; ``None`` for none.
      low_inclusive, high_inclusive: whether each bound is allowed.
      finite: refuse infinities.
      allow_none: accept ``None``.
      allow_schedule: accept a callable (a schedule ``step -> value``) unchecked.
      hint: a sentence appended to the message (what the argument means, a usual value).

    Raises:
      TypeError: ``value`` is not a real number, a real scalar array or (if allowed) a
        schedule or ``None``.
      ValueError: ``value`` is an array of another shape, NaN, infinite or out of range.
    """
    where = _where(context)
    interval = _interval(low, high, low_inclusive, high_inclusive)
    expected = "a " + ("finite " if finite else "") + "real number" + (
        f" {interval}" if interval else "")
    if allow_schedule:
        expected += ", a scalar array or a schedule (step -> value)"
    if allow_none:
        expected += ", or None"
    tail = f" {hint}" if hint else ""

    def type_error(extra: str = "") -> TypeError:
        return TypeError(f"{where}: {name} must be {expected}; got {describe(value)}.{extra}"
                         f"{tail}")

    if value is None:
        if allow_none:
            return
        raise type_error()
    if isinstance(value, (bool, np.bool_)):
        raise type_error()
    if isinstance(value, str):
        try:
            suggestion = float(value)
        except ValueError:
            raise type_error() from None
        raise type_error(f" Pass the number itself: {name}={suggestion!r}.")
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if allow_schedule:
            return
        raise type_error(f" {name} cannot be a schedule here; to change it during training "
                         f"use optstate.inject_hyperparams.")
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if not (jnp.issubdtype(value.dtype, jnp.integer)
                or jnp.issubdtype(value.dtype, jnp.floating)):
            raise type_error()
        if np.ndim(value) != 0:
            raise ValueError(
                f"{where}: {name} must be {expected}; got {describe(value)}. {name} is one "
                f"number for all parameters: pass a scalar (shape ()).{tail}")
        if isinstance(value, jax.Array):
            return  # possibly traced: its value is not read
        number = float(value)
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise type_error()

    def value_error(reason: str) -> ValueError:
        return ValueError(f"{where}: {name} must be {expected}; got {name}={value!r}"
                          f"{reason}.{tail}")

    if math.isnan(number):
        raise value_error("")
    if finite and math.isinf(number):
        raise value_error("")
    if low is not None and (number < low or (not low_inclusive and number == low)):
        raise value_error("")
    if high is not None and (number > high or (not high_inclusive and number == high)):
        raise value_error("")
    dtype = _compute_dtype()
    with np.errstate(over="ignore"):
        rounded = float(np.asarray(number, dtype=dtype))
    if high is not None and not high_inclusive and math.isfinite(high) and rounded >= high:
        below = float(np.nextafter(np.asarray(high, dtype), np.asarray(-np.inf, dtype)))
        raise value_error(f", which rounds to {rounded:g} in {dtype}, the precision of the "
                          f"step (use at most {below!r})")
    if low is not None and not low_inclusive and math.isfinite(low) and rounded <= low:
        above = float(np.nextafter(np.asarray(low, dtype), np.asarray(np.inf, dtype)))
        raise value_error(f", which rounds to {rounded:g} in {dtype}, the precision of the "
                          f"step (use at least {above!r})")


def check_int(name: str, value: Any, *, context: str, low: int | None = None,
              hint: str = "") -> None:
    """Raises unless ``value`` is a Python or NumPy integer (not a bool) ``>= low``.

    A 0-d integer JAX array (possibly traced) is accepted without reading its value.

    Raises:
      TypeError: not an integer. ValueError: below ``low``.
    """
    where = _where(context)
    bound = "" if low is None else f" >= {low}"
    tail = f" {hint}" if hint else ""
    if (isinstance(value, jax.Array) and np.ndim(value) == 0
            and jnp.issubdtype(value.dtype, jnp.integer)):
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        given = (f"{name}={value!r}, a {type(value).__name__}"
                 if isinstance(value, (float, np.floating)) else describe(value))
        raise TypeError(f"{where}: {name} must be an integer{bound}; got {given}.{tail}")
    if low is not None and value < low:
        raise ValueError(f"{where}: {name} must be an integer{bound}; got {name}={value!r}."
                         f"{tail}")


def check_learning_rate(value: Any, context: str, *, name: str = "learning_rate",
                        allow_none: bool = False) -> None:
    """Raises unless ``value`` is a learning rate: a finite number, a 0-d real array, or a
    schedule ``step -> value`` (a callable, not called here).

    Any sign is accepted, as in Optax (a negative rate ascends the loss).

    Raises:
      TypeError: a string, a bool, ``None`` (unless ``allow_none``) or another non-number.
      ValueError: NaN, an infinity, or an array that is not 0-d.
    """
    hint = f"{name} is the step size, e.g. 1e-3, or a schedule from optstate.schedules."
    check_scalar(name, value, context=context, allow_none=allow_none, allow_schedule=True,
                 hint=hint)


def check_dtype(name: str, dtype: Any, context: str, kind: str = "floating",
                allow_none: bool = True) -> Any:
    """Checks a storage dtype (``mu_dtype=jnp.bfloat16``) and returns it canonicalised.

    Args:
      name: the argument's name; ``dtype``: its value; ``context``: the function.
      kind: ``"floating"`` (real floating dtypes, bfloat16 and float8 included).
      allow_none: accept ``None`` (meaning "the parameters' dtype"), returned as is.

    Returns:
      ``jax.dtypes.canonicalize_dtype(dtype)``, or ``None``.

    Raises:
      TypeError: ``dtype`` is not a dtype, or not of ``kind`` (an integer dtype would
        truncate the stored moments to integers, e.g. Adam's ``mu`` to 0).
    """
    if kind != "floating":
        raise ValueError(f"check_dtype: unknown kind {kind!r}; expected 'floating'.")
    where = _where(context)
    expected = "a floating dtype (e.g. jnp.float32 or jnp.bfloat16)" + (
        " or None (the parameters' dtype)" if allow_none else "")
    if dtype is None:
        if allow_none:
            return None
        raise TypeError(f"{where}: {name} must be {expected}; got None.")
    try:
        canonical = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {name} must be {expected}; got {describe(dtype)}, which is "
                        f"not a dtype.") from None
    if not jnp.issubdtype(canonical, jnp.floating):
        why = (" (an integer dtype truncates the stored state, e.g. Adam's mu to 0)"
               if jnp.issubdtype(canonical, jnp.integer) or canonical == np.bool_ else "")
        raise TypeError(
            f"{where}: {name} must be {expected}; got {canonical}{why}. For 8-bit or 4-bit "
            f"storage of the state wrap the transform in optstate.quantize_state.")
    return canonical


def is_transform(tx: Any) -> bool:
    """Whether ``tx`` is a gradient transformation: an object with callable ``init`` and
    ``update`` attributes (optstate's, Optax's, ...) or a plain ``(init, update)`` pair of
    callables (which ``optstate.with_extra_args_support`` turns into a transform)."""
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return True
    return (isinstance(tx, (tuple, list)) and not hasattr(tx, "_fields") and len(tx) == 2
            and all(callable(f) for f in tx))


def check_transform(tx: Any, context: str, *, position: int | None = None,
                    name: str | None = None) -> None:
    """Raises unless ``tx`` is a gradient transformation (see :func:`is_transform`).

    Args:
      tx: what the user passed.
      context: the function receiving it (``"chain"``).
      position: its position among several (``chain(adam, 3)``: 1), named in the message.
      name: the argument's name, named in the message (default ``"inner"``).

    Raises:
      TypeError: ``tx`` is not a transform; a function (e.g. the factory ``optstate.adam``
        itself) is told to be called first.
    """
    if is_transform(tx):
        return
    where = _where(context)
    if position is not None:
        arg = f"argument {position}" + (f" ({name})" if name else "")
    else:
        arg = name or "inner"
    message = (f"{where}: {arg} must be a gradient transformation (an object with init and "
               f"update, e.g. optstate.adam(1e-3)); got {describe(tx)}.")
    if callable(tx) and not isinstance(tx, type):
        fn = getattr(tx, "__name__", "the function")
        message += (f" If {fn} builds a transform, call it first: {fn}(...) "
                    f"(e.g. optstate.adam(learning_rate=1e-3), not optstate.adam).")
    raise TypeError(message)


def check_state(state: Any, expected: type, context: str) -> None:
    """Raises unless ``state`` is the state ``expected`` (a NamedTuple class) of a transform.

    Accepted: an instance of ``expected``, or of any NamedTuple with the same field names
    (Optax's equivalent state, e.g. ``optax.ScaleByAdamState``, which optstate's transforms
    accept). Only the Python type is inspected, so the check costs nothing under ``jit``.

    Raises:
      TypeError: naming the expected state class and its fields, the given one, and the fix.
    """
    if isinstance(state, expected):
        return
    fields = getattr(type(state), "_fields", None)
    if isinstance(state, tuple) and fields == expected._fields:
        return
    given = describe(state)
    if isinstance(state, tuple) and fields is None:
        given = f"a tuple of {len(state)} entries (a chain's state?)"
    elif isinstance(state, dict):
        given = f"a dict with keys {sorted(state, key=repr)}"
    raise TypeError(
        f"{context}: expected the state made by this transform's init, a {expected.__name__} "
        f"(fields {', '.join(expected._fields) or 'none'}); got {given}, the state of another "
        f"transform. Pass the state returned by this transform's init (state = tx.init(params)"
        f"), and keep each transform's state with it (in a chain, entry i of the chain's state "
        f"belongs to transform i).")
