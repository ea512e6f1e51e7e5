"""Which parameters of a ``quantize_state`` step take the fused kernel, and running them.

The fused kernel (:mod:`optstate.quantization.kernel`) updates one parameter's quantized state
in one pass. It is used automatically on GPU (Triton) and TPU (Mosaic, where code books are
computed by arithmetic: no gathers) for parameters of at least :data:`MIN_KERNEL_ELEMENTS`
values whose inner update is elementwise; CPU keeps the XLA path (the chunked loop of
:mod:`optstate.quantization.chunked`). Every other parameter, and every parameter the kernel
cannot take (the reason is recorded and shown by ``optstate.memory.describe(state, tx=...)``),
takes the XLA path, whose results are always correct: the kernel is an optimisation, never a
requirement.

:func:`use_kernel` overrides the choice for the code traced inside it: ``"off"``, ``"triton"``,
``"mosaic"`` or ``"interpret"`` (Pallas interpret mode, any backend and any size: what the
tests run on CPU).

Sharded state (:mod:`optstate.sharding` splits quantized state so that a block never
straddles a shard): the kernel runs per shard (:mod:`optstate.quantization.kernel_shards`).

* Inside ``jax.shard_map`` (``optstate.sharding.shard_map_update``, or your own) the values
  are local shards and the kernel runs on them, its operands and outputs typed as varying over
  the manual axes the parameter's values vary over. A parameter whose gradient, parameter and
  state vary over different axes takes the XLA path (the kernel would make all its outputs
  vary). In interpret mode JAX 0.10's Pallas interpreter cannot evaluate a kernel on varying
  values, so there the shards are all-gathered and each device interprets its own shard's
  kernel (tests only; the compiled backends run on the local shards).
* Under plain ``jit`` with the state typed as split over a mesh (sharding in types, an
  Explicit mesh), :func:`optstate.update_and_apply` wraps each parameter's kernel in
  ``jax.shard_map`` over that mesh, its operands split like the state's codes (a gradient or
  parameter laid out otherwise is resharded); stochastic rounding offsets a shard's counters
  so that it draws what the whole leaf draws there (a state split on a dimension other than
  the first takes the XLA path then). The kernel takes a parameter only where every shard
  holds whole blocks; otherwise the reason says which dimension would cut one. ``tx.update``
  does the same. Plain ``jit`` with ``NamedSharding`` arguments on an Auto mesh (the types
  carry no split) runs one kernel on the whole leaf, which XLA partitions itself (not
  measured).

The choice is made when a step is traced: :func:`use_kernel` around an already compiled
``jax.jit`` function changes nothing until it is traced again.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from optstate._core import _compat
from optstate._core.base import apply_updates
from optstate.quantization.array import is_quantized
from optstate.quantization.codecs import CodebookCodec
from optstate.quantization.kernel import ARITHMETIC_BOOK_BACKENDS, BACKENDS, Leaf, geometry
from optstate.quantization.kernel_shards import Chosen, run_kernel, shards_of, typed_specs
from optstate.quantization.tile_codecs import arithmetic_form

#: Parameters with fewer values take the XLA path under the automatic choice (a launch and a
#: table load cost more than they save); a forced backend (:func:`use_kernel`) takes any size.
MIN_KERNEL_ELEMENTS = 1 << 16

#: What ``recording_update_paths`` records for a leaf updated by the fused kernel.
KERNEL = "kernel"

_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "optstate_fused_kernel_mode", default=None)
_APPLYING: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "optstate_fused_applying", default=None)


class KernelFallbackWarning(UserWarning):
    """A parameter that could take the fused kernel takes the XLA path (correct, slower); the
    message says why."""


@contextlib.contextmanager
def use_kernel(mode: str | None) -> Iterator[None]:
    """Chooses the fused kernel's backend for ``quantize_state`` steps traced inside.

    Args:
      mode: ``None`` (automatic: Triton on GPU, Mosaic on TPU, off on CPU), ``"off"``,
        ``"triton"``, ``"mosaic"`` or ``"interpret"`` (any backend and any leaf size; slow,
        for tests).

    Example:
      >>> import jax.numpy as jnp, optstate
      >>> from optstate.quantization.fused import use_kernel
      >>> tx = optstate.quantize_state(optstate.adam(1e-3), "int8", min_size=256)
      >>> params = {"w": jnp.ones((4, 256))}
      >>> with use_kernel("interpret"):
      ...     new_params, state = optstate.update_and_apply(tx, params, tx.init(params), params)
      >>> new_params["w"].shape
      (4, 256)
    """
    if mode is not None and mode != "off" and mode not in BACKENDS:
        raise ValueError(f"use_kernel: unknown mode {mode!r}; expected None, 'off' or one of "
                         f"{list(BACKENDS)}.")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def current_backend() -> tuple[str | None, bool]:
    """``(backend or None, forced)`` for the code being traced now."""
    mode = _MODE.get()
    if mode == "off":
        return None, True
    if mode is not None:
        return mode, True
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "triton", False
    if platform == "tpu":
        return "mosaic", False
    return None, False


@contextlib.contextmanager
def applying(update_fn: Callable[..., Any]) -> Iterator[None]:
    """Inside, the ``quantize_state`` whose update is ``update_fn`` returns new parameters in
    place of updates (what :func:`optstate.update_and_apply` asks for)."""
    token = _APPLYING.set(update_fn)
    try:
        yield
    finally:
        _APPLYING.reset(token)


def applying_update(update_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``update_and_apply(grads, state, params, **extra_args) -> (new_params, new_state)`` of
    the ``quantize_state`` whose update is ``update_fn``: ``update_fn`` run under
    :func:`applying`, so the kernel writes the parameters (in place when donated)."""
    def update_and_apply(grads, state, params, **extra_args):
        with applying(update_fn), typed_specs(grads, state, params):
            return update_fn(grads, state, params, **extra_args)

    return update_and_apply


