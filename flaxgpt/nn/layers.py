"""The building blocks of book chapter 4: LayerNorm, GELU, FeedForward, the transformer block, and the
shortcut-connection demo network."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxgpt.config import GPTConfig
from flaxgpt.nn.attention import MultiHeadAttention
from flaxgpt.nn.initializers import dense

__all__ = ["LayerNorm", "gelu", "GELU", "FeedForward", "TransformerBlock"]

# --------------------------------------------------------------------------- layers


class LayerNorm(nn.Module):
    """The book's LayerNorm: biased variance, eps 1e-5, learnable ``scale`` and ``shift``.

    Computed in float32 whatever the input dtype, and cast back. (Flax's ``nn.LayerNorm`` defaults to
    eps 1e-6 and a one-pass variance, which is why this one exists.)
    """

    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        emb_dim = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (emb_dim,), self.param_dtype)
        shift = self.param("shift", nn.initializers.zeros, (emb_dim,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=-1, keepdims=True)  # (..., 1)
        var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)  # (..., 1) biased
        norm = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (norm * scale.astype(jnp.float32) + shift.astype(jnp.float32)).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (as GPT-2 and the book): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class GELU(nn.Module):
    """Module form of :func:`gelu`, as the book's ``GELU`` class."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


class FeedForward(nn.Module):
    """Linear(emb, 4 emb) -> GELU -> Linear(4 emb, emb)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        common = dict(use_bias=True, init=cfg.init, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        h = dense(4 * cfg.emb_dim, cfg.emb_dim, name="fc1", **common)(x)  # (B, T, 4C)
        h = gelu(h)
        return dense(
            cfg.emb_dim, 4 * cfg.emb_dim, residual_layers=cfg.n_layers, name="fc2", **common
        )(h)  # (B, T, C)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x))).

    With a KV cache the block also returns the updated cache of its layer; see
    :class:`flaxgpt.nn.attention.MultiHeadAttention` for the cache arguments.
    """

    cfg: GPTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool = True,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
        offset: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.cfg
        drop = nn.Dropout(cfg.drop_rate, name="drop_shortcut")
        att = MultiHeadAttention(
            d_out=cfg.emb_dim,
            num_heads=cfg.n_heads,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
            init_scheme=cfg.init,
            n_layers=cfg.n_layers,
            impl=cfg.attention,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            name="att",
        )
        h, kv = att(
            LayerNorm(cfg.ln_eps, cfg.weight_dtype, name="norm1")(x),
            deterministic,
            kv=kv,
            index=index,
            offset=offset,
        )  # (B, T, C)
        x = x + drop(h, deterministic=deterministic)
        h = FeedForward(cfg, name="ff")(LayerNorm(cfg.ln_eps, cfg.weight_dtype, name="norm2")(x))
        x = x + drop(h, deterministic=deterministic)  # (B, T, C)
        return x, kv

