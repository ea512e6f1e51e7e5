"""``quantize_state``: store any transform's state in 8-bit, 4-bit, FP8 or BF16.

The wrapper keeps the inner transform's state with every large floating leaf replaced by a
:class:`~optstate.quantization.array.QuantizedArray` (codes plus per-block scales, in a format
of :mod:`optstate.quantization.formats`). Each step dequantizes, runs the inner update and
quantizes the new state again. When the inner update is elementwise per parameter (Adam,
AdamW, RMSProp, Adagrad, Adadelta, Lion, momentum, weight decay, schedules; decided by reading
its jaxpr, :mod:`optstate.quantization.elementwise`), the step never holds the whole state in
float32 (:mod:`optstate.quantization.chunked`); otherwise (global-norm clipping, LAMB,
Adafactor, a finiteness check inside) it dequantizes the whole state, which is always correct,
and says so with a :class:`BoundedStepFallbackWarning`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
import warnings
from typing import Any, Collection, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from optstate._core import _compat
from optstate._core.base import (
    GradientTransformation,
    register_fused_update,
    with_extra_args_support,
)
from optstate._core.checks import check_transform
from optstate._core.leaves import field_labels, is_boxed, leaves_with_paths, path_str, unbox
from optstate.quantization import formats, fused
from optstate.quantization.array import QuantizedArray, is_quantized
from optstate.quantization.block import dequantize, quantize_array, requantize_like
from optstate.quantization.chunked import MIN_LOOP_ELEMENTS, chunked_leaves, chunked_step
from optstate.quantization.containment import keep_finite_leaves
from optstate.quantization.elementwise import Analysis, elementwise_owners
from optstate.quantization.formats import StorageFormat
from optstate.quantization.policy import (kept_in_fp32, leaf_format, loop_owners,
                                          recording_into, step_seeds, unlooped)

#: State field names whose leaves are non-negative (second moments and other accumulators of
#: squares), stored on an unsigned, zero-free grid. They match the NamedTuple fields of
#: optstate's and Optax's states: Adam/AdamW/AdaBelief/AMSGrad ``nu`` (and ``nu_max``),
#: RMSProp ``nu``, Adagrad ``sum_of_squares``, Adadelta ``e_g``/``e_x``, Adafactor
#: ``v_row``/``v_col``/``v``.
NONNEG_FIELDS: frozenset[str] = frozenset(
    {"nu", "nu_max", "sum_of_squares", "e_g", "e_x", "v_row", "v_col", "v", "grad_sqr_avg",
     "sum_of_squared_grads"})

#: State fields ``quantize_state`` never re-encodes: they already hold exact low-order bits
#: (``compensated_params``' ``residual``: an int8/int16 grid or a bf16 compensation in units
#: of the parameter's own rounding), which a block-wise grid would throw away.
EXACT_FIELDS: frozenset[str] = frozenset({"residual"})

ROUNDINGS = ("nearest", "stochastic")
#: What ``quantize_state(stalling=...)`` accepts: how stall-prone leaves are stored.
STALLING = ("stochastic", "fp32", None)

#: Default ``chunk_elements`` per backend. On CPU a chunk's float32 values should stay in cache
#: and XLA runs a loop body's kernels one after another: 64K values per chunk (as fast as 128K
#: on 32M parameters, and a step's temporaries, about 28 bytes per chunk value for int8, stay
#: small beside a model of a few million parameters: ``bench/quantized.py memory``). On GPU and TPU
#: each chunk costs kernel launches and a whole leaf streams at full bandwidth: 4M values, i.e.
#: whole leaves up to 4M elements, so that the temporaries are bounded by 4M float32 values
#: per state field (measured in ``bench/quantized.py``).
DEFAULT_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 16}
ACCELERATOR_CHUNK_ELEMENTS = 1 << 22


def default_chunk_elements(backend: str | None = None) -> int:
    """The ``chunk_elements`` that :func:`quantize_state` uses when given ``None``, for
    ``backend`` (default: ``jax.default_backend()``)."""
    backend = jax.default_backend() if backend is None else backend
    return DEFAULT_CHUNK_ELEMENTS.get(backend, ACCELERATOR_CHUNK_ELEMENTS)



class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`.

    ``inner_state``: the inner transform's state, large floating leaves replaced by
    :class:`~optstate.quantization.array.QuantizedArray`. ``key``: raw ``uint32`` PRNG key data
    (``jax.random.key_data``) for stochastic rounding, advanced once per step (unchanged with
    nearest rounding).
    """

    inner_state: Any
    key: jax.Array



