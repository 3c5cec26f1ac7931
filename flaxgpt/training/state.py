"""The train state and the pure, jitted train and eval steps built from a task (book chapter 5.2)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from flaxgpt.nn.model import GPTModel
from flaxgpt.training.tasks import PRETRAIN, Batch, Metrics, Task

__all__ = [
    "TrainState",
    "create_train_state",
    "make_train_step",
    "make_eval_step",
    "train_step",
    "eval_step",
]

StepFn = Callable[["TrainState", Batch, jax.Array], tuple["TrainState", jax.Array]]
EvalFn = Callable[["TrainState", Batch], Metrics]


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state; apply_fn and tx static) plus the model, static.

    ``step`` counts ``train_step`` calls (micro-batches when gradients are accumulated).
    """

    model: GPTModel = flax.struct.field(pytree_node=False)


def create_train_state(
    model: GPTModel, params: Any, tx: optax.GradientTransformation, apply_fn: Callable[..., Any] | None = None
) -> TrainState:
    """Builds the initial train state (``step`` 0 as an int32 array, optimizer state from ``tx.init``).

    Args:
      model: the model.
      params: the parameters ``apply_fn`` takes under "params".
      tx: the optimizer, e.g. :func:`flaxgpt.training.optim.make_optimizer`.
      apply_fn: ``state.apply_fn`` (hashable); None for ``model.apply``. A LoRA state passes
        :class:`flaxgpt.nn.lora.LoRAApply` (see :func:`flaxgpt.finetune.lora_train.lora_train_state`).

    Returns:
      The state.
    """
    apply_fn = model.apply if apply_fn is None else apply_fn
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=tx, model=model)
    return state.replace(step=jnp.zeros((), jnp.int32))  # strong int32: one compile, also on resume


def _step(task: Task, state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, jax.Array]:
    dropout_key = jax.random.fold_in(key, state.step)

    def loss_fn(params: Any) -> tuple[jax.Array, Metrics]:
        return task.loss(params, state.apply_fn, batch, dropout_key, False)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    with jax.named_scope("optimizer"):  # a name for profiles (benchmarks/breakdown.py)
        state = state.apply_gradients(grads=grads)
    return state, loss


@functools.lru_cache(maxsize=64)
def make_train_step(task: Task = PRETRAIN) -> StepFn:
    """The jitted training step of a task: ``step(state, batch, key) -> (state, loss)``.

    One optimizer (micro-)step: the task's loss with dropout, gradients, update. ``state`` is donated
    (invalid after the call: use the returned one); dropout uses ``fold_in(key, state.step)``, so a run
    is a function of its seed. Built once per task (cached), compiled once per batch shape.

    Args:
      task: the task (hashable).

    Returns:
      The jitted step; the loss is the float32 scalar of this batch before the update.
    """
    return jax.jit(functools.partial(_step, task), donate_argnums=0)


@functools.lru_cache(maxsize=64)
def make_eval_step(task: Task = PRETRAIN) -> EvalFn:
    """The jitted evaluation step of a task: ``eval(state, batch) -> task.batch_metrics(...)``.

    Args:
      task: the task (hashable).

    Returns:
      The jitted function; its values are float32 scalars, without dropout.
    """

    def metrics(state: TrainState, batch: Batch) -> Metrics:
        return task.batch_metrics(state.params, state.apply_fn, batch)

    return jax.jit(metrics)


def _pretrain_step(
    state: TrainState, inputs: jax.Array, targets: jax.Array, key: jax.Array
) -> tuple[TrainState, jax.Array]:
    """One optimizer (micro-)step of pretraining: loss, gradients, update. Jitted once; ``state`` is donated.

    Args:
      state: the train state (invalid after the call: use the returned one).
      inputs: (B, T) int32 token ids.
      targets: (B, T) int32 next-token ids (-100 to ignore a position).
      key: the run's PRNG key; dropout uses ``fold_in(key, state.step)``, so a run is a function of its seed.

    Returns:
      (new state, float32 scalar loss of this batch before the update).
    """
    return _step(PRETRAIN, state, (inputs, targets), key)


train_step = jax.jit(_pretrain_step, donate_argnums=0)


@jax.jit
def eval_step(state: TrainState, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean loss of one batch without dropout (the book's ``calc_loss_batch`` in eval mode).

    Args:
      state: the train state.
      inputs: (B, T) int32 token ids.
      targets: (B, T) int32 next-token ids.

    Returns:
      A float32 scalar.
    """
    return PRETRAIN.batch_metrics(state.params, state.apply_fn, (inputs, targets))["loss"]
