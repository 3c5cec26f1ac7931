"""flaxgpt.nn.initializers: PyTorch's uniform bound, GPT-2's normal std, and the chunked drawing of large
tensors (same distribution as drawing them whole, bounded scratch)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.nn import initializers
from flaxgpt.nn.initializers import chunked, dense, embedding_init, torch_uniform


def test_torch_uniform_bound_and_statistics():
    fan_in = 64
    x = np.asarray(torch_uniform(fan_in)(jax.random.key(0), (fan_in, 4096)))  # 262k draws
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.999 * bound  # fills U(-b, b) to its edge
    assert abs(x.mean()) < 6 * (bound / math.sqrt(3)) / math.sqrt(x.size)
    np.testing.assert_allclose(x.std(), bound / math.sqrt(3), rtol=0.01)  # std of U(-b, b)
    assert torch_uniform(fan_in)(jax.random.key(0), (3,), jnp.bfloat16).dtype == jnp.bfloat16


def test_torch_uniform_equals_pytorch_linear_bound():
    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(48, 8)
    ours = np.asarray(torch_uniform(48)(jax.random.key(1), (48, 8)))
    bound = float(1 / math.sqrt(48))
    assert float(layer.weight.detach().abs().max()) <= bound and float(layer.bias.detach().abs().max()) <= bound
    assert np.abs(ours).max() <= bound


def test_chunked_equals_unchunked_below_the_threshold_and_blocks_above(monkeypatch):
    normal = jax.nn.initializers.normal(1.0)
    key = jax.random.key(3)
    small = chunked(normal)(key, (16, 8))
    np.testing.assert_array_equal(small, normal(key, (16, 8)))  # small: drawn whole, identical
    monkeypatch.setattr(initializers, "_CHUNK_BYTES", 4 * 8 * 4)  # 4 rows of 8 float32s per block
    big = np.asarray(chunked(normal)(key, (16, 8)))
    assert big.shape == (16, 8)
    for i in range(4):  # block i is the base initializer with fold_in(key, i)
        np.testing.assert_array_equal(big[4 * i : 4 * i + 4], normal(jax.random.fold_in(key, i), (4, 8)))
    assert not np.array_equal(big[:4], big[4:8])  # blocks are independent draws


def test_chunked_rows_tile_the_tensor_exactly(monkeypatch):
    monkeypatch.setattr(initializers, "_CHUNK_BYTES", 3 * 5 * 4)  # 3 rows fit, 10 rows: blocks of 2
    x = np.asarray(chunked(jax.nn.initializers.normal(1.0))(jax.random.key(0), (10, 5)))
    assert x.shape == (10, 5) and np.all(x != 0) and len(np.unique(x)) == x.size


def test_chunked_statistics_match_the_base_initializer(monkeypatch):
    monkeypatch.setattr(initializers, "_CHUNK_BYTES", 64 * 256 * 4)
    x = np.asarray(chunked(jax.nn.initializers.normal(0.02))(jax.random.key(0), (1024, 256)))  # 16 blocks
    assert abs(x.mean()) < 6 * 0.02 / math.sqrt(x.size)
    np.testing.assert_allclose(x.std(), 0.02, rtol=0.01)


@pytest.mark.parametrize("residual_layers, std", [(0, 0.02), (12, 0.02 / math.sqrt(24))])
def test_gpt2_dense_init_std_and_zero_bias(residual_layers, std):
    layer = dense(512, 256, use_bias=True, init="gpt2", residual_layers=residual_layers)
    p = layer.init(jax.random.key(0), jnp.zeros((1, 256)))["params"]
    kernel = np.asarray(p["kernel"])  # (in, out)
    assert kernel.shape == (256, 512)
    np.testing.assert_allclose(kernel.std(), std, rtol=0.02)
    assert abs(kernel.mean()) < 6 * std / math.sqrt(kernel.size)
    np.testing.assert_array_equal(p["bias"], 0.0)


def test_torch_dense_uses_fan_in_for_kernel_and_bias():
    p = dense(32, 128, use_bias=True).init(jax.random.key(0), jnp.zeros((1, 128)))["params"]
    bound = 1 / math.sqrt(128)
    for x in (p["kernel"], p["bias"]):
        assert np.abs(np.asarray(x)).max() <= bound
    assert np.asarray(p["bias"]).std() > 0.5 * bound / math.sqrt(3)  # uniform, not zeros


@pytest.mark.parametrize("scheme, std", [("torch", 1.0), ("gpt2", 0.02)])
def test_embedding_init_std(scheme, std):
    x = np.asarray(embedding_init(scheme)(jax.random.key(0), (1000, 128)))
    np.testing.assert_allclose(x.std(), std, rtol=0.02)
