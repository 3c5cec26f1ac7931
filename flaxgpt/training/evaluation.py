"""Evaluation over a loader's fixed batches (the book's ``calc_loss_loader``), the greedy per-epoch sample,
and the adapters between user callables (``shard_batch``, ``step_fn``) and batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.book.generate import generate_text_simple
from flaxgpt.nn.lora import inference_params
from flaxgpt.training.state import StepFn, TrainState, make_eval_step, make_train_step
from flaxgpt.training.tasks import PRETRAIN, Batch, Task, batch_args
from flaxgpt.validation import check_optional_int

__all__ = ["evaluate", "evaluate_metrics", "greedy_sample", "placer", "stepper"]

Place = Callable[[Batch], Batch]


def placer(shard_batch: Callable[..., Batch] | None) -> Place:
    """``place(batch) -> batch on devices`` from a user's ``shard_batch`` (called as
    ``shard_batch(*batch_args(batch))``, e.g. ``shard_batch(inputs, targets)``); ``jnp.asarray`` on every
    array when None.

    Args:
      shard_batch: the user's callable, or None.

    Returns:
      The placing function.
    """
    if shard_batch is None:
        return lambda batch: jax.tree.map(jnp.asarray, batch)
    return lambda batch: shard_batch(*batch_args(batch))


def stepper(task: Task, step_fn: Callable[..., tuple[TrainState, jax.Array]] | None) -> StepFn:
    """``step(state, batch, key)`` from a user's ``step_fn`` (called as ``step_fn(state, *batch_args(batch),
    key)``, e.g. ``train_step(state, inputs, targets, key)``); the task's jitted step when None.

    Args:
      task: the task.
      step_fn: the user's step, or None.

    Returns:
      The step function.
    """
    if step_fn is None:
        return make_train_step(task)
    return lambda state, batch, key: step_fn(state, *batch_args(batch), key)


def evaluate_metrics(
    state: TrainState,
    loader: Any,
    task: Task = PRETRAIN,
    num_batches: int | None = None,
    place: Place | None = None,
) -> dict[str, float]:
    """A task's evaluation metrics over the first ``num_batches`` batches of the loader's epoch 0.

    Using ``loader.batches(0)`` means repeated evaluations see the same batches and the loader's own
    epoch counter is untouched.

    Args:
      state: the train state.
      loader: anything with ``len()`` and ``batches(epoch)`` (e.g. :class:`flaxgpt.data.windows.DataLoader`).
      task: the task whose ``batch_metrics`` and ``eval_metrics`` are used.
      num_batches: how many batches (all when None or larger than the loader); positive.
      place: puts a host batch on devices (default ``jnp.asarray``), see :func:`placer`.

    Returns:
      ``task.eval_metrics`` of the per-batch values (``{"loss": nan}`` for an empty loader, as the book).
    """
    num_batches = check_optional_int("num_batches", num_batches, 1)
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    place = place or placer(None)
    eval_fn = make_eval_step(task)
    values = []
    for i, batch in enumerate(loader.batches(0)):
        if i >= n:
            break
        values.append(eval_fn(state, place(batch)))
    return task.eval_metrics([{k: float(v) for k, v in m.items()} for m in values])


def evaluate(
    state: TrainState,
    loader: Any,
    num_batches: int | None = None,
    shard_batch: Callable[..., Batch] | None = None,
) -> float:
    """The book's ``calc_loss_loader`` for pretraining: the mean of per-batch losses over the first
    ``num_batches`` batches of ``loader.batches(0)``.

    Args:
      state: the train state.
      loader: a :class:`flaxgpt.data.windows.DataLoader` (anything with ``len()`` and ``batches(epoch)``).
      num_batches: how many batches (all when None or larger than the loader).
      shard_batch: places a numpy batch on devices, ``shard_batch(inputs, targets)`` (default: ``jnp.asarray``).

    Returns:
      The mean loss, or NaN for an empty loader (as the book).
    """
    return evaluate_metrics(state, loader, PRETRAIN, num_batches, placer(shard_batch))["loss"]


def greedy_sample(state: TrainState, tokenizer: Any, start_context: str, max_new_tokens: int = 50) -> str:
    """The book's ``generate_and_print_sample``, returning the text: greedy continuation of a prompt.

    It uses the book's ``generate_text_simple`` (not the compiled ``generate``) on purpose: that loop crops the
    window to the last ``context_length`` tokens, so a sample may run past a small model's context (the
    fixture run samples 50 tokens from a 32-token model), where ``generate`` refuses prompt + new tokens
    beyond the context.

    Args:
      state: the train state (its model and params are used; a LoRA state's adapters are merged first).
      tokenizer: a tiktoken Encoding or a Tokenizer.
      start_context: the prompt.
      max_new_tokens: tokens to generate.

    Returns:
      The prompt and its continuation, decoded.
    """
    from flaxgpt.text.tokenizers import text_to_token_ids, token_ids_to_text

    cfg = state.model.cfg
    ids = text_to_token_ids(start_context, tokenizer)  # (1, T)
    params = inference_params(state.params)
    out = generate_text_simple(state.model, params, ids, max_new_tokens, cfg.context_length)
    return token_ids_to_text(np.asarray(out), tokenizer)
