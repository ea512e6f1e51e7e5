"""The quantized state leaf: codes plus per-block scales, with its logical shape and dtype.

A :class:`QuantizedArray` stands where a floating state leaf (e.g. Adam's ``nu`` for one
parameter) would be. It is a JAX pytree node whose children are plain arrays only:

* ``codes``: the stored values. ``int8``: ``uint8`` indices into a 256-entry dynamic map, in
  the leaf's own shape. ``int4``: ``uint8`` holding two 4-bit indices per byte along the last
  axis (element ``2i`` in the low nibble), shape ``(*shape[:-1], ceil(shape[-1] / 2))``.
  ``fp8_e4m3`` / ``fp8_e5m2``: the bits (``uint8``) of ``float8_e4m3fn`` / ``float8_e5m2``
  values in the leaf's shape. ``bf16``: the bits (``uint16``) of the ``bfloat16`` cast of the
  leaf. (FP8 and BF16 codes are kept as raw bits, reinterpreted with
  ``lax.bitcast_convert_type``, because XLA on CPU computes in float32 and would convert whole
  arrays where the step updates them in place.)
* ``scales``: one ``float32`` per block (the block's absolute maximum for ``int8``/``int4``;
  ``absmax / 2**8`` for ``fp8_e4m3`` and ``absmax / 2**15`` for ``fp8_e5m2``, the largest
  powers of two below their largest finite values, so that re-quantizing an unchanged block
  is exact); empty (shape ``(0,)``) for ``bf16``.

Its static metadata (pytree aux data) is ``fmt``, ``shape`` (logical), ``dtype`` (logical),
``block_size`` and ``nonneg`` (whether the unsigned, zero-free grid is used). Key paths look
like ``...mu['w'].codes`` / ``...mu['w'].scales`` under the original leaf path, so Orbax,
Flax and sharding rules see ordinary arrays.

Block layout (see :func:`optstate.quantization.block.block_layout`): blocks run along the trailing
axes and never cross the first axis, so sharding the first axis of ``codes`` and ``scales``
alike never splits a block. ``scales`` has shape ``(*shape[:a], n_blocks)`` where ``a`` is the
first of the fewest trailing axes holding at least ``block_size`` elements; when even
``shape[1:]`` holds fewer than ``block_size`` elements (e.g. ``(4096, 3)``), a block is a
group of ``g`` consecutive rows of the first axis (``g`` a power of two dividing
``shape[0]``) and ``scales`` has shape ``(shape[0] // g, 1)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from optstate.quantization import formats
from optstate.quantization.formats import StorageFormat


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedArray:
    """A floating array stored as low-precision ``codes`` plus per-block ``scales``.

    Children (arrays): ``codes``, ``scales``. Static metadata: ``fmt``, ``shape``, ``dtype``,
    ``block_size``, ``nonneg``. ``optstate.dequantize(q)`` returns the logical array
    ``x ≈ decode(codes) * scale`` of shape ``shape`` and dtype ``dtype``.

    The children may also be tracers, ``jax.ShapeDtypeStruct``s or shardings (e.g. in a tree of
    shardings built with ``jax.tree.map``); properties below read only the static metadata.
    """

    codes: Any
    scales: Any
    fmt: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    nonneg: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def format(self) -> StorageFormat:
        """The registered :class:`~optstate.quantization.formats.StorageFormat` of ``fmt``."""
        return formats.get(self.fmt)

    @property
    def size(self) -> int:
        """Number of logical elements, ``prod(shape)``."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        """Number of logical dimensions."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: ``codes`` plus ``scales`` (from their shapes and dtypes)."""
        total = 0
        for child in (self.codes, self.scales):
            shape = getattr(child, "shape", None)
            dtype = getattr(child, "dtype", None)
            if shape is not None and dtype is not None:
                total += math.prod(shape) * np.dtype(dtype).itemsize
        return total

    def __repr__(self) -> str:
        return (
            f"QuantizedArray(fmt={self.fmt!r}, shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
            f"block_size={self.block_size}, nonneg={self.nonneg})"
        )


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["codes", "scales"],
    meta_fields=["fmt", "shape", "dtype", "block_size", "nonneg"],
)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, QuantizedArray)


def splits_whole_blocks(node: Any, codes_shape: tuple[int, ...],
                        scales_shape: tuple[int, ...], d: int, k: int) -> bool:
    """Whether logical dimension ``d`` of quantized ``node`` can be split ``k`` ways with codes
    and scales split alike and every shard holding whole blocks.

    Layout of :class:`~optstate.quantization.array.QuantizedArray`: ``codes`` has the logical
    dims (the last one packed for int4); ``scales`` has shape ``(*shape[:a], n_blocks)``,
    where blocks run over the flattened trailing axes ``shape[a:]``, or ``(shape[0] // g, 1)``
    when a block is ``g`` whole rows.
    """
    shape = tuple(int(x) for x in node.shape)
    if k == 1:
        return True
    if shape[d] % k or codes_shape[d] % k:
        return False
    if math.prod(scales_shape) == 0:  # bf16: no scales, no blocks
        return True
    if getattr(getattr(node, "format", None), "rank1", False) and len(shape) >= 2:
        # rank-1 normalisation: every element's scale involves a maximum over its whole
        # row and column, so no split of the leaf holds whole "blocks": replicate it
        return False
    block = int(getattr(node, "block_size", 0) or 0)
    last = len(scales_shape) - 1
    if d < last:
        # an axis before the blocked ones: every index along it has blocks of its own, or
        # (rows grouped g at a time) the scales follow whole groups of rows
        rows_grouped = (d == 0 and len(scales_shape) == 2 and scales_shape[1] == 1
                        and scales_shape[0] != shape[0])
        if rows_grouped:
            return scales_shape[0] % k == 0 and shape[0] % scales_shape[0] == 0
        return scales_shape[d] == shape[d]
    if d == last:
        # the first blocked axis: a shard holds shape[d] / k slices of the trailing axes,
        # which must be whole blocks (and the last block must not be ragged)
        inner = math.prod(shape[d + 1:])
        return (block > 0 and ((shape[d] // k) * inner) % block == 0
                and scales_shape[d] % k == 0)
    return False  # inside a block
