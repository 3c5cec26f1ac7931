"""Tests for flaxgpt.training.evaluation: a task's metrics over a loader's first batches, the book's
``calc_loss_loader`` (a mean of per-batch means)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flaxgpt.data.windows import DataLoader, GPTDataset
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.training.evaluation import evaluate, evaluate_metrics
from flaxgpt.training.losses import cross_entropy_loss
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state


@pytest.fixture(scope="module")
def setup(tiny_config):
    cfg = tiny_config()
    state = create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(0)), make_optimizer(1e-3))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 200)
    loader = DataLoader(GPTDataset(ids, 8, 8), 4, shuffle=True, drop_last=False, seed=1)
    return state, loader


def _book_calc_loss_loader(state, loader, num_batches):
    """The book's calc_loss_loader, by hand: mean over the first batches of each batch's mean loss."""
    losses = []
    for i, (x, y) in enumerate(loader.batches(0)):
        if i >= num_batches:
            break
        logits = state.apply_fn({"params": state.params}, x, deterministic=True)
        losses.append(float(cross_entropy_loss(logits, y)))
    return float(np.mean(losses))


def test_metrics_are_the_mean_of_batch_means(setup) -> None:
    state, loader = setup
    got = evaluate_metrics(state, loader, num_batches=3)
    assert set(got) == {"loss"}
    np.testing.assert_allclose(got["loss"], _book_calc_loss_loader(state, loader, 3), rtol=1e-6)
    assert evaluate(state, loader, 3) == pytest.approx(got["loss"], rel=1e-7)
    everything = evaluate_metrics(state, loader)  # None: every batch, the last partial one included
    np.testing.assert_allclose(everything["loss"], _book_calc_loss_loader(state, loader, len(loader)), rtol=1e-6)
    assert evaluate_metrics(state, loader, num_batches=10_000) == everything  # capped at len(loader)


def test_loader_epoch_is_untouched_and_bad_counts_rejected(setup) -> None:
    state, loader = setup
    before = loader.epoch
    evaluate_metrics(state, loader, num_batches=2)
    assert loader.epoch == before
    with pytest.raises(ValueError, match="num_batches"):
        evaluate_metrics(state, loader, num_batches=0)
