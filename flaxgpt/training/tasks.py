"""Tasks: what a batch means. A task supplies the loss of a batch and its evaluation metrics; the training
loop (:func:`flaxgpt.training.loop.fit`) knows nothing else about the objective. Pretraining
(next-token cross-entropy, book chapter 5) is one task; classification (chapter 6) and instruction tuning
(chapter 7) plug into the same loop as other subclasses of :class:`Task`.

A **batch** is a pytree of arrays with a leading batch dimension, as the loader yields it: pretraining's
``(inputs, targets)`` tuple, or e.g. a dict ``{"inputs": ..., "labels": ...}``. User-supplied
``shard_batch`` and ``step_fn`` callables receive a tuple batch's elements as separate positional
arguments (``shard_batch(inputs, targets)``, ``step_fn(state, inputs, targets, key)``, as before tasks
existed) and any other batch as one argument (:func:`batch_args`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flaxgpt.training.losses import IGNORE_INDEX, chunked_cross_entropy_loss, cross_entropy_loss
from flaxgpt.validation import check_token_ids

__all__ = ["Batch", "Metrics", "Task", "PretrainTask", "PRETRAIN", "batch_args", "mean_metrics"]

Batch = Any  # a pytree of arrays, leading dimension B
Metrics = dict[str, jax.Array]  # per-batch values, computed under jit
ApplyFn = Callable[..., Any]  # ``state.apply_fn``: ``apply_fn({"params": p}, inputs, deterministic=..., rngs=...)``


def batch_args(batch: Batch) -> tuple[Any, ...]:
    """The positional arguments a batch gives user callables: a tuple's elements, else the batch itself.

    Args:
      batch: a batch as the loader yields it.

    Returns:
      A tuple of arguments.
    """
    return batch if isinstance(batch, tuple) else (batch,)


def mean_metrics(per_batch: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Averages each metric over batches (the book's ``calc_loss_loader``: a mean of per-batch means).

    Args:
      per_batch: one dict of floats per evaluated batch (every dict has the same keys).

    Returns:
      ``{name: mean}``; ``{"loss": nan}`` when there are no batches (the book returns NaN then).
    """
    if not per_batch:
        return {"loss": float("nan")}
    return {k: float(np.mean([float(m[k]) for m in per_batch])) for k in per_batch[0]}


@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop needs to know about an objective. Subclass as a frozen dataclass and override
    :meth:`loss`; override the others only when the defaults do not fit.

    Tasks must be hashable (frozen dataclasses are): the jitted train and eval steps are built once per
    task (:func:`flaxgpt.training.state.make_train_step`). Their methods are traced inside ``jit``
    (``loss``, ``batch_metrics``) or run on the host (``eval_metrics``, ``count``, ``check_loader``).
    """

    def loss(
        self, params: Any, apply_fn: ApplyFn, batch: Batch, rng: jax.Array | None, deterministic: bool
    ) -> tuple[jax.Array, Metrics]:
        """The scalar loss of a batch (what training differentiates) and auxiliary values.

        Args:
          params: the model parameters.
          apply_fn: the model's apply function (``state.apply_fn``).
          batch: one batch, already on devices.
          rng: the dropout key of this step (None when ``deterministic``).
          deterministic: True in evaluation (no dropout).

        Returns:
          (float32 scalar loss, dict of float32 scalars, e.g. ``{"accuracy": ...}``; may be empty).
        """
        raise NotImplementedError(f"{type(self).__name__} must define loss()")

    def batch_metrics(self, params: Any, apply_fn: ApplyFn, batch: Batch) -> Metrics:
        """Evaluation values of one batch, without dropout (default: ``{"loss": ..., **aux}``).

        Args:
          params: the model parameters.
          apply_fn: the model's apply function.
          batch: one batch.

        Returns:
          A dict of scalars; :meth:`eval_metrics` aggregates them over batches.
        """
        loss, aux = self.loss(params, apply_fn, batch, None, True)
        return {"loss": loss, **aux}

    def eval_metrics(self, per_batch: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """Aggregates :meth:`batch_metrics` over the evaluated batches (default: the mean of each).

        Override for ratios over examples (e.g. accuracy as correct / total when batches differ in size).

        Args:
          per_batch: one dict of floats per batch.

        Returns:
          ``{name: value}``; must hold "loss". The loop records ``train_<name>`` and ``val_<name>``.
        """
        return mean_metrics(per_batch)

    def count(self, batch: Batch) -> int:
        """What a batch adds to ``tokens_seen`` (default: the size of its first array).

        Args:
          batch: a host (numpy) batch.

        Returns:
          A non-negative int.
        """
        return int(np.size(jax.tree.leaves(batch)[0]))

    def check_loader(self, loader: Any, vocab_size: int, name: str) -> None:
        """Host-side checks of a loader before training (default: its ``dataset.token_ids``, if any,
        lie in the vocabulary).

        Args:
          loader: the loader.
          vocab_size: the model's vocabulary size.
          name: "training" or "validation", for the message.
        """
        ids = getattr(getattr(loader, "dataset", None), "token_ids", None)
        if ids is not None:
            check_token_ids(ids, vocab_size, name=f"{name} token ids")


@dataclasses.dataclass(frozen=True)
class PretrainTask(Task):
    """Next-token prediction (book chapter 5): batches are ``(inputs, targets)``, both (B, T) int32;
    the loss is the mean cross-entropy over positions whose target is not ``ignore_index``; the only
    metric is "loss"; ``tokens_seen`` counts input tokens.

    Attributes:
      ignore_index: targets with this value do not count.
      loss_chunk: None for the plain loss over the (B, T, V) logits; a row count to take the loss
        through :func:`flaxgpt.training.losses.chunked_cross_entropy_loss`, which never holds the whole
        logits or their gradient (for long contexts and large batches, where they dominate memory).
    """

    ignore_index: int = IGNORE_INDEX
    loss_chunk: int | None = None

    def loss(
        self, params: Any, apply_fn: ApplyFn, batch: Batch, rng: jax.Array | None, deterministic: bool
    ) -> tuple[jax.Array, Metrics]:
        """See :meth:`Task.loss`."""
        inputs, targets = batch  # (B, T), (B, T)
        rngs = None if deterministic else {"dropout": rng}
        if self.loss_chunk is not None:
            from flaxgpt.nn.model import GPTModel

            hidden = apply_fn(
                {"params": params}, inputs, deterministic=deterministic, rngs=rngs, return_hidden=True
            )  # (B, T, C)

            def head(h: jax.Array) -> jax.Array:
                return apply_fn({"params": params}, h, method=GPTModel.logits_from_hidden)  # (chunk, V)

            return chunked_cross_entropy_loss(hidden, head, targets, self.loss_chunk, self.ignore_index), {}
        logits = apply_fn({"params": params}, inputs, deterministic=deterministic, rngs=rngs)  # (B, T, V)
        return cross_entropy_loss(logits, targets, self.ignore_index), {}

    def count(self, batch: Batch) -> int:
        """Input tokens of the batch, B * T."""
        return int(np.size(batch[0]))


PRETRAIN = PretrainTask()  # the default task of fit, train_step and evaluate
