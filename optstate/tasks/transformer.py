"""A small decoder-only transformer in Flax NNX (pre-norm, learned positions, causal attention).

The default sizes (``d_model`` 256, two blocks, 1.7M parameters) give weight matrices of 16K
to 262K elements, the leaf sizes of real layers rather than of a toy, so that the optimizer
state is a sizeable part of the train step's memory; every matrix is above
``quantize_state``'s ``min_size=4096`` and gets quantized state, while biases and layer norms
(256 to 1024 elements each) keep fp32 state. Short windows (64 bytes) keep the activations,
and the compute, small enough for a demo on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of :class:`TransformerLM`.

    Attributes:
      vocab_size: number of token ids (256 for bytes).
      seq_len: maximum sequence length (size of the position table).
      d_model: width of the residual stream.
      num_heads: attention heads (``d_model`` must be divisible by it).
      num_layers: transformer blocks.
      mlp_ratio: hidden width of the MLP as a multiple of ``d_model``.
    """

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(
                f"ModelConfig: d_model ({self.d_model}) must be divisible by num_heads "
                f"({self.num_heads})."
            )


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with a fused query/key/value projection."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return self.out(mixed)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.ln_attn = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = CausalSelfAttention(d_model, num_heads, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_ratio * d_model, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_ratio * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln_mlp(x))))


class TransformerLM(nnx.Module):
    """Decoder-only language model: token ids ``(batch, length)`` to logits ``(..., vocab)``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.d_model
        self.embed = nnx.Embed(config.vocab_size, d, rngs=rngs)
        self.positions = nnx.Param(jax.random.normal(rngs.params(), (config.seq_len, d)) * 0.02)
        self.blocks = nnx.List([
            Block(d, config.num_heads, config.mlp_ratio, rngs=rngs)
            for _ in range(config.num_layers)
        ])
        self.ln_final = nnx.LayerNorm(d, rngs=rngs)
        # A small output layer makes the initial prediction nearly uniform (loss ~ ln 256).
        self.head = nnx.Linear(d, config.vocab_size, kernel_init=nnx.initializers.normal(0.02),
                               rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[-1]
        if length > self.config.seq_len:
            raise ValueError(
                f"TransformerLM: sequences of at most {self.config.seq_len} tokens, got {length}."
            )
        x = self.embed(tokens) + self.positions[...][:length]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats per byte) of ``logits[:, t]`` predicting ``tokens[:, t]``."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)
    return -jnp.mean(picked)
