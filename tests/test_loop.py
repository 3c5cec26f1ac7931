"""fit and evaluate on a tiny model: the book's evaluation cadence, metrics.jsonl, exact resume, NaN stop,
signals, gradient accumulation and argument checks."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.data.windows import DataLoader
from flaxgpt.io.checkpoint import list_checkpoints, restore_checkpoint
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.training.loop import NonFiniteLossError, Position, evaluate, fit
from flaxgpt.training.metrics import read_metrics
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state, eval_step

IDS = np.random.default_rng(0).integers(0, 64, 700)
TX = make_optimizer(3e-3, weight_decay=0.1)  # one optimizer object: the step compiles once per module


@pytest.fixture
def cfg(tiny_config):
    return tiny_config(vocab_size=64, context_length=8, n_heads=2, drop_rate=0.1)


@pytest.fixture
def new_state(cfg):
    model = GPTModel(cfg)

    def make(seed: int = 0, tx=TX):
        return create_train_state(model, init_params(cfg, jax.random.key(seed)), tx)

    return make


def _loaders(ids=IDS, batch_size: int = 4, seed: int = 3, length: int = 8):
    split = int(0.85 * len(ids))
    train = DataLoader.from_token_ids(ids[:split], batch_size, length, length, seed=seed)
    val = DataLoader.from_token_ids(ids[split:], batch_size, length, length, shuffle=False, drop_last=False)
    return train, val


def _fit(state, **kw):
    train, val = _loaders()
    losses = []
    user_cb = kw.pop("callback", None)

    def callback(event, info):
        if event == "step":
            losses.append(info["loss"])
        if user_cb:
            user_cb(event, info)

    kw.setdefault("key", jax.random.key(11))
    kw.setdefault("eval_iter", 2)
    result = fit(state, train, val, callback=callback, **kw)
    return result, losses


def test_evaluate_uses_fixed_batches_and_leaves_loader_alone(new_state):
    state = new_state()
    train, _ = _loaders()
    first = evaluate(state, train, num_batches=2)
    assert train.epoch == 0
    manual = np.mean([float(eval_step(state, jnp.asarray(x), jnp.asarray(y)))
                      for (x, y), _ in zip(train.batches(0), range(2))])
    assert first == pytest.approx(manual, rel=1e-6)
    assert evaluate(state, train, num_batches=2) == first
    with pytest.raises(ValueError, match="num_batches"):
        evaluate(state, train, num_batches=0)


def test_fit_evaluates_like_the_book_and_logs_metrics(tmp_path, new_state):
    result, losses = _fit(new_state(), num_epochs=2, eval_freq=5, run_dir=tmp_path)
    n = len(_loaders()[0])  # batches per epoch
    assert result.updates == 2 * n == len(losses) and result.stopped == "epochs"
    expected_steps = list(range(1, 2 * n + 1, 5))
    if expected_steps[-1] != 2 * n:
        expected_steps.append(2 * n)
    assert result.eval_steps == expected_steps
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == expected_steps
    assert set(records[0]) == {"step", "epoch", "epochs_done", "train_loss", "val_loss", "tokens_seen", "time_s"}
    assert records == [{k: pytest.approx(v) for k, v in r.items()} for r in result.history]
    assert records[-1]["tokens_seen"] == 2 * n * 4 * 8
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{2 * n:08d}"]
    assert result.position == Position(2, 0, 2 * n * 32)


def test_exact_resume(tmp_path, new_state):
    """Same process, same machine: a run stopped and resumed equals the straight run bit for bit."""
    n_steps = 7  # stops mid-epoch
    straight, straight_losses = _fit(new_state(), num_epochs=3, max_steps=2 * n_steps, eval_freq=3)

    first, first_losses = _fit(new_state(), num_epochs=3, max_steps=n_steps, eval_freq=3, run_dir=tmp_path)
    assert first.stopped == "max_steps"
    state, meta = restore_checkpoint(tmp_path, new_state(seed=5))
    start = Position(meta["epoch"], meta["batch_index"], meta["tokens_seen"])
    second, second_losses = _fit(
        state, num_epochs=3, max_steps=2 * n_steps, eval_freq=3, run_dir=tmp_path, start=start, key=meta["key"]
    )
    assert first_losses + second_losses == straight_losses  # bit-exact
    assert second.val_losses[-1] == straight.val_losses[-1]
    assert second.position == straight.position
    for a, b in zip(jax.tree.leaves(second.state.params), jax.tree.leaves(straight.state.params)):
        np.testing.assert_array_equal(a, b)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == straight.eval_steps


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, new_state):
    result, _ = _fit(new_state(), num_epochs=1, max_steps=2, run_dir=tmp_path, checkpoint_every=1)
    before = [p.name for p in list_checkpoints(tmp_path)]
    poisoned = result.state.replace(
        params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), result.state.params)
    )
    start = Position(*[getattr(result.position, f) for f in ("epoch", "batch_index", "tokens_seen")])
    with pytest.raises(NonFiniteLossError, match=r"nan.*step_00000002"):
        _fit(poisoned, num_epochs=1, run_dir=tmp_path, checkpoint_every=1, start=start)
    assert [p.name for p in list_checkpoints(tmp_path)] == before
    restored, meta = restore_checkpoint(tmp_path, new_state())
    assert meta["step"] == 2 and all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(restored.params))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_stops(tmp_path, new_state, signum):
    previous = signal.getsignal(signum)

    def send(event, info):
        if event == "step" and info["step"] == 3:
            os.kill(os.getpid(), signum)

    result, losses = _fit(new_state(), num_epochs=5, run_dir=tmp_path, eval_freq=100, callback=send)
    assert result.stopped == signal.Signals(signum).name
    assert result.updates == len(losses) == 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    assert signal.getsignal(signum) is previous


def test_gradient_accumulation_counts_updates(tmp_path, new_state):
    state = new_state(tx=make_optimizer(3e-3, accumulate_steps=2))
    result, losses = _fit(state, num_epochs=1, max_steps=3, eval_freq=100, accumulate_steps=2, run_dir=tmp_path)
    assert result.updates == 3 and len(losses) == 6 and int(result.state.step) == 6
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eval_freq=0), "eval_freq"),
        (dict(eval_iter=True), "eval_iter"),
        (dict(num_epochs=-1), "num_epochs"),
        (dict(max_steps=-1), "max_steps"),
        (dict(checkpoint_every=1.5), "checkpoint_every"),
        (dict(accumulate_steps=0), "accumulate_steps"),
    ],
)
def test_fit_rejects_bad_arguments(new_state, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(new_state(), **{"num_epochs": 1, **kwargs})


def test_fit_rejects_ids_outside_the_vocabulary(new_state):
    bad = np.array(IDS)
    bad[5] = 64  # outside the vocabulary: checked once on the host
    train, val = _loaders(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fit(new_state(), train, val, key=jax.random.key(0), num_epochs=1)
