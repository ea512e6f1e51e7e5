"""A LLaMA-like decoder family at real sizes, built for planning: layers under ``scan``.

Shapes follow LLaMA (Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
2023): pre-norm RMSNorm blocks, rotary positions, SwiGLU MLPs, untied input and output
embeddings, a 32K vocabulary; the 70B size uses grouped-query attention with 8 key/value
heads (Touvron et al., "Llama 2", 2023). The smaller sizes take GPT-3's widths and depths
(Brown et al., 2020, Table 2.1) with a SwiGLU hidden width of about :math:`\\frac83 d`
rounded up to a multiple of 256, as LLaMA does.

Every per-layer weight is stacked along a leading layer axis and the blocks run under
``lax.scan`` with ``jax.checkpoint`` around each block (activation rematerialisation, as
large models are trained), so the compiled program, and the time XLA takes to compile it,
do not grow with depth. The planner builds the parameters as ``jax.ShapeDtypeStruct`` only;
:func:`init_params` exists for the small sizes whose step is also run for real.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "FAMILY",
    "STACKED",
    "DecoderConfig",
    "abstract_params",
    "init_params",
    "loss_fn",
    "resolve",
]

STACKED = "layers"
"""The key of the subtree whose leaves carry a leading layer axis (scanned over)."""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes of one member of the family.

    Attributes:
      name: the family name (``"125M"``, ..., ``"70B"``).
      d_model: width of the residual stream.
      num_layers: decoder blocks (stacked, scanned).
      num_heads: query heads; ``d_model`` must be divisible by it.
      num_kv_heads: key/value heads (``num_heads`` for multi-head attention, fewer for
        grouped-query attention); must divide ``num_heads``.
      ffn: hidden width of the SwiGLU MLP.
      vocab: vocabulary size (input and output embeddings are separate matrices).
    """

    name: str
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn: int
    vocab: int = 32000

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig {self.name}: d_model ({self.d_model}) must be divisible by "
                f"num_heads ({self.num_heads}), and num_heads by num_kv_heads "
                f"({self.num_kv_heads}).")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_params(self) -> int:
        """Parameter count: :math:`2Vd + d + L(2d + 2d^2 + 2d\\,d_{kv} + 3d f)`."""
        return sum(math.prod(s.shape) for s in jax.tree.leaves(_shapes(self)))


def _swiglu_width(d: int) -> int:
    return 256 * math.ceil(8 * d / 3 / 256)


FAMILY: dict[str, DecoderConfig] = {
    c.name: c for c in (
        DecoderConfig("125M", 768, 12, 12, 12, _swiglu_width(768)),
        DecoderConfig("350M", 1024, 24, 16, 16, _swiglu_width(1024)),
        DecoderConfig("1.3B", 2048, 24, 16, 16, _swiglu_width(2048)),
        DecoderConfig("7B", 4096, 32, 32, 32, 11008),
        DecoderConfig("70B", 8192, 80, 64, 8, 28672),
    )
}
"""The family, smallest first (``num_params``: 134M, 374M, 1.36B, 6.74B, 69.0B)."""


def resolve(name: str) -> DecoderConfig:
    """The member called ``name`` (case-insensitive); ``ValueError`` naming the sizes if none."""
    for key, config in FAMILY.items():
        if key.lower() == name.strip().lower():
            return config
    raise ValueError(f"unknown model size {name!r}; expected one of {', '.join(FAMILY)}")


def _shapes(c: DecoderConfig) -> dict[str, Any]:
    d, L, f, v = c.d_model, c.num_layers, c.ffn, c.vocab
    kv = c.num_kv_heads * c.head_dim
    s = jax.ShapeDtypeStruct
    return {
        "embed": s((v, d), jnp.float32),
        STACKED: {
            "attn_norm": s((L, d), jnp.float32),
            "wq": s((L, d, d), jnp.float32),
            "wk": s((L, d, kv), jnp.float32),
            "wv": s((L, d, kv), jnp.float32),
            "wo": s((L, d, d), jnp.float32),
            "mlp_norm": s((L, d), jnp.float32),
            "w_gate": s((L, d, f), jnp.float32),
            "w_up": s((L, d, f), jnp.float32),
            "w_down": s((L, f, d), jnp.float32),
        },
        "final_norm": s((d,), jnp.float32),
        "head": s((d, v), jnp.float32),
    }


