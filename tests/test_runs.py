"""Tests for flaxgpt/io/runs.py: which checkpoint format a run writes, and that the loaders of
flaxgpt/io/checkpoint.py read either format (safetensors from one process, sharded orbax)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from flaxgpt.io.checkpoint import load_model_from_checkpoint, resolve_checkpoint, restore_checkpoint, save_checkpoint
from flaxgpt.io.runs import checkpoint_format_of, has_checkpoints, run_checkpoint_format, run_of_checkpoint


@pytest.fixture(scope="module")
def state(tiny_config):
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import init_params
    from flaxgpt.training.optim import make_optimizer
    from flaxgpt.training.state import create_train_state

    cfg = tiny_config()
    return cfg, create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(0)), make_optimizer(1e-3))


def _save(fmt: str, run: Path, cfg, state) -> Path:
    kwargs = dict(step=2, key=jax.random.key(1), config=cfg, epoch=1, batch_index=3, tokens_seen=64)
    if fmt == "orbax":
        from flaxgpt.io.orbax_checkpoint import save_orbax_checkpoint

        return save_orbax_checkpoint(run, state, **kwargs)
    return save_checkpoint(run, state, **kwargs)


def test_an_empty_run_takes_the_requested_format(tmp_path: Path) -> None:
    assert checkpoint_format_of(tmp_path) is None and not has_checkpoints(tmp_path)
    assert run_checkpoint_format(tmp_path) == "safetensors"  # one process
    assert run_checkpoint_format(tmp_path, "orbax") == "orbax"
    with pytest.raises(ValueError, match="checkpoint format must be"):
        run_checkpoint_format(tmp_path, "pickle")


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_either_format_resolves_restores_and_loads(state, tmp_path: Path, fmt: str) -> None:
    cfg, st = state
    run = tmp_path / "run"
    ckpt = _save(fmt, run, cfg, st)
    assert checkpoint_format_of(run) == fmt and has_checkpoints(run) and run_of_checkpoint(ckpt) == run
    assert run_checkpoint_format(run) == fmt  # a run keeps its format
    other = "orbax" if fmt == "safetensors" else "safetensors"
    with pytest.raises(ValueError, match="would mix formats"):
        run_checkpoint_format(run, other)
    path, meta = resolve_checkpoint(run)
    assert Path(path) == Path(ckpt) and (meta["step"], meta["epoch"], meta["batch_index"]) == (2, 1, 3)
    restored, meta = restore_checkpoint(run, jax.tree.map(np.zeros_like, st))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(st)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, params, info = load_model_from_checkpoint(run)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(st.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info["step"] == 2
