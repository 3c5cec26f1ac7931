"""flaxgpt.nn.kv_cache: init_cache's shapes and layouts (stacked for the scanned model, per-layer tuples
for the unrolled one), and the model's checks of a cache that does not fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.nn.kv_cache import init_cache
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import (
    init_params,
)


def test_init_cache_shapes(tiny):
    cache = init_cache(tiny, batch_size=3, length=10)  # unrolled: one array per layer
    assert len(cache.k) == len(cache.v) == 2
    assert all(k.shape == (3, 4, 8, 10) for k in cache.k)  # (B, H, D, S)
    assert all(v.shape == (3, 4, 10, 8) for v in cache.v)  # (B, H, S, D)
    assert cache.k[0].dtype == jnp.float32 and cache.length == 10
    assert int(cache.index) == 0 and cache.offset.tolist() == [0, 0, 0]
    scanned = init_cache(tiny.replace(scan_layers=True), batch_size=3, length=10)  # stacked
    assert scanned.k.shape == (2, 3, 4, 8, 10) and scanned.v.shape == (2, 3, 4, 10, 8)
    assert scanned.length == 10
    assert init_cache(tiny.replace(dtype="bfloat16"), 1, 4).k[0].dtype == jnp.bfloat16
    assert init_cache(tiny, 2, 4, offset=[0, 3]).offset.tolist() == [0, 3]


def test_cache_layout_must_match_scan_layers(tiny, tiny_params):
    ids = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="scan_layers=False"):
        GPTModel(tiny).apply(
            {"params": tiny_params}, ids, cache=init_cache(tiny.replace(scan_layers=True), 1, 8)
        )


def test_cache_rejects_overflowing_context(tiny, tiny_params):
    params = tiny_params
    with pytest.raises(ValueError, match="context_length"):
        GPTModel(tiny).apply(
            {"params": params},
            jnp.zeros((1, tiny.context_length + 1), jnp.int32),
            cache=init_cache(tiny, 1, 32),
        )


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_cache_layout_follows_scan_layers_both_ways(tiny, scan):
    cfg = tiny.replace(scan_layers=scan)
    params = init_params(cfg, jax.random.key(0))
    cache = init_cache(cfg, 2, 12)
    assert isinstance(cache.k, tuple) != scan and isinstance(cache.v, tuple) != scan
    logits, new = GPTModel(cfg).apply({"params": params}, jnp.ones((2, 3), jnp.int32), cache=cache)
    assert logits.shape == (2, 3, cfg.vocab_size) and int(new.index) == 3
    assert jax.tree.structure(new) == jax.tree.structure(cache)  # same layout comes back
    other = init_cache(tiny.replace(scan_layers=not scan), 2, 12)
    with pytest.raises(ValueError, match=rf"scan_layers={scan}.*init_cache"):
        GPTModel(cfg).apply({"params": params}, jnp.ones((2, 3), jnp.int32), cache=other)


def test_init_cache_writes_only_the_new_slots(tiny, tiny_params):
    cache = init_cache(tiny, 1, 8)
    _, new = GPTModel(tiny).apply({"params": tiny_params}, jnp.ones((1, 3), jnp.int32), cache=cache)
    for k, v in zip(new.k, new.v):  # (B, H, D, S), (B, H, S, D)
        assert np.any(k[..., :3] != 0) and np.all(k[..., 3:] == 0)
        assert np.any(v[..., :3, :] != 0) and np.all(v[..., 3:, :] == 0)