class BoundedStepFallbackWarning(UserWarning):
    """``quantize_state`` dequantizes the whole state for a step (correct, but the step's
    temporaries grow with the state) because the inner update is not elementwise per
    parameter; the message names the reason."""


@dataclasses.dataclass(frozen=True)
class _Config:
    fmt: StorageFormat
    block: int
    min_size: int
    rounding: str
    keep: tuple[str, ...]
    seed: int
    nonneg_fields: frozenset[str]
    chunk_elements: int | None  # None: chosen per backend at trace time
    stalling: str | None = "stochastic"
    rank1: bool = False


def _leaf_decision(cfg: _Config, path: str, field: str | None, leaf: Any) -> bool | None:
    """``None``: keep as is; else the ``nonneg`` flag of the quantized leaf."""
    if not cfg.fmt.quantized or is_quantized(leaf):
        return None
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return None
    size = math.prod(shape)
    if not shape or size == 0 or size < cfg.min_size:
        return None
    if any(re.search(pattern, path) for pattern in cfg.keep) or field in EXACT_FIELDS:
        return None
    return field in cfg.nonneg_fields


# -- explicit-sharding meshes ------------------------------------------------------------------


def _explicit_spec(x: Any) -> Any:
    """The ``PartitionSpec`` of ``x``'s type when ``x`` is typed on a mesh with an Explicit
    axis (``jax.sharding.AxisType.Explicit``), else ``None``."""
    sharding = _compat.typed_sharding(x)
    explicit = _compat.explicit_axis_type()
    axis_types = _compat.mesh_axis_types(getattr(sharding, "mesh", None))
    if explicit is None or not any(t == explicit for t in axis_types):
        return None
    return sharding.spec


def _explicit_mesh(*trees: Any) -> Any:
    """The (abstract) mesh in the types of the leaves of ``trees`` typed on a mesh with an
    Explicit axis, or ``None`` when there are none.

    Raises:
      ValueError: the leaves are typed on different meshes (one line: which, and what to do).
    """
    meshes: list[Any] = []
    for tree in trees:
        for x in jax.tree.leaves(tree):
            if _explicit_spec(x) is not None:
                mesh = _compat.typed_sharding(x).mesh
                if all(mesh != seen for seen in meshes):
                    meshes.append(mesh)
    if len(meshes) > 1:
        raise ValueError(
            f"quantize_state: the gradients, state and parameters are typed on different "
            f"meshes ({meshes[0]} and {meshes[1]}); place them all on the one mesh given to "
            f"optstate.sharding.state_shardings and param_shardings.")
    return meshes[0] if meshes else None


def _run_in_auto_mode(fn: Any, args: tuple, out_specs: Any) -> Any:
    """``fn(*args)`` with the mesh's Explicit axes switched to Auto, its outputs typed with
    ``out_specs``.

    Block quantization reshapes codes and scales (``(rows, n) -> (rows * n / B, B)``), which
    sharding-in-types rejects for sharded operands on Explicit axes; in Auto mode XLA's
    partitioner handles them (blocks never straddle a shard, so no data moves).

    The mesh is the one in the arguments' types, so no ``jax.set_mesh`` context is needed:
    ``auto_axes`` given bare ``PartitionSpec`` objects takes the context mesh, and without one it
    would run ``fn`` in Explicit mode (JAX 0.10's default ``jax.make_mesh``)."""
    mesh = _explicit_mesh(*args)
    out_shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), out_specs,
                                 is_leaf=lambda s: isinstance(s, PartitionSpec))
    return _compat.auto_axes(fn, out_sharding=out_shardings)(*args)


def _specs_like(tree: Any) -> Any:
    """``PartitionSpec`` of every array leaf of ``tree`` (replicated where untyped)."""
    def spec(x):
        s = _explicit_spec(x)
        return PartitionSpec() if s is None else s

    return jax.tree.map(spec, tree)


def _any_explicit(*trees: Any) -> bool:
    return any(_explicit_spec(x) is not None for t in trees for x in jax.tree.leaves(t))


# -- which step each leaf takes ----------------------------------------------------------------

_UPDATE_PATHS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "optstate_quantize_state_update_paths", default=None)

