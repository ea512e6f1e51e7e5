"""Inside a jitted train step: lay a tree out as given, whatever the mesh's axis types.

The jit path needs two in-step operations besides the shardings of
:mod:`~optstate.sharding.placement`: gathering stage-3 parameters for the forward pass and
reduce-scattering gradients at stage 2 (Rajbhandari et al., ZeRO, SC 2020). Both are a change
of layout, which an Auto mesh axis takes as a hint (``with_sharding_constraint``) and an
Explicit one only through ``reshard``; :func:`constrain` picks the right one per leaf.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

from optstate._core._compat import explicit_axis_type, mesh_axis_types
from optstate._core.types import PyTree, Updates
from optstate.sharding._rule import axes_of, is_none


def _explicit_axes(mesh: Any) -> frozenset[str]:
    """The names of the Explicit axes of ``mesh`` (none on a JAX without axis types)."""
    explicit = explicit_axis_type()
    if explicit is None:
        return frozenset()
    return frozenset(n for n, t in zip(mesh.axis_names, mesh_axis_types(mesh)) if t == explicit)


def constrain(tree: PyTree, shardings: PyTree) -> PyTree:
    """Constrains ``tree`` (inside ``jit``) to ``shardings``, whatever the mesh's axis types.

    Leaves whose sharding names an Explicit mesh axis (or lives on an all-Explicit mesh) go
    through ``jax.sharding.reshard``, the only way to change an Explicit sharding; the others
    through ``jax.lax.with_sharding_constraint``. Outside ``jit`` both move concrete arrays.
    The ZeRO recipes (Rajbhandari et al., SC 2020) use it to reduce-scatter gradients
    (stage 2) and to all-gather stage-3 parameters for the forward pass::

        full = constrain(params, param_shardings(params, mesh, stage=0))

    Args:
      tree: a pytree of arrays.
      shardings: a pytree of ``NamedSharding`` with the structure of ``tree``.

    Returns:
      ``tree`` with every leaf laid out as its sharding says.
    """

    def one(x: Any, sharding: NamedSharding) -> Any:
        if x is None:
            return None
        explicit = _explicit_axes(sharding.mesh)
        used = {a for e in sharding.spec for a in axes_of(e)}
        if explicit and (used & explicit or explicit == set(sharding.mesh.axis_names)):
            return jax.sharding.reshard(x, sharding)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(one, tree, shardings, is_leaf=is_none)


def reduce_scatter_gradients(grads: Updates, shardings: PyTree) -> Updates:
    """ZeRO stage 2: reduce-scatter the data-parallel gradients instead of all-reducing them.

    Inside a ``jit``-ed train step whose batch is sharded over the data axis, the gradient of
    the mean loss is a sum over devices, :math:`g = \\frac1N\\sum_i g_i`. Constraining it to
    ``grad_shardings(params, mesh, stage=2)`` tells XLA that device :math:`i` needs only its
    shard :math:`g^{(i)}`, so the all-reduce becomes a reduce-scatter and each device keeps
    :math:`G/N` gradient bytes (Rajbhandari et al., ZeRO, SC 2020). On GPU and TPU XLA emits
    a ``reduce-scatter``; the CPU backend may lower it as all-reduce plus slice.

    Usage (inside the jitted step)::

        grads = jax.grad(loss)(params, batch)
        grads = reduce_scatter_gradients(grads, grad_sh)   # grad_sh = grad_shardings(...)
        updates, state = tx.update(grads, state, params)

    Args:
      grads: the gradients, with the structure of the parameters.
      shardings: ``grad_shardings(params, mesh, stage=2, axis=...)``.

    Returns:
      The gradients, sharded over the data axis.
    """
    return constrain(grads, shardings)
