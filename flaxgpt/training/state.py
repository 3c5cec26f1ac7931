"""The train state and the pure, jitted train step (book chapter 5.2)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from flaxgpt.nn.model import GPTModel
from flaxgpt.training.losses import cross_entropy_loss

__all__ = ["TrainState", "create_train_state", "train_step", "eval_step"]

class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state; apply_fn and tx static) plus the model, static.

    ``step`` counts ``train_step`` calls (micro-batches when gradients are accumulated).
    """

    model: GPTModel = flax.struct.field(pytree_node=False)


def create_train_state(model: GPTModel, params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Builds the initial train state (``step`` 0 as an int32 array, optimizer state from ``tx.init``).

    Args:
      model: the model; its ``apply`` becomes ``state.apply_fn``.
      params: the model's parameters.
      tx: the optimizer, e.g. :func:`flaxgpt.optim.make_optimizer`.

    Returns:
      The state.
    """
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, model=model)
    return state.replace(step=jnp.zeros((), jnp.int32))  # strong int32: one compile, also on resume


def _train_step(
    state: TrainState, inputs: jax.Array, targets: jax.Array, key: jax.Array
) -> tuple[TrainState, jax.Array]:
    dropout_key = jax.random.fold_in(key, state.step)

    def loss_fn(params: Any) -> jax.Array:
        logits = state.apply_fn(
            {"params": params}, inputs, deterministic=False, rngs={"dropout": dropout_key}
        )  # (B, T, V) float32
        return cross_entropy_loss(logits, targets)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


train_step = jax.jit(_train_step, donate_argnums=0)


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
    logits = state.apply_fn({"params": state.params}, inputs, deterministic=True)  # (B, T, V)
    return cross_entropy_loss(logits, targets)