def apply_requested(update_fn: Callable[..., Any]) -> bool:
    """Whether :func:`applying` is active for ``update_fn`` (and not for a nested one)."""
    return _APPLYING.get() is update_fn


# -- the plan ----------------------------------------------------------------------------------

def plan(s_leaves: list[Any], owners: list[int | None] | None, updates: Any, params: Any,
         extra_args: dict[str, Any]) -> tuple[dict[int, Chosen],
                                              dict[int, str]]:
    """The parameters that take the kernel (``{k: (leaf, geometry, backend)}``) and, for the
    other parameters with quantized state, why not (``{k: reason}``; empty when the kernel is
    off)."""
    backend, forced = current_backend()
    if backend is None or owners is None:
        return {}, {}
    u_leaves = jax.tree.leaves(updates)
    p_leaves = None if params is None else jax.tree.leaves(params)
    members: dict[int, list[int]] = {}
    for s, k in enumerate(owners):
        if k is not None:
            members.setdefault(k, []).append(s)
    chosen: dict[int, Chosen] = {}
    reasons: dict[int, str] = {}
    for k, ss in sorted(members.items()):
        qs = [s_leaves[s] for s in ss if is_quantized(s_leaves[s])]
        if not qs:
            continue
        size = math.prod(jnp.shape(u_leaves[k]))
        if not forced and size < MIN_KERNEL_ELEMENTS:
            continue
        reason = _why_not(k, ss, s_leaves, u_leaves, p_leaves, extra_args, backend)
        geo: Any = None
        shards: Any = None
        if reason is None:
            shards = shards_of(ss, s_leaves, tuple(jnp.shape(u_leaves[k])))
            if isinstance(shards, str):
                reason, shards = shards, None
        if reason is None:
            # per shard: the tiles of one shard (whole blocks, so the same blocks as the XLA
            # path's)
            shape = tuple(jnp.shape(u_leaves[k])) if shards is None else shards.local
            geo = geometry(shape, qs[0].format, qs[0].block_size, backend)
            if isinstance(geo, str):
                reason, geo = geo, None
        if reason is None:
            chosen[k] = (Leaf(k, tuple(ss)), geo, backend, shards)
        else:
            reasons[k] = reason
    return chosen, reasons


