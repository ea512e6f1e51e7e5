"""The inner update of the fused kernel, read off its jaxpr and cut in two.

The kernel (:mod:`.kernel`) runs ``inner.update`` on tiles. Its jaxpr is cut into the
equations whose inputs are all scalars (bias corrections, schedules, step counts), which run
once outside the kernel, and the rest, restricted to what the outputs need, which runs on each
tile: Mosaic TPU lowers no ``pow`` of an integer step count, Triton would redo scalar work per
tile, and work on other parameters' placeholder tiles is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def _is_literal(v: Any) -> bool:
    return isinstance(v, jex_core.Literal)


def _rank(v: Any) -> int:
    return len(getattr(getattr(v, "aval", None), "shape", ()))


def _bind(eqn: Any, values: list[Any]) -> list[Any]:
    out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


class Program:
    """A function of ``(scalars, tiles)`` read off its jaxpr and cut in two: equations whose
    inputs are all scalars (bias corrections, schedules, step counts) run once, outside the
    kernel (:meth:`scalars`); the rest, restricted to what the outputs need, runs on each tile
    (:meth:`tiles`). Mosaic TPU lowers no integer ``pow`` and Triton pays per tile for scalar
    work, so neither sees it; dead work on other parameters' placeholder tiles is dropped."""

    def __init__(self, fn: Callable[..., Any], scalar_avals: list[Any], tile_avals: list[Any]):
        closed = jax.make_jaxpr(fn)(scalar_avals, tile_avals)
        jaxpr = closed.jaxpr
        self.jaxpr, self.consts = jaxpr, list(closed.consts)
        n_s = len(scalar_avals)
        self.scalar_in, self.tile_in = list(jaxpr.invars[:n_s]), list(jaxpr.invars[n_s:])
        known = set(self.scalar_in)
        for v, c in zip(jaxpr.constvars, self.consts):
            if len(np.shape(c)):
                raise ValueError("the update captures an array constant")
            known.add(v)
        outer, inner = [], []
        for eqn in jaxpr.eqns:
            ins_known = all(_is_literal(v) or v in known for v in eqn.invars)
            if ins_known and all(_rank(v) == 0 for v in eqn.outvars) and not eqn.effects:
                outer.append(eqn)
                known.update(eqn.outvars)
            else:
                inner.append(eqn)
        live = {v for v in jaxpr.outvars if not _is_literal(v)}
        needed = []
        for eqn in reversed(inner):
            if any(v in live for v in eqn.outvars):
                needed.append(eqn)
                live.update(v for v in eqn.invars if not _is_literal(v))
        self.inner = needed[::-1]
        self.carried = [v for v in list(jaxpr.constvars) + self.scalar_in +
                        [v for e in outer for v in e.outvars] if v in live]
        self.outer = outer

    def tile_primitives(self) -> set[str]:
        """The names of the primitives the tile work binds, nested calls included."""
        names: set[str] = set()

        def visit(eqns: list[Any]) -> None:
            for eqn in eqns:
                names.add(eqn.primitive.name)
                for value in eqn.params.values():
                    for sub in value if isinstance(value, (tuple, list)) else (value,):
                        inner = getattr(sub, "jaxpr", sub)
                        if hasattr(inner, "eqns"):
                            visit(inner.eqns)

        visit(self.inner)
        return names

    def scalars(self, values: list[Any]) -> list[jax.Array]:
        """The scalars the tile work reads, computed from the scalar inputs ``values``."""
        env: dict[Any, Any] = dict(zip(self.jaxpr.constvars, self.consts))
        env.update(zip(self.scalar_in, values))
        for eqn in self.outer:
            ins = [v.val if _is_literal(v) else env[v] for v in eqn.invars]
            env.update(zip(eqn.outvars, _bind(eqn, ins)))
        return [jnp.asarray(env[v]) for v in self.carried]

    def tiles(self, carried: list[Any], tiles: list[jax.Array]) -> list[jax.Array]:
        """The outputs on one set of tiles, given :meth:`scalars`' values."""
        env: dict[Any, Any] = dict(zip(self.carried, carried))
        env.update(zip(self.tile_in, tiles))
        for eqn in self.inner:
            ins = [v.val if _is_literal(v) else env[v] for v in eqn.invars]
            env.update(zip(eqn.outvars, _bind(eqn, ins)))
        return [v.val if _is_literal(v) else env[v] for v in self.jaxpr.outvars]