#: What :func:`recording_update_paths` records for a leaf updated by the bounded-memory loop.
CHUNKED = "chunked"
#: Why the state of a parameter with a rank-1 normalised leaf takes the whole-leaf step.
RANK1_WHOLE = ("rank-1 normalisation (scales are maxima over whole rows and columns), "
               "one parameter at a time")


def recording_update_paths() -> contextlib.AbstractContextManager[dict[str, str]]:
    """Records, while active, the step each quantized leaf takes in ``quantize_state`` updates
    traced or run in this context: ``{path in the inner state: "chunked" or "whole: why"}``.

    Local to the calling context (a ``contextvars`` variable): nothing process-wide changes.
    ``optstate.memory.describe(state, tx=tx)`` uses it.
    """
    return recording_into(_UPDATE_PATHS)


def _record_paths(inner_state: Any, s_leaves: list[Any], chunked: dict[int, list[int]],
                  why_whole: str, rank1_step: frozenset[int] = frozenset()) -> None:
    record = _UPDATE_PATHS.get()
    if record is None:
        return
    in_loop = {s for members in chunked.values() for s in members}
    paths = [path_str(p) for p, _ in leaves_with_paths(inner_state, is_leaf=is_quantized)]
    for s, x in enumerate(s_leaves):
        if is_quantized(x):
            if s in rank1_step and s in in_loop:  # a group of its own, whole
                record[paths[s]] = f"whole: {RANK1_WHOLE}"
            else:
                record[paths[s]] = CHUNKED if s in in_loop else f"whole: {why_whole}"


# -- the transform ----------------------------------------------------------------------------