def _why_not(k: int, ss: list[int], s_leaves: list[Any], u_leaves: list[Any],
             p_leaves: list[Any] | None, extra_args: dict[str, Any], backend: str) -> str | None:
    qs = [s_leaves[s] for s in ss if is_quantized(s_leaves[s])]
    if len({(q.fmt, q.block_size) for q in qs}) != 1:
        return "its state leaves are stored in different formats"
    codec = qs[0].format.codec
    if (backend in ARITHMETIC_BOOK_BACKENDS and isinstance(codec, CodebookCodec)
            and any(arithmetic_form(codec.book(q.nonneg)) is None for q in qs)):
        return ("a code book with no arithmetic form needs gathers, which Mosaic TPU does not "
                "lower")
    shape = tuple(jnp.shape(u_leaves[k]))
    for s in ss:
        x = s_leaves[s]
        dtype = x.dtype if is_quantized(x) else jnp.asarray(x).dtype
        if tuple(jnp.shape(x) if not is_quantized(x) else x.shape) != shape:
            return "a state leaf of another shape"
        # integer leaves of the parameter's shape (compensated_params' residual codes) are
        # carried through the tile as they are; the inner update computes on them itself
        if not (jnp.issubdtype(dtype, jnp.floating) or (
                not is_quantized(x) and jnp.issubdtype(dtype, jnp.integer))):
            return f"a state leaf of dtype {dtype}"
    leaves = [u_leaves[k]] + ([] if p_leaves is None else [p_leaves[k]])
    for x in leaves:
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            return f"a {jnp.asarray(x).dtype} gradient or parameter"
    everything = [x for x in u_leaves + (p_leaves or []) + list(extra_args.values())]
    everything += [x for x in s_leaves if not is_quantized(x)]
    for x in everything:
        if jax.dtypes.issubdtype(getattr(x, "dtype", None) or jnp.asarray(x).dtype,
                                 jax.dtypes.extended):
            return "a PRNG key in the state or arguments"
        if jnp.iscomplexobj(x):
            return "complex numbers"
    for name, x in extra_args.items():
        if jnp.shape(x):
            return f"the extra argument {name!r} is an array, not a scalar"
    # inside shard_map the kernel runs on this device's shard, its outputs typed as varying
    # over the manual axes its operands vary over: all of them alike, or an output that the
    # XLA path keeps invariant (e.g. a replicated state beside a varying parameter) would vary
    arrays = leaves + [c for q in qs for c in (q.codes, q.scales) if math.prod(jnp.shape(c))]
    arrays += [s_leaves[s] for s in ss if not is_quantized(s_leaves[s])]
    manual = {_compat.varying_axes(x) or frozenset() for x in arrays}
    if len(manual) > 1:
        return (f"inside shard_map its gradient, parameter and state vary over different "
                f"manual axes ({sorted(sorted(m) for m in manual)})")
    return None


# -- running it --------------------------------------------------------------------------------


def overlay(chosen: dict[int, Chosen], inner_update: Callable[..., Any],
            updates: Any, s_leaves: list[Any], s_def: Any, params: Any,
            extra_args: dict[str, Any], seeds: list[Any], new_updates: Any,
            new_leaves: list[Any], *, apply: bool, applied: bool = False
            ) -> tuple[Any, list[Any]]:
    """The XLA path's results with the kernel's put in for the ``chosen`` parameters.

    Returns ``(new_updates, new_leaves)``, or with ``apply`` ``(new_params, new_leaves)``:
    ``p + u`` in each parameter's dtype, the kernel's parameters written by the kernel (in
    place when the caller donates them). ``applied``: the XLA path's ``new_updates`` are
    already the new parameters (the bounded step wrote them). The XLA path's results for the
    chosen parameters are left unused, so XLA never computes them.
    """
    u_leaves, u_def = jax.tree.flatten(updates)
    p_leaves = None if params is None else jax.tree.leaves(params)
    p_def = None if params is None else jax.tree.structure(params)
    out_leaves = list(new_leaves)
    kernel_out: dict[int, Any] = {}
    for k, entry in sorted(chosen.items()):
        out, members = run_kernel(
            entry, inner_update, u_leaves=u_leaves, u_def=u_def, s_leaves=s_leaves,
            s_def=s_def, p_leaves=p_leaves, p_def=p_def, extra_args=extra_args, seeds=seeds,
            apply=apply and p_leaves is not None)
        kernel_out[k] = out
        for s, value in members.items():
            out_leaves[s] = value
    if apply:
        if params is None:
            raise ValueError("update_and_apply: params is None; pass the parameters.")
        if applied:
            base = list(jax.tree.leaves(new_updates))
        else:
            flat_u = jax.tree.leaves(new_updates)
            base = jax.tree.leaves(apply_updates(params, u_def.unflatten(flat_u)))
        for k, value in kernel_out.items():
            base[k] = value
        return p_def.unflatten(base), out_leaves
    flat_u = list(jax.tree.leaves(new_updates))
    for k, value in kernel_out.items():
        flat_u[k] = value
    return u_def.unflatten(flat_u), out_leaves


