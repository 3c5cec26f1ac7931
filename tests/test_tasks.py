"""Tasks plug into the one loop: a last-token classifier with accuracy (dict batches) and a masked
next-token loss train through the same ``fit`` as pretraining, without touching it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.training.evaluation import evaluate_metrics
from flaxgpt.training.loop import fit
from flaxgpt.training.losses import cross_entropy_loss
from flaxgpt.training.metrics import read_metrics
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state, make_eval_step, make_train_step, train_step
from flaxgpt.training.tasks import PRETRAIN, Task, batch_args, mean_metrics


def _logits(params, apply_fn, inputs, rng, deterministic):
    rngs = None if deterministic else {"dropout": rng}
    return apply_fn({"params": params}, inputs, deterministic=deterministic, rngs=rngs)  # (B, T, V)


@dataclasses.dataclass(frozen=True)
class LastTokenClassifier(Task):
    """Chapter-6 style: the last position's logits restricted to the first ``num_classes`` entries."""

    num_classes: int = 2

    def loss(self, params, apply_fn, batch, rng, deterministic):
        logits = _logits(params, apply_fn, batch["inputs"], rng, deterministic)[:, -1, : self.num_classes]  # (B, C)
        labels = batch["labels"]  # (B,)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, {"correct": correct.astype(jnp.float32), "examples": jnp.float32(labels.shape[0])}

    def eval_metrics(self, per_batch):
        return {"loss": mean_metrics(per_batch)["loss"],
                "accuracy": sum(m["correct"] for m in per_batch) / sum(m["examples"] for m in per_batch)}

    def count(self, batch):
        return int(batch["labels"].shape[0])  # examples seen


@dataclasses.dataclass(frozen=True)
class MaskedNextToken(Task):
    """Chapter-7 style: next-token loss only where ``mask`` is 1 (e.g. the response, not the prompt)."""

    def loss(self, params, apply_fn, batch, rng, deterministic):
        logits = _logits(params, apply_fn, batch["inputs"], rng, deterministic)  # (B, T, V)
        targets = jnp.where(batch["mask"] > 0, batch["targets"], -100)  # (B, T)
        return cross_entropy_loss(logits, targets), {}


class ListLoader:
    """The loader protocol fit needs: ``len()`` and ``batches(epoch, start)``, order a function of (seed, epoch)."""

    def __init__(self, batches, seed=0, shuffle=True):
        self._batches, self.seed, self.shuffle = batches, seed, shuffle

    def __len__(self):
        return len(self._batches)

    def batches(self, epoch, start=0):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self)) if self.shuffle else range(len(self))
        return (self._batches[i] for i in list(order)[start:])


@pytest.fixture
def state_for(tiny_config):
    cfg = tiny_config(vocab_size=64, context_length=8, n_heads=2)

    def make(lr=3e-3):
        return create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(0)), make_optimizer(lr))

    return make


