"""train_step / eval_step / make_train_step on a tiny model: initial loss, learning, one compile, dropout
keys, and the task-built step agreeing with the public pretraining step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.training.losses import cross_entropy_loss
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state, eval_step, make_eval_step, make_train_step, train_step
from flaxgpt.training.tasks import PRETRAIN, PretrainTask


@pytest.fixture
def new_state(tiny_config):
    cfg = tiny_config(vocab_size=64, context_length=8, n_heads=2, drop_rate=0.1)
    model, tx = GPTModel(cfg), make_optimizer(3e-3, weight_decay=0.1)

    def make(seed: int = 0):
        return create_train_state(model, init_params(cfg, jax.random.key(seed)), tx)

    return make


def _batch(seed: int = 0):
    ids = np.random.default_rng(seed).integers(0, 64, 33)
    return jnp.asarray(ids[:32].reshape(4, 8)), jnp.asarray(ids[1:33].reshape(4, 8))  # (4, 8), (4, 8)


def test_initial_loss_is_about_log_vocab(new_state):
    loss = float(eval_step(new_state(), *_batch()))
    assert abs(loss - math.log(64)) < 0.35


def test_train_step_learns_and_compiles_once(new_state):
    state = new_state()
    x = jnp.asarray(np.tile(np.arange(8), (4, 1)), jnp.int32)  # (4, 8) the same sequence
    y = (x + 1) % 64
    key = jax.random.key(0)
    before = train_step._cache_size()
    losses = []
    for _ in range(25):
        state, loss = train_step(state, x, y, key)
        losses.append(float(loss))
    assert train_step._cache_size() - before <= 1
    assert int(state.step) == 25
    assert losses[-1] < 0.5 * losses[0]


def test_dropout_key_depends_on_step_and_seed(new_state):
    x, y = _batch()
    a = float(train_step(new_state(), x, y, jax.random.key(1))[1])
    b = float(train_step(new_state(), x, y, jax.random.key(1))[1])
    c = float(train_step(new_state(), x, y, jax.random.key(2))[1])
    s1, _ = train_step(new_state(), x, y, jax.random.key(1))
    d = float(train_step(s1, x, y, jax.random.key(1))[1])  # step 1: another dropout mask
    e = float(eval_step(new_state(), x, y))
    assert a == b and a != c and a != e and d != a


def test_task_step_equals_public_train_step(new_state):
    """make_train_step(PRETRAIN) on an (inputs, targets) batch is the public 4-argument train_step."""
    x, y = _batch(3)
    key = jax.random.key(7)
    s_a, s_b = new_state(), new_state()
    step = make_train_step(PRETRAIN)
    assert make_train_step(PretrainTask()) is step  # cached per (equal) task
    for _ in range(3):
        s_a, loss_a = train_step(s_a, x, y, key)
        s_b, loss_b = step(s_b, (x, y), key)
        assert float(loss_a) == float(loss_b)
    for a, b in zip(jax.tree.leaves(s_a.params), jax.tree.leaves(s_b.params)):
        np.testing.assert_array_equal(a, b)
    assert float(make_eval_step(PRETRAIN)(s_a, (x, y))["loss"]) == float(eval_step(s_a, x, y))


def test_ignore_index_leaves_positions_out(new_state):
    """Targets of -100 drop out of the mean: the loss equals the loss of the kept positions alone."""
    x, y = _batch(4)
    state = new_state()
    masked = y.at[:, :4].set(-100)
    logits = state.apply_fn({"params": state.params}, x, deterministic=True)  # (4, 8, V)
    kept = float(cross_entropy_loss(logits[:, 4:], y[:, 4:]))
    assert float(eval_step(state, x, masked)) == pytest.approx(kept, rel=1e-6)
    assert float(eval_step(state, x, y)) != pytest.approx(kept, rel=1e-3)
