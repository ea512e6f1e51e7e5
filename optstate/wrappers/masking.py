"""``masked``: apply a transform to a selected subset of the leaves, pass the rest through.

The inner transform sees a tree in which every masked-out leaf (or subtree) is replaced by a
``MaskedNode``, an empty pytree node, so it allocates no state for those leaves. The helpers
that split a tree under a prefix tree of bools or labels (:func:`flatten_prefix`) are shared
with :mod:`optstate.wrappers.partition`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from optstate._core.base import GradientTransformation, with_extra_args_support
from optstate._core.checks import check_state, check_transform, describe
from optstate._core.types import MaskOrFn, OptState, Params, PyTree, Updates


class MaskedNode(NamedTuple):
    """Placeholder for a masked-out leaf or subtree.

    It is a pytree node with no children, so ``jax.tree.map`` and every transform skip it
    (no state is allocated and no arithmetic is done for it).
    """


class MaskedState(NamedTuple):
    """State of :func:`masked`: the state of the inner transform over the selected leaves."""

    inner_state: OptState


def _is_placeholder(x: Any) -> bool:
    """Whether ``x`` stands for an absent leaf (``None`` or a :class:`MaskedNode`)."""
    return x is None or isinstance(x, MaskedNode)


def _prefix_mismatch(prefix: Any, tree: Any, tree_name: str) -> str:
    """Describes where ``prefix`` (a mask or label tree) fails to be a prefix of ``tree``."""
    prefix_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(prefix)[0]]
    flat_tree = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_placeholder)[0]
    tree_paths = [p for p, _ in flat_tree]
    for p in prefix_paths:
        if not any(tp[: len(p)] == p for tp in tree_paths):
            return (f"it has a leaf at {jax.tree_util.keystr(p)} where the {tree_name} "
                    f"tree has no entry")
    for tp in tree_paths:
        if not any(tp[: len(p)] == p for p in prefix_paths):
            return (f"the {tree_name} leaf {jax.tree_util.keystr(tp)} has no entry in it")
    return "same paths, different container types"


def flatten_prefix(prefix: PyTree, tree: PyTree, *, prefix_name: str, tree_name: str,
                   context: str) -> tuple[list[tuple[str, Any]], list[Any], Any]:
    """Splits ``tree`` into the subtrees under each leaf of ``prefix``.

    Args:
      prefix: a tree whose structure is a prefix of ``tree``'s (a mask or a label tree).
      tree: the parameters or updates.
      prefix_name, tree_name, context: how the message names the two trees and the caller.

    Returns:
      ``(prefix_leaves, subtrees, prefix_treedef)`` where ``prefix_leaves`` is a list of
      ``(path string, leaf)`` pairs and ``subtrees`` the subtree of ``tree`` under each.

    Raises:
      ValueError: ``prefix`` is not a prefix of ``tree``, naming the first differing path and
        both structures.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(prefix)
    try:
        subtrees = treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        detail = _prefix_mismatch(prefix, tree, tree_name)
        raise ValueError(
            f"{context}: the {prefix_name} tree must have the structure of the {tree_name} tree "
            f"(or of a prefix of it), but {detail}.\n"
            f"  {prefix_name} structure: {treedef}\n"
            f"  {tree_name} structure: {jax.tree.structure(tree, is_leaf=_is_placeholder)}"
        ) from None
    leaves = [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]
    return leaves, subtrees, treedef


def _as_bool(path: str, m: Any, context: str) -> bool:
    """The Python bool of mask leaf ``m`` at ``path``; raises ``TypeError`` if it is not one."""
    if isinstance(m, jax.core.Tracer):
        raise TypeError(
            f"{context}: mask leaf {path} is a traced value; the mask must be static (Python "
            f"or NumPy bools, or concrete arrays), e.g. computed from shapes, not from values."
        )
    if isinstance(m, (bool, np.bool_)):
        return bool(m)
    dtype = getattr(m, "dtype", None)
    if dtype is not None and np.dtype(dtype) == np.bool_ and np.size(m) == 1:
        return bool(np.asarray(m))
    raise TypeError(
        f"{context}: mask leaf {path} must be a bool (True: transform, False: pass through); "
        f"got {type(m).__name__}{'' if dtype is None else f' of dtype {dtype}'}."
    )


def is_mask_function(mask: Any) -> bool:
    """Whether ``mask`` is a function ``params -> mask tree`` rather than a mask tree.

    Optax's rule: it is a function when every leaf of ``mask`` (seen as a pytree) is callable
    and there is at least one. A plain function is a single callable leaf; a callable pytree
    whose leaves are bools (an Equinox-like module defining ``__call__``) is a mask tree, not
    a function, and is never called.
    """
    leaves = jax.tree.leaves(mask)
    return bool(leaves) and all(callable(leaf) for leaf in leaves)


def resolve_mask(mask: MaskOrFn, tree: PyTree) -> PyTree:
    """The mask tree for ``tree``: ``mask(tree)`` if ``mask`` is a mask function (see
    :func:`is_mask_function`), else ``mask``."""
    return mask(tree) if is_mask_function(mask) else mask


