"""RunDir: checkpoint cadence, metrics.jsonl, the loss plot, and failed writes (read-only folder, full disk)
that leave nothing half-written and raise one RunDirError naming the file and the reason."""

from __future__ import annotations

import errno
import os

import jax
import pytest
from safetensors import SafetensorError

import flaxgpt.io.checkpoint as checkpoint_module
import flaxgpt.training.metrics as metrics_module
from flaxgpt.io.checkpoint import list_checkpoints, restore_checkpoint
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.training.metrics import read_metrics
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.run_dir import Position, RunDir, RunDirError
from flaxgpt.training.state import create_train_state


@pytest.fixture
def state(tiny_config):
    cfg = tiny_config()
    return create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(0)), make_optimizer(1e-3))


def _save(run, state, step=4):
    return run.save(state, step=step, key=jax.random.key(1), config=state.model.cfg,
                    position=Position(1, 2, 300), seed=7)


def test_cadence_save_and_resume_metadata(tmp_path, state):
    run = RunDir(tmp_path / "run", checkpoint_every=3, keep=2, tokenizer_name="bytes", extra={"a": 1})
    assert [run.due(u) for u in range(1, 7)] == [False, False, True, False, False, True]
    assert not RunDir(tmp_path, checkpoint_every=0).due(3) and not RunDir(None, checkpoint_every=1).due(1)
    assert run.open(0) == []
    for step in (3, 6, 9):
        path = _save(run, state, step)
        assert run.last_saved == step and run.last_checkpoint == path
    assert [p.name for p in run.checkpoints()] == ["step_00000006", "step_00000009"]  # keep=2
    _, meta = restore_checkpoint(run.path, state)
    assert (meta["step"], meta["epoch"], meta["batch_index"], meta["tokens_seen"], meta["seed"]) == (9, 1, 2, 300, 7)
    assert meta["tokenizer"] == "bytes" and meta["extra"] == {"a": 1}


def test_open_truncates_metrics_and_plot(tmp_path):
    run = RunDir(tmp_path)
    assert run.plot() is None  # no evaluation yet
    for step in (1, 5, 9):
        run.log({"step": step, "epochs_done": step / 10, "tokens_seen": step * 8, "train_loss": 3.0 - step / 10,
                 "val_loss": 3.5 - step / 20})
    assert [r["step"] for r in run.open(5)] == [1, 5]
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1, 5]
    out = run.plot()
    assert out == tmp_path / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_path_everything_is_a_no_op(state):
    run = RunDir(None, checkpoint_every=1)
    assert run.open(3) == [] and run.checkpoints() == [] and run.plot() is None and run.metrics_path is None
    run.log({"step": 1})
    assert _save(run, state) is None and run.last_saved is None


def _fail_after_half(error):
    def save_file(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # half a file, as a full disk leaves it
        raise error

    return save_file


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                         '"No space left on device" })'), "No space left on device"),
    ],
)
def test_failed_checkpoint_write_leaves_nothing(tmp_path, state, monkeypatch, error, reason):
    run = RunDir(tmp_path / "run")
    run.open(0)
    monkeypatch.setattr(checkpoint_module, "save_file", _fail_after_half(error))
    with pytest.raises(RunDirError) as info:
        _save(run, state)
    message = str(info.value)
    assert message == f"cannot write {tmp_path / 'run' / 'checkpoints' / 'step_00000004'}: {reason}"
    assert "\n" not in message and isinstance(info.value, OSError)
    assert sorted(p.name for p in run.path.iterdir()) == []  # no checkpoints/ folder, no .tmp-* inside
    assert run.last_saved is None and run.last_checkpoint is None

    monkeypatch.undo()  # an earlier good checkpoint survives a later failure untouched
    good = _save(run, state, step=2)
    monkeypatch.setattr(checkpoint_module, "save_file", _fail_after_half(error))
    with pytest.raises(RunDirError):
        _save(run, state, step=4)
    assert os.listdir(run.path / "checkpoints") == [good.name] and list_checkpoints(run.path) == [good]


def test_failed_metrics_write_takes_the_half_line_back(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.log({"step": 1, "train_loss": 2.0})
    size = run.metrics_path.stat().st_size
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 10:
            return real_write(fd, bytes(data[:10]))  # a short write ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(metrics_module.os, "write", half_then_full)
    with pytest.raises(RunDirError, match="metrics.jsonl: No space left on device"):
        run.log({"step": 2, "train_loss": 1.0})
    monkeypatch.undo()
    assert run.metrics_path.stat().st_size == size
    assert read_metrics(run.metrics_path) == [{"step": 1, "train_loss": 2.0}]


def test_unwritable_folder_is_one_error(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    with pytest.raises(RunDirError, match="Permission denied"):
        RunDir(tmp_path / "run").open(0)
    assert not (tmp_path / "run").exists()
    assert os.listdir(tmp_path) == []
