"""The book's loss figure (section 5.2): train and validation loss against epochs, with a second x axis
for tokens seen."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flaxgpt.io.files import atomic_file

__all__ = ["plot_losses", "plot_metrics"]


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[int],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Draws the book's ``plot_losses`` figure and optionally saves it.

    Args:
      epochs_seen: x positions in epochs, one per evaluation.
      tokens_seen: tokens seen at each evaluation (top axis).
      train_losses: training loss per evaluation.
      val_losses: validation loss per evaluation.
      path: where to save the figure (format by extension, written atomically); None to only return it.

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
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same y, tokens on the top axis
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:  # a full disk leaves the old figure, not half a new one
            fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png")
        plt.close(fig)
    return fig


def plot_metrics(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Any:
    """Plots metrics.jsonl records (``epochs_done``, ``tokens_seen``, ``train_loss``, ``val_loss``).

    Args:
      records: evaluation records, as :func:`flaxgpt.training.metrics.read_metrics` returns them.
      path: the PNG to write.

    Returns:
      The matplotlib Figure.
    """
    rows = [r for r in records if r.get("train_loss") is not None and r.get("val_loss") is not None]
    return plot_losses(
        [float(r.get("epochs_done", 0.0)) for r in rows],
        [int(r.get("tokens_seen", 0)) for r in rows],
        [float(r["train_loss"]) for r in rows],
        [float(r["val_loss"]) for r in rows],
        path,
    )
