"""flaxgpt.nn.attention: the causal mask and MultiHeadAttention (parameter names, a reference formula,
the book's PyTorch module, causality, dropout, the fused-kernel path and the KV-cache path)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.nn.attention import MultiHeadAttention, causal_mask


def _rand(key: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape)


def test_causal_mask():
    np.testing.assert_array_equal(causal_mask(3), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_mha_param_names_and_shapes():
    mha = MultiHeadAttention(d_out=8, num_heads=2, context_length=4, qkv_bias=True)
    p = mha.init(jax.random.key(0), jnp.zeros((1, 4, 6)))["params"]
    assert {n: {k: v.shape for k, v in p[n].items()} for n in p} == {
        "W_query": {"kernel": (6, 8), "bias": (8,)},
        "W_key": {"kernel": (6, 8), "bias": (8,)},
        "W_value": {"kernel": (6, 8), "bias": (8,)},
        "out_proj": {"kernel": (8, 8), "bias": (8,)},
    }


def _book_mha_numpy(x, p, num_heads):
    """The book's MultiHeadAttention written out in numpy (float64)."""
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    proj = {n: np.asarray(p[n]["kernel"], np.float64) for n in p}
    d_out = proj["W_query"].shape[1]
    hd = d_out // num_heads

    def split(a):
        return a.reshape(b, t, num_heads, hd).transpose(0, 2, 1, 3)  # (B, H, T, D)

    q, k, v = (split(x @ proj[n]) for n in ("W_query", "W_key", "W_value"))
    scores = q @ k.transpose(0, 1, 3, 2)  # (B, H, T, T)
    scores = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, scores)
    w = np.exp(scores / math.sqrt(hd) - (scores / math.sqrt(hd)).max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    ctx = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, d_out)
    return ctx @ proj["out_proj"] + np.asarray(p["out_proj"]["bias"], np.float64)


@pytest.mark.parametrize("impl", ["xla", "dot_product"])
def test_mha_matches_reference_formula(impl):
    x = _rand(0, (2, 6, 8))
    mha = MultiHeadAttention(d_out=8, num_heads=2, context_length=6, impl=impl)
    p = mha.init(jax.random.key(3), x)["params"]
    out, _ = mha.apply({"params": p}, x)
    np.testing.assert_allclose(out, _book_mha_numpy(x, p, 2), rtol=1e-5, atol=1e-5)


def test_mha_matches_torch_book_module():
    torch = pytest.importorskip("torch")
    b, t, d_in, d_out, h = 2, 6, 8, 8, 2
    x = np.asarray(_rand(0, (b, t, d_in)))
    mha = MultiHeadAttention(d_out=d_out, num_heads=h, context_length=t)
    p = mha.init(jax.random.key(4), jnp.asarray(x))["params"]
    out, _ = mha.apply({"params": p}, jnp.asarray(x))

    # The book's torch forward, step by step, with the same weights (torch Linear weight = kernel.T).
    tx = torch.tensor(x)
    lin = {n: torch.tensor(np.asarray(p[n]["kernel"]).T) for n in p}
    q, k, v = (
        (tx @ lin[n].T).view(b, t, h, d_out // h).transpose(1, 2) for n in ("W_query", "W_key", "W_value")
    )
    scores = q @ k.transpose(2, 3)
    mask = torch.triu(torch.ones(t, t), diagonal=1).bool()
    scores.masked_fill_(mask, -torch.inf)
    w = torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1)
    ctx = (w @ v).transpose(1, 2).contiguous().view(b, t, d_out)
    ref = ctx @ lin["out_proj"].T + torch.tensor(np.asarray(p["out_proj"]["bias"]))
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "dot_product"])
def test_future_tokens_never_change_past_outputs(impl):
    t, cut = 8, 5
    x = _rand(0, (2, t, 8))
    x_changed = x.at[:, cut:].set(_rand(1, (2, t - cut, 8)))
    mha = MultiHeadAttention(d_out=8, num_heads=2, context_length=t, impl=impl)
    p = mha.init(jax.random.key(0), x)["params"]
    out, _ = mha.apply({"params": p}, x)
    out_changed, _ = mha.apply({"params": p}, x_changed)
    np.testing.assert_array_equal(out[:, :cut], out_changed[:, :cut])
    assert not np.allclose(out[:, cut:], out_changed[:, cut:])  # the test can see a change


def test_mha_dropout_reproducible_and_inactive_when_deterministic():
    x = _rand(0, (2, 6, 8))
    mha = MultiHeadAttention(d_out=8, num_heads=2, context_length=6, dropout=0.5)
    p = mha.init(jax.random.key(0), x)["params"]
    clean, _ = mha.apply({"params": p}, x)

    def run(seed, deterministic=False):
        out, _ = mha.apply(
            {"params": p}, x, deterministic=deterministic, rngs={"dropout": jax.random.key(seed)}
        )
        return out

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), clean)
    np.testing.assert_array_equal(run(1, deterministic=True), clean)


def test_dot_product_rejects_training_dropout():
    x = _rand(0, (1, 4, 8))
    mha = MultiHeadAttention(d_out=8, num_heads=2, context_length=4, dropout=0.1, impl="dot_product")
    p = mha.init(jax.random.key(0), x)["params"]
    mha.apply({"params": p}, x, deterministic=True)  # fine for inference
    with pytest.raises(ValueError, match="dot_product"):
        mha.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})


@pytest.mark.parametrize("impl", ["xla", "dot_product"])
def test_mha_cache_path_equals_full_forward(impl):
    b, t, s, h, d = 2, 6, 8, 2, 4
    x = _rand(0, (b, t, h * d))
    mha = MultiHeadAttention(d_out=h * d, num_heads=h, context_length=s, impl=impl)
    p = mha.init(jax.random.key(0), x)["params"]
    full, _ = mha.apply({"params": p}, x)
    kv = (jnp.zeros((b, h, d, s)), jnp.zeros((b, h, s, d)))  # keys (B, H, D, S), values (B, H, S, D)
    offset = jnp.zeros((b,), jnp.int32)
    # Prefill 4 tokens, then decode the remaining 2 one at a time.
    out, kv = mha.apply({"params": p}, x[:, :4], kv=kv, index=jnp.int32(0), offset=offset)
    outs = [out]
    for i in range(4, t):
        out, kv = mha.apply({"params": p}, x[:, i : i + 1], kv=kv, index=jnp.int32(i), offset=offset)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    assert kv[0].shape == (b, h, d, s) and kv[1].shape == (b, h, s, d)
    assert np.all(np.asarray(kv[0])[..., t:] == 0.0)  # unwritten slots untouched
    assert np.all(np.asarray(kv[1])[:, :, t:] == 0.0)


def test_dot_product_equals_xla():
    x = _rand(0, (2, 7, 12))
    kw = dict(d_out=12, num_heads=3, context_length=7)
    p = MultiHeadAttention(**kw).init(jax.random.key(0), x)["params"]
    a, _ = MultiHeadAttention(**kw).apply({"params": p}, x)
    b, _ = MultiHeadAttention(impl="dot_product", **kw).apply({"params": p}, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