def quantize_state(inner: GradientTransformation, fmt: str = "int8", *,
                   block_size: int | None = None, min_size: int = 4096,
                   rounding: str = "nearest", keep: str | Sequence[str] = (), seed: int = 0,
                   nonneg_fields: Collection[str] | None = None,
                   chunk_elements: int | None = None,
                   stalling: str | None = "stochastic",
                   rank1: bool | None = None) -> GradientTransformation:
    r"""Stores the state of ``inner`` block-wise in 8-bit, 4-bit, FP8 or BF16.

    For every floating state leaf ``x`` with at least ``min_size`` elements, the wrapper keeps
    codes and one fp32 scale per block of ``B`` values (blocks along the trailing axes):

    .. math::

       s_b = \max_{i \in b} |x_i|, \qquad c_i = Q(x_i / s_b), \qquad
       \hat x_i = \mathrm{decode}(c_i)\, s_b ,

    with ``Q`` rounding to the nearest code value, or stochastically
    (:math:`P(\text{up}) = (y - v_{lo}) / (v_{hi} - v_{lo})`, so
    :math:`E[\hat x] = x`). Each step computes
    :math:`(u', S') = \mathrm{inner.update}(g, \hat S, p)` and stores :math:`Q(S')`. The
    update ``u'`` is computed from the float32 state, before it is stored.

    Formats: ``"int8"`` — the dynamic (exponent + linear fraction) map of Dettmers et al.,
    "8-bit Optimizers via Block-wise Quantization" (ICLR 2022), block 256, signed for signed
    state, unsigned and zero-free for non-negative state; ``"int4"`` — block 128, a 4-bit
    signed dynamic map and, for non-negative state, the zero-free linear grid
    :math:`(i+1)/16` (Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States",
    NeurIPS 2023), scaled by rank-1 normalisation where the leaf has two or more axes (below);
    ``"fp8_e4m3"`` / ``"fp8_e5m2"`` — block-scaled FP8 (block 256, the block
    maximum mapped to 256 / 32768); ``"bf16"`` — a plain cast; ``"fp32"`` — unchanged.

    Non-negative state — leaves under a NamedTuple field named in ``nonneg_fields`` (default
    :data:`NONNEG_FIELDS`: ``nu``, ``sum_of_squares``, ``e_g``, ``e_x``, ``v_row``, ``v_col``,
    ``v``, ...), for optstate's and Optax's states alike — is stored on a grid without zero,
    so a positive second moment never dequantizes to zero.

    Stall-prone state: a leaf whose update adds to it with no decay, :math:`s' = s + f`
    (Adagrad's ``sum_of_squares``, SM3's accumulators, Yogi's second moment, a
    ``multi_steps(..., use_grad_mean=False)`` accumulator, schedule-free's ``z``), stops
    growing under nearest rounding once its increments fall under half a grid step; so does,
    on a coarse grid, an EMA :math:`s' = c\,s + f` whose decay :math:`c` is at least the
    format's ``stall_decay`` (``int4``: 0.95, e.g. Lion's and Adan's moments). Such leaves are
    found on the update's derivative, :math:`\partial s' / \partial s`, read off its
    linearization (:mod:`optstate.quantization.running_sums`), not by name, and stored as
    ``stalling`` says: with stochastic rounding (default, unbiased: :math:`E[Q(s')] = s'`),
    kept in float32 (``"fp32"``), or like every other leaf (``None``).
    ``optstate.memory.describe(state, params, tx=tx)`` shows each leaf's rounding.

    Rank-1 normalisation (``rank1``, the default for ``int4``; Li, Chen, Zhu 2023): a
    non-negative leaf with at least two axes is scaled per element by
    :math:`N_{ij} = \min(\max_k |x_{ik}|, \max_k |x_{kj}|)` (for more axes, the smallest
    of the maxima over all other axes) instead of its block's maximum, and stored as format
    ``"int4_rank1"`` with the maxima as scales. The zero-free grid's smallest value is then
    :math:`N_{ij}/16`, not :math:`s_b/16`: far fewer small second moments are rounded up,
    which removed most of int4's early lag on the embedded task (held-out loss gap to fp32 at
    step 20: 0.29 nats block-wise, 0.05 rank-1 on a 0.48M-parameter model; 0.060 and 0.024
    on a 1.7M-parameter one). Its scales span whole rows and columns, so that
    parameter's state is updated whole, one parameter at a time (``describe`` says so), not
    by the row-chunk loop.

    Peak memory: when ``inner``'s update is elementwise per parameter (checked on its
    jaxpr: Adam, AdamW, RMSProp, Adagrad, Adadelta, Lion, momentum, weight decay, schedules,
    ``inject_hyperparams``), the updates are computed from the dequantized codes inside
    whatever consumes them (XLA fuses dequantization, the update rule and ``apply_updates``
    into one pass), and the new state of each parameter is computed and stored in place in a
    loop over chunks of about ``chunk_elements`` values (whole blocks), one parameter after
    another, reading a copy of that parameter's old codes; smaller parameters are updated
    whole, a group of at most ``chunk_elements`` values at a time. The temporaries are one
    parameter's old codes plus a chunk's (or group's) float32 values (about 0.5 bytes per
    parameter on CPU for 8 leaves of 1024x1024 with int8), whatever the mix of leaf sizes.
    Otherwise (global-norm clipping, LAMB, Adafactor, a
    finiteness check inside) the whole state is dequantized for the step, which is correct
    for any transform. Wrap ``apply_if_finite`` around ``quantize_state`` rather than inside
    it to keep the bounded path.

    Args:
      inner: any gradient transformation (optstate's or Optax's).
      fmt: ``"int8"``, ``"int4"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"bf16"`` or ``"fp32"``.
      block_size: values per block (default 256; 128 for ``int4``).
      min_size: leaves with fewer elements stay as they are (as do integer leaves, scalars
        and empty leaves). The decision depends only on a leaf's global shape.
      rounding: ``"nearest"`` or ``"stochastic"`` (randomness from a key kept in the state:
        the same ``seed`` gives bit-identical runs).
      keep: regular expressions; state leaves whose path (``jax.tree_util.keystr`` within the
        inner state, e.g. ``"[0].mu['embed']"``) matches one (``re.search``) stay as they are.
      seed: seed of the stochastic-rounding key.
      nonneg_fields: override of :data:`NONNEG_FIELDS`.
      chunk_elements: about how many values one chunk holds (bounds the step's temporaries).
        Default ``None``: 64K on CPU, 4M on GPU and TPU (:func:`default_chunk_elements`).
        The chunk size changes results only by float32 rounding (XLA fuses each arrangement
        differently); a given size and backend are bit-reproducible. Parameters with fewer than
        ``min(2 * chunk_elements, 65536)`` elements (or a rank-1 normalised leaf) are updated
        whole, in groups of at most ``chunk_elements`` values, one group after another.
      stalling: how stall-prone leaves (above) are stored: ``"stochastic"`` (default; with
        ``rounding="nearest"`` only these leaves round stochastically, from the state's key),
        ``"fp32"`` (not quantized: exact, at 4 bytes per value), or ``None`` (as every other
        leaf, with ``rounding``).
      rank1: rank-1 normalisation of non-negative leaves of two or more axes (``None``: the
        format's default, on for ``int4``, the only format that offers it).

    The bounded path is chosen by reading the inner update's jaxpr; when it cannot be taken
    for a large leaf, a :class:`BoundedStepFallbackWarning` says why, once per transform, and
    ``optstate.memory.describe(state, tx=...)`` shows the path each leaf takes.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.ones((256, 64))}
      >>> tx = optstate.quantize_state(optstate.adamw(1e-3), "int8")
      >>> state = tx.init(params)
      >>> state.inner_state[0].mu["w"]
      QuantizedArray(fmt='int8', shape=(256, 64), dtype=float32, block_size=256, nonneg=False)
      >>> updates, state = tx.update(params, state, params)
      >>> print(f"{optstate.memory.state_bytes(state) / params['w'].size:.2f} bytes/parameter")
      2.03 bytes/parameter

    Returns:
      A :class:`~optstate.GradientTransformation` whose state is :class:`QuantizedState`.

    Raises:
      ValueError: unknown ``fmt``, ``rounding`` or ``stalling``, or a bad ``block_size`` (the
        message lists what is accepted).
    """
    check_transform(inner, "quantize_state")
    storage = formats.get(fmt)
    block = storage.block_size(block_size)
    if rounding not in ROUNDINGS:
        raise ValueError(f"quantize_state: unknown rounding {rounding!r}; expected one of "
                         f"{list(ROUNDINGS)}.")
    keep = _keep_patterns(keep)
    if not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"quantize_state: min_size must be a non-negative integer; got "
                         f"{min_size!r}.")
    if chunk_elements is not None and (not isinstance(chunk_elements, (int, np.integer))
                                       or chunk_elements < 1):
        raise ValueError(f"quantize_state: chunk_elements must be a positive integer; got "
                         f"{chunk_elements!r}.")
    chunk = None if chunk_elements is None else max(int(chunk_elements), 2 * max(block, 1))
    if rank1 is None:
        rank1 = storage.name in formats.RANK1_VARIANT
    elif not isinstance(rank1, bool):
        raise TypeError(f"quantize_state: rank1 must be True, False or None (the format's "
                        f"default); got {rank1!r}.")
    elif rank1 and storage.name not in formats.RANK1_VARIANT:
        raise ValueError(f"quantize_state: rank1=True is available for "
                         f"{sorted(formats.RANK1_VARIANT)}, not {storage.name!r}; pass "
                         f"fmt='int4' or leave rank1=None.")
    if stalling not in STALLING:
        raise ValueError(f"quantize_state: unknown stalling={stalling!r}; expected one of "
                         f"{list(STALLING)} (how leaves that nearest rounding would stall "
                         f"are stored).")
    config = _Config(storage, block, int(min_size), rounding, keep, int(seed),
                     frozenset(NONNEG_FIELDS if nonneg_fields is None else nonneg_fields), chunk,
                     stalling, rank1)
    inner = with_extra_args_support(inner)
    warned: list[str] = []  # the fallback reason already reported by this transform

    def init(params):
        inner_state = inner.init(params)
        flat, treedef = jax.tree_util.tree_flatten(
            inner_state, is_leaf=lambda x: is_quantized(x) or is_boxed(x))
        paths = [path_str(p) for p, _ in leaves_with_paths(inner_state, is_leaf=is_quantized)]
        fields = field_labels(inner_state, is_leaf=is_quantized)
        decisions = [_leaf_decision(config, path, field, unbox(leaf))
                     for path, leaf, field in zip(paths, flat, fields)]
        kept = kept_in_fp32(config, inner, params, flat, treedef, decisions)
        leaves = []
        for i, (leaf, nonneg) in enumerate(zip(flat, decisions)):
            value = unbox(leaf)
            if nonneg is None or i in kept:  # kept: a stall-prone leaf, stalling="fp32"
                leaves.append(leaf)
            else:
                # A boxed leaf (a Flax ``Variable``, as ``nnx.Optimizer`` passes parameters) is
                # replaced by the quantized array, which Flax then handles as a pytree node.
                leaves.append(_quantize_leaf(value, leaf_format(config, value, nonneg), block,
                                             nonneg))
        key = jax.random.key_data(jax.random.key(config.seed))
        return QuantizedState(jax.tree_util.tree_unflatten(treedef, leaves), key)

    def update(updates, state, params=None, **extra_args):
        if not isinstance(state, QuantizedState):
            raise ValueError(f"quantize_state: expected a QuantizedState (from this "
                             f"transform's init); got {type(state).__name__}.")
        if _any_explicit(updates, state, params):
            # Same structure in and out: the new state keeps the old state's specs and the
            # updates the gradients' specs.
            out_specs = (_specs_like(updates), _specs_like(state))
            # the state's split, recorded before the switch to Auto: the kernel runs per shard
            with fused.typed_specs(updates, state, params):
                return _run_in_auto_mode(
                    lambda u, s, p: _update(u, s, p, **extra_args), (updates, state, params),
                    out_specs)
        return _update(updates, state, params, **extra_args)

    def _update(updates, state, params=None, **extra_args):
        chunk_elements = _chunk_elements(config)
        _check_stored_format(state.inner_state, config)
        s_leaves, s_def = jax.tree.flatten(state.inner_state, is_leaf=is_quantized)
        # per leaf: a uint32[2] seed (stochastic rounding) or None (nearest), from the wrapper's
        # rounding and its policy for stall-prone leaves (running sums, slow EMAs)
        seeds, new_key = step_seeds(config, inner, updates, state, s_leaves, s_def, params,
                                    extra_args, lambda path, x: _leaf_decision(
                                        config, path, None, x) is not None)

        analysis = Analysis(None, "no quantized leaf")
        if any(is_quantized(x) for x in s_leaves):
            abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in s_leaves]
            analysis = elementwise_owners(
                inner.update, updates, s_def.unflatten(abstract), params, extra_args)
        # rank-1 leaves: never the kernel; chunked_step updates them whole, one group at a time
        looped = loop_owners(analysis.owners, s_leaves)
        chunked = chunked_leaves(chunk_elements, s_leaves, analysis.owners, updates)
        apply = fused.apply_requested(update)  # optstate.update_and_apply: new params out
        kernels = fused.select(inner.update, updates, s_leaves, s_def, params, extra_args,
                               seeds, looped, apply, warned)
        chunked = {k: v for k, v in chunked.items() if k not in kernels}
        why_whole = analysis.reason or "a leaf under the loop's size, updated in one piece"
        _record_paths(state.inner_state, s_leaves, chunked, why_whole,
                      unlooped(analysis.owners, looped))
        fused.record(_UPDATE_PATHS.get(), [path_str(p) for p, _ in leaves_with_paths(
            state.inner_state, is_leaf=is_quantized)], s_leaves)
        if analysis.owners is None:
            _warn_fallback(warned, analysis.reason, s_leaves, chunk_elements)
        applied = False  # whether new_updates already holds the new parameters
        if not chunked:
            new_updates, new_leaves = _whole_step(inner, updates, s_leaves, s_def, params,
                                                  extra_args, seeds, analysis.owners)
        else:
            applied = apply and params is not None
            new_updates, new_leaves = chunked_step(chunk_elements, inner, updates, s_leaves,
                                                   s_def, params, extra_args, seeds, chunked,
                                                   analysis.owners, apply=applied)
        new_updates, new_leaves = fused.overlay(kernels, inner.update, updates, s_leaves, s_def,
                                                params, extra_args, seeds, new_updates,
                                                new_leaves, apply=apply, applied=applied)
        return new_updates, QuantizedState(s_def.unflatten(new_leaves), new_key)

    register_fused_update(update, fused.applying_update(update))  # optstate.update_and_apply
    return GradientTransformation(init, update)


