"""Book chapter 3, the attention mechanism, from weightless self-attention to multi-head attention.

The teaching path (:func:`simple_self_attention`, :class:`SelfAttentionV1`, :class:`SelfAttentionV2`,
:class:`CausalAttention`, :class:`MultiHeadAttentionWrapper`) follows the chapter section by section;
:class:`MultiHeadAttention` is the production module used by :class:`flaxgpt.nn.model.GPTModel`, with an
optional KV cache for generation and a fused-kernel path (``jax.nn.dot_product_attention``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxgpt.nn.initializers import dense

__all__ = ["causal_mask", "MultiHeadAttention"]

# A finite "minus infinity" for the production path: a fully masked row (a padding query of a ragged
# batch) then gives a uniform, finite softmax instead of NaNs that would leak through 0 * NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def causal_mask(t: int) -> jax.Array:
    """Boolean (T, T) mask, True where a query may attend (on and below the diagonal)."""
    return jnp.tril(jnp.ones((t, t), dtype=bool))


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with split heads: one projection each for Q, K and V (section 3.6.2).

    Without a cache it is the book's module. With a cache (generation), ``kv`` holds this layer's key
    slots (B, H, D, S) and value slots (B, H, S, D) (the layout of :class:`flaxgpt.nn.kv_cache.KVCache`:
    keys transposed so the decode matmuls read both caches without a transpose); the new keys/values are
    written at slot ``index`` in place and queries attend to every written slot at or before their own,
    from slot ``offset[b]`` on (slots before it are the left padding of a shorter prompt in a ragged
    batch).

    Attributes:
      d_out: output width (= model width); split into ``num_heads`` heads.
      num_heads: number of heads.
      context_length: the longest sequence without a cache.
      dropout: dropout rate on the attention weights.
      qkv_bias: bias on the Q/K/V projections.
      init_scheme: "torch" or "gpt2" initialisation (not ``init``, which would shadow ``Module.init``).
      n_layers: model depth, for GPT-2's scaled init of ``out_proj``.
      impl: "xla" (einsum + softmax) or "dot_product" (``jax.nn.dot_product_attention``).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    d_out: int
    num_heads: int
    context_length: int
    dropout: float = 0.0
    qkv_bias: bool = False
    init_scheme: str = "torch"
    n_layers: int = 1
    impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool = True,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
        offset: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Args:
          x: (B, T, d_in) inputs.
          deterministic: disables dropout; otherwise a "dropout" PRNG key is needed.
          kv: this layer's cache (keys (B, H, D, S), values (B, H, S, D)), or None.
          index: () int32, the slot of x's first token in the cache.
          offset: (B,) int32, each row's first valid slot.

        Returns:
          (B, T, d_out) outputs and the updated (keys, values) (None without a cache).
        """
        b, t, d_in = x.shape
        h, d = self.num_heads, self.d_out // self.num_heads
        common = dict(init=self.init_scheme, dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (
            dense(self.d_out, d_in, use_bias=self.qkv_bias, name=name, **common)(x).reshape(b, t, h, d)
            for name in ("W_query", "W_key", "W_value")
        )  # each (B, T, H, D)

        if self.impl == "dot_product" and self.dropout > 0.0 and not deterministic:
            raise ValueError(
                "attention='dot_product' has no dropout on attention weights; train with "
                "attention='xla' or drop_rate=0"
            )
        if kv is None:
            if self.impl == "dot_product":
                context = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, H, D)
            else:
                # Heads first, then plain batched (T, D) products: on XLA:CPU the (B, T, H, D) einsums ran
                # 2-3x slower than this layout (benchmarks/breakdown.py). The 1/sqrt(d) scale goes on q
                # (T x D values, not T x T).
                q_h, k_h, v_h = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # each (B, H, T, D)
                scores = jnp.einsum(
                    "bhtd,bhsd->bhts", q_h * (1.0 / math.sqrt(d)), k_h, preferred_element_type=jnp.float32
                )  # (B, H, T, T)
                scores = jnp.where(causal_mask(t)[None, None], scores, _MASK_VALUE)
                weights = jax.nn.softmax(scores, axis=-1)  # (B, H, T, T) float32
                weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
                context = jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), v_h)  # (B, H, T, D)
                context = context.transpose(0, 2, 1, 3)  # (B, T, H, D)
        else:
            keys, values = kv  # (B, H, D, S), (B, H, S, D)
            k_new = k.transpose(0, 2, 3, 1).astype(keys.dtype)  # (B, H, D, T)
            v_new = v.transpose(0, 2, 1, 3).astype(values.dtype)  # (B, H, T, D)
            keys = jax.lax.dynamic_update_slice(keys, k_new, (0, 0, 0, index))  # (B, H, D, S)
            values = jax.lax.dynamic_update_slice(values, v_new, (0, 0, index, 0))  # (B, H, S, D)
            kv = (keys, values)
            q_slot = index + jnp.arange(t)  # (T,)
            k_slot = jnp.arange(keys.shape[-1])  # (S,)
            mask = (k_slot[None, :] <= q_slot[:, None])[None] & (
                k_slot[None, None, :] >= offset[:, None, None]
            )  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)
            if self.impl == "dot_product":
                # jax.nn.dot_product_attention wants (B, S, H, D): transpose the caches (the GPU path).
                k_all = keys.transpose(0, 3, 1, 2).astype(q.dtype)  # (B, S, H, D)
                v_all = values.transpose(0, 2, 1, 3).astype(q.dtype)  # (B, S, H, D)
                context = jax.nn.dot_product_attention(q, k_all, v_all, mask=mask)  # (B, T, H, D)
            else:
                q_h = q.transpose(0, 2, 1, 3)  # (B, H, T, D)
                scores = jnp.einsum(
                    "bhtd,bhds->bhts", q_h, keys.astype(q.dtype), preferred_element_type=jnp.float32
                )  # (B, H, T, S)
                scores = jnp.where(mask, scores / math.sqrt(d), _MASK_VALUE)
                weights = jax.nn.softmax(scores, axis=-1)  # (B, H, T, S) float32
                weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
                context = jnp.einsum(
                    "bhts,bhsd->bhtd", weights.astype(q.dtype), values.astype(q.dtype)
                )  # (B, H, T, D)
                context = context.transpose(0, 2, 1, 3)  # (B, T, H, D)

        out = dense(
            self.d_out, self.d_out, use_bias=True, residual_layers=self.n_layers, name="out_proj", **common
        )(context.reshape(b, t, self.d_out))  # (B, T, d_out)
        return out, kv
