"""Book chapter 5.3: from logits to the next token -- greedy, temperature, top-k and top-p (nucleus).

Every function here is pure and takes its settings as *traced* values, so one compiled decode loop
serves every temperature, k and p: ``temperature == 0`` selects greedy decoding, ``top_k >= vocab`` and
``top_p >= 1`` switch the filters off (:func:`sampling_args` maps ``None`` to those values). Validate
settings on the host (:func:`check_sampling`) before calling into ``jit``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.validation import check_int, check_number

__all__ = ["check_sampling", "sampling_args", "greedy", "filter_logits", "sample_logits", "sample_next"]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Validates sampling settings on the host.

    Args:
      temperature: >= 0 (0 means greedy).
      top_k: None or an integer >= 1.
      top_p: None or a number in (0, 1].

    Raises:
      ValueError: naming the bad value and what was expected.
    """
    check_number("temperature (0 means greedy)", temperature, 0.0)
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None:
        check_number("top_p", top_p, 0.0, 1.0, open_low=True)


def sampling_args(
    temperature: float, top_k: int | None, top_p: float | None, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host-side settings as fixed-dtype scalars for a jitted sampler (no weak types, no retracing).

    Args:
      temperature: >= 0.
      top_k: None (no top-k filter) or >= 1; values above ``vocab_size`` are clipped to it.
      top_p: None (no nucleus filter) or in (0, 1].
      vocab_size: the logits' last dimension.

    Returns:
      ``(temperature, top_k, top_p)`` as float32, int32, float32 numpy scalars.
    """
    check_sampling(temperature, top_k, top_p)
    k = vocab_size if top_k is None else min(int(top_k), vocab_size)
    p = 1.0 if top_p is None else float(top_p)
    return np.float32(temperature), np.int32(k), np.float32(p)


def greedy(logits: jax.Array) -> jax.Array:
    """Args:
      logits: (..., V).

    Returns:
      (...,) int32 argmax token ids.
    """
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k, then top-p: logits outside the kept set become -inf.

    Top-k keeps logits >= the k-th largest (as the book: those below it are set to -inf, so ties with the
    k-th survive). Top-p then keeps the smallest set of the most likely remaining tokens whose total
    probability (softmax of the top-k-filtered logits) reaches ``top_p``; the most likely token is always
    kept. Both filters use one descending sort and are no-ops for ``top_k >= V`` and ``top_p >= 1``.

    Args:
      logits: (B, V) float logits (already divided by the temperature).
      top_k: () int, 1 <= top_k <= V.
      top_p: () float in (0, 1].

    Returns:
      (B, V) logits with the filtered-out entries at -inf.
    """
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # (B, V) largest first
    rank = jnp.arange(v)  # (V,)
    desc = jnp.where(rank < top_k, desc, -jnp.inf)  # (B, V) top-k of the sorted logits
    probs = jax.nn.softmax(desc, axis=-1)  # (B, V)
    before = jnp.cumsum(probs, axis=-1) - probs  # (B, V) mass of the more likely tokens
    keep = (rank < top_k) & ((before < top_p) | (top_p >= 1.0))  # (B, V) a prefix; rank 0 always kept
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)  # (B, 1) >= 1
    threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)  # (B, 1) smallest kept logit
    return jnp.where(logits >= threshold, logits, -jnp.inf)  # (B, V)


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Draws one token per row from softmax(logits / temperature) restricted by top-k / top-p.

    Row ``b`` uses ``fold_in(key, b)``, so a row's draw does not depend on the batch size.

    Args:
      logits: (B, V) float logits.
      key: a PRNG key.
      temperature: () float > 0.
      top_k: () int in [1, V].
      top_p: () float in (0, 1].

    Returns:
      (B,) int32 token ids.
    """
    v = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / temperature  # (B, V)
    needs_filter = (top_k < v) | (top_p < 1.0)
    scaled = jax.lax.cond(needs_filter, filter_logits, lambda x, k, p: x, scaled, top_k, top_p)
    row_keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits.shape[0]))  # (B,) keys
    return jax.vmap(jax.random.categorical)(row_keys, scaled).astype(jnp.int32)  # (B,)


def sample_next(
    logits: jax.Array, key: jax.Array, temperature: Any, top_k: Any, top_p: Any
) -> jax.Array:
    """The next token: greedy argmax when ``temperature == 0``, else :func:`sample_logits`.

    All settings may be traced; the branch is a ``lax.cond``, so greedy decoding skips the sort.

    Args:
      logits: (B, V) float logits of the last position.
      key: a PRNG key (unused when greedy).
      temperature: () float >= 0.
      top_k: () int in [1, V] (V: no filter).
      top_p: () float in (0, 1] (1: no filter).

    Returns:
      (B,) int32 token ids.
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    return jax.lax.cond(
        temperature == 0.0,
        lambda lg, *_: greedy(lg),
        lambda lg, k, t, tk, tp: sample_logits(lg, k, t, tk, tp),
        logits,
        key,
        temperature,
        top_k,
        top_p,
    )