def _keep_patterns(keep: Any) -> tuple[str, ...]:
    """``keep`` as a tuple of compiled-checked regular expressions (``None``: none)."""
    if keep is None:
        return ()
    if isinstance(keep, str):
        keep = (keep,)
    try:
        patterns = tuple(keep)
    except TypeError:
        raise TypeError(f"quantize_state: keep must be a regular expression or a sequence of "
                        f"them (e.g. keep=r\"embed\"); got {keep!r}.") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"quantize_state: keep must hold regular expressions (str); got "
                            f"{pattern!r} of type {type(pattern).__name__}.")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"quantize_state: keep={pattern!r} is not a valid regular "
                             f"expression ({error}); escape special characters with "
                             f"re.escape if you meant the text itself.") from None
    return patterns


def _check_stored_format(inner_state: Any, cfg: _Config) -> None:
    """Refuses a state quantized by another ``quantize_state`` (format or block size)."""
    for path, leaf in leaves_with_paths(inner_state, is_leaf=is_quantized):
        fmts = {cfg.fmt.name, formats.RANK1_VARIANT.get(cfg.fmt.name, cfg.fmt.name)}
        if is_quantized(leaf) and (leaf.fmt not in fmts or leaf.block_size != cfg.block):
            raise ValueError(
                f"quantize_state: leaf {path_str(path)} of the state is stored as {leaf.fmt!r} "
                f"with blocks of {leaf.block_size}, but this transform stores {cfg.fmt.name!r} "
                f"with blocks of {cfg.block}. Pass the state returned by this transform's "
                f"init.")