def abstract_params(config: DecoderConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The parameters as ``jax.ShapeDtypeStruct`` of ``dtype`` (nothing is allocated)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), _shapes(config))


def init_params(config: DecoderConfig, key: jax.Array, dtype: Any = jnp.float32
                ) -> dict[str, Any]:
    """Real parameters (norms 1, matrices normal with std 0.02): for small sizes only."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(_shapes(config))
    keys = jax.random.split(key, len(flat))
    out = [jnp.ones(x.shape, dtype) if str(path[-1].key).endswith("norm")
           else (0.02 * jax.random.normal(k, x.shape)).astype(dtype)
           for k, (path, x) in zip(keys, flat)]
    return treedef.unflatten(out)


def _rms_norm(x: jax.Array, w: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    scale = lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (x32 * scale).astype(x.dtype) * w.astype(x.dtype)


def _rotary(x: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al., RoFormer, 2021) of ``x`` ``(B, S, H, D)``."""
    seq, half = x.shape[1], x.shape[-1] // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = jnp.arange(seq, dtype=jnp.float32)[:, None] * freq[None, :]
    cos = jnp.cos(angle)[None, :, None, :].astype(x.dtype)
    sin = jnp.sin(angle)[None, :, None, :].astype(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def _block(c: DecoderConfig, x: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
    batch, seq, _ = x.shape
    hd, kv, groups = c.head_dim, c.num_kv_heads, c.num_heads // c.num_kv_heads
    h = _rms_norm(x, w["attn_norm"])
    q = _rotary((h @ w["wq"]).reshape(batch, seq, c.num_heads, hd))
    k = _rotary((h @ w["wk"]).reshape(batch, seq, kv, hd))
    v = (h @ w["wv"]).reshape(batch, seq, kv, hd)
    q = q.reshape(batch, seq, kv, groups, hd)
    logits = jnp.einsum("bqkgd,btkd->bkgqt", q, k).astype(jnp.float32) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1).astype(x.dtype)
    mixed = jnp.einsum("bkgqt,btkd->bqkgd", probs, v).reshape(batch, seq, c.d_model)
    x = x + mixed @ w["wo"]
    h = _rms_norm(x, w["mlp_norm"])
    return x + (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]


def loss_fn(config: DecoderConfig, params: dict[str, Any], tokens: jax.Array, *,
            compute_dtype: Any = jnp.bfloat16, remat: bool = True,
            gather: Callable[[Any], Any] | None = None) -> jax.Array:
    """Mean next-token cross-entropy of ``tokens`` ``(batch, seq)`` (int32).

    Parameters are cast to ``compute_dtype`` where they are used (mixed precision: the
    stored parameters, gradients and optimizer state keep their own dtypes). ``gather``, if
    given, is applied to the embedding, the head and each block's weights right before use:
    at ZeRO stage 3 it all-gathers one block at a time inside the scan, as FSDP does.
    """
    gather = gather or (lambda t: t)
    cast = lambda t: jax.tree.map(lambda a: a.astype(compute_dtype), t)
    outer = gather({k: v for k, v in params.items() if k != STACKED})
    x = jnp.take(cast(outer["embed"]), tokens, axis=0)

    def body(x: jax.Array, w: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        return _block(config, x, cast(gather(w))), None

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    x, _ = lax.scan(body, x, params[STACKED])
    x = _rms_norm(x, cast(outer["final_norm"]))
    logits = (x[:, :-1] @ cast(outer["head"])).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
    return -jnp.mean(picked)
