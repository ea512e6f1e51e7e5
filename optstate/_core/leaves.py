"""The one view of a state leaf: Flax boxes, path names and the NamedTuple field that holds a leaf.

Every package that walks a state tree (quantization, staleness, resets, sharding) asks the same
questions of it: is this node a Flax ``Variable`` boxing one array (``nnx.Optimizer`` calls
``init`` on boxed parameters), what is the array inside, what is a leaf's path called, and which
NamedTuple field (``mu``, ``nu``, ``count``...) holds it. The answers live here, once.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import jax

from optstate._core.types import PyTree

IsLeaf = Callable[[Any], bool]


def is_boxed(x: Any) -> bool:
    """Whether ``x`` is a Flax ``Variable`` (a pytree node boxing one value).

    Detected by class name and module so that Flax is never imported (it is optional)."""
    return any(c.__name__ == "Variable" and c.__module__.startswith("flax")
               for c in type(x).__mro__)


def unbox(x: Any) -> Any:
    """The value inside a Flax ``Variable``; ``x`` itself otherwise."""
    if not is_boxed(x):
        return x
    return x.get_value() if hasattr(x, "get_value") else x.value


def is_namedtuple(x: Any) -> bool:
    """Whether ``x`` is a NamedTuple instance (a transform's state record)."""
    return isinstance(x, tuple) and hasattr(x, "_fields")


def key_name(key: Any) -> Hashable:
    """The plain name of one path entry: a dict key, an attribute name or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def path_names(path: Sequence[Any]) -> tuple[Hashable, ...]:
    """The plain names along a key path, e.g. ``(0, 'mu', 'w')`` for ``[0].mu['w']``."""
    return tuple(key_name(k) for k in path)


def path_str(path: Sequence[Any]) -> str:
    """A key path as ``jax.tree_util.keystr`` writes it (``[0].mu['w']``): the form used in
    every error message and in ``keep=`` patterns."""
    return jax.tree_util.keystr(tuple(path))


def field_names(path: Sequence[Any]) -> set[str]:
    """The NamedTuple field names and string dict keys along ``path`` (``{'mu', 'w'}``)."""
    names = set()
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            names.add(key.name)
        elif isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            names.add(key.key)
    return names


def leaves_with_paths(tree: PyTree, is_leaf: IsLeaf | None = None) -> list[tuple[tuple, Any]]:
    """``(path, leaf)`` pairs of ``tree``, with Flax boxes (and whatever ``is_leaf`` accepts,
    e.g. quantized arrays) kept whole as leaves."""
    def leaf(x):
        return is_boxed(x) or (is_leaf is not None and is_leaf(x))

    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)[0]


def field_labels(tree: PyTree, is_leaf: IsLeaf | None = None) -> list[str | None]:
    """For each leaf of ``tree`` in :func:`leaves_with_paths` order, the name of the innermost
    NamedTuple field that holds it (``"nu"`` for ``ScaleByAdamState.nu``, whatever the
    parameter tree below it looks like), or ``None`` outside any NamedTuple."""
    def leaf(x):
        return is_boxed(x) or (is_leaf is not None and is_leaf(x))

    out: list[str | None] = []

    def visit(node: Any, field: str | None) -> None:
        if leaf(node):
            out.append(field)
            return
        if is_namedtuple(node):
            for name in node._fields:
                visit(getattr(node, name), name)
            return
        children = jax.tree_util.tree_flatten(
            node, is_leaf=lambda x: x is not node and (is_namedtuple(x) or leaf(x)))[0]
        if len(children) == 1 and children[0] is node:
            out.append(field)
            return
        for child in children:
            if is_namedtuple(child) or leaf(child):
                visit(child, field)
            else:
                out.append(field)

    visit(tree, None)
    return out
