"""``inject_hyperparams``: hyperparameters as arrays in the state, or schedules.

The numeric arguments of an optimizer factory become entries of ``state.hyperparams`` (so
they can be read and changed between jitted steps without recompiling, and are
checkpointed), and the inner transform is rebuilt from them at every update. Their dtypes
follow Optax's rules: floating values take the parameters' widest floating dtype (or
``hyperparam_dtype``), explicitly typed arrays keep theirs, and other arrays (a PRNG key,
integer arrays) are stored as they are.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.base import GradientTransformation, with_extra_args_support
from optstate._core.checks import (
    check_dtype,
    check_state,
    check_transform,
    describe,
    is_transform,
)
from optstate._core.numerics import safe_increment, zero_count
from optstate._core.types import OptState, Params, Updates


class InjectHyperparamsState(NamedTuple):
    """State of an :func:`inject_hyperparams` transform.

    Attributes:
      count: the number of updates done, int32 scalar; schedules are evaluated on it.
      hyperparams: ``{name: array}``, the numeric hyperparameters used by the last update
        (or, after ``init``, by the first). Unscheduled entries may be replaced between steps
        (``state.hyperparams['learning_rate'] = jnp.asarray(1e-4, old.dtype)``) and the next
        update uses them; scheduled entries are recomputed from ``count`` at every update.
        (A Python float works too and is stored in the entry's floating dtype, but it is a
        weakly typed argument, so a jitted step compiles once more; an array of another
        floating dtype is kept in that dtype, as in Optax, and also recompiles.)
      inner_state: the state of the inner transform.
    """

    count: jax.Array
    hyperparams: dict[str, jax.Array]
    inner_state: OptState


def _is_float_like(value: Any) -> bool:
    """Whether ``value`` is a Python float or has a floating dtype."""
    if isinstance(value, float):
        return True
    dtype = getattr(value, "dtype", None)
    return (dtype is not None and not jax.dtypes.issubdtype(dtype, jax.dtypes.extended)
            and jnp.issubdtype(dtype, jnp.floating))


def _is_typed_array(value: Any) -> bool:
    """A JAX array with an explicit (strong) dtype, e.g. ``jnp.float16(0.9)`` or a PRNG key;
    Optax stores such a hyperparameter as it is."""
    return isinstance(value, jax.Array) and not getattr(value, "weak_type", False)


def hyperparam_dtype_of(tree: Any) -> Any:
    """The dtype of floating hyperparameters for parameters ``tree`` (Optax's rule).

    The widest floating dtype of the leaves (``bfloat16`` parameters give ``bfloat16``; mixed
    ``bfloat16``/``float16`` promote to ``float32``, where Optax raises); complex leaves count
    as their real part's dtype (a hyperparameter is a real number; Optax would use the
    complex dtype); without floating leaves, JAX's default float dtype.
    """
    found = None
    for leaf in jax.tree.leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            continue
        if jnp.issubdtype(dtype, jnp.complexfloating):
            dtype = jnp.finfo(dtype).dtype
        elif not jnp.issubdtype(dtype, jnp.floating):
            continue
        found = dtype if found is None else jnp.promote_types(found, dtype)
    return jax.dtypes.canonicalize_dtype(float) if found is None else np.dtype(found)


def _to_array(name: str, value: Any, float_dtype: Any, force_float: bool = False) -> jax.Array:
    """The state entry for ``value``: a typed array is kept as it is (a floating one in its
    own dtype, a PRNG key untouched), other floating values become ``float_dtype``, other
    values strongly typed arrays of their own dtype. ``force_float`` (an entry that started
    as a float) also turns a non-floating value into ``float_dtype``."""
    try:
        if _is_typed_array(value) and (_is_float_like(value) or not force_float):
            return value
        if force_float or _is_float_like(value):
            return jnp.asarray(value, dtype=float_dtype)
        arr = jnp.asarray(value)
        return arr.astype(arr.dtype)  # drops the weak type of Python scalars
    except TypeError:
        raise TypeError(
            f"inject_hyperparams: hyperparameter {name!r} must be numeric (a float or an "
            f"array); got {value!r} of type {type(value).__name__}.") from None


def _is_static_value(value: Any) -> bool:
    """Whether an argument of the factory stays a Python value (not an array in the state)."""
    # bools and ints (flags, sizes) stay static, as do dtypes and types (e.g. mu_dtype),
    # strings, None and containers.
    if isinstance(value, (bool, int, np.bool_, np.integer)):
        return True
    if isinstance(value, (type, np.dtype)):
        return True
    return not (callable(value) or isinstance(value, (float, np.floating, np.ndarray, jax.Array)))


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: Any = None,
) -> Callable[..., GradientTransformation]:
    """Turns the numeric hyperparameters of ``inner_factory`` into state.

    ``inject_hyperparams(optstate.adam)(learning_rate=1e-3)`` builds a transform whose
    state keeps ``learning_rate`` as an array in ``state.hyperparams``; at every step
    the inner transform is rebuilt from the current values and applied:

    .. math::

        h_t = \\begin{cases} \\sigma(t) & h \\text{ is a schedule } \\sigma \\\\
                            h_{\\text{state}} & \\text{otherwise,} \\end{cases}
        \\qquad (u, s) \\leftarrow \\mathrm{factory}(h_t).\\mathrm{update}(u, s),
        \\qquad t \\leftarrow t + 1,

    with :math:`t` the number of updates done so far (0 at the first update). Because the
    values are arrays in the state, changing one between steps does not recompile a jitted
    step, and checkpoints keep them. Reference: the hyperparameter-injection pattern of
    Optax (``optax.inject_hyperparams``); schedules as in Loshchilov & Hutter, ICLR 2017.

    Args:
      inner_factory: a function returning a :class:`GradientTransformation` (e.g.
        ``optstate.adamw`` or ``optax.adamw``) whose numeric arguments it accepts as arrays.
      static_args: names of arguments to keep static even if they are callables or floats
        (e.g. a callable ``mask``). Besides these, bools, ints, dtypes, strings and ``None``
        stay static (Optax puts ints in the state, where a traced size cannot be used);
        floats and arrays (a PRNG key too) become state; other callables are schedules
        ``step -> value``.
      hyperparam_dtype: the dtype of floating hyperparameters in the state. ``None``
        (default, as in Optax): the widest floating dtype of the parameters (of the updates
        when ``update`` is called without parameters), so ``bfloat16`` parameters give
        ``bfloat16`` hyperparameters; pass ``jnp.float32`` to keep e.g. a learning rate exact
        with ``bfloat16`` parameters. Either way an explicitly typed array
        (``b1=jnp.float32(0.9)``) and a schedule's typed output keep their own dtype.

    Returns:
      A function with ``inner_factory``'s signature returning a
      :class:`GradientTransformation` with state :class:`InjectHyperparamsState`.

    The returned function builds the inner transform once from the values given, so the
    factory's own checks (e.g. ``b1`` in :math:`[0, 1)`) run where the user wrote them; the
    values set later in the state are arrays and are not range-checked.

    Raises:
      TypeError: ``inner_factory`` is not a function returning a transform (e.g. a transform
        itself: pass ``optstate.adam``, not ``optstate.adam(1e-3)``); at ``update``, a state
        not made by this transform's ``init``.
      TypeError: ``hyperparam_dtype`` not a floating dtype (or ``None``).
      ValueError: ``static_args`` names an argument ``inner_factory`` does not have.
      KeyError: ``state.hyperparams`` was given a key that is not a numeric hyperparameter.
    """
    if is_transform(inner_factory) or not callable(inner_factory):
        raise TypeError(
            f"inject_hyperparams: inner_factory must be a function that returns a transform "
            f"(e.g. optstate.adam); got {describe(inner_factory)}. Pass the function and its "
            f"arguments separately: inject_hyperparams(optstate.adam)(learning_rate=1e-3).")
    static = {static_args} if isinstance(static_args, str) else set(static_args)
    signature = inspect.signature(inner_factory)
    unknown = static - set(signature.parameters)
    if unknown:
        raise ValueError(
            f"inject_hyperparams: static_args {sorted(unknown)} are not arguments of "
            f"{getattr(inner_factory, '__name__', inner_factory)!r}; its arguments are "
            f"{list(signature.parameters)}.")
    fixed_dtype = check_dtype("hyperparam_dtype", hyperparam_dtype, "inject_hyperparams")

    @functools.wraps(inner_factory)
    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError("inject_hyperparams: pass the hyperparameters of "
                                    f"{inner_factory.__name__} by name, not as *{name}.")
            else:
                arguments[name] = value

        fixed, numeric, scheduled = {}, {}, {}
        for name, value in arguments.items():
            if name in static or _is_static_value(value):
                fixed[name] = value
            elif callable(value):
                scheduled[name] = value
            else:
                numeric[name] = value

        float_keys = {k for k, v in numeric.items() if _is_float_like(v)}

        # Build the inner transform once from the values as given, so that the factory
        # checks them here (with Python numbers, which it range-checks) and not at the first
        # traced update (with arrays, which it cannot).
        probe = {k: _to_array(k, f(zero_count()), jnp.float32 if fixed_dtype is None
                                 else fixed_dtype)
                 for k, f in scheduled.items()}
        factory_name = getattr(inner_factory, "__name__", "inner_factory")
        check_transform(inner_factory(**fixed, **numeric, **probe), "inject_hyperparams",
                        name=f"what {factory_name}(...) returned")

        def evaluate(count: jax.Array, stored: dict[str, Any], tree: Any
                     ) -> dict[str, jax.Array]:
            extra = set(stored) - set(numeric) - set(scheduled)
            missing = set(numeric) - set(stored)
            if extra or missing:
                raise KeyError(
                    f"inject_hyperparams: state.hyperparams has unknown keys {sorted(extra)} "
                    f"and lacks keys {sorted(missing)}; expected the numeric hyperparameters "
                    f"{sorted(set(numeric) | set(scheduled))}.")
            # A hyperparameter that started as a float stays floating whatever the user stores
            # (e.g. a Python int), so the state's dtypes never change.
            float_dtype = hyperparam_dtype_of(tree) if fixed_dtype is None else fixed_dtype
            values = {k: _to_array(k, stored[k], float_dtype, force_float=k in float_keys)
                      for k in numeric}
            values.update({k: _to_array(k, f(count), float_dtype) for k, f in scheduled.items()})
            return values

        def init(params: Params) -> InjectHyperparamsState:
            count = zero_count()
            hyperparams = evaluate(count, numeric, params)
            inner = inner_factory(**fixed, **hyperparams)
            return InjectHyperparamsState(count=count, hyperparams=hyperparams,
                                          inner_state=inner.init(params))

        def update(updates: Updates, state: InjectHyperparamsState,
                   params: Params | None = None, **extra_args: Any
                   ) -> tuple[Updates, InjectHyperparamsState]:
            check_state(state, InjectHyperparamsState, "inject_hyperparams")
            hyperparams = evaluate(state.count, state.hyperparams,
                                   updates if params is None else params)
            inner = with_extra_args_support(inner_factory(**fixed, **hyperparams))
            updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
            return updates, InjectHyperparamsState(
                count=safe_increment(state.count), hyperparams=hyperparams, inner_state=inner_state)

        return GradientTransformation(init, update)

    return wrapped
