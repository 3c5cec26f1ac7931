"""The book's optimizer: AdamW, with appendix D's warmup + cosine schedule, gradient clipping and
gradient accumulation, as one ``optax.GradientTransformation``."""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax

from flaxgpt.validation import check_int, check_number

__all__ = ["schedule", "make_optimizer", "decay_mask"]

# Leaves that ``decay_biases_and_norms=False`` leaves undecayed: biases and LayerNorm scale/shift.
_NO_DECAY_NAMES = frozenset({"bias", "scale", "shift"})


def schedule(
    lr: float, warmup_steps: int = 0, total_steps: int | None = None, min_lr: float = 0.0
) -> optax.Schedule:
    """Learning rate per optimizer update (appendix D): linear warmup from 0 to ``lr`` over
    ``warmup_steps`` updates, then cosine decay to ``min_lr`` at ``total_steps`` (constant ``lr`` when
    ``total_steps`` is None).

    Args:
      lr: the peak learning rate.
      warmup_steps: updates of linear warmup (0: none).
      total_steps: updates at which the cosine reaches ``min_lr``; None for no decay.
      min_lr: the final learning rate of the cosine.

    Returns:
      An optax schedule: update count -> learning rate.
    """
    lr = check_number("lr", lr, 0.0, open_low=True)
    min_lr = check_number("min_lr", min_lr, 0.0)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    if min_lr > lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed lr ({lr})")
    if total_steps is None:
        if warmup_steps == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps]
        )
    total_steps = check_int("total_steps", total_steps, 1)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) to leave room "
            "for the cosine decay"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=min_lr,
    )


def decay_mask(params: Any) -> Any:
    """Pytree of bools: True for leaves that get weight decay (all but biases and LayerNorm
    scale/shift; embeddings and the output head are decayed).

    Args:
      params: a params tree.

    Returns:
      A tree of the same structure with bool leaves.
    """

    def keep(path: tuple[Any, ...], _: Any) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name not in _NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(keep, params)


@functools.lru_cache(maxsize=32)
def make_optimizer(
    lr: float,
    weight_decay: float = 0.1,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr: float = 0.0,
    grad_clip: float | None = None,
    accumulate_steps: int = 1,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    decay_biases_and_norms: bool = True,
) -> optax.GradientTransformation:
    """The book's ``torch.optim.AdamW(params, lr, weight_decay)``, with optional extras.

    With the defaults this is AdamW (betas 0.9/0.999, eps 1e-8, decoupled weight decay
    ``lr * weight_decay * p`` on every parameter, as the book's ``model.parameters()``). The same
    arguments return the same (cached) object, so ``train_step`` compiled for one run is reused by the
    next one in the same process.

    Args:
      lr: peak learning rate.
      weight_decay: decoupled weight-decay coefficient.
      warmup_steps: linear warmup updates (see :func:`schedule`).
      total_steps: updates of the cosine decay to ``min_lr``; None keeps ``lr`` after warmup.
      min_lr: final learning rate of the cosine.
      grad_clip: clip gradients to this global L2 norm (None: no clipping).
      accumulate_steps: average gradients over this many micro-batches per update
        (``optax.MultiSteps``); each ``train_step`` call is one micro-batch.
      b1, b2, eps: Adam's hyper-parameters.
      decay_biases_and_norms: False skips weight decay on biases and LayerNorm scale/shift.

    Returns:
      The gradient transformation.
    """
    weight_decay = check_number("weight_decay", weight_decay, 0.0)
    accumulate_steps = check_int("accumulate_steps", accumulate_steps, 1)
    if grad_clip is not None:
        grad_clip = check_number("grad_clip", grad_clip, 0.0, open_low=True)
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= check_number(name, value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    lr_schedule = schedule(lr, warmup_steps, total_steps, min_lr)
    adamw = optax.adamw(
        lr_schedule,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=None if decay_biases_and_norms else decay_mask,
    )
    tx = adamw if grad_clip is None else optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    if accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps).gradient_transformation()
    return tx
