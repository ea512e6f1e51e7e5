"""Structure checks that turn a mismatched gradient tree into an error naming the leaf path.

All checks read only static information (tree structure, shapes, dtypes), so they cost
nothing under ``jit`` and run once per trace.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_is_none = lambda x: x is None  # noqa: E731


def leaf_paths(tree: Any) -> list[str]:
    """The ``jax.tree_util.keystr`` path of every leaf of ``tree`` (``None`` counts as a leaf)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [jax.tree_util.keystr(path) for path, _ in leaves]


def _first_difference(given: list[str], expected: list[str]) -> str:
    """Describes the first place two lists of leaf paths part (for error messages)."""
    for g, e in zip(given, expected):
        if g != e:
            return f"first difference: leaf {g!r} where {e!r} was expected"
    if len(given) > len(expected):
        return f"extra leaf at {given[len(expected)]!r}"
    if len(expected) > len(given):
        return f"missing leaf at {expected[len(given)]!r}"
    return "same leaf paths, different container types"


def check_same_tree(tree: Any, reference: Any, *, name: str = "updates",
                    reference_name: str = "params", context: str = "") -> None:
    """Raises if ``tree`` and ``reference`` differ in structure or in any leaf's shape.

    Args:
      tree: the tree to check (e.g. the updates).
      reference: the tree it must match (e.g. the parameters or a state field).
      name, reference_name: how the two trees are called in the message.
      context: the transform's name, prefixed to the message.

    Raises:
      ValueError: the structures differ (naming the first differing path and both
        structures), or a leaf's shape differs (naming the leaf path and both shapes).
    """
    where = f"{context}: " if context else ""
    tree_def = jax.tree.structure(tree, is_leaf=_is_none)
    ref_def = jax.tree.structure(reference, is_leaf=_is_none)
    if tree_def != ref_def:
        detail = _first_difference(leaf_paths(tree), leaf_paths(reference))
        raise ValueError(
            f"{where}the {name} tree does not match the {reference_name} tree ({detail}).\n"
            f"  expected structure: {ref_def}\n  given structure:    {tree_def}"
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    ref_flat = jax.tree.leaves(reference, is_leaf=_is_none)
    for (path, leaf), ref in zip(flat, ref_flat):
        if leaf is None or ref is None:
            continue
        if jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"{where}leaf {jax.tree_util.keystr(path)} of {name} has shape {jnp.shape(leaf)}; "
                f"expected {jnp.shape(ref)} as in {reference_name}."
            )


def check_floating(tree: Any, *, name: str = "updates", context: str = "") -> None:
    """Raises ``TypeError`` naming the first leaf of ``tree`` whose dtype is not floating.

    Args:
      tree: the tree to check; ``name`` and ``context`` are used in the message.
    """
    where = f"{context}: " if context else ""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{where}leaf {jax.tree_util.keystr(path)} of {name} has dtype {dtype}; "
                f"expected a floating dtype (e.g. float32 or bfloat16)."
            )


def check_updates(updates: Any, reference: Any, *, reference_name: str, context: str) -> None:
    """Both checks above: ``updates`` matches ``reference`` leaf by leaf and is floating."""
    check_same_tree(updates, reference, name="updates", reference_name=reference_name,
                    context=context)
    check_floating(updates, name="updates", context=context)
