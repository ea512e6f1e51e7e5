r"""Which state leaves are running sums, read off the linearized update.

A state leaf :math:`s` is a *running sum* when its new value is the old one plus something,
with no decay: :math:`s' = s + f(g, \ldots)` (Adagrad's ``sum_of_squares``, SM3's
accumulators, Yogi's additive second moment, a gradient accumulator, schedule-free's ``z``),
possibly reset to zero at some steps (``s' = \text{select}(c, 0, s + f)``). Nearest rounding
stalls such a leaf for good once its increments fall under half a grid step of the stored
value, which happens as the sum grows: unlike an EMA, nothing pulls it back. Stored with
nearest rounding on a coarse grid it stops growing; stochastic rounding keeps it unbiased
(:math:`E[Q(s + f)] = s + f`), float32 keeps it exact.

The test is on the derivative, not on names: linearize the update with respect to the
floating state leaves and read the linear map's diagonal. A leaf is a running sum when the
tangent of its new value is its own tangent, unscaled, plus (optionally) terms from *other*
leaves, or such a value and zero chosen by a select (a reset). Everything else — a
multiplication by a decay (EMAs: Adam's ``mu`` and ``nu``), a ``max`` (AMSGrad), any
primitive not listed here — is "not a running sum", the safe answer: the leaf keeps the
wrapper's rounding.

Nothing is executed: the update is traced on abstract values (``jax.ShapeDtypeStruct``), so
the answer depends only on shapes and dtypes and is the same in ``init``, ``update`` and
``jax.eval_shape``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core

# Each variable of the linear map carries ``{input index: kind}`` over the inputs its
# tangent depends on; an empty map is zero. Kinds: ``1.0`` (the input itself, coefficient
# exactly 1) or another float (the input times that known constant), ``_SEL`` (the input or
# zero, chosen elementwise by a select: a reset), ``_OTHER`` (anything else: a coefficient
# that is not a known constant, a mix, an unknown primitive).
_SEL = "select"
_OTHER = "other"

# Primitives whose output's tangent is their (only) array operand's, unscaled.
_PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                           "optimization_barrier", "pvary"})
_SUB_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
#: Scalar residuals are folded to constants only through this many equations.
_FOLD_DEPTH = 64

Coeffs = dict


class _Unknown(Exception):
    """A residual that depends on the inputs (or is too large to fold)."""


def _open(j: Any) -> tuple[Any, Sequence[Any]]:
    if hasattr(j, "jaxpr") and hasattr(j, "consts"):
        return j.jaxpr, j.consts
    return j, ()


def _other(*maps: Coeffs) -> Coeffs:
    return {k: _OTHER for m in maps for k in m}


def _scaled(m: Coeffs, factor: float | None) -> Coeffs:
    if factor is None:
        return _other(m)
    return {k: kind * factor if isinstance(kind, float) else _OTHER for k, kind in m.items()}


def _add(a: Coeffs, b: Coeffs) -> Coeffs:
    out = dict(a)
    for k, kind in b.items():
        out[k] = _OTHER if k in out else kind
    return out


def _select(cases: Sequence[Coeffs]) -> Coeffs:
    out: Coeffs = {}
    for k in set().union(*cases):
        kinds = [case.get(k) for case in cases]
        if any(kind == _OTHER for kind in kinds):
            out[k] = _OTHER
        elif all(kind == 1.0 for kind in kinds):
            out[k] = 1.0
        elif all(kind is None or kind in (1.0, _SEL) for kind in kinds):
            out[k] = _SEL  # the input itself, or zero (a reset)
        elif len(set(kinds)) == 1:
            out[k] = kinds[0]
        else:
            out[k] = _OTHER
    return out


def _propagate(jaxpr: Any, in_maps: Sequence[Coeffs], known: dict[Any, float]
               ) -> list[Coeffs]:
    """Coefficient maps of ``jaxpr``'s outputs. Its constvars are residuals (primal values):
    as a term they can only be zeros instantiated by the linearization (the map is linear);
    as a factor, ``known`` gives the value of those that fold to a scalar constant."""
    env: dict[Any, Coeffs] = {v: {} for v in jaxpr.constvars}
    env.update(zip(jaxpr.invars, in_maps))

    def read(v: Any) -> Coeffs:
        return {} if isinstance(v, jex_core.Literal) else env.get(v, {})

    def factor(v: Any) -> float | None:
        if isinstance(v, jex_core.Literal):
            value = np.asarray(v.val)
            return float(value) if value.size == 1 else None
        return known.get(v)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        sub = next((eqn.params[p] for p in _SUB_JAXPR_PARAMS if p in eqn.params
                    and hasattr(_open(eqn.params[p])[0], "eqns")), None)
        if sub is not None and len(_open(sub)[0].invars) == len(ins):
            inner = _open(sub)[0]
            inner_known = {iv: known[ov] for iv, ov in zip(inner.invars, eqn.invars)
                           if not isinstance(ov, jex_core.Literal) and ov in known}
            outs = _propagate(inner, ins, inner_known)
        elif name == "cond":
            branches = [_propagate(_open(b)[0], ins[1:], {}) for b in eqn.params["branches"]]
            outs = [_select(list(per_out)) for per_out in zip(*branches)]
        elif name in _PASS_THROUGH and len(ins) == 1:
            outs = [ins[0]] * len(eqn.outvars)
        elif name in ("add_any", "add"):
            outs = [_add(ins[0], ins[1])]
        elif name == "sub":
            outs = [_add(ins[0], _scaled(ins[1], -1.0))]
        elif name == "neg":
            outs = [_scaled(ins[0], -1.0)]
        elif name == "select_n":
            outs = [_select(ins[1:])]
        elif name == "mul" and not (ins[0] and ins[1]):
            tangent, other = (ins[0], eqn.invars[1]) if ins[0] else (ins[1], eqn.invars[0])
            outs = [_scaled(tangent, factor(other))]
        elif name == "div" and not ins[1]:
            d = factor(eqn.invars[1])
            outs = [_scaled(ins[0], None if not d else 1.0 / d)]
        else:
            outs = [_other(*ins)] * len(eqn.outvars)
        for v, m in zip(eqn.outvars, outs):
            env[v] = m
    return [read(v) for v in jaxpr.outvars]


def _fold(jaxpr: Any, consts: Sequence[Any], targets: Sequence[Any]) -> list[float | None]:
    """The values of the scalar ``targets`` (variables or literals of ``jaxpr``) that do not
    depend on its inputs, computed from the equations that produce them (``None`` for the
    others)."""
    producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    values: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))

    def value(v: Any, depth: int) -> Any:
        if isinstance(v, jex_core.Literal):
            return np.asarray(v.val)
        if v in values:
            return values[v]
        eqn = producer.get(v)
        if eqn is None or depth > _FOLD_DEPTH or any(
                np.size(getattr(getattr(x, "aval", None), "shape", ())) and
                int(np.prod(x.aval.shape)) > 1 for x in eqn.invars):
            raise _Unknown
        args = [value(x, depth + 1) for x in eqn.invars]
        outs = eqn.primitive.bind(*args, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        for ov, o in zip(eqn.outvars, outs):
            values[ov] = np.asarray(o)
        return values[v]

    out = []
    for t in targets:
        try:
            val = np.asarray(value(t, 0))
            out.append(float(val.reshape(())) if val.size == 1 and np.isrealobj(val) else None)
        except Exception:  # noqa: BLE001 - anything unfoldable is simply unknown
            out.append(None)
    return out


def self_coefficients(update: Callable[..., Any], updates: Any, state: Any, params: Any,
                      extra_args: dict[str, Any], candidates: Sequence[int]
                      ) -> dict[int, float | str | None]:
    r"""For each leaf index (into ``jax.tree.leaves(state)``) in ``candidates``, how its new
    value depends on its old one in ``update``: :math:`\partial s'_i / \partial s_i`
    elementwise, as

    * ``1.0``: a running sum, :math:`s' = s + f` (with no decay);
    * ``"select"``: a running sum that a select resets to zero at some steps;
    * another float :math:`c`: :math:`s' = c\, s + f` with :math:`c` a known constant (an
      EMA with decay :math:`c`);
    * ``None``: anything else (a step-dependent or data-dependent coefficient, a primitive
      this analysis does not follow, or an update that cannot be linearized).

    ``updates``, ``state`` and ``params`` may be ``jax.ShapeDtypeStruct`` pytrees; nothing
    large is executed (only scalar constants are folded).
    """
    candidates = list(candidates)
    if not candidates:
        return {}
    u_leaves, u_def = jax.tree.flatten(updates)
    s_leaves, s_def = jax.tree.flatten(state)
    p_leaves, p_def = (None, None) if params is None else jax.tree.flatten(params)
    abstract = lambda xs: [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]  # noqa: E731
    linear: list[Any] = []

    def traced(u, s, p):
        s = list(s)

        def new_candidates(*cand):
            full = list(s)
            for i, c in zip(candidates, cand):
                full[i] = c
            _, new_state = update(u_def.unflatten(u), s_def.unflatten(full),
                                  None if p_def is None else p_def.unflatten(p), **extra_args)
            new = jax.tree.leaves(new_state)
            return [new[i] for i in candidates]

        primals = [s[i] for i in candidates]
        _, lin = jax.linearize(new_candidates, *primals)
        closed = jax.make_jaxpr(lin)(*primals)
        linear.append(closed)
        # the residuals that are scalars: returned so that the outer jaxpr shows how each
        # is computed, and those computed from constants alone can be folded
        return [c for c in closed.consts if np.size(getattr(c, "shape", ())) <= 1]

    try:
        outer = jax.make_jaxpr(traced)(abstract(u_leaves), abstract(s_leaves),
                                       None if p_leaves is None else abstract(p_leaves))
        closed = linear[0]
        scalar_vars = [v for v, c in zip(closed.jaxpr.constvars, closed.consts)
                       if np.size(getattr(c, "shape", ())) <= 1]
        folded = _fold(outer.jaxpr, outer.consts, outer.jaxpr.outvars)
        known = {v: f for v, f in zip(scalar_vars, folded) if f is not None}
        maps = _propagate(closed.jaxpr, [{k: 1.0} for k in range(len(candidates))], known)
    except Exception:  # noqa: BLE001 - not linearizable: nothing is known
        return {i: None for i in candidates}
    out: dict[int, float | str | None] = {}
    for k, i in enumerate(candidates):
        kind = maps[k].get(k) if k < len(maps) else _OTHER
        out[i] = None if kind in (None, _OTHER) else kind
    return out


def is_running_sum(coefficient: float | str | None) -> bool:
    """Whether a :func:`self_coefficients` entry is a running sum (no decay)."""
    return coefficient == 1.0 or coefficient == _SEL
