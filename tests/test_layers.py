"""flaxgpt.nn.layers: LayerNorm and GELU against PyTorch, FeedForward, and the pre-LN TransformerBlock."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.config import GPTConfig
from flaxgpt.nn.layers import GELU, FeedForward, LayerNorm, TransformerBlock, gelu


def _rand(key: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(key), shape)


def test_layer_norm_params_and_normalisation():
    x = _rand(0, (2, 5), scale=3.0) + 1.5
    ln = LayerNorm()
    params = ln.init(jax.random.key(0), x)["params"]
    assert set(params) == {"scale", "shift"}
    np.testing.assert_array_equal(params["scale"], np.ones(5))
    np.testing.assert_array_equal(params["shift"], np.zeros(5))
    out = ln.apply({"params": params}, x)
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.var(-1), 1.0, atol=1e-4)  # biased variance (book: ~1 per row)
    # scale and shift act per feature.
    p2 = {"scale": jnp.full((5,), 2.0), "shift": jnp.arange(5.0)}
    np.testing.assert_allclose(ln.apply({"params": p2}, x), 2.0 * out + jnp.arange(5.0), atol=1e-5)


def test_layer_norm_uses_biased_variance_and_eps():
    x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    mean, var = 2.5, 1.25  # biased: sum((x - mean)^2) / n
    expected = (x - mean) / math.sqrt(var + 1e-5)
    params = LayerNorm().init(jax.random.key(0), x)["params"]
    np.testing.assert_allclose(LayerNorm().apply({"params": params}, x), expected, rtol=1e-6)
    # eps matters for a constant row: 0 / sqrt(0 + eps) stays finite.
    const = jnp.ones((1, 4))
    out = LayerNorm().apply({"params": {"scale": jnp.ones(4), "shift": jnp.zeros(4)}}, const)
    np.testing.assert_array_equal(out, np.zeros((1, 4)))


def test_layer_norm_equals_torch():
    torch = pytest.importorskip("torch")
    x = np.asarray(_rand(1, (3, 7, 32), scale=4.0)) + 2.0
    scale = np.asarray(_rand(2, (32,))) + 1.0
    shift = np.asarray(_rand(3, (32,)))
    params = {"scale": jnp.asarray(scale), "shift": jnp.asarray(shift)}
    ours = LayerNorm().apply({"params": params}, jnp.asarray(x))
    ref = torch.nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(scale))
        ref.bias.copy_(torch.tensor(shift))
        expected = ref(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-6, rtol=0)


def test_layer_norm_bfloat16_computes_in_float32_and_casts_back():
    x = (_rand(0, (2, 16), scale=50.0) + 1000.0).astype(jnp.bfloat16)
    p = {"scale": jnp.ones(16), "shift": jnp.zeros(16)}
    out = LayerNorm().apply({"params": p}, x)
    assert out.dtype == jnp.bfloat16
    ref = LayerNorm().apply({"params": p}, x.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)


def test_gelu_equals_torch_tanh_form():
    torch = pytest.importorskip("torch")
    x = np.linspace(-6.0, 6.0, 1001, dtype=np.float32)
    expected = torch.nn.functional.gelu(torch.tensor(x), approximate="tanh").numpy()
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(GELU().apply({}, jnp.asarray(x))), expected, atol=1e-6, rtol=0)


def test_gelu_is_the_tanh_approximation_not_erf():
    x = jnp.array([-1.0, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=True), atol=1e-7)
    exact = jax.nn.gelu(jnp.array(1.5), approximate=False)
    assert abs(float(gelu(jnp.array(1.5)) - exact)) > 1e-5  # distinguishable from the erf form


def test_feed_forward_shapes_and_4x_width(tiny_config):
    cfg = tiny_config(emb_dim=16)
    x = _rand(0, (2, 3, cfg.emb_dim))
    ff = FeedForward(cfg)
    params = ff.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "fc1": {"kernel": (16, 64), "bias": (64,)},
        "fc2": {"kernel": (64, 16), "bias": (16,)},
    }
    out = ff.apply({"params": params}, x)
    assert out.shape == (2, 3, 16)
    h = gelu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    expected = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _block_params(cfg: GPTConfig, x: jax.Array):
    return TransformerBlock(cfg).init(jax.random.key(0), x)["params"]


def test_transformer_block_structure_and_shape(tiny_config):
    cfg = tiny_config()
    x = _rand(0, (2, 4, cfg.emb_dim))
    params = _block_params(cfg, x)
    assert set(params) == {"norm1", "att", "norm2", "ff"}
    assert set(params["att"]) == {"W_query", "W_key", "W_value", "out_proj"}
    out, kv = TransformerBlock(cfg).apply({"params": params}, x)
    assert out.shape == x.shape and kv is None


def test_transformer_block_is_pre_ln_with_shortcuts(tiny_config):
    from flaxgpt.nn.attention import MultiHeadAttention

    cfg = tiny_config()
    x = _rand(0, (2, 4, cfg.emb_dim))
    p = _block_params(cfg, x)
    out, _ = TransformerBlock(cfg).apply({"params": p}, x)
    ln = LayerNorm()
    att = MultiHeadAttention(d_out=cfg.emb_dim, num_heads=cfg.n_heads, context_length=cfg.context_length)
    h, _ = att.apply({"params": p["att"]}, ln.apply({"params": p["norm1"]}, x))
    x1 = x + h
    x2 = x1 + FeedForward(cfg).apply({"params": p["ff"]}, ln.apply({"params": p["norm2"]}, x1))
    np.testing.assert_allclose(out, x2, rtol=1e-5, atol=1e-5)


def test_transformer_block_dropout_reproducible_and_inactive_when_deterministic(tiny_config):
    cfg = tiny_config(drop_rate=0.5)
    x = _rand(0, (2, 4, cfg.emb_dim))
    p = _block_params(cfg, x)
    block = TransformerBlock(cfg)
    clean, _ = block.apply({"params": p}, x)

    def run(seed):
        return block.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})[0]

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), clean)
    det, _ = block.apply({"params": p}, x, deterministic=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(det, clean)