def _chunk_elements(cfg: _Config) -> int:
    """``cfg.chunk_elements``, or the default for the backend being traced for."""
    if cfg.chunk_elements is not None:
        return cfg.chunk_elements
    return max(default_chunk_elements(), 2 * max(cfg.block, 1))


def _warn_fallback(warned: list[str], reason: str | None, s_leaves: list[Any],
                   chunk_elements: int) -> None:
    """Warns once per transform that the whole state is dequantized for the step, when a
    quantized leaf is large enough that the bounded-memory loop would have mattered."""
    threshold = min(2 * chunk_elements, MIN_LOOP_ELEMENTS)
    large = [x for x in s_leaves if is_quantized(x) and x.size >= threshold]
    if not large or reason in warned:
        return
    warned.append(reason)
    warnings.warn(
        f"quantize_state: the whole state ({len(large)} quantized leaves of >= {threshold} "
        f"values) is dequantized at once for each step because the inner transform is not "
        f"elementwise per parameter: {reason}. Results are correct; only the step's peak "
        f"memory is higher. Keep whole-tree transforms (clip_by_global_norm, apply_if_finite) "
        f"outside quantize_state to get the bounded-memory step.",
        BoundedStepFallbackWarning, stacklevel=4)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_fresh(value: jax.Array, fmt: StorageFormat, block: int, nonneg: bool
                    ) -> QuantizedArray:
    """``quantize_array`` of a fresh state leaf, compiled once per shape and format: ``init``
    called outside ``jit`` would otherwise quantize op by op, compiling each one."""
    # A fresh state is usually constant (zeros): under ``jit`` XLA would otherwise fold its
    # whole quantization at compile time, taking minutes for large leaves.
    value = jax.lax.optimization_barrier(value)
    return quantize_array(value, fmt, block_size=block or None, nonneg=nonneg)


