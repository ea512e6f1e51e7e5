"""Which parts of a transform's update are elementwise, read off its jaxpr.

``quantize_state`` bounds the temporaries of a step by running the inner update on row
chunks of one parameter at a time. That is only correct when every output element depends on
the same element of the inputs of *one* parameter (plus scalars such as the step count):
Adam, AdamW, RMSProp, Adagrad, Lion, momentum, weight decay, scaling by a schedule. It is wrong
for clipping by the global norm, LAMB's trust ratio, Adafactor's factored statistics or a
finiteness check over the whole tree.

:func:`elementwise_owners` traces the update once (abstractly) and propagates labels through
the jaxpr: every array input is labelled by the parameter it belongs to (gradient and
parameter leaf ``k``) or by its own state-leaf index; elementwise primitives union the labels
of their array operands; scalars (rank 0) carry no label and may depend on anything rank 0.
Any primitive that moves data between elements (reductions, reshapes, dot products, gathers,
iota, random bits of an array shape, loops over arrays, array constants) makes the analysis
give up. Finally a union-find merges each output with its input position; the update is
separable when no class holds two parameters, and the owner of each state leaf is the
parameter of its class.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.extend import core as jex_core

_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "bitcast_convert_type", "cbrt",
    "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq",
    "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "lgamma", "digamma", "log", "log1p", "logistic", "lt",
    "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision",
    "rem", "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor",
    "stop_gradient", "optimization_barrier",
})

_SUB_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class NotElementwise(Exception):
    """The update mixes elements (or parameters); the reason says which primitive."""


Label = frozenset | None  # None: a scalar (rank 0); else the atoms the array depends on


def _rank(v: Any) -> int:
    aval = getattr(v, "aval", None)
    shape = getattr(aval, "shape", ())
    return len(shape)


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(getattr(getattr(v, "aval", None), "shape", ()))


def _open(j: Any) -> tuple[Any, Sequence[Any]]:
    """(open jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
    if hasattr(j, "jaxpr") and hasattr(j, "consts"):
        return j.jaxpr, j.consts
    return j, ()


def _const_label(c: Any) -> Label:
    if len(getattr(c, "shape", ())) > 0:
        raise NotElementwise("an array constant captured by the update")
    return None


def _propagate(jaxpr: Any, consts: Sequence[Any], in_labels: Sequence[Label]) -> list[Label]:
    env: dict[Any, Label] = {}

    def read(v: Any) -> Label:
        if isinstance(v, jex_core.Literal):
            if len(getattr(v.aval, "shape", ())) > 0:
                raise NotElementwise("an array literal")
            return None
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = _const_label(c)
    for v in jaxpr.constvars[len(consts):]:
        if _rank(v) > 0:
            raise NotElementwise("an array constant")
        env[v] = None
    for v, label in zip(jaxpr.invars, in_labels):
        env[v] = label
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        array_ins = [(v, lab) for v, lab in zip(eqn.invars, ins) if _rank(v) > 0]
        scalar_outs = all(_rank(v) == 0 for v in eqn.outvars)
        name = eqn.primitive.name
        if not array_ins and scalar_outs:
            outs: list[Label] = [None] * len(eqn.outvars)
        else:
            sub = next((eqn.params[p] for p in _SUB_JAXPR_PARAMS if p in eqn.params
                        and hasattr(_open(eqn.params[p])[0], "eqns")), None)
            if sub is not None:
                sub_jaxpr, sub_consts = _open(sub)
                if len(sub_jaxpr.invars) != len(ins):
                    raise NotElementwise(f"{name} with an unexpected signature")
                outs = _propagate(sub_jaxpr, sub_consts, ins)
            elif name == "cond":
                if _rank(eqn.invars[0]) > 0:
                    raise NotElementwise("cond on an array predicate")
                outs_per_branch = []
                for branch in eqn.params["branches"]:
                    b_jaxpr, b_consts = _open(branch)
                    outs_per_branch.append(_propagate(b_jaxpr, b_consts, ins[1:]))
                outs = []
                for labels in zip(*outs_per_branch):
                    arrays = [lab for lab in labels if lab is not None]
                    outs.append(frozenset().union(*arrays) if arrays else None)
            elif name in _ELEMENTWISE:
                out_shape = _shape(eqn.outvars[0])
                for v, _ in array_ins:
                    if _shape(v) != out_shape:
                        raise NotElementwise(f"{name} broadcasting {_shape(v)} to {out_shape}")
                outs = [frozenset().union(*[lab for _, lab in array_ins])] * len(eqn.outvars)
            elif name == "broadcast_in_dim" and _rank(eqn.invars[0]) == 0:
                outs = [frozenset()]
            else:
                raise NotElementwise(f"primitive {name!r}")
        for v, lab in zip(eqn.outvars, outs):
            env[v] = None if _rank(v) == 0 else (lab if lab is not None else frozenset())
    return [read(v) for v in jaxpr.outvars]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, a: Any) -> Any:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


