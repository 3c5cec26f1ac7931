"""train_step, evaluate and fit on a tiny model: initial loss, learning, exact resume, NaN stop, signals."""

from __future__ import annotations

import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.config import GPTConfig
from flaxgpt.data.windows import DataLoader
from flaxgpt.io.checkpoint import list_checkpoints, restore_checkpoint
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.training.loop import NonFiniteLossError, Position, evaluate, fit
from flaxgpt.training.metrics import read_metrics
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state, eval_step, train_step

CFG = GPTConfig(vocab_size=64, context_length=8, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)
MODEL = GPTModel(CFG)
TX = make_optimizer(3e-3, weight_decay=0.1)  # one optimizer object: train_step compiles once per module
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, 700)


def _state(seed: int = 0):
    return create_train_state(MODEL, init_params(CFG, jax.random.key(seed)), TX)


def _loaders(ids=IDS, batch_size: int = 4, seed: int = 3):
    split = int(0.85 * len(ids))
    train = DataLoader.from_token_ids(ids[:split], batch_size, CFG.context_length, CFG.context_length, seed=seed)
    val = DataLoader.from_token_ids(
        ids[split:], batch_size, CFG.context_length, CFG.context_length, shuffle=False, drop_last=False
    )
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


def test_initial_loss_is_about_log_vocab():
    x = jnp.asarray(IDS[:32].reshape(4, 8))
    y = jnp.asarray(IDS[1:33].reshape(4, 8))
    loss = float(eval_step(_state(), x, y))
    assert abs(loss - math.log(CFG.vocab_size)) < 0.35


def test_train_step_learns_and_compiles_once():
    state = _state()
    x = jnp.asarray(np.tile(np.arange(8), (4, 1)), jnp.int32)  # (4, 8) the same sequence
    y = (x + 1) % CFG.vocab_size
    key = jax.random.key(0)
    before = train_step._cache_size()
    losses = []
    for _ in range(25):
        state, loss = train_step(state, x, y, key)
        losses.append(float(loss))
    assert train_step._cache_size() - before <= 1
    assert int(state.step) == 25
    assert losses[-1] < 0.5 * losses[0]


def test_dropout_key_depends_on_step_and_seed():
    x = jnp.asarray(IDS[:32].reshape(4, 8))
    y = jnp.asarray(IDS[1:33].reshape(4, 8))
    a = float(train_step(_state(), x, y, jax.random.key(1))[1])
    b = float(train_step(_state(), x, y, jax.random.key(1))[1])
    c = float(train_step(_state(), x, y, jax.random.key(2))[1])
    assert a == b and a != c


def test_evaluate_uses_fixed_batches_and_leaves_loader_alone():
    state = _state()
    train, _ = _loaders()
    first = evaluate(state, train, num_batches=2)
    assert train.epoch == 0
    manual = np.mean([float(eval_step(state, jnp.asarray(x), jnp.asarray(y)))
                      for (x, y), _ in zip(train.batches(0), range(2))])
    assert first == pytest.approx(manual, rel=1e-6)
    assert evaluate(state, train, num_batches=2) == first


def test_fit_evaluates_like_the_book_and_logs_metrics(tmp_path):
    result, losses = _fit(_state(), num_epochs=2, eval_freq=5, run_dir=tmp_path)
    n = len(_loaders()[0])  # batches per epoch
    assert result.updates == 2 * n == len(losses) and result.stopped == "epochs"
    expected_steps = list(range(1, 2 * n + 1, 5))
    if expected_steps[-1] != 2 * n:
        expected_steps.append(2 * n)
    assert result.eval_steps == expected_steps
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == expected_steps
    assert {"step", "epoch", "train_loss", "val_loss", "tokens_seen"} <= set(records[0])
    assert records[-1]["tokens_seen"] == 2 * n * 4 * 8
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{2 * n:08d}"]
    assert result.position == Position(2, 0, 2 * n * 32)


def test_exact_resume(tmp_path):
    n_steps = 7  # stops mid-epoch
    straight, straight_losses = _fit(_state(), num_epochs=3, max_steps=2 * n_steps, eval_freq=3)

    first, first_losses = _fit(_state(), num_epochs=3, max_steps=n_steps, eval_freq=3, run_dir=tmp_path)
    assert first.stopped == "max_steps"
    state, meta = restore_checkpoint(tmp_path, _state(seed=5))
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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    result, _ = _fit(_state(), num_epochs=1, max_steps=2, run_dir=tmp_path, checkpoint_every=1)
    before = [p.name for p in list_checkpoints(tmp_path)]
    poisoned = result.state.replace(
        params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), result.state.params)
    )
    start = Position(*[getattr(result.position, f) for f in ("epoch", "batch_index", "tokens_seen")])
    with pytest.raises(NonFiniteLossError, match=r"nan.*step_00000002"):
        _fit(poisoned, num_epochs=1, run_dir=tmp_path, checkpoint_every=1, start=start)
    assert [p.name for p in list_checkpoints(tmp_path)] == before
    restored, meta = restore_checkpoint(tmp_path, _state())
    assert meta["step"] == 2 and all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(restored.params))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_stops(tmp_path, signum):
    previous = signal.getsignal(signum)

    def send(event, info):
        if event == "step" and info["step"] == 3:
            os.kill(os.getpid(), signum)

    result, losses = _fit(_state(), num_epochs=5, run_dir=tmp_path, eval_freq=100, callback=send)
    assert result.stopped == signal.Signals(signum).name
    assert result.updates == len(losses) == 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    assert signal.getsignal(signum) is previous


def test_gradient_accumulation_counts_updates(tmp_path):
    tx = make_optimizer(3e-3, accumulate_steps=2)
    state = create_train_state(MODEL, init_params(CFG, jax.random.key(0)), tx)
    result, losses = _fit(state, num_epochs=1, max_steps=3, eval_freq=100, accumulate_steps=2, run_dir=tmp_path)
    assert result.updates == 3 and len(losses) == 6 and int(result.state.step) == 6
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == 3


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eval_freq"):
        _fit(_state(), num_epochs=1, eval_freq=0)
    bad = np.array(IDS)
    bad[5] = CFG.vocab_size  # outside the vocabulary: checked once on the host
    train, val = _loaders(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fit(_state(), train, val, key=jax.random.key(0), num_epochs=1)
