"""LoRA fine-tuning (book appendix E): a train state whose only trainable leaves are the adapters.

The state's params are ``{"base": params, "lora": LoRA}`` (:func:`flaxgpt.nn.lora.lora_train_params`), its
``apply_fn`` runs the adapted model (:class:`flaxgpt.nn.lora.LoRAApply`), and its optimizer is partitioned
(:func:`flaxgpt.finetune.trainable.partition_optimizer`): the base gets no gradient use, no optimizer state
and a zero update, so it stays bit-identical; AdamW's moments exist for the adapters only. Any task
(:class:`flaxgpt.finetune.classify.ClassificationTask`, :data:`flaxgpt.finetune.instruct.INSTRUCT`) trains
through :func:`flaxgpt.training.loop.fit` unchanged, with checkpoints and exact resume.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from flaxgpt.finetune.trainable import FROZEN, TRAINABLE, partition_optimizer
from flaxgpt.nn.lora import LoRA, LoRAApply, lora_train_params
from flaxgpt.nn.model import GPTModel
from flaxgpt.training.state import TrainState, create_train_state

__all__ = ["lora_labels", "lora_train_state", "lora_metadata"]


def lora_labels(train_params: dict[str, Any]) -> dict[str, Any]:
    """The label tree of a LoRA state's params: the base "frozen", every adapter leaf "trainable".

    Args:
      train_params: ``{"base": params, "lora": LoRA}``.

    Returns:
      A tree of the same structure with string leaves.
    """
    return {
        "base": jax.tree.map(lambda _: FROZEN, train_params["base"]),
        "lora": jax.tree.map(lambda _: TRAINABLE, train_params["lora"]),
    }


def lora_train_state(
    model: GPTModel, params: Any, lora: LoRA, tx: optax.GradientTransformation
) -> tuple[TrainState, dict[str, Any]]:
    """A train state that trains only ``lora`` on top of the frozen ``params``.

    Args:
      model: the plain model.
      params: its base params (kept bit-identical by training).
      lora: the adapters (e.g. :func:`flaxgpt.nn.lora.init_lora`).
      tx: the adapters' optimizer (e.g. :func:`flaxgpt.training.optim.make_optimizer`).

    Returns:
      (state, labels); ``state.params`` is ``{"base": params, "lora": lora}``, the labels are
      :func:`lora_labels`'s (for :func:`flaxgpt.finetune.trainable.count_by_label`). The train step donates
      the state, so after the first step read the base and adapters from the returned state
      (``state.params["base"]``, ``state.params["lora"]``), not from the arrays passed in.
    """
    train = lora_train_params(params, lora)
    labels = lora_labels(train)
    return create_train_state(model, train, partition_optimizer(tx, labels), apply_fn=LoRAApply(model)), labels


def lora_metadata(lora: LoRA, targets: Any) -> dict[str, Any]:
    """The JSON settings a checkpoint keeps to rebuild the adapters: ``{"rank", "alpha", "dropout", "targets"}``.

    Args:
      lora: the adapters.
      targets: the targets they were made for (preset name or patterns).

    Returns:
      The settings dict (stored under "lora" in a checkpoint's extra metadata).
    """
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
            "targets": targets if isinstance(targets, str) else list(targets)}
