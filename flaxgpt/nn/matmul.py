"""Matrix products laid out for speed on every backend, XLA:CPU included: the Dense layers' product and the
tied output head. Same numbers as the plain forms (up to float summation order); the layouts were chosen
from the per-op profiles of ``benchmarks/breakdown.py``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["SMALL_ROWS", "matmul_2d", "tied_logits", "int8_matmul"]

# At most this many rows (B * T of a decode step) is a matrix-vector product: memory-bound.
SMALL_ROWS = 8
_SPLIT_K = 4  # parts the contraction is split into for such products


def matmul_2d(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.dot_general`` for a Dense layer (``nn.Dense(dot_general=matmul_2d)``): (..., in) @ (in, out)
    as one 2-D (N, in) @ (in, out) product.

    * The 2-D form: XLA:CPU ran it and its two backward products (``dx = dy W^T``, ``dW = x^T dy``)
      faster than the (B, T, in) contraction, whose weight gradient contracts two axes.
    * N <= :data:`SMALL_ROWS` (batch-1 decoding): XLA:CPU emits a matrix-vector product on one thread,
      about 60% of the memory bandwidth on two cores. Splitting the contraction into
      :data:`_SPLIT_K` contiguous row blocks of the kernel (a free reshape) makes a batched product
      that uses every core; the partial sums are added (summation order differs by float rounding).

    Other contractions fall through to ``lax.dot_general`` unchanged.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    plain = tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
    if lhs.ndim < 2 or lhs_batch or rhs_batch or not plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)
    k, n = rhs.shape
    x = lhs.reshape(-1, k)  # (N, K)
    if x.shape[0] <= SMALL_ROWS and k % _SPLIT_K == 0:
        p = _SPLIT_K
        xs = x.reshape(x.shape[0], p, k // p).transpose(1, 0, 2)  # (P, N, K/P)
        out = jax.lax.dot_general(
            xs, rhs.reshape(p, k // p, n), (((2,), (1,)), ((0,), (0,))), precision,
            preferred_element_type=preferred_element_type,
        ).sum(0)  # (N, out)
    else:
        out = jax.lax.dot_general(
            x, rhs, (((1,), (0,)), ((), ())), precision, preferred_element_type=preferred_element_type
        )  # (N, out)
    return out.reshape(*lhs.shape[:-1], n)  # (..., out)


def tied_logits(hidden: jax.Array, table: jax.Array, dtype: Any = None) -> jax.Array:
    """The tied output head: ``hidden @ table.T``, (..., C) x (V, C) -> (..., V).

    For a few rows (decoding) the product is taken as ``table @ hidden.T``, which XLA:CPU streams
    through the (V, C) table row by row at full bandwidth, instead of a matrix-vector product over
    its transpose (measured 1.3x faster for GPT-2's 50257 x 768 table on two cores).

    Args:
      hidden: (..., C) final hidden states.
      table: (V, C) token-embedding table.
      dtype: compute dtype both are cast to (default: their promoted dtype).

    Returns:
      (..., V) logits in ``dtype``.
    """
    dtype = dtype or jnp.promote_types(hidden.dtype, table.dtype)
    h = hidden.astype(dtype).reshape(-1, hidden.shape[-1])  # (N, C)
    table = table.astype(dtype)
    if h.shape[0] <= SMALL_ROWS:
        out = jax.lax.dot_general(table, h, (((1,), (1,)), ((), ()))).T  # (V, N) -> (N, V)
    else:
        out = jax.lax.dot_general(h, table, (((1,), (1,)), ((), ())))  # (N, V)
    return out.reshape(*hidden.shape[:-1], table.shape[0])  # (..., V)


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """``x @ (q * scale[:, None]).T``: (..., in) x int8 (out, in) -> (..., out) in x's dtype.

    Args:
      x: (..., in) activations.
      q: (out, in) int8 weights.
      scale: (out,) float32 per-output-channel scales.

    Returns:
      (..., out) outputs.
    """
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # (N, in)
    if x2.shape[0] == 1:
        # One row: a multiply-reduce along q's contiguous rows, the int8 -> float convert fused in: each
        # weight is read once, as one byte. The barrier ties q to x: without it XLA hoists the convert
        # out of a decode loop and keeps a float32 copy of every matrix, which it then reads each step.
        q, x2 = jax.lax.optimization_barrier((q, x2))
        y = jnp.sum(q.astype(jnp.float32) * x2, axis=-1)[None] * scale  # (1, out)
    else:
        w = (q.astype(jnp.float32) * scale[:, None]).T  # (in, out) dequantised once
        y = matmul_2d(x2, w, (((1,), (0,)), ((), ())))  # (N, out)
    return y.reshape(*x.shape[:-1], q.shape[0]).astype(x.dtype)  # (..., out)
