r"""``compensated_params``: low-precision (bf16, fp16) parameters that train like float32 ones.

In mixed-precision training the float32 master copy of the parameters is optimizer state too.
A model simply cast to bf16 loses every update smaller than half a bf16 step (the weight
*stalls*, as a quantized EMA does). This wrapper keeps, per parameter, what the low-precision
copy cannot hold: the rounding residual on a linear int8 or int16 grid in units of the
parameter's ulp, a bf16 (Kahan) compensation, or nothing at all with stochastic rounding.

Each step reconstructs the master value :math:`\hat p = p + r`, hands the inner transform the
master parameters, adds its update in float32, rounds to the parameter dtype and stores the new
residual. The updates it returns are exactly ``new_p - p`` (in float32), so
``apply_updates`` lands on the new low-precision parameters bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optstate._core.base import GradientTransformation, with_extra_args_support
from optstate._core.checks import check_int, check_state, check_transform, describe
from optstate._core.leaves import path_str
from optstate._core.numerics import round_half_even
from optstate._core.types import OptState, Params, PyTree, Updates

__all__ = ["CORRECTIONS", "CompensatedParamsState", "FullPrecision", "compensated_params",
           "master_params"]

#: The accepted ``correction`` values.
CORRECTIONS = ("int8", "int16", "bf16", "stochastic")

#: Bits of the linear residual grids; codes are ``round(r * 2**bits)`` for ``r`` in ulps.
_GRID_BITS = {"int8": 8, "int16": 16}
_CODE_DTYPES = {"int8": jnp.int8, "int16": jnp.int16}


class FullPrecision(NamedTuple):
    """Stands in the residual tree for a parameter that loses nothing (float32, float64 or a
    non-floating leaf) and, with ``correction="stochastic"``, for every parameter.

    It is an empty pytree node: no array, no bytes, nothing to shard or checkpoint.
    """


class CompensatedParamsState(NamedTuple):
    """State of :func:`compensated_params`.

    Attributes:
      inner_state: the wrapped transform's state, built on the float32 master parameters.
      residual: a tree shaped like the parameters: per low-precision parameter, what it cannot
        hold (``int8``/``int16`` codes of :math:`(\\hat p - p) / \\mathrm{ulp}(p)` scaled by
        :math:`2^8` / :math:`2^{16}`, or the bf16 compensation :math:`\\hat p - p`); a
        :class:`FullPrecision` node elsewhere.
      key: raw ``uint32`` PRNG key data (``jax.random.key_data``) for stochastic rounding,
        advanced once per step (unchanged by the other corrections).
    """

    inner_state: OptState
    residual: PyTree
    key: jax.Array


def _is_low(dtype: Any) -> bool:
    """Whether a parameter of ``dtype`` loses bits against float32 (bf16, fp16, fp8)."""
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating)) and jnp.finfo(dtype).bits < 32
    except TypeError:  # extended dtypes (PRNG keys)
        return False


def _round_nearest(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` (float32) rounded to the nearest value of ``dtype`` (ties to even), still as
    float32.

    Integer arithmetic on the float32 bits: the dropped mantissa bits are rounded half to
    even by adding ``2**(d-1) - 1`` plus the kept last bit, then masked off (a carry moves
    into the exponent, as rounding up to the next binade must). Not a cast there and back,
    which XLA may drop (``xla_allow_excess_precision``, on by default: every residual would be
    zero), nor ``reduce_precision``, which Pallas' Triton lowering lacks (the fused kernel runs
    this on tiles).
    """
    info = jnp.finfo(dtype)
    drop = 23 - int(info.nmant)  # float32 mantissa bits that ``dtype`` does not keep
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    last = (bits >> np.uint32(drop)) & np.uint32(1)
    bits = (bits + np.uint32((1 << (drop - 1)) - 1) + last) & np.uint32(
        (0xFFFFFFFF << drop) & 0xFFFFFFFF)
    out = jax.lax.bitcast_convert_type(bits, jnp.float32)
    out = jnp.where(x != x, x, out)  # a NaN's payload could round to infinity
    if int(info.nexp) < 8:
        # past the largest finite value of ``dtype``: infinity (float32 has more binades)
        inf = jnp.where(x < 0, np.float32(-np.inf), np.float32(np.inf))
        out = jnp.where(jnp.abs(out) > np.float32(info.max), inf, out)
    if info.minexp - info.nmant >= jnp.finfo(jnp.float32).minexp:
        # below ``dtype``'s normal range (fp16's starts at 6e-5): multiples of its subnormal
        # spacing (a power of two: exact), ties to even
        spacing = np.float32(2.0 ** (info.minexp - info.nmant))
        sub = round_half_even(x / spacing) * spacing
        out = jnp.where(jnp.abs(x) < np.float32(2.0**info.minexp), sub, out)
    return out


