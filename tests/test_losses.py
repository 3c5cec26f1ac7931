"""cross_entropy_loss and perplexity: against a NumPy reference, PyTorch, and the book's figures."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.training.losses import IGNORE_INDEX, cross_entropy_loss, perplexity


def _reference(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100) -> float:
    logits = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    keep = targets != ignore_index
    return float(-logp[keep, targets[keep]].mean())


def test_matches_numpy_reference_with_ignored_positions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    targets[0, 1] = targets[1, 4] = IGNORE_INDEX
    got = float(cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets)))
    assert got == pytest.approx(_reference(logits, targets), rel=1e-6)
    # ignored positions do not count: changing their logits changes nothing
    logits2 = logits.copy()
    logits2[0, 1] += 100.0
    assert float(cross_entropy_loss(jnp.asarray(logits2), jnp.asarray(targets))) == pytest.approx(got, rel=1e-6)


def test_custom_ignore_index_and_all_ignored():
    logits = jnp.zeros((1, 3, 4))
    targets = jnp.array([[1, 7, 7]])
    assert float(cross_entropy_loss(logits, targets, ignore_index=7)) == pytest.approx(math.log(4))
    assert float(cross_entropy_loss(logits, jnp.full((1, 3), -100))) == 0.0


def test_low_precision_logits_give_float32_loss():
    logits = jnp.ones((2, 3, 5), jnp.bfloat16)
    loss = cross_entropy_loss(logits, jnp.zeros((2, 3), jnp.int32))
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(math.log(5), rel=1e-6)


def test_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7, 13)).astype(np.float32)
    targets = rng.integers(0, 13, size=(3, 7))
    targets[2, :3] = -100
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).flatten(0, 1), torch.from_numpy(targets).flatten()
    ).item()
    assert float(cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets))) == pytest.approx(
        expected, rel=1e-5
    )


def test_perplexity_book_value():
    # Book section 5.1.2: a loss of 10.7940 is a perplexity of about 48,725.
    assert float(perplexity(10.7940)) == pytest.approx(48725.8, rel=1e-4)
    assert float(perplexity(jnp.float32(0.0))) == 1.0


@pytest.mark.parametrize("chunk", [1, 4, 7, 64], ids=["rows", "even", "ragged", "one-block"])
def test_chunked_cross_entropy_matches_the_full_loss_and_its_gradients(chunk):
    from flaxgpt.training.losses import chunked_cross_entropy_loss

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)  # (B, T, C)
    table = jnp.asarray(rng.standard_normal((11, 8)), jnp.float32)  # (V, C)
    targets = jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32).at[1, 2:4].set(-100)

    def full(h, w):
        return cross_entropy_loss(h @ w.T, targets)

    def chunked(h, w):
        return chunked_cross_entropy_loss(h, lambda x: x @ w.T, targets, chunk)

    np.testing.assert_allclose(chunked(hidden, table), full(hidden, table), rtol=1e-6)
    g_full = jax.grad(full, argnums=(0, 1))(hidden, table)
    g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, table)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    every = jnp.full_like(targets, -100)
    assert float(chunked_cross_entropy_loss(hidden, lambda x: x @ table.T, every, chunk)) == 0.0
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy_loss(hidden, lambda x: x @ table.T, targets, 0)