def check_traceable(chosen: dict[int, Chosen],
                    inner_update: Callable[..., Any], updates: Any, s_leaves: list[Any],
                    s_def: Any, params: Any, extra_args: dict[str, Any], seeds: list[Any],
                    apply: bool) -> tuple[dict[int, Chosen], dict[int, str]]:
    """``chosen`` without the parameters whose kernel does not trace (an inner update that
    cannot run on a tile), and why; checked abstractly, nothing runs."""
    u_leaves, u_def = jax.tree.flatten(updates)
    p_leaves = None if params is None else jax.tree.leaves(params)
    p_def = None if params is None else jax.tree.structure(params)
    kept, reasons = {}, {}
    for k, entry in chosen.items():
        leaf, shards = entry[0], entry[3]
        if (shards is not None and not shards.contiguous
                and any(seeds[s] is not None for s in leaf.members)):
            reasons[k] = ("stochastic rounding of a state split on a dimension other than the "
                          "first (a shard's counters are not one range of the leaf's)")
            continue
        def run(u_leaves, s_leaves, p_leaves, seeds, entry=entry):
            return run_kernel(
                entry, inner_update, u_leaves=u_leaves, u_def=u_def, s_leaves=s_leaves,
                s_def=s_def, p_leaves=p_leaves, p_def=p_def, extra_args=extra_args,
                seeds=seeds, apply=apply and p_leaves is not None)
        try:
            jax.eval_shape(run, u_leaves, s_leaves, p_leaves, seeds)
        except Exception as error:  # noqa: BLE001 - any failure means "take the XLA path"
            reasons[k] = (f"the inner update does not run in the kernel "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:160]})")
            continue
        kept[k] = entry
    return kept, reasons


def warn_fallbacks(warned: list[str], reasons: dict[int, str], forced: bool) -> None:
    """Warns once per transform and reason that a parameter takes the XLA path although the
    kernel is on (only for reasons that depend on the transform, not on a leaf's shape)."""
    for reason in sorted(set(reasons.values())):
        if reason in warned or not (forced or reason.startswith("the inner update")):
            continue
        warned.append(reason)
        warnings.warn(f"quantize_state: a parameter takes the XLA path instead of the fused "
                      f"kernel: {reason}. Results are the same; only speed differs.",
                      KernelFallbackWarning, stacklevel=5)


def select(inner_update: Callable[..., Any], updates: Any, s_leaves: list[Any], s_def: Any,
           params: Any, extra_args: dict[str, Any], seeds: list[Any],
           owners: list[int | None] | None, apply: bool, warned: list[str]
           ) -> dict[int, Chosen]:
    """The parameters of this step that take the kernel (see :func:`plan`), checked to trace;
    warns about the others once per reason, and records both for ``describe``."""
    chosen, reasons = plan(s_leaves, owners, updates, params, extra_args)
    chosen, failed = check_traceable(chosen, inner_update, updates, s_leaves, s_def, params,
                                     extra_args, seeds, apply)
    reasons.update(failed)
    warn_fallbacks(warned, reasons, current_backend()[1])
    _REASONS.set((chosen, reasons, owners))
    return chosen


_REASONS: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "optstate_fused_last_plan", default=({}, {}, None))


def record(record: dict[str, str] | None, paths: list[str], s_leaves: list[Any]) -> None:
    """Marks in ``record`` (``recording_update_paths``) the leaves of the last :func:`select`
    that take the kernel, and why the others of a planned parameter do not."""
    if record is None:
        return
    chosen, reasons, owners = _REASONS.get()
    if owners is None:
        return
    for s, x in enumerate(s_leaves):
        k = owners[s]
        if not is_quantized(x) or k is None:
            continue
        if k in chosen:
            record[paths[s]] = KERNEL
        elif k in reasons and paths[s] in record:
            record[paths[s]] = f"{record[paths[s]]} (no kernel: {reasons[k]})"
