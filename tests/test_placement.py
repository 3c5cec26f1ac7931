"""Tests for flaxgpt.training.placement on this process's devices (the 8-device runs are in test_sharding.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.sharding import make_mesh
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.placement import batch_placer, check_mesh, fit_placement
from flaxgpt.training.state import create_train_state, train_step


def test_check_mesh_names_the_problem() -> None:
    n = jax.device_count()
    assert check_mesh(f"data={n}", batch_size=n) == {"data": n, "fsdp": 1}
    with pytest.raises(ValueError, match=str(n + 1)):
        check_mesh(f"data={n + 1}", batch_size=4 * (n + 1))  # more devices than there are
    with pytest.raises(ValueError):
        check_mesh("data=x", batch_size=4)


def test_fit_placement_step_equals_the_plain_step(tiny_config) -> None:
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    tx = make_optimizer(1e-3)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    key = jax.random.key(1)
    _, want = train_step(create_train_state(GPTModel(cfg), params, tx), x, y, key)
    fresh = init_params(cfg, jax.random.key(0))  # the first step donated (deleted) the first copy
    state, place, step = fit_placement(create_train_state(GPTModel(cfg), fresh, tx), f"data={jax.device_count()}", 2)
    _, got = step(state, *place(x, y), key)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    mesh_place = batch_placer(make_mesh(f"data={jax.device_count()}"))
    batch = mesh_place({"input_ids": x, "labels": y[:, 0]})  # a task's dict batch passes through whole
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (2, 8)