def is_params_placeholder(params: Any) -> bool:
    """Whether ``params`` is the placeholder ``optax.tree.map_params`` passes to ``init``.

    ``optax.tree.map_params(tx, f, state)`` calls ``tx.init`` on an empty pytree node (a
    private class of ``optax.tree_utils``) to learn where the parameter-shaped trees sit in
    the state; a mask cannot be applied to it, so :func:`masked` hands it to the inner
    transform unchanged, as Optax's ``masked`` does. Recognised by class name and module, so
    optstate does not import Optax.
    """
    cls = type(params)
    return (cls.__name__ == "_ParamsPlaceholder"
            and cls.__module__.split(".", 1)[0] == "optax")


def split_by_mask(mask_tree: Any, tree: Any, *, tree_name: str, context: str
                  ) -> tuple[list[bool], list[Any], Any]:
    """Checks ``mask_tree`` against ``tree``; returns the bools, the subtrees and the treedef."""
    leaves, subtrees, treedef = flatten_prefix(
        mask_tree, tree, prefix_name="mask", tree_name=tree_name, context=context)
    bools = [_as_bool(path, m, context) for path, m in leaves]
    return bools, subtrees, treedef


def mask_tree_with(bools: list[bool], subtrees: list[Any], treedef: Any) -> Any:
    """Rebuilds the tree with every subtree whose bool is False replaced by ``MaskedNode()``."""
    return treedef.unflatten([s if b else MaskedNode() for b, s in zip(bools, subtrees)])


def masked(inner: GradientTransformation, mask: MaskOrFn) -> GradientTransformation:
    """Applies ``inner`` to the leaves selected by ``mask`` and passes the others through.

    With a boolean mask :math:`m_i` per leaf,

    .. math::

        u_i \\leftarrow \\begin{cases} \\mathrm{inner}(u)_i & m_i = \\text{True} \\\\
                                        u_i & m_i = \\text{False}. \\end{cases}

    ``inner`` sees a tree in which each masked-out leaf or subtree is replaced by a
    :class:`MaskedNode` (an empty pytree node), so it keeps state only for the selected
    leaves. The typical use is to exempt biases and normalisation scales from weight decay
    (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019).

    Args:
      inner: the transform to apply to the selected leaves (optstate's or Optax's).
      mask: a pytree of bools with the structure of the parameters (or of a prefix of it;
        a bool at an inner node selects the whole subtree), or a function
        ``params -> mask`` (called on the parameters in ``init`` and on the updates in
        ``update``). The mask must be static: Python/NumPy bools or concrete arrays. As in
        Optax, ``mask`` is called only when all its pytree leaves are callable (a plain
        function); a callable pytree of bools, such as an Equinox module, is a mask tree.

    Under ``optax.tree.map_params`` (which calls ``init`` on a placeholder instead of
    parameters) ``init`` passes the placeholder to ``inner`` unmasked, as Optax does, so
    ``f`` is mapped over the inner state's parameter-shaped trees; there, masked-out
    leaves are :class:`MaskedNode` (pass ``is_leaf`` to ``map_params`` if ``f`` takes
    extra trees).

    Returns:
      A :class:`GradientTransformation` with state :class:`MaskedState`.

    Raises:
      ValueError: the mask tree is not a prefix of the parameter/update tree (naming the path).
      TypeError: ``inner`` is not a transform, ``mask`` is ``None``, or a mask leaf is not a
        bool (naming the path); at ``update``, a state not made by this transform's ``init``.
    """
    check_transform(inner, "masked", name="inner")
    if mask is None or isinstance(mask, (str, bytes)):
        raise TypeError(
            f"masked: mask must be a tree of bools shaped like the parameters (or a prefix of "
            f"them) or a function params -> such a tree; got {describe(mask)}. To transform "
            f"every leaf, use the inner transform without masked.")
    inner = with_extra_args_support(inner)

    def init(params: Params) -> MaskedState:
        if is_params_placeholder(params):
            return MaskedState(inner_state=inner.init(params))
        bools, subtrees, treedef = split_by_mask(
            resolve_mask(mask, params), params, tree_name="params", context="masked.init")
        return MaskedState(inner_state=inner.init(mask_tree_with(bools, subtrees, treedef)))

    def update(updates: Updates, state: MaskedState, params: Params | None = None,
               **extra_args: Any) -> tuple[Updates, MaskedState]:
        check_state(state, MaskedState, "masked.update")
        mask_tree = resolve_mask(mask, updates)
        bools, subtrees, treedef = split_by_mask(
            mask_tree, updates, tree_name="updates", context="masked.update")
        masked_updates = mask_tree_with(bools, subtrees, treedef)
        masked_params = None
        if params is not None:
            masked_params = mask_tree_with(*split_by_mask(
                mask_tree, params, tree_name="params", context="masked.update"))
        new_masked, new_inner_state = inner.update(
            masked_updates, state.inner_state, masked_params, **extra_args)
        try:
            new_subtrees = treedef.flatten_up_to(new_masked)
        except (ValueError, TypeError):
            raise ValueError(
                "masked.update: the inner transform returned updates whose structure differs "
                f"from its input.\n  expected: {jax.tree.structure(masked_updates)}\n"
                f"  returned: {jax.tree.structure(new_masked)}"
            ) from None
        out = treedef.unflatten(
            [new if b else old for b, new, old in zip(bools, new_subtrees, subtrees)])
        return out, MaskedState(inner_state=new_inner_state)

    return GradientTransformation(init, update)
