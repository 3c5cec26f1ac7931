"""The key/value cache that generation threads explicitly through the model (no hidden state)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flaxgpt.config import GPTConfig


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, preallocated for the whole decode.

    Attributes:
      k: (L, B, S, H, D) keys, layer-major (so a scanned model scans over it).
      v: (L, B, S, H, D) values.
      index: () int32, the next slot to write.
      offset: (B,) int32, each row's first real slot: a shorter prompt in a ragged batch is left-padded,
        and its positions count from ``offset`` (position = slot - offset).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array
    offset: jax.Array

    @property
    def length(self) -> int:
        """Number of slots S."""
        return self.k.shape[2]


def init_cache(
    cfg: GPTConfig, batch_size: int, length: int, offset: Any = None, dtype: Any = None
) -> KVCache:
    """Returns an empty cache of ``length`` slots.

    Args:
      cfg: the model's config.
      batch_size: rows B.
      length: slots S (prompt bucket plus new tokens).
      offset: (B,) first real slot of each row (default zeros: no left padding).
      dtype: storage dtype (default: the compute dtype).

    Returns:
      A zero-filled :class:`KVCache` with ``index`` 0.
    """
    shape = (cfg.n_layers, batch_size, length, cfg.n_heads, cfg.head_dim)
    dtype = cfg.compute_dtype if dtype is None else dtype
    offset = jnp.zeros((batch_size,), jnp.int32) if offset is None else jnp.asarray(offset, jnp.int32)
    return KVCache(
        k=jnp.zeros(shape, dtype),  # (L, B, S, H, D)
        v=jnp.zeros(shape, dtype),  # (L, B, S, H, D)
        index=jnp.zeros((), jnp.int32),
        offset=offset,
    )
