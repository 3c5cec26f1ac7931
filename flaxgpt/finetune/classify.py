"""Book chapter 6: a GPT as a text classifier.

:func:`to_classifier` swaps the language-model head for a fresh ``(emb_dim, num_classes)`` linear layer with
bias (PyTorch's ``nn.Linear`` initialisation, as the book's ``torch.nn.Linear(emb_dim, 2)``); the config
records ``num_classes``, so the classifier saves, loads and shows in ``flaxgpt info`` like any model.
:class:`ClassificationTask` is the chapter's loss and accuracy as a task of the one training loop:
cross-entropy of the logits at the last position (the book), or at each row's last real token
(``pool="last_nonpad"``, the book's bonus experiment). :func:`classify` is the book's ``classify_review``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxgpt.config import GPTConfig
from flaxgpt.data.classification import PAD_TOKEN_ID
from flaxgpt.nn.initializers import torch_uniform
from flaxgpt.nn.model import GPTModel
from flaxgpt.training.tasks import Batch, Metrics, Task
from flaxgpt.validation import check_int, check_token_ids

__all__ = ["POOLS", "to_classifier", "ClassificationTask", "classify", "pool_positions"]

POOLS = ("last", "last_nonpad")


def to_classifier(cfg: GPTConfig, params: Any, num_classes: int, key: jax.Array) -> tuple[GPTConfig, Any]:
    """Replaces the model's output head by a fresh classification head (book section 6.5).

    Args:
      cfg: the pretrained model's config (tied or untied, either layer layout).
      params: its parameters (left untouched; the result shares every array but the head).
      num_classes: the number of classes (>= 2).
      key: PRNG key of the head's initialisation.

    Returns:
      ``(config, params)``: ``num_classes`` set and ``tie_embeddings`` off; ``params["out_head"]`` holds a
      (emb_dim, num_classes) ``kernel`` and a (num_classes,) ``bias``, both U(+-1/sqrt(emb_dim)) as PyTorch's
      ``nn.Linear``.
    """
    num_classes = check_int("num_classes", num_classes, 2)
    if "tok_emb" not in params:
        raise ValueError("params do not look like a GPTModel's (no 'tok_emb'); pass the params tree itself")
    kernel_key, bias_key = jax.random.split(key)
    init = torch_uniform(cfg.emb_dim)
    head = {
        "kernel": init(kernel_key, (cfg.emb_dim, num_classes), cfg.weight_dtype),  # (C, n)
        "bias": init(bias_key, (num_classes,), cfg.weight_dtype),  # (n,)
    }
    new = {k: v for k, v in params.items() if k != "out_head"}
    new["out_head"] = head
    return cfg.replace(num_classes=num_classes, tie_embeddings=False), new


def pool_positions(pool: str, lengths: jax.Array, width: int) -> Any:
    """The position whose logits classify each row: "last" (the book) or "last_nonpad" (each row's last
    real token, ``lengths - 1``).

    Args:
      pool: one of :data:`POOLS`.
      lengths: (B,) real token counts.
      width: the padded width T.

    Returns:
      "last", or a (B,) int32 array for the model's ``positions=``.
    """
    if pool == "last":
        return "last"
    if pool == "last_nonpad":
        return jnp.clip(lengths.astype(jnp.int32) - 1, 0, width - 1)  # (B,)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


@dataclasses.dataclass(frozen=True)
class ClassificationTask(Task):
    """Cross-entropy and accuracy of the logits at one position per row (book chapter 6).

    Batches are ``{"input_ids": (B, T), "labels": (B,), "lengths": (B,)}`` (see
    :class:`flaxgpt.data.classification.ClassificationDataset`); the model is a classifier from
    :func:`to_classifier`. Accuracy is correct / examples over the evaluated batches (the book's
    ``calc_accuracy_loader``); the loss is the mean of per-batch means (its ``calc_loss_loader``).
    ``tokens_seen`` counts examples, as the book's ``examples_seen``.

    Attributes:
      pool: "last" or "last_nonpad".
    """

    pool: str = "last"

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")

    def logits(self, params: Any, apply_fn: Any, batch: Batch, rng: jax.Array | None, deterministic: bool) -> jax.Array:
        """(B, num_classes) float32 logits of the pooled position."""
        ids = batch["input_ids"]  # (B, T)
        positions = pool_positions(self.pool, batch["lengths"], ids.shape[1])
        rngs = None if deterministic else {"dropout": rng}
        return apply_fn({"params": params}, ids, deterministic=deterministic, rngs=rngs, positions=positions)

    def loss(
        self, params: Any, apply_fn: Any, batch: Batch, rng: jax.Array | None, deterministic: bool
    ) -> tuple[jax.Array, Metrics]:
        """See :meth:`flaxgpt.training.tasks.Task.loss`; aux holds the batch's correct count and size."""
        logits = self.logits(params, apply_fn, batch, rng, deterministic)  # (B, n)
        labels = batch["labels"]  # (B,)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return loss, {"correct": correct, "examples": jnp.float32(labels.shape[0])}

    def eval_metrics(self, per_batch: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """``loss`` (mean of batch means) and ``accuracy`` (correct / examples)."""
        if not per_batch:
            return {"loss": float("nan"), "accuracy": float("nan")}
        examples = sum(float(m["examples"]) for m in per_batch)
        return {
            "loss": float(np.mean([float(m["loss"]) for m in per_batch])),
            "accuracy": sum(float(m["correct"]) for m in per_batch) / examples,
        }

    def count(self, batch: Batch) -> int:
        """Examples in the batch (the book's ``examples_seen``)."""
        return int(np.shape(batch["labels"])[0])

    def check_loader(self, loader: Any, vocab_size: int, name: str) -> None:
        """Checks the loader's token ids against the vocabulary and its labels against the head."""
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "input_ids"):
            check_token_ids(dataset.input_ids, vocab_size, name=f"{name} token ids")


