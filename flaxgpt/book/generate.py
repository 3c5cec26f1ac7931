"""Book section 4.7: ``generate_text_simple``, the greedy loop without a KV cache.

The fast path is :func:`flaxgpt.generation.decode.generate`; this one is kept as the book wrote it, as
the reference the tests compare the compiled decoder with.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.generation.buckets import prompt_bucket
from flaxgpt.nn.model import GPTModel, Params
from flaxgpt.validation import check_int, check_language_model, check_token_ids

__all__ = ["generate_text_simple"]


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(model: GPTModel, params: Params, idx: jax.Array, last: jax.Array) -> jax.Array:
    positions = jnp.full((idx.shape[0],), last, jnp.int32)  # (B,)
    return model.apply({"params": params}, idx, deterministic=True, positions=positions)  # (B, V)


def generate_text_simple(
    model: GPTModel, params: Params, idx: Any, max_new_tokens: int, context_size: int
) -> jax.Array:
    """The book's greedy loop: crop to the last ``context_size`` tokens, take the argmax of the last
    position, append, repeat. No KV cache (see :func:`flaxgpt.generation.decode.generate` for the fast path).

    The window is right-padded to a power-of-two bucket, so the forward compiles once per bucket rather
    than once per length; causal attention makes the padding invisible to the real positions.

    Args:
      model: the model.
      params: its parameters.
      idx: (B, T) token ids.
      max_new_tokens: tokens to append.
      context_size: the longest window fed to the model (<= the model's context_length).

    Returns:
      (B, T + max_new_tokens) int32 ids.
    """
    cfg = model.cfg
    check_language_model(cfg)
    idx = check_token_ids(idx, cfg.vocab_size)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape (B, T) with T >= 1, got {idx.shape}")
    context_size = check_int("context_size", context_size, 1, cfg.context_length + 1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
    for _ in range(max_new_tokens):
        window = idx[:, -context_size:]  # (B, t)
        t = window.shape[1]
        padded = np.zeros((idx.shape[0], prompt_bucket(t, context_size)), np.int32)  # (B, bucket)
        padded[:, :t] = window
        logits = _last_logits(model, params, jnp.asarray(padded), jnp.int32(t - 1))  # (B, V)
        next_id = np.asarray(jnp.argmax(logits, axis=-1), np.int32)  # (B,)
        idx = np.concatenate([idx, next_id[:, None]], axis=1)
    return jnp.asarray(idx)
