"""``partition``: a different transform for each labelled group of parameters.

Each group's transform runs under :func:`~optstate.masked`, so a group keeps state only for
its own leaves, and a frozen group (``set_to_zero()``) keeps none.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, NamedTuple

import jax

from optstate._core.base import GradientTransformation
from optstate._core.checks import check_state, check_transform, describe
from optstate._core.types import OptState, Params, PyTree, Updates
from optstate.wrappers.masking import flatten_prefix, is_params_placeholder, masked

#: A pytree of labels shaped like the parameters (or a prefix of them), or ``params -> labels``.
LabelsOrFn = PyTree | Callable[[Params], PyTree]


class PartitionState(NamedTuple):
    """State of :func:`partition`: ``{label: MaskedState(inner_state)}``, one per group."""

    inner_states: Mapping[Hashable, OptState]


def _labels_for(param_labels: LabelsOrFn, tree: Any, tree_name: str, context: str,
                known: Mapping[Hashable, Any]) -> Any:
    """The label tree for ``tree``, checked: a prefix of ``tree``, every label has a transform."""
    labels = param_labels(tree) if callable(param_labels) else param_labels
    leaves, _, _ = flatten_prefix(labels, tree, prefix_name="labels", tree_name=tree_name,
                                  context=context)
    missing: dict[Any, list[str]] = {}
    for path, label in leaves:
        try:
            ok = label in known
        except TypeError:
            raise TypeError(
                f"{context}: the label at {path} must be hashable (a transform key); "
                f"got {label!r} of type {type(label).__name__}.") from None
        if not ok:
            missing.setdefault(label, []).append(path)
    if missing:
        lines = "; ".join(f"label {lab!r} at {', '.join(paths)}" for lab, paths in missing.items())
        raise ValueError(
            f"{context}: some parameters carry a label with no transform ({lines}). "
            f"Transforms are given for labels {sorted(known, key=repr)}.")
    return labels


def partition(transforms: Mapping[Hashable, GradientTransformation],
              param_labels: LabelsOrFn) -> GradientTransformation:
    """Applies a different transform to each group of parameters.

    With labels :math:`\\ell_i` per leaf and a transform :math:`T_g` per label,

    .. math::

        u_i \\leftarrow T_{\\ell_i}\\big(\\{u_j : \\ell_j = \\ell_i\\}\\big)_i .

    Each group's transform runs under :func:`masked`, so it keeps state only for its own
    leaves. A frozen group, ``set_to_zero()``, holds no state arrays at all; this is the
    parameter-efficient fine-tuning case (e.g. LoRA, Hu et al., ICLR 2022: only the adapters
    carry optimizer state).

    Args:
      transforms: ``{label: transform}``; transforms may be optstate's or Optax's.
      param_labels: a pytree of labels with the structure of the parameters (or a prefix of
        it), or a callable ``params -> labels`` (called on the parameters in ``init`` and on
        the updates in ``update``). Every label must be a key of ``transforms``.

    Returns:
      A :class:`GradientTransformation` with state :class:`PartitionState`. Like
      :func:`masked`, it works under ``optax.tree.map_params``.

    Raises:
      TypeError: ``transforms`` is not a mapping of transforms (naming the label whose value
        is not one), or ``param_labels`` is ``None``; at ``update``, a state not made by this
        transform's ``init``.
      ValueError: a leaf's label has no transform (naming the label and the leaf paths), or
        the label tree is not a prefix of the parameter tree (naming the path).
    """
    if not isinstance(transforms, Mapping):
        raise TypeError(
            f"partition: transforms must be a dict {{label: transform}}, e.g. "
            f"{{'adam': optstate.adam(1e-3), 'frozen': optstate.set_to_zero()}}; got "
            f"{describe(transforms)}.")
    for label, tx in transforms.items():
        check_transform(tx, "partition", name=f"transforms[{label!r}]")
    if param_labels is None:
        raise TypeError(
            "partition: param_labels must be a tree of labels shaped like the parameters (or "
            "a prefix of them) or a function params -> labels; got None.")
    transforms = dict(transforms)

    def group_mask(labels: Any, group: Hashable) -> Any:
        return jax.tree.map(lambda label: label == group, labels)

    def init(params: Params) -> PartitionState:
        if is_params_placeholder(params):
            # optax.tree.map_params: nothing to label; each group's masked init hands the
            # placeholder to its transform, as Optax's partition does.
            return PartitionState(inner_states={
                group: masked(tx, True).init(params) for group, tx in transforms.items()})
        labels = _labels_for(param_labels, params, "params", "partition.init", transforms)
        return PartitionState(inner_states={
            group: masked(tx, group_mask(labels, group)).init(params)
            for group, tx in transforms.items()
        })

    def update(updates: Updates, state: PartitionState, params: Params | None = None,
               **extra_args: Any) -> tuple[Updates, PartitionState]:
        check_state(state, PartitionState, "partition.update")
        labels = _labels_for(param_labels, updates, "updates", "partition.update", transforms)
        if set(state.inner_states) != set(transforms):
            raise ValueError(
                f"partition.update: the state has groups {sorted(state.inner_states, key=repr)}"
                f"; expected {sorted(transforms, key=repr)}.")
        new_states = {}
        for group, tx in transforms.items():
            updates, new_states[group] = masked(tx, group_mask(labels, group)).update(
                updates, state.inner_states[group], params, **extra_args)
        return updates, PartitionState(inner_states=new_states)

    return GradientTransformation(init, update)