def _ulp(a: jax.Array, dtype: Any) -> jax.Array:
    r"""The spacing of ``dtype`` just above ``a`` (float32, non-negative, a value of ``dtype``),
    as a float32 power of two.

    :math:`\mathrm{ulp}(a) = 2^{e - m}` for :math:`a \in [2^e, 2^{e+1})` with :math:`m`
    stored mantissa bits: :math:`\mathrm{rd}(a + \tfrac34 a 2^{-m}) - a`, since
    :math:`\tfrac34 a 2^{-m}` lies in :math:`[\tfrac34, \tfrac32)` ulp (exact in float32).
    Elementwise arithmetic only (no ``frexp`` bit casts), so ``quantize_state`` can still take
    its bounded-memory step around this wrapper. Clipped below to the subnormal spacing of
    ``dtype`` (zero and subnormals; at least float32's smallest normal number, never a
    flushed float32 subnormal) and above to the spacing of ``dtype``'s top binade (its
    largest finite value has no finite neighbour above).
    """
    info = jnp.finfo(dtype)
    up = _round_nearest(a + a * np.float32(0.75 * 2.0**-info.nmant), dtype)
    bottom = np.float32(max(2.0 ** (info.minexp - info.nmant), jnp.finfo(jnp.float32).tiny))
    top = np.float32(2.0 ** (info.maxexp - 1 - info.nmant))
    return jnp.clip(up - a, bottom, top)


def _encode(master: jax.Array, p32: jax.Array, dtype: Any, correction: str) -> jax.Array:
    """The residual of ``master`` over ``p32``, its rounding to ``dtype`` (both float32)."""
    diff = master - p32  # exact: p32 is the rounding of master
    if correction == "bf16":
        return diff.astype(jnp.bfloat16)
    bits = _GRID_BITS[correction]
    code_dtype = _CODE_DTYPES[correction]
    info = jnp.iinfo(code_dtype)
    # diff / ulp * 2**bits: ulp is a power of two, so the scaling is exact. The grid is
    # symmetric (no code -2**(bits-1)): a decoded master is never a tie, so it rounds to p.
    scaled = diff / _ulp(jnp.abs(p32), dtype) * np.float32(2.0**bits)
    return jnp.clip(round_half_even(scaled), -info.max, info.max).astype(code_dtype)


def _decode(p: jax.Array, residual: Any, dtype: Any, correction: str) -> jax.Array:
    """The float32 master value of ``p`` given its residual."""
    p32 = p.astype(jnp.float32)
    if isinstance(residual, FullPrecision) or correction == "stochastic":
        return p32
    if correction == "bf16":
        return p32 + residual.astype(jnp.float32)
    step = _ulp(jnp.abs(p32), dtype) * np.float32(2.0**-_GRID_BITS[correction])
    return p32 + residual.astype(jnp.float32) * step


def _round_stochastic(x: jax.Array, dtype: Any, u: jax.Array) -> jax.Array:
    r"""``x`` (float32) rounded to ``dtype`` up or down, to the far neighbour with probability
    equal to the fractional distance, so :math:`E[\mathrm{round}(x)] = x`. ``u`` is uniform
    in [0, 1). Returns float32 values of ``dtype``."""
    near = _round_nearest(x, dtype)
    d = x - near  # exact
    a = jnp.abs(near)
    ulp = _ulp(a, dtype)
    # the gap from ``near`` towards ``x``: one ulp, or half of one going down from a power of 2
    toward_zero = (d * near) < 0
    power_of_two = a == ulp * np.float32(2.0 ** jnp.finfo(dtype).nmant)
    gap = jnp.where(toward_zero & power_of_two, ulp * np.float32(0.5), ulp)
    far = near + jnp.where(d < 0, -gap, gap)
    return jnp.where(u * gap < jnp.abs(d), far, near)


def _leaves(tree: PyTree) -> tuple[list[Any], Any]:
    return jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)


def _param_paths(params: Params) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
    return [path_str(p) for p, _ in flat]


