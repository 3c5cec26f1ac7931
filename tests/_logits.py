"""A jitted ``model.apply`` shared by the model tests (the config is static, so equal configs and shapes share
one compile across test files)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxgpt.config import GPTConfig
from flaxgpt.nn.model import GPTModel

__all__ = ["logits"]


def logits(cfg: GPTConfig, params, ids, deterministic: bool = True, rngs=None):
    """(B, T, V) logits of ``GPTModel(cfg)`` on ``ids``; ``rngs={"dropout": key}`` for dropout."""
    key = None if rngs is None else rngs["dropout"]
    return _jit_logits(cfg, params, jnp.asarray(ids), deterministic, key)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jit_logits(cfg: GPTConfig, params, ids, deterministic, key):
    rngs = None if key is None else {"dropout": key}
    return GPTModel(cfg).apply({"params": params}, ids, deterministic=deterministic, rngs=rngs)
