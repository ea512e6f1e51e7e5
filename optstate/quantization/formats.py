"""THE registry of storage formats: every format optstate can keep optimizer state in.

A :class:`StorageFormat` says everything the rest of the library needs to know about a
format: its name, bits per stored value, default block size, code dtype, how many values share
one code element, the float grid it rounds to (for the stall model) and the codec that turns
values into codes. Names enter the library as strings (``quantize_state(inner, "int8")``), are
resolved here once (:func:`get`) and flow on as the object.

Adding a format: one entry in :data:`FORMATS` below, plus its codec in
:mod:`optstate.quantization.codecs` if none of the existing codecs fits (and its grid in
:mod:`optstate.quantization.grids` for a new float grid). Nothing else dispatches on names:
the quantized array, the chunked step, sharding, checkpoints, ``describe`` and the command
line read what they need from the entry.

Bytes per parameter of Adam state (two moments), scales included: fp32 8, bf16 4,
int8/fp8 about 2.03, int4 about 1.06 (block sizes 256 and 128).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from optstate.quantization import codebooks
from optstate.quantization.codecs import (
    Codec,
    CodebookCodec,
    FloatCodec,
    ScaledFloatCodec,
    pack_int4,
    unpack_int4,
)
from optstate.quantization.grids import FLOAT_FORMATS, FloatFormat


@dataclasses.dataclass(frozen=True)
class StorageFormat:
    """One storage format of optimizer state.

    Attributes:
      name: what users pass, e.g. ``"int8"``.
      bits: stored bits per value (scales not counted).
      default_block_size: values per block when ``block_size=None`` (0: the format has no
        blocks and no scales).
      codec: turns values into codes and back; ``None`` for a format stored as is (``fp32``).
      codes_dtype: the unsigned integer dtype of the stored codes (``None`` for ``fp32``).
      values_per_code: how many values share one element of ``codes`` along the last axis
        (2 for ``int4``: two 4-bit codes per byte).
      grid: the float grid the format rounds to (``None`` for code-book formats); its
        mantissa bits drive the stall model of :mod:`optstate.staleness`.
      reference: where the format comes from.
      stall_decay: state whose per-step decay (the coefficient of its old value in its new
        one, read off the update by :mod:`optstate.quantization.running_sums`) is at least
        this is *stall-prone*: nearest rounding on this grid stops it moving, so
        ``quantize_state`` stores it as its ``stalling=`` argument says (stochastic rounding
        by default). ``1.0``: running sums only (no decay at all).
      rank1: leaves of at least two dimensions are scaled by rank-1 normalisation (per
        element, the smallest of the maxima along each axis: Li, Chen, Zhu 2023) instead of
        per block; scales are the maxima along each axis, concatenated.
    """

    name: str
    bits: int
    default_block_size: int
    codec: Codec | None
    codes_dtype: str | None
    values_per_code: int = 1
    grid: FloatFormat | None = None
    reference: str = ""
    stall_decay: float = 1.0
    rank1: bool = False

    @property
    def quantized(self) -> bool:
        """Whether leaves in this format are stored as a ``QuantizedArray``."""
        return self.codec is not None

    @property
    def blocked(self) -> bool:
        """Whether the format keeps one float32 scale per block."""
        return self.codec is not None and self.codec.blocked

    def codes_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the stored codes of a leaf of logical ``shape``: the last axis divided by
        :attr:`values_per_code` (rounded up)."""
        if self.values_per_code == 1:
            return tuple(shape)
        if not shape:
            return (1,)
        k = self.values_per_code
        return tuple(shape[:-1]) + (-(-shape[-1] // k),)

    def pack(self, codes: Any) -> Any:
        """Codes of one value each -> stored codes (packed along the last axis)."""
        return pack_int4(codes) if self.values_per_code == 2 else codes

    def unpack(self, packed: Any, n: int) -> Any:
        """Stored codes -> codes of one value each, ``n`` along the last axis."""
        return unpack_int4(packed, n) if self.values_per_code == 2 else packed

    def block_size(self, block_size: Any, *, context: str = "quantize_state") -> int:
        """The block size to use for a requested ``block_size`` (``None``: the default).

        Raises:
          ValueError: ``block_size`` is not a positive integer, is below 2, or is odd for a
            format that packs two values per byte.
        """
        if block_size is None:
            return self.default_block_size
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
            raise ValueError(f"{context}: block_size must be None or a positive integer "
                             f"(e.g. 64, 128, 256, 2048); got {block_size!r}.")
        block_size = int(block_size)
        if not self.blocked:
            return 0  # no blocks; the argument is ignored
        k = self.values_per_code
        if block_size < 2 or block_size % k:
            rule = (" and even (two codes per byte)" if k == 2 else
                    f" and a multiple of {k} ({k} codes per byte)" if k > 1 else "")
            raise ValueError(
                f"{context}: block_size for {self.name!r} must be an integer >= 2{rule}; "
                f"got {block_size}. Accepted: None (default {self.default_block_size}) or e.g. "
                f"64, 128, 256, 2048.")
        return block_size


_DETTMERS = "Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022"
_LI = "Li, Chen, Zhu, Memory Efficient Optimizers with 4-bit States, NeurIPS 2023"
_OCP = "OCP 8-bit Floating Point Specification (OFP8), 2023"


def _scaled_float(name: str, dtype: str) -> StorageFormat:
    grid = FLOAT_FORMATS[name]
    return StorageFormat(name, 8, 256, ScaledFloatCodec(grid, dtype, "uint8"), "uint8",
                         grid=grid, reference=_OCP)


#: Every storage format, by name (the order is the order of error messages and menus).
FORMATS: dict[str, StorageFormat] = {f.name: f for f in (
    StorageFormat("int8", 8, 256,
                  CodebookCodec(codebooks.INT8_SIGNED, codebooks.INT8_UNSIGNED), "uint8",
                  reference=_DETTMERS),
    StorageFormat("int4", 4, 128,
                  CodebookCodec(codebooks.INT4_SIGNED, codebooks.INT4_UNSIGNED), "uint8",
                  values_per_code=2, reference=_LI,
                  # 16 levels: an EMA that keeps 95% of its value per step (Lion's 0.99,
                  # Adan's 0.98/0.99, Adam's b2) moves by less than half a level for most
                  # elements, and nearest rounding freezes it (bench/catalogue.py: lion 108%,
                  # adan 25% shortfall with nearest, 8% and 3% with stochastic rounding).
                  stall_decay=0.95),
    _scaled_float("fp8_e4m3", "float8_e4m3fn"),
    _scaled_float("fp8_e5m2", "float8_e5m2"),
    StorageFormat("bf16", 16, 0, FloatCodec(FLOAT_FORMATS["bf16"], "bfloat16", "uint16"),
                  "uint16", grid=FLOAT_FORMATS["bf16"]),
    StorageFormat("fp32", 32, 0, None, None, grid=FLOAT_FORMATS["fp32"]),
)}

#: Layout variants of the formats above, used by ``quantize_state`` for some leaves (never
#: named by users): ``int4_rank1`` is ``int4`` with rank-1 normalisation, which
#: ``quantize_state(..., rank1=True)`` (the default for ``int4``) gives second moments.
VARIANTS: dict[str, StorageFormat] = {
    "int4_rank1": dataclasses.replace(FORMATS["int4"], name="int4_rank1", rank1=True),
}
#: The variant of each format used for rank-1 normalised leaves.
RANK1_VARIANT: dict[str, str] = {"int4": "int4_rank1"}

#: Names of every format ``quantize_state`` accepts.
NAMES: tuple[str, ...] = tuple(FORMATS)
#: Names of the formats that store a leaf as a ``QuantizedArray`` (all but ``fp32``).
QUANTIZED_NAMES: tuple[str, ...] = tuple(n for n, f in FORMATS.items() if f.quantized)


def get(fmt: str | StorageFormat, *, context: str = "quantize_state") -> StorageFormat:
    """The registered format named ``fmt`` (a :class:`StorageFormat` is returned as is).

    Raises:
      ValueError: unknown name; the message lists the accepted ones.
    """
    if isinstance(fmt, StorageFormat):
        return fmt
    if isinstance(fmt, str) and fmt in FORMATS:
        return FORMATS[fmt]
    if isinstance(fmt, str) and fmt in VARIANTS:
        return VARIANTS[fmt]
    raise ValueError(f"{context}: unknown format {fmt!r}; expected one of {list(NAMES)}.")


# Short names of plain dtypes, as ``describe`` and ``optstate inspect`` print them.
_DTYPE_NAMES = {
    "float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
    "float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2",
}


def dtype_format_name(dtype: Any) -> str:
    """The format name of a plain array of ``dtype`` (``float32`` -> ``"fp32"``,
    ``bfloat16`` -> ``"bf16"``, ...); other dtypes keep their NumPy name (``"int32"``)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return _DTYPE_NAMES.get(name, name)
