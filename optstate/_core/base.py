"""The gradient-transformation protocol: ``init``/``update`` pairs over pytree state.

Holds :class:`GradientTransformation`, :class:`EmptyState` and :func:`init_empty_state`, the
trivial transforms (:func:`identity`, :func:`set_to_zero`), the combinators :func:`chain` and
:func:`named_chain`, :func:`apply_updates`, and :func:`with_extra_args_support`, which lets a
foreign transform take part in a chain.

The shapes of these objects match Optax's exactly, so that ``flax.nnx.Optimizer``, Linen's
``TrainState``, Equinox and Optax's own combinators accept optstate transforms unchanged.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from optstate._core.checks import check_transform, describe
from optstate._core.tree_checks import check_same_tree

# Re-exported (see __all__): other packages import these names from here; their home is
# types.py.
from optstate._core.types import (
    OptState,
    Params,
    PyTree,
    ScalarOrSchedule,
    Schedule,
    Updates,
)

__all__ = [
    "EmptyState", "GradientTransformation", "OptState", "Params", "PyTree", "ScalarOrSchedule",
    "Schedule", "TransformInitFn", "TransformUpdateFn", "Updates", "apply_updates", "chain",
    "identity", "init_empty_state", "named_chain", "register_fused_update", "set_to_zero",
    "update_and_apply", "with_extra_args_support",
]


class TransformInitFn(Protocol):
    """``init(params) -> state``: builds the state of a transform from the parameters."""

    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    """``update(updates, state, params=None, **extra_args) -> (updates, state)``."""

    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra_args) -> (updates, state)``.

    Transforms hold no arrays (all arrays live in the state), are hashable, and accept and
    ignore keyword arguments they do not use. The state returned by ``update`` has exactly the
    pytree structure of the state returned by ``init``.
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def init_empty_state(params: Params) -> EmptyState:
    """The ``init`` of every stateless transform: ignores ``params``, returns ``EmptyState()``.

    Args:
      params: the parameters (unused).

    Returns:
      ``EmptyState()``, a pytree with no leaves.
    """
    del params
    return EmptyState()


def _accepts_extra_args(update_fn: Callable[..., Any]) -> bool:
    """Whether ``update_fn`` declares ``**kwargs`` (``False`` when it has no signature)."""
    try:
        signature = inspect.signature(update_fn)
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def with_extra_args_support(tx: GradientTransformation) -> GradientTransformation:
    """Wraps ``tx`` (optstate's or a foreign one, e.g. Optax's) so that its ``update``
    accepts and ignores keyword arguments it does not declare.

    Args:
      tx: any gradient transformation, or a plain ``(init, update)`` pair of functions.

    Returns:
      ``tx`` itself (as a :class:`GradientTransformation`) when its ``update`` already takes
      ``**extra_args``, else a transform with the same ``init`` whose ``update`` drops them.

    Raises:
      TypeError: ``tx`` is not a transform (e.g. the number 3, or the factory
        ``optstate.adam`` not yet called).
    """
    check_transform(tx, "with_extra_args_support", name="tx")
    if hasattr(tx, "init"):
        init, inner_update = tx.init, tx.update
    else:
        init, inner_update = tx
    if _accepts_extra_args(inner_update):
        return GradientTransformation(init, inner_update)

    def update(updates, state, params=None, **extra_args):
        del extra_args
        return inner_update(updates, state, params)

    return GradientTransformation(init, update)


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged: ``u <- u``.

    Returns:
      A stateless :class:`GradientTransformation`.
    """

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, state

    return GradientTransformation(init_empty_state, update)


