"""Book section 4.4: the shortcut-connection demo network."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from flaxgpt.nn.initializers import dense
from flaxgpt.nn.layers import gelu

__all__ = ["ExampleDeepNeuralNetwork"]

class ExampleDeepNeuralNetwork(nn.Module):
    """The book's shortcut-connection demo: Linear + GELU layers, optionally with shortcuts.

    A shortcut is added only where a layer's output has the same shape as its input, as in the book.
    """

    layer_sizes: Sequence[int]
    use_shortcut: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (d_in, d_out) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:])):
            out = gelu(dense(d_out, d_in, use_bias=True, name=f"layers_{i}")(x))
            x = x + out if self.use_shortcut and x.shape == out.shape else out
        return x
