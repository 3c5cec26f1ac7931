"""Checkpoints: exact round trip, atomic layout, newest-valid selection, pruning, no pickle, and the
faults of issue 10 (a kill mid-prune, a meta.json missing a key, one-line errors, NaN params)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
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
    resolve_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from flaxgpt.io.pretrained import load_any
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state

CFG = GPTConfig(vocab_size=61, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
DIGEST = re.compile(r"[0-9a-f]{64}")


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
    with caplog.at_level(logging.DEBUG, logger="flaxgpt.io.checkpoint"):
        restored, meta = restore_checkpoint(tmp_path, _state())
    assert meta["step"] == 1 and _equal_trees(restored, good)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_00000002" in warnings[0] and "corrupt" in warnings[0]
    assert "\n" not in warnings[0] and not DIGEST.search(warnings[0])  # one short line: digests at DEBUG
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(len(DIGEST.findall(m)) == 2 for m in debug)
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


# --------------------------------------------------------------------------- a kill while pruning

_KILLED_PRUNER = """
import os, shutil, signal, sys
import jax, jax.numpy as jnp
from flaxgpt.config import GPTConfig
from flaxgpt.io.checkpoint import save_checkpoint

real_rmtree = shutil.rmtree


def dying_rmtree(path, *args, **kwargs):
    if os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, "state.safetensors")):
        os.unlink(os.path.join(path, "state.safetensors"))  # rmtree got this far when the process was killed
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)


