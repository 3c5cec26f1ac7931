"""Book chapter 5: the next-token cross-entropy loss and perplexity."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["IGNORE_INDEX", "cross_entropy_loss", "perplexity"]

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
        return _cross_entropy(logits, targets, ignore_index)


def _cross_entropy(logits: jax.Array, targets: jax.Array, ignore_index: int) -> jax.Array:
    logits = logits.astype(jnp.float32)  # (..., V)
    mask = targets != ignore_index  # (...)
    safe_targets = jnp.where(mask, targets, 0)  # (...)
    # -log softmax(logits)[target] = logsumexp(logits) - logits[target]. Gathering from the logits
    # rather than from log_softmax keeps the backward pass to one softmax (several times faster on CPU).
    lse = jax.nn.logsumexp(logits, axis=-1)  # (...)
    picked = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]  # (...)
    total = jnp.sum(jnp.where(mask, lse - picked, 0.0))
    count = jnp.sum(mask)
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def perplexity(loss: jax.Array | float) -> jax.Array:
    """``exp(loss)``: the effective number of equally likely next tokens (book section 5.1.2).

    Args:
      loss: a mean cross-entropy in nats.

    Returns:
      The perplexity, a float32 array.
    """
    return jnp.exp(jnp.asarray(loss, jnp.float32))