def _quantize_leaf(value: Any, fmt: StorageFormat, block: int, nonneg: bool) -> QuantizedArray:
    """``quantize_array`` of a freshly initialized state leaf; on an Explicit mesh, in Auto
    mode with the codes typed like the leaf (the last axis unsplit for packed codes) and
    the scales replicated (``init``'s ``out_shardings`` places them)."""
    def quantize(v):
        return _quantize_fresh(v, fmt, block, nonneg)

    spec = _explicit_spec(value)
    if spec is None:
        return quantize(value)
    entries = tuple(spec) + (None,) * (len(value.shape) - len(tuple(spec)))
    if fmt.values_per_code > 1:
        entries = entries[:-1] + (None,)
    # the shapes only: traced on the sharded value, the reshapes would fail in Explicit mode
    abstract = jax.eval_shape(quantize, jax.ShapeDtypeStruct(value.shape, value.dtype))
    out = dataclasses.replace(abstract, codes=PartitionSpec(*entries), scales=PartitionSpec())
    return _run_in_auto_mode(quantize, (value,), out)


def _whole_step(inner, updates, s_leaves, s_def, params, extra_args, seeds, owners):
    """Dequantize everything, update, quantize everything (any inner transform)."""
    full = [dequantize(x) if is_quantized(x) else x for x in s_leaves]
    new_updates, new_state = inner.update(updates, s_def.unflatten(full), params, **extra_args)
    new_flat = keep_finite_leaves(s_leaves, full, s_def.flatten_up_to(new_state), owners)
    out = []
    for old, new, seed in zip(s_leaves, new_flat, seeds):
        out.append(requantize_like(old, new, seed) if is_quantized(old) else new)
    return new_updates, out
