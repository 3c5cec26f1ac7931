"""Book chapter 3, the teaching path: from weightless self-attention to the stacked-heads wrapper.

Section by section: :func:`simple_self_attention` (3.3), :class:`SelfAttentionV1` / :class:`SelfAttentionV2`
(3.4), :class:`CausalAttention` (3.5), :class:`MultiHeadAttentionWrapper` (3.6.1). The production module,
:class:`flaxgpt.nn.attention.MultiHeadAttention` (3.6.2), lives in ``flaxgpt.nn``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxgpt.nn.attention import causal_mask
from flaxgpt.nn.initializers import dense

__all__ = [
    "simple_self_attention",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
]

def simple_self_attention(x: jax.Array) -> jax.Array:
    """Self-attention without trainable weights (section 3.3).

    Args:
      x: inputs of shape (T, d) or (B, T, d).

    Returns:
      Context vectors of the same shape: softmax(x x^T) x.
    """
    scores = x @ jnp.swapaxes(x, -1, -2)  # (..., T, T)
    weights = jax.nn.softmax(scores, axis=-1)  # (..., T, T)
    return weights @ x  # (..., T, d)


def _scaled_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """softmax(q k^T / sqrt(d_k)) v, without a mask; returns (context, weights)."""
    scores = q @ jnp.swapaxes(k, -1, -2)  # (..., T, T)
    weights = jax.nn.softmax(scores / math.sqrt(k.shape[-1]), axis=-1)
    return weights @ v, weights


class SelfAttentionV1(nn.Module):
    """Scaled dot-product attention with raw weight matrices Wq, Wk, Wv (section 3.4.1).

    Weights start as U[0, 1), like the book's ``torch.rand``.
    """

    d_out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        init = nn.initializers.uniform(1.0)
        w_query = self.param("W_query", init, (d_in, self.d_out))
        w_key = self.param("W_key", init, (d_in, self.d_out))
        w_value = self.param("W_value", init, (d_in, self.d_out))
        context, _ = _scaled_attention(x @ w_query, x @ w_key, x @ w_value)  # (..., T, d_out)
        return context


class SelfAttentionV2(nn.Module):
    """As :class:`SelfAttentionV1` with ``Dense`` layers (no bias by default; section 3.4.2)."""

    d_out: int
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        q, k, v = (
            dense(self.d_out, d_in, use_bias=self.qkv_bias, name=name)(x)
            for name in ("W_query", "W_key", "W_value")
        )
        context, _ = _scaled_attention(q, k, v)  # (..., T, d_out)
        return context


class CausalAttention(nn.Module):
    """One causal attention head with dropout on the attention weights (section 3.5).

    Scores above the diagonal are set to -inf before the softmax, so each token only sees itself and
    earlier tokens.
    """

    d_out: int
    context_length: int
    dropout: float = 0.0
    qkv_bias: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, return_weights: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Args:
          x: (B, T, d_in) inputs, T <= context_length.
          deterministic: disables dropout; otherwise a "dropout" PRNG key is needed.
          return_weights: also return the (B, T, T) attention weights.

        Returns:
          (B, T, d_out) context vectors (and the weights).
        """
        b, t, d_in = x.shape
        if t > self.context_length:
            raise ValueError(f"sequence length {t} exceeds context_length {self.context_length}")
        q, k, v = (
            dense(self.d_out, d_in, use_bias=self.qkv_bias, name=name)(x)
            for name in ("W_query", "W_key", "W_value")
        )  # each (B, T, d_out)
        scores = q @ jnp.swapaxes(k, -1, -2)  # (B, T, T)
        scores = jnp.where(causal_mask(t), scores, -jnp.inf)
        weights = jax.nn.softmax(scores / math.sqrt(self.d_out), axis=-1)  # (B, T, T)
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        context = weights @ v  # (B, T, d_out)
        return (context, weights) if return_weights else context


class MultiHeadAttentionWrapper(nn.Module):
    """Multi-head attention as ``num_heads`` stacked :class:`CausalAttention` heads (section 3.6.1).

    Output width is ``num_heads * d_out``; heads are named ``heads_0``, ``heads_1``, ...
    """

    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        heads = [
            CausalAttention(self.d_out, self.context_length, self.dropout, self.qkv_bias, name=f"heads_{i}")
            for i in range(self.num_heads)
        ]
        return jnp.concatenate([h(x, deterministic) for h in heads], axis=-1)  # (B, T, H * d_out)
