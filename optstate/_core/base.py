"""The gradient-transformation protocol: ``init``/``update`` pairs over pytree state.

The shapes of these objects match Optax's exactly, so that ``flax.nnx.Optimizer``, Linen's
``TrainState``, Equinox and Optax's own combinators accept optstate transforms unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from optstate._core.tree_checks import check_same_tree

PyTree = Any
Params = PyTree
Updates = PyTree
OptState = PyTree
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]
Schedule = Callable[[jax.Array], jax.Array]


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
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


def _accepts_extra_args(update_fn: Callable[..., Any]) -> bool:
    try:
        signature = inspect.signature(update_fn)
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def with_extra_args_support(tx: GradientTransformation) -> GradientTransformation:
    """Wraps ``tx`` (optstate's or a foreign one, e.g. Optax's) so that its ``update``
    accepts and ignores keyword arguments it does not declare."""
    if _accepts_extra_args(tx.update):
        return GradientTransformation(tx.init, tx.update)

    def update(updates, state, params=None, **extra_args):
        del extra_args
        return tx.update(updates, state, params)

    return GradientTransformation(tx.init, update)


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged: ``u <- u``."""

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, state

    return GradientTransformation(init, update)


def set_to_zero() -> GradientTransformation:
    """The transform that zeroes its updates, ``u <- 0`` (freezes parameters)."""

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return jax.tree.map(jnp.zeros_like, updates), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in sequence: ``u <- t_n(...t_2(t_1(u)))``.

    The state is a tuple with one entry per transform. Keyword arguments reach every
    transform; foreign transforms (Optax's) that do not accept them are wrapped.
    """
    wrapped = tuple(with_extra_args_support(t) for t in transforms)

    def init(params):
        return tuple(t.init(params) for t in wrapped)

    def update(updates, state, params=None, **extra_args):
        if len(state) != len(wrapped):
            raise ValueError(
                f"chain: expected a state tuple of {len(wrapped)} entries (one per transform), "
                f"got {len(state)}."
            )
        new_state = []
        for t, s in zip(wrapped, state):
            updates, s = t.update(updates, s, params, **extra_args)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def named_chain(*named_transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with the state a dict keyed by the given names."""
    names = [name for name, _ in named_transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: names must be unique, got {names}.")
    wrapped = tuple((name, with_extra_args_support(t)) for name, t in named_transforms)

    def init(params):
        return {name: t.init(params) for name, t in wrapped}

    def update(updates, state, params=None, **extra_args):
        new_state = {}
        for name, t in wrapped:
            if name not in state:
                raise ValueError(f"named_chain: state has no entry {name!r}; expected keys {names}.")
            updates, new_state[name] = t.update(updates, state[name], params, **extra_args)
        return updates, new_state

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``p + u`` for every leaf, cast back to the parameter's dtype.

    ``None`` parameters (e.g. from a partitioned tree) are kept as ``None``.
    """
    check_same_tree(updates, params, name="updates", reference_name="params",
                    context="apply_updates")
    return jax.tree.map(
        lambda p, u: None if p is None else jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
        params,
        updates,
        is_leaf=lambda x: x is None,
    )

