"""The layouts of flaxgpt.nn.matmul give the plain products' numbers, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.nn.matmul import SMALL_ROWS, matmul_2d, tied_logits

PLAIN = (((2,), (0,)), ((), ()))  # (B, T, K) x (K, N), as nn.Dense asks for a 3-D input


@pytest.mark.parametrize("rows", [(1, 1), (2, 3), (4, 16)], ids=["decode", "few", "many"])
def test_matmul_2d_matches_dot_general(rows):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((*rows, 64)), jnp.float32)  # (B, T, K)
    w = jnp.asarray(rng.standard_normal((64, 24)), jnp.float32)  # (K, N)
    want = jax.lax.dot_general(x, w, PLAIN)  # (B, T, N)
    got = matmul_2d(x, w, PLAIN)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, PLAIN)))  # noqa: E731
    g_want = jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, w)
    g_got = jax.grad(loss(matmul_2d), argnums=(0, 1))(x, w)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_matmul_2d_splits_only_small_products():
    x_small = jnp.ones((1, SMALL_ROWS, 64))
    x_big = jnp.ones((1, SMALL_ROWS + 1, 64))
    w = jnp.ones((64, 8))
    small = jax.jit(lambda x: matmul_2d(x, w, PLAIN)).lower(x_small).as_text()
    big = jax.jit(lambda x: matmul_2d(x, w, PLAIN)).lower(x_big).as_text()
    assert "tensor<4x16x8xf32>" in small  # the kernel as 4 row blocks of 16
    assert "tensor<4x16x8xf32>" not in big and "tensor<9x64xf32>" in big  # one 2-D product


def test_matmul_2d_passes_other_contractions_through():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((3, 5, 7)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 7, 2)), jnp.float32)
    dims = (((2,), (1,)), ((0,), (0,)))  # batched
    np.testing.assert_array_equal(matmul_2d(a, b, dims), jax.lax.dot_general(a, b, dims))


@pytest.mark.parametrize("shape", [(1,), (2, 1), (3, 5)], ids=["vector", "decode", "prefill"])
def test_tied_logits_matches_hidden_times_table_transposed(shape):
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.standard_normal((*shape, 16)), jnp.float32)  # (..., C)
    table = jnp.asarray(rng.standard_normal((37, 16)), jnp.float32)  # (V, C)
    want = h @ table.T  # (..., V)
    np.testing.assert_allclose(tied_logits(h, table), want, rtol=1e-5, atol=1e-5)
    g_want = jax.grad(lambda h, t: jnp.sum(jnp.cos(h @ t.T)), argnums=(0, 1))(h, table)
    g_got = jax.grad(lambda h, t: jnp.sum(jnp.cos(tied_logits(h, t))), argnums=(0, 1))(h, table)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert tied_logits(h, table, jnp.bfloat16).dtype == jnp.bfloat16