shutil.rmtree = dying_rmtree
state = {"params": {"w": jnp.full((3,), 3.0)}, "step": jnp.asarray(3)}
cfg = GPTConfig(vocab_size=61, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
save_checkpoint(sys.argv[1], state, step=3, key=jax.random.key(0), config=cfg, keep=2)
"""


def _tiny_state(v: float):
    return {"params": {"w": jnp.full((3,), float(v))}, "step": jnp.asarray(int(v))}


def test_kill_while_pruning_leaves_only_complete_checkpoints(tmp_path):
    for step in (1, 2):
        _save(tmp_path, _tiny_state(step), step, keep=2)
    proc = subprocess.run([sys.executable, "-c", _KILLED_PRUNER, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # killed inside the pruner's delete
    ckpt_dir = tmp_path / "checkpoints"
    assert any(p.name.startswith(".trash-step_00000001") for p in ckpt_dir.iterdir())  # the half-deleted one
    # nothing in the step_* namespace is incomplete (not even for a plain glob, as `train` uses)
    for folder in ckpt_dir.glob("step_*"):
        assert (folder / "meta.json").is_file() and (folder / "state.safetensors").is_file(), folder
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert not any(p.name.startswith(".trash-") for p in ckpt_dir.iterdir())  # the listing cleaned it up
    assert resolve_checkpoint(tmp_path)[0].name == latest_checkpoint(tmp_path).name == "step_00000003"
    restored, meta = restore_checkpoint(tmp_path, _tiny_state(0))
    assert meta["step"] == 3 and float(restored["params"]["w"][0]) == 3.0
    assert load_model_from_checkpoint(tmp_path)[2]["step"] == 3
    for ckpt in list_checkpoints(tmp_path):
        resolve_checkpoint(ckpt)  # each one verifies on its own


def test_prune_retires_damaged_step_folders(tmp_path):
    _save(tmp_path, _tiny_state(1), 1)
    damaged = tmp_path / "checkpoints" / "step_00000005"
    damaged.mkdir()
    (damaged / "meta.json").write_text("{}")  # as an older version's kill mid-delete left it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    _save(tmp_path, _tiny_state(2), 2)
    assert not damaged.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


# --------------------------------------------------------------------------- a meta.json missing a key


def _flip_last_byte(text: str, key: str, last: bool) -> str:
    needle = f'"{key}"'
    at = text.rindex(needle) if last else text.index(needle)
    end = at + len(needle) - 2  # the key's last character
    return text[:end] + chr(ord(text[end]) ^ 1) + text[end + 1 :]


@pytest.mark.parametrize(
    "key, last",
    [("tensors", False), ("sha256", False), ("bytes", False), ("leaves", False), ("step", True),
     ("step", False),  # the first "step" is a leaf's name: checked against the tensor file's names
     ("config", False), ("key", False), ("tokenizer", False), ("epoch", False), ("extra", False),
     ("dtype", True), ("name", True), ("emb_dim", False)],
)  # fmt: skip
def test_meta_missing_a_key_is_corrupt_and_falls_back(tmp_path, key, last):
    good = _perturbed(_state(), 1.0)
    _save(tmp_path, good, 1)
    newest = _save(tmp_path, _state(), 2)
    meta_file = newest / "meta.json"
    meta_file.write_text(_flip_last_byte(meta_file.read_text(), key, last))
    json.loads(meta_file.read_text())  # still valid JSON
    with pytest.raises(CheckpointError, match="meta.json"):
        resolve_checkpoint(newest)
    restored, meta = restore_checkpoint(tmp_path, _state())
    assert meta["step"] == 1 and _equal_trees(restored, good)
    cfg, params, info = load_model_from_checkpoint(tmp_path)
    assert info["step"] == 1 and _equal_trees(params, good.params)
    with pytest.raises(CheckpointError):
        load_model_from_checkpoint(newest)


@pytest.mark.parametrize(
    "change",
    [{"step": "2"}, {"step": 3}, {"epoch": True}, {"tensors": {"file": "state.safetensors", "bytes": 1}},
     {"key": ["1", 2]}, {"leaves": [7]}, {"config": {"emb_dim": -1}}],
)  # fmt: skip
def test_meta_values_of_the_wrong_type_are_corrupt(tmp_path, change):
    newest = _save(tmp_path, _state(), 2)
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        read_meta(newest)


# --------------------------------------------------------------------------- every checkpoint corrupt


def _corrupt_all(tmp_path, n: int = 2) -> None:
    for step in range(1, n + 1):
        path = _save(tmp_path, _state(), step)
        data = bytearray((path / "state.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (path / "state.safetensors").write_bytes(bytes(data))


def test_every_checkpoint_corrupt_is_one_short_error(tmp_path, caplog):
    _corrupt_all(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="flaxgpt.io.checkpoint"):
        with pytest.raises(CheckpointError) as info:
            resolve_checkpoint(tmp_path)
    message = str(info.value)
    assert message == f"no checkpoint in {tmp_path} verifies (2 found, all corrupt)"
    assert [r.split(":")[0] for r in info.value.reasons] == ["step_00000002", "step_00000001"]
    assert all(len(DIGEST.findall(r)) == 2 for r in info.value.reasons)  # the details are kept
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no warning lines before it
    debug = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert all(reason in debug for reason in info.value.reasons)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="all corrupt"):
        load_model_from_checkpoint(tmp_path)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    code = "import sys; from flaxgpt.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)


def test_generate_on_an_all_corrupt_run_prints_one_line(tmp_path):
    _corrupt_all(tmp_path)
    quiet = _cli("generate", "--checkpoint", str(tmp_path), "--prompt", "hi")
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [
        f"flaxgpt generate: error: no checkpoint in {tmp_path} verifies (2 found, all corrupt); "
        "run with --verbose for the reasons"
    ]
    loud = _cli("generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--verbose")
    assert loud.returncode == 2
    lines = loud.stderr.splitlines()
    assert lines[-1] == f"flaxgpt generate: error: no checkpoint in {tmp_path} verifies (2 found, all corrupt)"
    reasons = [line for line in lines if "state.safetensors is corrupt" in line]
    assert len(reasons) == 2 and all(len(DIGEST.findall(r)) == 2 for r in reasons)


# --------------------------------------------------------------------------- non-finite parameters


def test_nan_params_in_a_checkpoint_are_refused_unless_allowed(tmp_path):
    state = _state()
    emb = state.params["tok_emb"]["embedding"].at[2, :3].set(jnp.nan)
    state = state.replace(params={**state.params, "tok_emb": {"embedding": emb}})
    _save(tmp_path, state, 1)
    with pytest.raises(ValueError, match=r"'params/tok_emb/embedding' holds 3 non-finite values"):
        load_model_from_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        load_any(tmp_path)
    _, params, _ = load_model_from_checkpoint(tmp_path, allow_non_finite=True)
    assert int(jnp.isnan(params["tok_emb"]["embedding"]).sum()) == 3
    cfg, params, _ = load_any(tmp_path, dtype="bfloat16", allow_non_finite=True)
    assert cfg.param_dtype == "bfloat16" and params["tok_emb"]["embedding"].dtype == jnp.bfloat16
    restored, _ = restore_checkpoint(tmp_path, _state())  # resuming training is the loop's business
    assert int(jnp.isnan(restored.params["tok_emb"]["embedding"]).sum()) == 3


def test_load_model_casts_on_request(tmp_path):
    state = _perturbed(_state(), 0.5)
    _save(tmp_path, state, 1)
    cfg, params, _ = load_model_from_checkpoint(tmp_path, dtype="bfloat16")
    assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    want = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.params)
    assert _equal_trees(params, want)
