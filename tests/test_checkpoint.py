"""Checkpoints: exact round trip, atomic layout, newest-valid selection, pruning, no pickle."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.config import GPTConfig
from flaxgpt.io.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_model_from_checkpoint,
    read_meta,
    restore_checkpoint,
    save_checkpoint,
)
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state

CFG = GPTConfig(vocab_size=61, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _state(seed: int = 0, cfg: GPTConfig = CFG):
    params = init_params(cfg, jax.random.key(seed))
    return create_train_state(GPTModel(cfg), params, make_optimizer(1e-3, decay_biases_and_norms=False))


def _perturbed(state, delta: float):
    """A state whose every float leaf differs (as after training) and whose step is 7."""
    moved = jax.tree.map(lambda x: x + delta if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return moved.replace(step=jnp.asarray(7, jnp.int32))


def _save(run_dir, state, step, **kw):
    kw.setdefault("key", jax.random.key(42))
    return save_checkpoint(run_dir, state, step=step, config=CFG, **kw)


def _equal_trees(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def test_round_trip_is_exact(tmp_path):
    state = _perturbed(_state(), 0.25)
    path = _save(tmp_path, state, 7, epoch=2, batch_index=3, seed=9, tokens_seen=1234, extra={"a": 1})
    assert path == tmp_path / "checkpoints" / "step_00000007"
    restored, meta = restore_checkpoint(tmp_path, _state(seed=1))
    assert _equal_trees(restored, state)
    abstract_template = jax.eval_shape(lambda: _state(seed=1))  # shapes only, nothing allocated
    assert _equal_trees(restore_checkpoint(tmp_path, abstract_template)[0], state)
    assert int(restored.step) == 7 and restored.step.dtype == jnp.int32
    assert (meta["step"], meta["epoch"], meta["batch_index"], meta["seed"], meta["tokens_seen"]) == (
        7, 2, 3, 9, 1234
    )
    assert meta["extra"] == {"a": 1} and meta["tokenizer"] == "gpt2"
    assert np.array_equal(jax.random.key_data(meta["key"]), jax.random.key_data(jax.random.key(42)))
    assert GPTConfig.from_dict(meta["config"]) == CFG
    assert (tmp_path / "config.json").exists() is False  # config.json is the CLI's
    names = [leaf["name"] for leaf in meta["leaves"]]
    assert "step" in names and "params/tok_emb/embedding" in names
    assert any(n.startswith("opt_state/") for n in names)


def test_bfloat16_leaves_round_trip(tmp_path):
    tree = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 3, "n": jnp.asarray(3, jnp.int32)}
    _save(tmp_path, tree, 1)
    restored, _ = restore_checkpoint(tmp_path, tree)
    assert restored["w"].dtype == jnp.bfloat16
    assert _equal_trees(restored, tree)


def test_load_model_from_checkpoint(tmp_path):
    state = _perturbed(_state(), 0.5)
    step_dir = _save(tmp_path, state, 5)
    for path in (tmp_path, step_dir, tmp_path / "checkpoints"):
        cfg, params, info = load_model_from_checkpoint(path)
        assert cfg == CFG
        assert _equal_trees(params, state.params)
        assert info["step"] == 5 and info["tokenizer"] == "gpt2" and info["path"] == str(step_dir)
    logits = GPTModel(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, CFG.vocab_size)


def test_keeps_last_n_and_ignores_temporary_folders(tmp_path):
    state = _state()
    for step in (1, 2, 3, 4):
        _save(tmp_path, state, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    # A crashed writer's half-written folder (with a higher step) is never chosen.
    tmp = tmp_path / "checkpoints" / f".tmp-step_00000009-{os.getpid()}"
    tmp.mkdir()
    (tmp / "state.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert load_model_from_checkpoint(tmp_path)[2]["step"] == 4


def test_corrupt_newest_falls_back_with_warning(tmp_path, caplog):
    good = _perturbed(_state(), 1.0)
    _save(tmp_path, good, 1)
    newest = _save(tmp_path, _state(), 2)
    data = bytearray((newest / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "state.safetensors").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="flaxgpt.io.checkpoint"):
        restored, meta = restore_checkpoint(tmp_path, _state())
    assert meta["step"] == 1 and _equal_trees(restored, good)
    assert any("step_00000002" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match="corrupt"):  # named explicitly: no fallback
        restore_checkpoint(newest, _state())


def test_missing_and_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model_from_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model_from_checkpoint(tmp_path)
    _save(tmp_path, _state(), 1)
    other = _state(cfg=CFG.replace(emb_dim=32))
    with pytest.raises(CheckpointError, match="shape"):
        restore_checkpoint(tmp_path, other)
    with pytest.raises(CheckpointError, match="missing"):
        restore_checkpoint(tmp_path, {"params": _state().params})


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, _state(), 3)
    second = _perturbed(_state(), 2.0)
    _save(tmp_path, second, 3)
    restored, _ = restore_checkpoint(tmp_path, _state())
    assert _equal_trees(restored, second)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


def test_meta_is_plain_json_and_nothing_is_pickled(tmp_path):
    path = _save(tmp_path, _state(), 1)
    assert json.loads((path / "meta.json").read_text())["format"] == read_meta(path)["format"]
    for f in Path(tmp_path).rglob("*"):
        if f.is_file():
            assert f.suffix not in (".pkl", ".pickle", ".npy", ".npz")
            assert f.read_bytes()[:2] not in PICKLE_MAGIC


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        _save(tmp_path, _state(), 1, keep=0)
    with pytest.raises(ValueError, match="step"):
        _save(tmp_path, _state(), -1)
