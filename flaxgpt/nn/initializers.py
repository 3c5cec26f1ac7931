"""Parameter initialisers: PyTorch's defaults (the book's numerics) and GPT-2's scheme."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxgpt.nn.matmul import matmul_2d

__all__ = ["Initializer", "chunked", "torch_uniform", "dense", "embedding_init"]

Initializer = Callable[..., jax.Array]

# Tensors above this many bytes are drawn in row chunks inside a loop, so that the PRNG's scratch
# space (bits, then the float transform: several times the tensor) is bounded by one chunk rather than
# the whole table. This keeps initialising gpt2-small within one extra copy of its parameters.
_CHUNK_BYTES = 16 * 2**20


def chunked(init: Initializer) -> Initializer:
    """Wraps an initializer so that large tensors are generated a block of rows at a time.

    Each block uses ``fold_in(key, block)``; the values are distributed exactly as ``init``'s.
    """

    def wrapped(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        row_bytes = math.prod(shape[1:]) * jnp.dtype(dtype).itemsize
        if len(shape) < 2 or shape[0] * row_bytes <= _CHUNK_BYTES:
            return init(key, shape, dtype)
        rows = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        # the largest divisor of shape[0] that fits, so the blocks tile the tensor exactly
        rows = max(d for d in range(1, min(rows, shape[0]) + 1) if shape[0] % d == 0)
        blocks = jax.lax.map(
            lambda i: init(jax.random.fold_in(key, i), (rows, *shape[1:]), dtype),
            jnp.arange(shape[0] // rows),
        )  # (n_blocks, rows, ...)
        return blocks.reshape(shape)

    return wrapped


def torch_uniform(fan_in: int) -> Initializer:
    """PyTorch's default for ``nn.Linear`` weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (``kaiming_uniform_(a=sqrt(5))`` on the weight reduces to this bound; the bias uses it directly.)
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return chunked(init)


def dense(
    features: int,
    fan_in: int,
    *,
    use_bias: bool,
    init: str = "torch",
    residual_layers: int = 0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """A ``nn.Dense`` (kernel (in, out)) initialised as PyTorch's ``nn.Linear`` or as GPT-2.

    Args:
      features: output width.
      fan_in: input width (needed for the bias bound of the "torch" scheme).
      use_bias: whether the layer has a bias.
      init: "torch" or "gpt2".
      residual_layers: for "gpt2", a projection into the residual stream gets std 0.02/sqrt(2 * n_layers);
        pass ``n_layers`` for those and 0 otherwise.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      name: module name.

    Returns:
      The Dense module.
    """
    if init == "torch":
        kernel_init = bias_init = torch_uniform(fan_in)
    else:
        std = 0.02 / math.sqrt(2 * residual_layers) if residual_layers else 0.02
        kernel_init, bias_init = chunked(nn.initializers.normal(std)), nn.initializers.zeros
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
        dot_general=matmul_2d,
        name=name,
    )


def embedding_init(init: str) -> Initializer:
    """``nn.Embedding``'s N(0, 1) for "torch", N(0, 0.02) for "gpt2"."""
    return chunked(nn.initializers.normal(1.0 if init == "torch" else 0.02))
