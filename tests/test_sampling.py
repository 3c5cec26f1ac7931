"""flaxgpt.generation.sampling: greedy, temperature, top-k and top-p as pure functions of traced settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.generation.sampling import (
    check_sampling,
    filter_logits,
    greedy,
    sample_logits,
    sample_next,
    sampling_args,
)

LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.4, -1.0], np.float32)  # distinct, descending
N_DRAWS = 40_000


def _expected(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Reference distribution in float64: softmax(logits / T) restricted to top-k, then top-p."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros(z.shape, bool)
    k = len(z) if top_k is None else top_k
    keep[order[:k]] = True
    if top_p is not None:
        probs = np.exp(z[order[:k]] - z[order[0]])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep[:] = False
        keep[order[:k][before < top_p]] = True
    w = np.where(keep, np.exp(z - z.max()), 0.0)
    return w / w.sum()


def _frequencies(temperature: float, top_k: int | None, top_p: float | None, seed: int) -> np.ndarray:
    t, k, p = sampling_args(temperature, top_k, top_p, LOGITS.size)
    batch = jnp.broadcast_to(jnp.asarray(LOGITS), (N_DRAWS, LOGITS.size))  # (N, V): row b draws with fold_in(key, b)
    draws = np.asarray(jax.jit(sample_next)(batch, jax.random.key(seed), t, k, p))  # (N,)
    return np.bincount(draws, minlength=LOGITS.size) / N_DRAWS


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "temperature, top_k, top_p, match",
    [
        (-0.5, None, None, "temperature"),
        (float("nan"), None, None, "temperature"),
        ("1.0", None, None, "temperature"),
        (1.0, 0, None, "top_k"),
        (1.0, 2.5, None, "top_k"),
        (1.0, True, None, "top_k"),
        (1.0, None, 0.0, "top_p"),
        (1.0, None, 1.5, "top_p"),
        (1.0, None, -0.1, "top_p"),
    ],
)
def test_check_sampling_rejects_bad_settings(temperature, top_k, top_p, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(temperature, top_k, top_p)


def test_sampling_args_maps_none_to_no_filter_and_clips_k():
    t, k, p = sampling_args(0.7, None, None, 50)
    assert (t.dtype, k.dtype, p.dtype) == (np.float32, np.int32, np.float32)
    assert (float(t), int(k), float(p)) == (pytest.approx(0.7), 50, 1.0)
    assert int(sampling_args(1.0, 1000, 0.5, 50)[1]) == 50


# --------------------------------------------------------------------------- filters


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (4, 33))
    np.testing.assert_array_equal(greedy(logits), np.argmax(np.asarray(logits), axis=-1))


def test_top_k_filter_keeps_k_largest_and_ties():
    logits = jnp.array([[3.0, 1.0, 2.0, 2.0, 0.0]])
    out = np.asarray(filter_logits(logits, jnp.int32(2), jnp.float32(1.0)))
    # The 2nd largest is 2.0, which two entries share: both stay (the book's `logits < min_val` rule).
    np.testing.assert_array_equal(np.isfinite(out[0]), [True, False, True, True, False])
    np.testing.assert_array_equal(out[0, [0, 2, 3]], [3.0, 2.0, 2.0])


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.3, [0]), (0.5, [0]), (0.51, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[[2, 0, 3, 1]][None], jnp.float32)  # shuffled: order must not matter
    out = np.asarray(filter_logits(logits, jnp.int32(4), jnp.float32(top_p)))[0]
    kept_probs = sorted(probs[[2, 0, 3, 1]][np.isfinite(out)], reverse=True)
    np.testing.assert_allclose(kept_probs, probs[kept], rtol=1e-6)


def test_filters_are_noops_at_their_limits():
    logits = jax.random.normal(jax.random.key(1), (3, 17))
    np.testing.assert_array_equal(filter_logits(logits, jnp.int32(17), jnp.float32(1.0)), logits)


# --------------------------------------------------------------------------- draws


def test_top_k_1_is_greedy():
    logits = jax.random.normal(jax.random.key(2), (64, 50)) * 3.0
    for seed in range(3):
        draws = sample_logits(logits, jax.random.key(seed), jnp.float32(1.5), jnp.int32(1), jnp.float32(1.0))
        np.testing.assert_array_equal(draws, greedy(logits))


def test_temperature_zero_is_greedy_and_ignores_the_key():
    logits = jax.random.normal(jax.random.key(3), (8, 40))
    for seed in range(3):
        out = sample_next(logits, jax.random.key(seed), 0.0, 5, 0.3)
        np.testing.assert_array_equal(out, greedy(logits))


def test_same_key_same_draws_and_rows_independent_of_batch_size():
    logits = jax.random.normal(jax.random.key(4), (6, 30))
    a = sample_next(logits, jax.random.key(7), 1.0, 30, 1.0)
    np.testing.assert_array_equal(a, sample_next(logits, jax.random.key(7), 1.0, 30, 1.0))
    np.testing.assert_array_equal(a[:2], sample_next(logits[:2], jax.random.key(7), 1.0, 30, 1.0))


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, None), (0.6, None, None), (1.7, 4, None), (0.8, None, 0.7), (1.3, 5, 0.8)],
)
def test_sampled_frequencies_match_the_restricted_softmax(temperature, top_k, top_p):
    expected = _expected(LOGITS, temperature, top_k, top_p)
    freq = _frequencies(temperature, top_k, top_p, seed=11)
    # 5 standard errors of the largest-variance cell: a correct sampler stays inside (and the key is
    # fixed, so the test is deterministic); every plausible bug moves some cell by far more.
    tol = 5.0 * np.sqrt(0.25 / N_DRAWS)  # 0.0125
    np.testing.assert_allclose(freq, expected, atol=tol)
    np.testing.assert_array_equal(freq[expected == 0.0], 0.0)  # filtered tokens are never drawn
    # The tolerance separates this distribution from its neighbours (no temperature, no filters).
    for other in (_expected(LOGITS, 1.0, top_k, top_p), _expected(LOGITS, temperature, None, None)):
        if not np.allclose(other, expected):
            assert np.max(np.abs(other - expected)) > 3 * tol


def test_settings_are_traced_one_compile():
    traces = []

    @jax.jit
    def f(logits, key, t, k, p):
        traces.append(1)
        return sample_next(logits, key, t, k, p)

    logits = jax.random.normal(jax.random.key(5), (2, 20))
    for t, k, p in [(0.0, None, None), (1.0, 3, None), (0.5, None, 0.9), (2.0, 20, 0.2)]:
        f(logits, jax.random.key(0), *sampling_args(t, k, p, 20))
    assert len(traces) == 1