def _residual_leaves(p_def: Any, residual: PyTree, context: str) -> list[Any]:
    """The residual entry of each parameter leaf: by structure, or else by leaf order (Flax's
    ``nnx.Optimizer`` boxes state in other ``Variable`` classes than the parameters)."""
    try:
        return p_def.flatten_up_to(residual)
    except (ValueError, TypeError):
        pass
    flat = jax.tree_util.tree_flatten(
        residual, is_leaf=lambda x: x is None or isinstance(x, FullPrecision))[0]
    if len(flat) != p_def.num_leaves:
        raise ValueError(
            f"{context}: the state's residual tree does not match the parameters (parameters "
            f"{p_def}, residual {jax.tree.structure(residual)}). Pass the state made by this "
            f"transform's init for these parameters.")
    return flat


def _dtype(x: Any) -> Any:
    return None if x is None else jnp.result_type(x)


def _residual_for(p: Any, correction: str) -> Any:
    if p is None or correction == "stochastic" or not _is_low(_dtype(p)):
        return FullPrecision()
    shape = jnp.shape(p)
    if correction == "bf16":
        return jnp.zeros(shape, jnp.bfloat16)
    return jnp.zeros(shape, _CODE_DTYPES[correction])


def _masters(p_leaves: list[Any], r_leaves: list[Any], correction: str) -> list[Any]:
    out = []
    for p, r in zip(p_leaves, r_leaves):
        if p is None or not _is_low(_dtype(p)):
            out.append(p)
        else:
            out.append(_decode(jnp.asarray(p), r, _dtype(p), correction))
    return out


def _check_residual(p_leaves: list[Any], r_leaves: list[Any], paths: list[str],
                    correction: str, context: str) -> None:
    """Raises unless each residual leaf is the one ``init`` makes for its parameter."""
    for path, p, r in zip(paths, p_leaves, r_leaves):
        want = _residual_for(jax.ShapeDtypeStruct(jnp.shape(p), _dtype(p))
                             if p is not None else None, correction)
        if isinstance(want, FullPrecision):
            ok = isinstance(r, FullPrecision)
            expected = "no residual (FullPrecision)"
        else:
            ok = (not isinstance(r, FullPrecision) and jnp.shape(r) == want.shape
                  and _dtype(r) == want.dtype)
            expected = f"a {want.dtype} residual of shape {want.shape}"
        if not ok:
            got = ("no residual" if isinstance(r, FullPrecision)
                   else f"{_dtype(r)} of shape {jnp.shape(r)}")
            raise ValueError(
                f"{context}: parameter {path} ({_dtype(p)}, shape {jnp.shape(p)}) needs "
                f"{expected} in the state, got {got}. The parameters' dtypes must stay those "
                f"given to init; pass the state returned by this transform's init.")