def classify(
    model: GPTModel,
    params: Any,
    text: str,
    tokenizer: Any,
    max_length: int | None = 120,
    pad_token_id: int = PAD_TOKEN_ID,
    pool: str = "last",
    labels: Sequence[str] | None = None,
) -> Any:
    """The book's ``classify_review``: encode, truncate to ``min(max_length, context_length)``, right-pad to
    ``max_length``, and take the argmax of the pooled position's logits.

    Args:
      model: a classifier (``model.cfg.num_classes`` set).
      params: its parameters.
      text: the text to classify (non-empty).
      tokenizer: encodes the text.
      max_length: the padded width (the book: the training set's longest text, 120 for SMS spam); None: no padding.
      pad_token_id: the padding id.
      pool: as the model was trained: "last" or "last_nonpad".
      labels: class names; when given the name is returned instead of the index.

    Returns:
      The predicted class index, or its name.
    """
    cfg = model.cfg
    if cfg.num_classes is None:
        raise ValueError("the model has a language-model head, not a classifier: see to_classifier()")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text to classify must be a non-empty str, got {text!r}")
    ids = list(tokenizer.encode(text))
    width = cfg.context_length if max_length is None else min(check_int("max_length", max_length, 1), cfg.context_length)
    ids = ids[:width]
    length = len(ids)
    if max_length is not None:
        ids = ids + [pad_token_id] * (width - length)
    batch = {
        "input_ids": jnp.asarray(check_token_ids([ids], cfg.vocab_size)),  # (1, T)
        "lengths": jnp.asarray([length], jnp.int32),
    }
    logits = _classify_logits(model, ClassificationTask(pool), params, batch)  # (1, n)
    index = int(jnp.argmax(logits[0]))
    return index if labels is None else labels[index]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _classify_logits(model: GPTModel, task: ClassificationTask, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return task.logits(params, model.apply, batch, None, True)
