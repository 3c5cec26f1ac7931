"""Helpers of the weight-format tests (test_hf.py, test_book.py, test_pretrained.py)."""

from __future__ import annotations

import jax
import numpy as np

from flaxgpt.config import GPTConfig
from flaxgpt.nn.params import param_shapes
from flaxgpt.pytree import flat_dict

__all__ = ["random_params", "assert_same_params"]


def random_params(cfg: GPTConfig, seed: int = 0, scale: float = 1.0) -> dict:
    """Params with every leaf random (no all-ones LayerNorm scales or zero biases to hide mix-ups)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), param_shapes(cfg))


def assert_same_params(a, b):
    """Same leaf names, shapes and values (compared as float32)."""
    fa, fb = flat_dict(a), flat_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert np.shape(fa[k]) == np.shape(fb[k]), k
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)
