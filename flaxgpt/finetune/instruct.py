"""Book chapter 7: instruction fine-tuning as a task of the one training loop.

The chapter's loss is the book's ``calc_loss_batch``, ``cross_entropy(logits.flatten(0, 1), targets.flatten())``:
the mean next-token cross-entropy over the targets that are not -100 (the padding after each text's first
end-of-text, the bucket padding, and with ``mask_instruction`` the prompt). That is
:class:`flaxgpt.training.tasks.PretrainTask`'s loss; :class:`InstructionTask` differs only in what it counts
as "tokens seen". :func:`instruct_metadata` is what a fine-tuned run records in its checkpoints for
``flaxgpt respond`` and ``flaxgpt chat``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxgpt.training.tasks import Batch, PretrainTask
from flaxgpt.validation import check_int

__all__ = ["INSTRUCT_KEY", "InstructionTask", "INSTRUCT", "instruct_metadata", "read_instruct_metadata"]

INSTRUCT_KEY = "instruct"  # the checkpoint-extra / config.json key of an instruction-tuned run


@dataclasses.dataclass(frozen=True)
class InstructionTask(PretrainTask):
    """The book's chapter-7 objective on ``(inputs, targets)`` batches, both (B, W) int32.

    The loss is the mean cross-entropy over targets that are not ``ignore_index`` (PyTorch's
    ``cross_entropy`` with its default ``ignore_index=-100``), so a batch padded to a wider bucket has the same
    loss as the book's exact-width batch. ``tokens_seen`` counts the **trained target tokens** (those not
    ignored), not the book's ``input_batch.numel()``: the numel would count padding and change with the
    bucket width, while the trained tokens are the same for exact and bucketed batches.
    """

    def count(self, batch: Batch) -> int:
        """Target tokens of the batch that the loss counts (not ``ignore_index``)."""
        return int(np.count_nonzero(np.asarray(batch[1]) != self.ignore_index))


INSTRUCT = InstructionTask()


def instruct_metadata(mask_instruction: bool, pad_token_id: int, **more: Any) -> dict[str, Any]:
    """What an instruction-tuned run records (``checkpoint_extra=`` of :func:`flaxgpt.training.loop.fit`).

    Args:
      mask_instruction: whether the prompt's targets were ignored in training (exercise 7.2).
      pad_token_id: the end-of-text / padding id (generation stops at it).
      **more: further JSON values to record (e.g. the data source).

    Returns:
      ``{"instruct": {"mask_instruction": ..., "pad_token_id": ..., **more}}``.
    """
    return {INSTRUCT_KEY: {"mask_instruction": bool(mask_instruction),
                           "pad_token_id": check_int("pad_token_id", pad_token_id, 0), **more}}


def read_instruct_metadata(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The instruction settings recorded in a checkpoint's metadata or a run's config.json.

    Args:
      meta: the metadata dict (e.g. the second value of :func:`flaxgpt.io.checkpoint.resolve_checkpoint`).

    Returns:
      The ``"instruct"`` dict, looked up at the top level and under ``"extra"``; None when absent.
    """
    for where in (meta, meta.get("extra") or {}):
        value = where.get(INSTRUCT_KEY) if isinstance(where, Mapping) else None
        if isinstance(value, Mapping):
            return dict(value)
    return None
