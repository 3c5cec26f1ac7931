"""Book chapter 5: the next-token cross-entropy loss and perplexity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["IGNORE_INDEX", "cross_entropy_loss", "chunked_cross_entropy_loss", "perplexity"]

# PyTorch's default ``ignore_index`` (the book pads instruction-tuning targets with it).
IGNORE_INDEX = -100


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """Mean next-token cross-entropy, as ``torch.nn.functional.cross_entropy(logits.flatten(0, 1),
    targets.flatten())`` in the book, computed in float32.

    Args:
      logits: (..., V) unnormalised scores (any float dtype).
      targets: (...) integer target ids in [0, V), or ``ignore_index`` for positions that do not count.
      ignore_index: the target value whose positions are left out of the mean.

    Returns:
      A float32 scalar: the mean over non-ignored positions (0.0 when every position is ignored, where
      PyTorch would return NaN).
    """
    with jax.named_scope("cross_entropy"):  # a name for profiles (benchmarks/breakdown.py)
        total, count = _nll_sum(logits, targets, ignore_index)
        return total / jnp.maximum(count, 1).astype(jnp.float32)


def _nll_sum(logits: jax.Array, targets: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """(sum of -log softmax(logits)[target] over non-ignored positions, their int32 count)."""
    logits = logits.astype(jnp.float32)  # (..., V)
    mask = targets != ignore_index  # (...)
    safe_targets = jnp.where(mask, targets, 0)  # (...)
    # -log softmax(logits)[target] = logsumexp(logits) - logits[target]. Gathering from the logits
    # rather than from log_softmax keeps the backward pass to one softmax (several times faster on CPU).
    lse = jax.nn.logsumexp(logits, axis=-1)  # (...)
    picked = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]  # (...)
    return jnp.sum(jnp.where(mask, lse - picked, 0.0)), jnp.sum(mask, dtype=jnp.int32)


def perplexity(loss: jax.Array | float) -> jax.Array:
    """``exp(loss)``: the effective number of equally likely next tokens (book section 5.1.2).

    Args:
      loss: a mean cross-entropy in nats.

    Returns:
      The perplexity, a float32 array.
    """
    return jnp.exp(jnp.asarray(loss, jnp.float32))


def chunked_cross_entropy_loss(
    hidden: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    chunk_size: int,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """:func:`cross_entropy_loss` of ``logits_fn(hidden)`` without ever holding all the logits.

    The rows go through the head ``chunk_size`` at a time in a ``lax.scan`` whose body is
    rematerialised: the forward pass keeps one (chunk, V) block of logits, and the backward pass
    recomputes each block and its gradient in turn, so neither the float32 (B, T, V) logits nor their
    gradient exist at once (for GPT-2 at B8 x T1024 they are 1.6 GB each). Same value as the full loss
    up to float summation order.

    Args:
      hidden: (..., C) final hidden states (after the final norm).
      logits_fn: the head, (chunk, C) -> (chunk, V) logits (e.g. ``GPTModel.logits_from_hidden``).
      targets: (...) target ids, ``ignore_index`` where a position does not count.
      chunk_size: rows per block (the last block is padded with ignored rows).
      ignore_index: as in :func:`cross_entropy_loss`.

    Returns:
      A float32 scalar, the mean over non-ignored positions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    c = hidden.shape[-1]
    h = hidden.reshape(-1, c)  # (N, C)
    y = targets.reshape(-1)  # (N,)
    n = h.shape[0]
    chunks = -(-n // chunk_size)
    pad = chunks * chunk_size - n
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(chunks, chunk_size, c)  # (K, chunk, C)
    y = jnp.pad(y, (0, pad), constant_values=ignore_index).reshape(chunks, chunk_size)  # (K, chunk)

    @jax.checkpoint
    def block(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
        hc, yc = xs  # (chunk, C), (chunk,)
        block_total, block_count = _nll_sum(logits_fn(hc), yc, ignore_index)  # logits (chunk, V)
        total, count = carry
        return (total + block_total, count + block_count), None

    with jax.named_scope("cross_entropy"):
        (total, count), _ = jax.lax.scan(block, (jnp.float32(0), jnp.int32(0)), (h, y))
        return total / jnp.maximum(count, 1).astype(jnp.float32)