def _class_batches(n_batches, batch_size, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        inputs = rng.integers(0, 64, (batch_size, 8)).astype(np.int32)  # (B, 8)
        out.append({"inputs": inputs, "labels": (inputs[:, -1] % 2).astype(np.int32)})  # label: last token's parity
    return out


def test_classifier_trains_through_fit_with_accuracy(tmp_path, state_for):
    train = ListLoader(_class_batches(8, 8, 0), seed=1)
    val = ListLoader(_class_batches(3, 8, 1) + _class_batches(1, 3, 2), shuffle=False)  # an uneven last batch
    placed = []

    def place(batch):  # a dict batch reaches shard_batch as one argument
        placed.append(sorted(batch))
        return jax.tree.map(jnp.asarray, batch)

    result = fit(state_for(1e-2), train, val, key=jax.random.key(0), num_epochs=6, eval_freq=8, eval_iter=4,
                 run_dir=tmp_path, task=LastTokenClassifier(), shard_batch=place)
    assert placed[0] == ["inputs", "labels"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(records[0])
    assert [r["step"] for r in records] == result.eval_steps == [1, 9, 17, 25, 33, 41, 48]
    assert records[-1]["tokens_seen"] == 48 * 8  # examples, from the task's count()
    assert records[-1]["train_accuracy"] > 0.9 and records[-1]["train_accuracy"] > records[0]["train_accuracy"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # accuracy over examples, not a mean of per-batch accuracies (27 examples in batches of 8, 8, 8, 3)
    metrics = evaluate_metrics(result.state, val, LastTokenClassifier())
    eval_fn = make_eval_step(LastTokenClassifier())
    correct = sum(float(eval_fn(result.state, jax.tree.map(jnp.asarray, b))["correct"]) for b in val.batches(0))
    assert metrics["accuracy"] == pytest.approx(correct / 27)
    assert metrics["accuracy"] == pytest.approx(records[-1]["val_accuracy"])


def test_masked_task_step_equals_pretraining_on_ignored_targets(state_for):
    """Two paths: the masked task's jitted step on a dict batch, and train_step with -100 targets."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 64, (4, 9)).astype(np.int32)
    mask = (np.arange(8)[None, :] >= rng.integers(2, 7, (4, 1))).astype(np.int32)  # (4, 8): response part
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": mask}
    ignored = np.where(mask > 0, ids[:, 1:], -100)
    key = jax.random.key(4)
    s_a, s_b = state_for(), state_for()
    step = make_train_step(MaskedNextToken())
    for _ in range(3):
        s_a, loss_a = step(s_a, jax.tree.map(jnp.asarray, batch), key)
        s_b, loss_b = train_step(s_b, jnp.asarray(ids[:, :-1]), jnp.asarray(ignored), key)
        assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    unmasked = make_eval_step(PRETRAIN)(s_a, (jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])))["loss"]
    assert float(make_eval_step(MaskedNextToken())(s_a, batch)["loss"]) != pytest.approx(float(unmasked))


def test_masked_task_trains_through_fit(state_for):
    rng = np.random.default_rng(5)
    seq = np.tile(np.arange(9, dtype=np.int32), (4, 1))  # (4, 9) a sequence to memorise
    batches = [{"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": (rng.random((4, 8)) > 0.5).astype(np.int32)}
               for _ in range(4)]
    result = fit(state_for(1e-2), ListLoader(batches), ListLoader(batches, shuffle=False), key=jax.random.key(0),
                 num_epochs=5, eval_freq=5, eval_iter=2, task=MaskedNextToken())
    assert result.updates == 20 and result.position.tokens_seen == 20 * 32
    assert result.val_losses[-1] < 0.5 * result.val_losses[0]


def test_batch_args_and_mean_metrics():
    assert batch_args((1, 2)) == (1, 2)
    d = {"a": 1}
    assert batch_args(d) == (d,)
    assert mean_metrics([{"loss": 1.0}, {"loss": 2.0}]) == {"loss": 1.5}
    assert np.isnan(mean_metrics([])["loss"])
    with pytest.raises(NotImplementedError, match="Task must define loss"):
        Task().loss(None, None, None, None, True)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_task_trains_like_the_plain_one(tiny_config, tied):
    """PretrainTask(loss_chunk=...) takes the loss through the head in blocks: the same losses and the same
    updated weights as the plain task, step after step (dropout on: the same masks)."""
    from flaxgpt.training.tasks import PretrainTask

    cfg = tiny_config(vocab_size=64, context_length=8, n_heads=2, tie_embeddings=tied, drop_rate=0.1)

    def make():
        return create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(0)), make_optimizer(3e-3))

    rng = np.random.default_rng(6)
    ids = rng.integers(0, 64, (3, 9)).astype(np.int32)
    targets = ids[:, 1:].copy()
    targets[0, :3] = -100
    batch = (jnp.asarray(ids[:, :-1]), jnp.asarray(targets))
    s_plain, s_chunk = make(), make()
    plain, chunked = make_train_step(PretrainTask()), make_train_step(PretrainTask(loss_chunk=5))
    key = jax.random.key(7)
    for _ in range(3):
        s_plain, loss_a = plain(s_plain, batch, key)
        s_chunk, loss_b = chunked(s_chunk, batch, key)
        assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-5)
    for a, b in zip(jax.tree.leaves(s_chunk.params), jax.tree.leaves(s_plain.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    metrics = make_eval_step(PretrainTask(loss_chunk=5))(s_chunk, batch)
    assert float(metrics["loss"]) == pytest.approx(float(make_eval_step(PRETRAIN)(s_chunk, batch)["loss"]), rel=1e-5)
