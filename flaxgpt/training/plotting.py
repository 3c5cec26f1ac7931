"""The book's figures: train and validation loss (section 5.2) or any other metric, e.g. accuracy (chapter 6's
``plot_values``), against epochs, with a second x axis for tokens (or examples) seen."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flaxgpt.files import atomic_file

__all__ = ["plot_losses", "plot_metrics"]


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[int],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    path: str | os.PathLike[str] | None = None,
    label: str = "loss",
    seen: str = "Tokens seen",
) -> Any:
    """Draws the book's ``plot_losses`` figure (``plot_values`` for another ``label``) and optionally saves it.

    Args:
      epochs_seen: x positions in epochs, one per evaluation.
      tokens_seen: tokens seen at each evaluation (top axis).
      train_losses: training loss per evaluation.
      val_losses: validation loss per evaluation.
      path: where to save the figure (format by extension, written atomically); None to only return it.
      label: the metric's name ("loss", "accuracy", ...).
      seen: the top axis' title ("Examples seen" for a classifier).

    Returns:
      The matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(epochs_seen)
    if not (len(tokens_seen) == len(train_losses) == len(val_losses) == n):
        raise ValueError(
            f"expected equal lengths, got epochs {n}, tokens {len(tokens_seen)}, "
            f"train {len(train_losses)}, val {len(val_losses)}"
        )
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label=f"Training {label}")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend(loc="upper right" if label == "loss" else "lower right")  # loss falls, accuracy rises
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same y, tokens on the top axis
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel(seen)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:  # a full disk leaves the old figure, not half a new one
            fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png")
        plt.close(fig)
    return fig


def plot_metrics(
    records: Sequence[dict[str, Any]], path: str | os.PathLike[str], metric: str = "loss", seen: str = "Tokens seen"
) -> Any:
    """Plots metrics.jsonl records (``epochs_done``, ``tokens_seen``, ``train_<metric>``, ``val_<metric>``).

    Args:
      records: evaluation records, as :func:`flaxgpt.training.metrics.read_metrics` returns them.
      path: the PNG to write.
      metric: which metric ("loss", "accuracy", ...).
      seen: the top axis' title.

    Returns:
      The matplotlib Figure.
    """
    train, val = f"train_{metric}", f"val_{metric}"
    rows = [r for r in records if r.get(train) is not None and r.get(val) is not None]
    return plot_losses(
        [float(r.get("epochs_done", 0.0)) for r in rows],
        [int(r.get("tokens_seen", 0)) for r in rows],
        [float(r[train]) for r in rows],
        [float(r[val]) for r in rows],
        path,
        label=metric,
        seen=seen,
    )