class Analysis(NamedTuple):
    """What :func:`elementwise_owners` found.

    Attributes:
      owners: for each leaf of the state (flattened), the index of the parameter leaf whose
        elements it follows element by element, or ``None`` for scalars and state that no
        parameter's update reads; ``None`` as a whole when the update is not separable.
      reason: why the update is not separable (``None`` when it is).
    """

    owners: list[int | None] | None
    reason: str | None = None


def elementwise_owners(update: Callable[..., Any], updates: Any, state: Any, params: Any,
                       extra_args: dict[str, Any]) -> Analysis:
    """Whether ``update`` is separable per parameter and per element, and which parameter each
    state leaf follows (see :class:`Analysis`).

    ``updates``, ``state`` and ``params`` may hold ``jax.ShapeDtypeStruct`` leaves; nothing is
    executed.
    """
    u_leaves, u_def = jax.tree.flatten(updates)
    s_leaves, s_def = jax.tree.flatten(state)
    p_leaves, p_def = (None, None) if params is None else jax.tree.flatten(params)
    if p_leaves is not None and (len(p_leaves) != len(u_leaves) or any(
            tuple(p.shape) != tuple(u.shape) for p, u in zip(p_leaves, u_leaves))):
        return Analysis(None, "the params tree does not match the updates leaf by leaf")
    n_u, n_s = len(u_leaves), len(s_leaves)

    def flat_fn(*leaves):
        u = u_def.unflatten(leaves[:n_u])
        s = s_def.unflatten(leaves[n_u:n_u + n_s])
        p = None if p_def is None else p_def.unflatten(leaves[n_u + n_s:])
        new_u, new_s = update(u, s, p, **extra_args)
        return jax.tree.leaves(new_u), jax.tree.leaves(new_s)

    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in
             u_leaves + s_leaves + ([] if p_leaves is None else p_leaves)]
    try:
        closed, out_shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
    except Exception as error:  # noqa: BLE001 - any failure only means "not analysed"
        # A transform that cannot be traced on abstract values (e.g. it reads a concrete value)
        # still runs on the whole-tree path, where a genuine error surfaces as itself.
        return Analysis(None, f"its update could not be traced abstractly "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    out_u, out_s = out_shapes
    if len(out_u) != n_u or len(out_s) != n_s:
        return Analysis(None, "its update changes the number of update or state leaves")
    if any(tuple(a.shape) != tuple(b.shape) for a, b in zip(out_u, u_leaves)):
        return Analysis(None, "its update changes the shape of an update leaf")
    if any(tuple(a.shape) != tuple(b.shape) for a, b in zip(out_s, s_leaves)):
        return Analysis(None, "its update changes the shape of a state leaf")

    in_labels: list[Label] = []
    for k, x in enumerate(u_leaves):
        in_labels.append(frozenset({("p", k)}) if len(x.shape) else None)
    for s, x in enumerate(s_leaves):
        in_labels.append(frozenset({("s", s)}) if len(x.shape) else None)
    for k, x in enumerate(p_leaves or []):
        in_labels.append(frozenset({("p", k)}) if len(x.shape) else None)
    try:
        out_labels = _propagate(closed.jaxpr, closed.consts, in_labels)
    except NotElementwise as error:
        return Analysis(None, f"its update mixes elements ({error})")

    uf = _UnionFind()
    for k, lab in enumerate(out_labels[:n_u]):
        for atom in lab or ():
            uf.union(("p", k), atom)
    for s, lab in enumerate(out_labels[n_u:]):
        if len(s_leaves[s].shape):
            uf.find(("s", s))
        for atom in lab or ():
            uf.union(("s", s), atom)
    owner_of_class: dict[Any, int] = {}
    for k, x in enumerate(u_leaves):
        if not len(x.shape):
            continue
        root = uf.find(("p", k))
        if root in owner_of_class and owner_of_class[root] != k:
            return Analysis(None, "its update mixes the state of two parameters")
        owner_of_class[root] = k
    owners: list[int | None] = []
    for s, x in enumerate(s_leaves):
        if not len(x.shape):
            owners.append(None)
            continue
        k = owner_of_class.get(uf.find(("s", s)))
        if k is not None and tuple(x.shape) != tuple(u_leaves[k].shape):
            return Analysis(None, "a state leaf follows a parameter of another shape")
        owners.append(k)
    return Analysis(owners)
