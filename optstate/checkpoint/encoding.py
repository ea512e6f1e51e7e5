"""How each leaf of a state is described and stored, and turned back into the array saved.

A leaf is described by its shape, dtype name, weak type and, for a typed PRNG key, its key
implementation. Orbax (TensorStore) stores most dtypes natively; any other dtype (``uint4``,
``float8_e4m3``, ...) is stored bit for bit as unsigned integers of its width (widened to
``uint8`` below 8 bits), and a PRNG key as its key data, so that restore can rebuild exactly the
array that was saved. Quantized leaves (:class:`~optstate.quantization.array.QuantizedArray`)
are stored as their array children and additionally recorded as groups, so that a target of
another quantization format is refused.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optstate._core import _compat
from optstate._core.types import PyTree
from optstate.checkpoint.errors import CheckpointError
from optstate.quantization.array import is_quantized
from optstate.quantization.formats import dtype_format_name

# Dtypes that Orbax/TensorStore store natively. Any other dtype (e.g. uint4, float8_e4m3) is
# stored bit-exactly as unsigned integers of the same width (widened to uint8 below 8 bits).
_NATIVE_DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "float8_e3m4", "float8_e8m0fnu", "float4_e2m1fn", "int4", "int2",
})

_UINT_OF_WIDTH = {2: "uint2", 4: "uint4", 8: "uint8", 16: "uint16", 32: "uint32", 64: "uint64"}


# -------------------------------------------------------------------------------------------
# Dtypes
# -------------------------------------------------------------------------------------------


def _is_key_dtype(dtype: Any) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _dtype_name(dtype: Any) -> str:
    return str(jnp.dtype(dtype)) if not _is_key_dtype(dtype) else str(dtype)


def _format_name(dtype_name: str) -> str:
    return dtype_format_name(dtype_name)


def _bit_width(dtype: Any) -> int:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return int(jnp.finfo(dtype).bits)
    if jnp.issubdtype(dtype, jnp.integer):
        return int(jnp.iinfo(dtype).bits)
    return 8 * dtype.itemsize


def _storage_dtype(dtype_name: str) -> str | None:
    """The dtype an array of ``dtype_name`` is stored as, or None when stored natively."""
    if dtype_name in _NATIVE_DTYPES:
        return None
    width = _bit_width(dtype_name)
    if width not in _UINT_OF_WIDTH:
        raise CheckpointError(f"dtype {dtype_name} ({width} bits) cannot be stored.")
    return "uint8" if width < 8 else _UINT_OF_WIDTH[width]


def _encode_bits(x: jax.Array) -> jax.Array:
    width = _bit_width(x.dtype)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(_UINT_OF_WIDTH[width]))
    return bits.astype(jnp.uint8) if width < 8 else bits


def _decode_bits(bits: jax.Array, dtype_name: str) -> jax.Array:
    width = _bit_width(dtype_name)
    if width < 8:
        bits = bits.astype(jnp.dtype(_UINT_OF_WIDTH[width]))
    return jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype_name))


# The Python scalar whose array JAX makes weakly typed, per dtype kind: a weak leaf's dtype is
# the one such a scalar takes (float32 or, with x64, float64; int32/int64; complex64/128).
_WEAK_SCALAR = {"f": 0.0, "i": 0, "u": 0, "c": 0j}


def _weak_zeros_like(x: jax.Array) -> jax.Array:
    """Zeros of ``x``'s shape and dtype, weakly typed, or ``None`` when no Python scalar gives
    a weakly typed array of that dtype (e.g. a weak ``bfloat16``)."""
    scalar = _WEAK_SCALAR.get(jnp.dtype(x.dtype).kind)
    if scalar is None:
        return None
    zero = jnp.asarray(scalar)
    if zero.dtype != x.dtype or not zero.weak_type:
        return None
    return jnp.broadcast_to(zero, x.shape)


def with_weak_type(x: jax.Array) -> jax.Array:
    """``x`` weakly typed, same dtype, value and sharding, through public JAX only.

    Weak types survive only operations whose inputs are all weak, so ``x`` is written into
    weakly typed zeros of its shape (``zeros.at[...].set(x)``, which keeps the zeros' weak
    type; under ``jit`` XLA reduces it to ``x`` itself).

    Raises:
      ValueError: no Python scalar gives a weakly typed array of ``x``'s dtype.
    """
    def mark(a):
        zeros = _weak_zeros_like(a)
        if zeros is None:
            raise ValueError(f"JAX makes no weakly typed {a.dtype} array from a Python scalar")
        return zeros.at[...].set(a, out_sharding=jax.typeof(a).sharding)

    sharding = getattr(x, "sharding", None)
    return jax.jit(mark, out_shardings=sharding)(x)


def _with_weak_type(x: jax.Array, where: str) -> jax.Array:
    """``x`` weakly typed again, as it was saved. A leaf that cannot be is an error naming it
    (``where``), never a silently strongly typed result: weak types decide the dtypes of later
    arithmetic."""
    try:
        return with_weak_type(x)
    except ValueError as e:
        raise CheckpointError(f"{where}: the leaf was saved weakly typed and its weak type "
                              f"cannot be restored: {e}. Restore with a target whose leaf is "
                              f"strongly typed (e.g. jnp.asarray(x, dtype)).") from e


# -------------------------------------------------------------------------------------------
# Leaf descriptions
# -------------------------------------------------------------------------------------------


def _quantized_groups(tree: PyTree) -> list[dict[str, Any]]:
    """Per quantized leaf (:class:`~optstate.quantization.array.QuantizedArray`): its path,
    format, logical shape and dtype, and the indices of its array children among the flattened
    leaves."""
    items, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    groups, index = [], 0
    for path, item in items:
        n = len(jax.tree.leaves(item))
        if is_quantized(item):
            shape = getattr(item, "shape", None)
            dtype = getattr(item, "dtype", None)
            block_size = getattr(item, "block_size", None)
            nonneg = getattr(item, "nonneg", None)
            groups.append({
                "path": jax.tree_util.keystr(path),
                "fmt": str(getattr(item, "fmt", "?")),
                "shape": None if shape is None else [int(d) for d in shape],
                "dtype": None if dtype is None else _dtype_name(dtype),
                "block_size": None if block_size is None else int(block_size),
                "nonneg": None if nonneg is None else bool(nonneg),
                "leaves": list(range(index, index + n)),
            })
        index += n
    return groups


def _leaf_meta(leaf: Any) -> tuple[tuple[int, ...], str, bool, str | None]:
    """(shape, dtype name, weak_type, PRNG key implementation or None) of an array-like."""
    if not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        leaf = jnp.asarray(leaf)  # numpy arrays and Python numbers as JAX would hold them
    dtype = leaf.dtype
    key_impl = None
    if _is_key_dtype(dtype):
        key_impl = _compat.key_impl_name(leaf)
    return (tuple(int(d) for d in leaf.shape), _dtype_name(dtype),
            bool(getattr(leaf, "weak_type", False)), key_impl)


def _sharding_note(x: Any) -> dict[str, Any] | None:
    """The sharding of a saved leaf as recorded for information (restore does not use it)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return {
            "mesh": {str(k): int(v) for k, v in sharding.mesh.shape.items()},
            "spec": [None if p is None else (list(p) if isinstance(p, tuple) else str(p))
                     for p in sharding.spec],
        }
    if sharding is not None:
        return {"devices": len(sharding.device_set)}
    return None
