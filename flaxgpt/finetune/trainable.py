"""Which parameters train: a label tree ("trainable" / "frozen") from names or path patterns, and the
optimizer that updates only the trainable ones (``optax.multi_transform``).

Frozen parameters get no optimizer state (``optax.set_to_zero`` keeps none, and AdamW's moments are
masked out), no weight decay and a zero update, so they stay bit-identical; XLA drops the backward pass
of everything only frozen parameters need.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from flaxgpt.pytree import path_name

__all__ = ["TRAINABLE", "FROZEN", "TRAINABLE_PRESETS", "trainable_patterns", "label_params", "partition_optimizer",
           "count_by_label"]

TRAINABLE, FROZEN = "trainable", "frozen"
# The named choices: the book's chapter 6 trains the last block, the final LayerNorm and the head.
TRAINABLE_PRESETS = ("last_block", "head", "all")


def trainable_patterns(trainable: str | Sequence[str], n_layers: int, scan_layers: bool = False) -> list[str]:
    """The path patterns (regular expressions matched at the start of a '/'-joined parameter path) of a
    named choice, or the given patterns.

    Args:
      trainable: "last_block", "head", "all", or a list of patterns such as ``["trf_blocks_11/", "out_head/"]``.
      n_layers: the model's depth (names the last block).
      scan_layers: the params use the scanned layout (one stacked ``trf_blocks``): "last_block" would split
        the layer axis, which a label tree cannot; convert to the unrolled layout first.

    Returns:
      The patterns.
    """
    if isinstance(trainable, str):
        if trainable == "all":
            return [""]
        if trainable == "head":
            return ["out_head/"]
        if trainable == "last_block":
            if scan_layers:
                raise ValueError(
                    'trainable="last_block" needs the unrolled layer layout (one entry per block); convert '
                    "with flaxgpt.nn.params.convert_layout(params, cfg.replace(scan_layers=False))"
                )
            return [f"trf_blocks_{n_layers - 1}/", "final_norm/", "out_head/"]
        raise ValueError(f"trainable must be one of {TRAINABLE_PRESETS} or a list of path patterns, got {trainable!r}")
    patterns = list(trainable)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"trainable patterns must be a non-empty list of strings, got {trainable!r}")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"trainable pattern {p!r} is not a regular expression: {e}") from e
    return patterns


def label_params(params: Any, patterns: Sequence[str]) -> Any:
    """Labels each leaf "trainable" when its path matches a pattern (``re.match``), else "frozen".

    Args:
      params: the params tree.
      patterns: from :func:`trainable_patterns`.

    Returns:
      A tree of the same structure with string leaves.

    Raises:
      ValueError: a pattern matches no parameter, or nothing is trainable.
    """
    compiled = [re.compile(p) for p in patterns]
    names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unused = [p.pattern for p in compiled if not any(p.match(n) for n in names)]
    if unused:
        raise ValueError(f"trainable patterns {unused} match no parameter (parameters look like {names[:3]})")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: TRAINABLE if any(p.match(path_name(path)) for p in compiled) else FROZEN, params
    )


def partition_optimizer(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, nothing (no state, zero update) on the frozen ones.

    Args:
      tx: the optimizer of the trainable parameters (e.g. :func:`flaxgpt.training.optim.make_optimizer`).
      labels: from :func:`label_params`.

    Returns:
      The partitioned transformation.
    """
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def count_by_label(params: Any, labels: Any) -> dict[str, int]:
    """Parameter counts per label, e.g. ``{"trainable": 7_680_002, "frozen": 116_773_632}``."""
    out = {TRAINABLE: 0, FROZEN: 0}
    for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        out[lab] += int(x.size)
    return out
