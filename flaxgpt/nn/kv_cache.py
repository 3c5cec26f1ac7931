"""The key/value cache that generation threads explicitly through the model (no hidden state)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flaxgpt.config import GPTConfig

__all__ = ["KVCache", "init_cache"]

Slots = Any  # a (L, ...) array (scanned model) or a tuple of L per-layer arrays (unrolled model)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, preallocated for the whole decode.

    The per-layer layout is chosen for the decode matmuls: keys are stored transposed, (B, H, D, S), so
    ``q @ keys`` needs no transpose, and values are (B, H, S, D), so ``weights @ values`` needs none
    either. How the layers are held follows ``cfg.scan_layers`` (see :func:`init_cache`):

    - unrolled model: ``k``/``v`` are tuples of ``n_layers`` arrays, so each layer's slots are updated
      in place and a decode step never copies the whole cache;
    - scanned model: ``k``/``v`` are stacked arrays with a leading layer axis, which ``nn.scan`` slices.

    Attributes:
      k: keys, (L, B, H, D, S) or a tuple of L arrays (B, H, D, S).
      v: values, (L, B, H, S, D) or a tuple of L arrays (B, H, S, D).
      index: () int32, the next slot to write.
      offset: (B,) int32, each row's first real slot: a shorter prompt in a ragged batch is left-padded,
        and its positions count from ``offset`` (position = slot - offset).
    """

    k: Slots
    v: Slots
    index: jax.Array
    offset: jax.Array

    @property
    def length(self) -> int:
        """Number of slots S."""
        v = self.v[0] if isinstance(self.v, (tuple, list)) else self.v  # (B, H, S, D) or (L, B, H, S, D)
        return v.shape[-2]


def init_cache(
    cfg: GPTConfig, batch_size: int, length: int, offset: Any = None, dtype: Any = None
) -> KVCache:
    """Returns an empty cache of ``length`` slots, in the layout ``cfg.scan_layers`` needs.

    Args:
      cfg: the model's config (``scan_layers`` picks stacked arrays or per-layer tuples).
      batch_size: rows B.
      length: slots S (prompt bucket plus new tokens).
      offset: (B,) first real slot of each row (default zeros: no left padding).
      dtype: storage dtype (default: the compute dtype).

    Returns:
      A zero-filled :class:`KVCache` with ``index`` 0: ``k`` (L, B, H, D, S) and ``v`` (L, B, H, S, D)
      when ``cfg.scan_layers``, else tuples of ``n_layers`` arrays (B, H, D, S) and (B, H, S, D).
    """
    b, h, d = batch_size, cfg.n_heads, cfg.head_dim
    dtype = cfg.compute_dtype if dtype is None else dtype
    offset = jnp.zeros((b,), jnp.int32) if offset is None else jnp.asarray(offset, jnp.int32)
    if cfg.scan_layers:
        k = jnp.zeros((cfg.n_layers, b, h, d, length), dtype)  # (L, B, H, D, S)
        v = jnp.zeros((cfg.n_layers, b, h, length, d), dtype)  # (L, B, H, S, D)
    else:
        k = tuple(jnp.zeros((b, h, d, length), dtype) for _ in range(cfg.n_layers))  # L x (B, H, D, S)
        v = tuple(jnp.zeros((b, h, length, d), dtype) for _ in range(cfg.n_layers))  # L x (B, H, S, D)
    return KVCache(k=k, v=v, index=jnp.zeros((), jnp.int32), offset=offset)