def compensated_params(inner: GradientTransformation, correction: str = "int8", *,
                       seed: int = 0) -> GradientTransformation:
    r"""Trains low-precision (bf16, fp16) parameters as if they were float32.

    Let :math:`p` be a stored low-precision parameter, :math:`\mathrm{rd}` rounding to its
    dtype and :math:`\mathrm{ulp}(p)` its spacing. The state holds a residual :math:`r` with
    which the float32 master value is :math:`\hat p = p + r`. A step with gradient :math:`g`:

    .. math::

       (u, S') = \mathrm{inner.update}(g, S, \hat p), \qquad
       \hat p' = \hat p + u \ \text{(float32)}, \qquad
       p' = \mathrm{rd}(\hat p'), \qquad r' = \hat p' - p',

    and the returned update is :math:`p' - p`, exact in float32, so ``apply_updates(p, u)``
    gives :math:`p'` bit for bit. How :math:`r'` is stored (``correction``):

    * ``"int8"`` / ``"int16"``: :math:`c = \mathrm{round}(2^{b}\, r' / \mathrm{ulp}(p'))` with
      :math:`b = 8` / :math:`16`, clipped to :math:`|c| \le 2^{b-1} - 1` (a linear grid on
      :math:`[-1/2, 1/2]` ulp), i.e. about :math:`b` more mantissa bits: bf16 + int8 holds 15
      bits, bf16 + int16 float32's 23. Decoding is exact in float32 (the scale is a power of
      two) and the decoded master always rounds back to :math:`p'`.
    * ``"bf16"``: :math:`r'` itself in bf16 (Kahan-style compensated summation: the lost
      low-order part is carried to the next step), 2 bytes per parameter.
    * ``"stochastic"``: no residual; :math:`p' = \mathrm{rd}_{sr}(p + u)` rounds up with
      probability equal to the fractional distance, so :math:`E[p'] = p + u` and updates
      below half a step are not lost on average. The randomness comes from a key in the
      state, so runs are reproducible and resumable.

    Float32 (and float64, and non-floating) parameters hold their value already: they get no
    residual and the inner updates pass through unchanged. The inner transform's ``init``
    and ``update`` see float32 master parameters and float32 gradients (bf16 gradients are
    cast, inside the fused step), so its moments are float32 (or what ``quantize_state``
    stores them as), its arithmetic is float32's and decoupled weight decay sees the exact
    value.

    No transform that changes updates may follow it: the updates it returns are exact only as
    they are. ``quantize_state`` changes no update, and may go on either side: int8 moments
    beside an int8 residual are about 3 bytes per parameter of optimizer state (7 with bf16
    parameters and gradients) against 16 for float32 AdamW. Outside,
    ``quantize_state(compensated_params(adamw, "int8"), "int8")``, the whole step (the
    residual included) runs in ``quantize_state``'s bounded loop, and with
    :func:`optstate.update_and_apply` the new parameters are written chunk by chunk in place:
    the lowest peak memory. ``quantize_state`` never re-encodes the residual
    (:data:`optstate.quantization.wrapper.EXACT_FIELDS`).
    The residual is a plain array shaped like its parameter (``optstate.sharding`` shards it
    like the parameter; checkpoints restore it exactly). Export the master weights with
    :func:`master_params`.

    Args:
      inner: the optimizer (optstate's or Optax's), e.g. ``optstate.adamw(1e-3)``.
      correction: ``"int8"`` (default), ``"int16"``, ``"bf16"`` or ``"stochastic"``.
      seed: seed of the stochastic-rounding key (used by ``"stochastic"`` only).

    Returns:
      A :class:`~optstate.GradientTransformation` with state :class:`CompensatedParamsState`.

    Raises:
      ValueError: unknown ``correction``; at ``update``, ``params`` not given, or a parameter
        whose dtype or shape no longer matches its residual (naming the leaf path).
      TypeError: ``inner`` is not a transform.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
      >>> tx = optstate.compensated_params(optstate.sgd(1e-3), "int8")
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones(4, jnp.bfloat16)}
      >>> for _ in range(3):  # each step is -1e-3: below half a bf16 step down from 1.0
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optstate.apply_updates(params, updates)
      >>> params["w"]  # plain bf16 would still be 1.0
      Array([0.996094, 0.996094, 0.996094, 0.996094], dtype=bfloat16)
      >>> optstate.master_params(params, state)["w"]  # 0.997, to the int8 grid's 2**-16
      Array([0.99697876, 0.99697876, 0.99697876, 0.99697876], dtype=float32)

    References:
      Micikevicius et al., "Mixed Precision Training", ICLR 2018 (float32 master weights);
      Zamirai et al., "Revisiting BFloat16 Training", arXiv 2010.06192, 2020 (Kahan
      summation and stochastic rounding of bf16 weights); Kahan, "Further remarks on reducing
      truncation errors", CACM 1965; FlashOptim (Databricks, 2026): bf16 weights with an int8
      error-correction term, AdamW in 7 bytes per parameter.
    """
    context = "compensated_params"
    check_transform(inner, context)
    if correction not in CORRECTIONS:
        raise ValueError(f"{context}: unknown correction {correction!r}; expected one of "
                         f"{list(CORRECTIONS)} (e.g. correction=\"int8\").")
    check_int("seed", seed, context=context)
    inner = with_extra_args_support(inner)

    def init(params: Params) -> CompensatedParamsState:
        p_leaves, p_def = _leaves(params)
        masters = [None if p is None else
                   (jnp.asarray(p).astype(jnp.float32) if _is_low(_dtype(p)) else p)
                   for p in p_leaves]
        residual = p_def.unflatten([_residual_for(p, correction) for p in p_leaves])
        key = jax.random.key_data(jax.random.key(seed))
        return CompensatedParamsState(inner.init(p_def.unflatten(masters)), residual, key)

    def update(updates: Updates, state: CompensatedParamsState, params: Params | None = None,
               **extra_args: Any) -> tuple[Updates, CompensatedParamsState]:
        check_state(state, CompensatedParamsState, context)
        if params is None:
            raise ValueError(
                f"{context}: update needs the current parameters (their low-precision values "
                f"and the residual make the master weights); call tx.update(grads, state, "
                f"params).")
        p_leaves, p_def = _leaves(params)
        r_leaves = _residual_leaves(p_def, state.residual, context)
        _check_residual(p_leaves, r_leaves, _param_paths(params), correction, context)

        masters = _masters(p_leaves, r_leaves, correction)
        # the inner transform computes in float32 for low-precision parameters: its updates
        # (lr * g, Adam's g**2) would otherwise be rounded to the gradients' bf16
        g_leaves = p_def.flatten_up_to(updates)
        grads32 = [g if g is None or p is None or not _is_low(_dtype(p))
                   else jnp.asarray(g).astype(jnp.promote_types(_dtype(g), jnp.float32))
                   for p, g in zip(p_leaves, g_leaves)]
        inner_updates, inner_state = inner.update(p_def.unflatten(grads32), state.inner_state,
                                                  p_def.unflatten(masters), **extra_args)
        u_leaves = p_def.flatten_up_to(inner_updates)

        key = state.key
        step_key = None
        if correction == "stochastic":
            next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
            key = jax.random.key_data(next_key)

        new_u, new_r = [], []
        for i, (p, r, m, u) in enumerate(zip(p_leaves, r_leaves, masters, u_leaves)):
            if p is None or u is None or not _is_low(_dtype(p)):
                new_u.append(u)
                new_r.append(r)
                continue
            dtype = _dtype(p)
            target = m + jnp.asarray(u).astype(jnp.float32)
            if step_key is None:
                p_new = _round_nearest(target, dtype)
                new_r.append(_encode(target, p_new, dtype, correction))
            else:
                noise = jax.random.uniform(jax.random.fold_in(step_key, i), jnp.shape(p),
                                           jnp.float32)
                p_new = _round_stochastic(target, dtype, noise)
                new_r.append(r)
            new_u.append(p_new - jnp.asarray(p).astype(jnp.float32))
        return p_def.unflatten(new_u), CompensatedParamsState(
            inner_state, p_def.unflatten(new_r), key)

    return GradientTransformation(init, update)


