"""flaxgpt.book.attention, chapter 3's teaching variants: golden values, equivalences between the
variants (and with the production MultiHeadAttention), causality and dropout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.book.attention import (
    CausalAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
    simple_self_attention,
)
from flaxgpt.nn.attention import MultiHeadAttention

INPUTS = jnp.array(
    [
        [0.43, 0.15, 0.89],  # Your     (x^1)
        [0.55, 0.87, 0.66],  # journey  (x^2)
        [0.57, 0.85, 0.64],  # starts   (x^3)
        [0.22, 0.58, 0.33],  # with     (x^4)
        [0.77, 0.25, 0.10],  # one      (x^5)
        [0.05, 0.80, 0.55],  # step     (x^6)
    ]
)


BOOK_CONTEXT = np.array(
    [
        [0.4421, 0.5931, 0.5790],
        [0.4419, 0.6515, 0.5683],
        [0.4431, 0.6496, 0.5671],
        [0.4304, 0.6298, 0.5510],
        [0.4671, 0.5910, 0.5266],
        [0.4177, 0.6503, 0.5645],
    ]
)


def _rand(key: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape)


# --------------------------------------------------------------------------- 3.3 simple self-attention


def test_simple_self_attention_book_values():
    scores = INPUTS @ INPUTS[1]
    np.testing.assert_allclose(scores, [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865], atol=1e-4)
    np.testing.assert_allclose(
        jax.nn.softmax(scores), [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581], atol=1e-4
    )
    context = simple_self_attention(INPUTS)
    assert context.shape == (6, 3)
    np.testing.assert_allclose(context, BOOK_CONTEXT, atol=1e-4)


def test_simple_self_attention_batched_equals_rows():
    x = _rand(0, (2, 5, 4))
    out = simple_self_attention(x)
    assert out.shape == (2, 5, 4)
    for b in range(2):
        np.testing.assert_allclose(out[b], simple_self_attention(x[b]), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 3.4 trainable weights


def test_self_attention_v1_matches_manual_formula():
    module = SelfAttentionV1(d_out=2)
    params = module.init(jax.random.key(0), INPUTS)["params"]
    assert set(params) == {"W_query", "W_key", "W_value"}
    for w in params.values():
        assert w.shape == (3, 2)
        assert float(w.min()) >= 0.0 and float(w.max()) < 1.0  # torch.rand: U[0, 1)
    q, k, v = (INPUTS @ params[n] for n in ("W_query", "W_key", "W_value"))
    weights = jax.nn.softmax(q @ k.T / math.sqrt(2), axis=-1)
    out = module.apply({"params": params}, INPUTS)
    assert out.shape == (6, 2)
    np.testing.assert_allclose(out, weights @ v, rtol=1e-6, atol=1e-6)


def test_self_attention_v2_has_no_bias_and_equals_v1_with_its_kernels():
    v2 = SelfAttentionV2(d_out=2)
    p2 = v2.init(jax.random.key(1), INPUTS)["params"]
    assert set(p2) == {"W_query", "W_key", "W_value"}
    for name in p2:
        assert set(p2[name]) == {"kernel"}  # no bias by default
        assert p2[name]["kernel"].shape == (3, 2)
    p1 = {name: p2[name]["kernel"] for name in p2}  # exercise 3.1: transfer the weights
    out1 = SelfAttentionV1(d_out=2).apply({"params": p1}, INPUTS)
    out2 = v2.apply({"params": p2}, INPUTS)
    np.testing.assert_allclose(out1, out2, rtol=1e-6, atol=1e-6)


def test_self_attention_v2_qkv_bias():
    p = SelfAttentionV2(d_out=2, qkv_bias=True).init(jax.random.key(0), INPUTS)["params"]
    assert all(p[n]["bias"].shape == (2,) for n in ("W_query", "W_key", "W_value"))


# --------------------------------------------------------------------------- 3.5 causal attention


def test_causal_weights_rows_sum_to_one_and_zero_above_diagonal():
    batch = jnp.stack([INPUTS, INPUTS])  # (2, 6, 3), as in the book
    module = CausalAttention(d_out=2, context_length=6, dropout=0.0)
    params = module.init(jax.random.key(0), batch)["params"]
    context, weights = module.apply({"params": params}, batch, return_weights=True)
    assert context.shape == (2, 6, 2) and weights.shape == (2, 6, 6)
    np.testing.assert_allclose(weights.sum(-1), np.ones((2, 6)), rtol=1e-6)
    upper = np.triu(np.ones((6, 6), bool), k=1)
    assert np.all(np.asarray(weights)[:, upper] == 0.0)
    assert np.all(np.asarray(weights)[:, ~upper] > 0.0)


def test_causal_attention_dropout_scales_and_is_reproducible():
    batch = jnp.stack([INPUTS, INPUTS])
    module = CausalAttention(d_out=2, context_length=6, dropout=0.5)
    params = module.init(jax.random.key(0), batch)["params"]
    _, clean = module.apply({"params": params}, batch, return_weights=True)

    def run(seed):
        return module.apply(
            {"params": params},
            batch,
            deterministic=False,
            return_weights=True,
            rngs={"dropout": jax.random.key(seed)},
        )

    (c1, w1), (c2, w2), (_, w3) = run(1), run(1), run(2)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(c1, c2)
    assert not np.array_equal(w1, w3)
    kept = np.asarray(w1) != 0
    assert 0 < kept.sum() < np.asarray(clean != 0).sum()
    # Survivors are scaled by 1 / (1 - p), as torch's nn.Dropout.
    np.testing.assert_allclose(np.asarray(w1)[kept], 2.0 * np.asarray(clean)[kept], rtol=1e-6)
    # deterministic=True ignores the rng.
    det = module.apply({"params": params}, batch, deterministic=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(det, module.apply({"params": params}, batch))


def test_causal_attention_rejects_long_sequence():
    module = CausalAttention(d_out=2, context_length=4)
    with pytest.raises(ValueError, match="exceeds context_length"):
        module.init(jax.random.key(0), jnp.zeros((1, 5, 3)))


# --------------------------------------------------------------------------- 3.6 multi-head: the wrapper


def _map_wrapper_to_mha(wrapper_params, num_heads: int, d_head: int):
    """Per-head Q/K/V kernels concatenated along the output axis; identity out_proj."""
    heads = [wrapper_params[f"heads_{i}"] for i in range(num_heads)]
    mha = {
        name: {"kernel": jnp.concatenate([h[name]["kernel"] for h in heads], axis=-1)}
        for name in ("W_query", "W_key", "W_value")
    }
    width = num_heads * d_head
    mha["out_proj"] = {"kernel": jnp.eye(width), "bias": jnp.zeros((width,))}
    return mha


def test_wrapper_and_split_heads_agree_with_mapped_weights():
    num_heads, d_head, t = 3, 4, 7
    x = _rand(0, (2, t, 5))
    wrapper = MultiHeadAttentionWrapper(d_out=d_head, context_length=t, dropout=0.0, num_heads=num_heads)
    wp = wrapper.init(jax.random.key(1), x)["params"]
    out_w = wrapper.apply({"params": wp}, x)
    assert out_w.shape == (2, t, num_heads * d_head)

    mha = MultiHeadAttention(d_out=num_heads * d_head, num_heads=num_heads, context_length=t)
    mp = _map_wrapper_to_mha(wp, num_heads, d_head)
    # Mapped tree has exactly the shapes MultiHeadAttention creates itself.
    own = mha.init(jax.random.key(2), x)["params"]
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, mp)
    out_m, kv = mha.apply({"params": mp}, x)
    assert kv is None
    np.testing.assert_allclose(out_m, out_w, rtol=1e-5, atol=1e-6)


def test_wrapper_future_tokens_never_change_past_outputs():
    x = _rand(0, (1, 6, 4))
    x_changed = x.at[:, 3:].set(0.0)
    wrapper = MultiHeadAttentionWrapper(d_out=2, context_length=6, dropout=0.0, num_heads=2)
    p = wrapper.init(jax.random.key(0), x)["params"]
    a, b = wrapper.apply({"params": p}, x), wrapper.apply({"params": p}, x_changed)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:], b[:, 3:])