def set_to_zero() -> GradientTransformation:
    """The transform that zeroes its updates, ``u <- 0`` (freezes parameters).

    Returns:
      A stateless :class:`GradientTransformation`.
    """

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return jax.tree.map(jnp.zeros_like, updates), state

    return GradientTransformation(init_empty_state, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    r"""Applies ``transforms`` in sequence.

    .. math:: u \leftarrow t_n(\dots t_2(t_1(u)))

    Keyword arguments reach every transform; foreign transforms (Optax's) that do not accept
    them are wrapped (:func:`with_extra_args_support`).

    Args:
      *transforms: the transforms, first applied first.

    Returns:
      A :class:`GradientTransformation` whose state is a tuple with one entry per transform
      (the layout of ``optax.chain``).

    Raises:
      TypeError: an argument is not a transform (naming its position); at ``update``, the
        state is not a tuple (e.g. the state of a single transform).
      ValueError: at ``update``, the state tuple has the wrong number of entries.
    """
    for i, t in enumerate(transforms):
        check_transform(t, "chain", position=i)
    wrapped = tuple(with_extra_args_support(t) for t in transforms)

    def init(params):
        return tuple(t.init(params) for t in wrapped)

    def update(updates, state, params=None, **extra_args):
        if not isinstance(state, (tuple, list)) or hasattr(state, "_fields"):
            raise TypeError(
                f"chain: expected the state made by this chain's init, a tuple of "
                f"{len(wrapped)} entries (one per transform); got {describe(state)}. Pass the "
                f"state returned by this chain's init (state = tx.init(params)).")
        if len(state) != len(wrapped):
            raise ValueError(
                f"chain: expected a state tuple of {len(wrapped)} entries (one per transform), "
                f"got {len(state)}. Pass the state returned by this chain's init "
                f"(state = tx.init(params))."
            )
        new_state = []
        for t, s in zip(wrapped, state):
            updates, s = t.update(updates, s, params, **extra_args)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def named_chain(*named_transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with the state a dict keyed by the given names.

    Args:
      *named_transforms: ``(name, transform)`` pairs, applied in the order given.

    Returns:
      A :class:`GradientTransformation` whose state is ``{name: state of that transform}``.

    Raises:
      TypeError: an argument is not a ``(name, transform)`` pair (naming its position).
      ValueError: two names are equal, or (at ``update``) the state lacks a name.
    """
    for i, pair in enumerate(named_transforms):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError(
                f"named_chain: argument {i} must be a (name, transform) pair with a string "
                f"name, e.g. ('adam', optstate.adam(1e-3)); got {describe(pair)}.")
        check_transform(pair[1], "named_chain", position=i, name=repr(pair[0]))
    names = [name for name, _ in named_transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: names must be unique, got {names}.")
    wrapped = tuple((name, with_extra_args_support(t)) for name, t in named_transforms)

    def init(params):
        return {name: t.init(params) for name, t in wrapped}

    def update(updates, state, params=None, **extra_args):
        if not isinstance(state, Mapping):
            raise TypeError(
                f"named_chain: expected the state made by this named_chain's init, a dict "
                f"with keys {names}; got {describe(state)}. Pass the state returned by its "
                f"init (state = tx.init(params)).")
        new_state = {}
        for name, t in wrapped:
            if name not in state:
                raise ValueError(f"named_chain: state has no entry {name!r}; expected keys {names}.")
            updates, new_state[name] = t.update(updates, state[name], params, **extra_args)
        return updates, new_state

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    r"""Returns ``p + u`` for every leaf, cast back to the parameter's dtype.

    .. math:: p \leftarrow \mathrm{cast}_{\mathrm{dtype}(p)}(p + u)

    Args:
      params: the parameters; ``None`` leaves (e.g. from a partitioned tree) stay ``None``.
      updates: a tree like ``params`` (the output of a transform's ``update``).

    Returns:
      The new parameters, each leaf in its old dtype.

    Raises:
      ValueError: ``updates`` differs from ``params`` in structure or in a leaf's shape
        (naming the leaf path).
    """
    check_same_tree(updates, params, name="updates", reference_name="params",
                    context="apply_updates")
    return jax.tree.map(
        lambda p, u: None if p is None else jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
        params,
        updates,
        is_leaf=lambda x: x is None,
    )



#: ``update`` function of a transform -> its fused ``update_and_apply`` (weak keys: a
#: transform that is garbage collected leaves no entry behind).
_FUSED_UPDATES: weakref.WeakKeyDictionary[Callable[..., Any], Callable[..., Any]] = (
    weakref.WeakKeyDictionary())


def register_fused_update(update_fn: Callable[..., Any],
                          update_and_apply_fn: Callable[..., Any]) -> None:
    """Registers ``update_and_apply_fn(grads, state, params, **extra_args) -> (new_params,
    new_state)`` as the fused step of the transform whose ``update`` is ``update_fn``; it must
    return what ``update`` followed by :func:`apply_updates` returns.

    ``optstate.quantize_state`` registers its kernel path here; :func:`update_and_apply` looks
    the transform's ``update`` up.
    """
    _FUSED_UPDATES[update_fn] = update_and_apply_fn


def update_and_apply(tx: GradientTransformation, grads: Updates, state: OptState,
                     params: Params, **extra_args: Any) -> tuple[Params, OptState]:
    r"""One optimizer step: ``tx.update`` followed by :func:`apply_updates`, fused where ``tx``
    allows.

    .. math:: (u, S') = \mathrm{tx.update}(g, S, p), \qquad p' = \mathrm{cast}_{\mathrm{dtype}(p)}(p + u)

    The result equals ``apply_updates(params, tx.update(grads, state, params)[0])`` with the
    new state. For ``optstate.quantize_state`` on GPU and TPU, a large parameter's state and
    value are updated by one fused kernel that reads and writes each byte once and may write
    the parameters in place: donate ``params`` and ``state`` to the jitted step
    (``jax.jit(step, donate_argnums=...)``). Any other transform (optstate's or Optax's) runs
    ``update`` and ``apply_updates``.

    Args:
      tx: a gradient transformation.
      grads: the gradients (a tree like ``params``).
      state: ``tx``'s state.
      params: the parameters.
      **extra_args: passed to ``tx.update``.

    Returns:
      ``(new_params, new_state)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> tx = optstate.adamw(1e-2)
      >>> params = {"w": jnp.ones(3)}
      >>> params, state = optstate.update_and_apply(tx, params, tx.init(params), params)
      >>> params["w"]
      Array([0.98999..., 0.98999..., 0.98999...], dtype=float32)
    """
    check_transform(tx, "update_and_apply", name="tx")
    fused = _FUSED_UPDATES.get(getattr(tx, "update", None)) if hasattr(tx, "update") else None
    if fused is not None:
        return fused(grads, state, params, **extra_args)
    update = tx.update if hasattr(tx, "update") else tx[1]
    updates, new_state = update(grads, state, params, **extra_args)
    return apply_updates(params, updates), new_state