def _find_states(state: PyTree) -> list[CompensatedParamsState]:
    found: list[CompensatedParamsState] = []

    def visit(node: Any) -> bool:
        if isinstance(node, CompensatedParamsState):
            found.append(node)
            return True
        return False

    jax.tree_util.tree_flatten(state, is_leaf=visit)
    return found


def master_params(params: Params, state: OptState) -> Params:
    r"""The float32 master parameters :math:`\hat p = p + r` held by a
    :func:`compensated_params` state, for evaluation, export or conversion.

    Low-precision leaves come back as float32 (their stored value plus the residual); other
    leaves are returned unchanged. ``state`` may be the wrapper's own state or any state tree
    holding exactly one :class:`CompensatedParamsState` (e.g. inside ``inject_hyperparams``).
    Jittable.

    Args:
      params: the current (low-precision) parameters.
      state: the optimizer state.

    Returns:
      A tree like ``params``.

    Raises:
      ValueError: ``state`` holds no :class:`CompensatedParamsState`, or more than one, or
        its residual does not match ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.full(2, 1.0, jnp.bfloat16)}
      >>> tx = optstate.compensated_params(optstate.sgd(1e-3), "int16")
      >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> optstate.master_params(optstate.apply_updates(params, updates), state)["w"]
      Array([0.9990001, 0.9990001], dtype=float32)
    """
    found = _find_states(state)
    if len(found) != 1:
        raise ValueError(
            f"master_params: expected a state holding exactly one CompensatedParamsState "
            f"(the state of optstate.compensated_params); found {len(found)} in "
            f"{describe(state)}.")
    residual = found[0].residual
    p_leaves, p_def = _leaves(params)
    r_leaves = _residual_leaves(p_def, residual, "master_params")
    correction = _correction_of(r_leaves)
    _check_residual(p_leaves, r_leaves, _param_paths(params), correction, "master_params")
    return p_def.unflatten(_masters(p_leaves, r_leaves, correction))


def _correction_of(r_leaves: list[Any]) -> str:
    """The correction a residual tree was made for (read off its dtypes)."""
    for r in r_leaves:
        if isinstance(r, FullPrecision):
            continue
        dtype = _dtype(r)
        for name, code in _CODE_DTYPES.items():
            if dtype == code:
                return name
        return "bf16"
    return "stochastic"
