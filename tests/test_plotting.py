"""The loss figure (book Figure 5.12): its series and points, the tokens axis, the file, bad lengths."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flaxgpt.training.plotting import plot_losses, plot_metrics  # noqa: E402


def test_plot_losses_series_and_file(tmp_path):
    path = tmp_path / "sub" / "loss.png"
    fig = plot_losses([0.0, 0.5, 1.0], [0, 512, 1024], [9.0, 7.0, 5.0], [9.5, 8.0, 7.5], path)
    ax1, ax2 = fig.axes
    lines = {line.get_label(): line for line in ax1.get_lines()}
    assert set(lines) == {"Training loss", "Validation loss"}
    np.testing.assert_array_equal(lines["Training loss"].get_xdata(), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(lines["Training loss"].get_ydata(), [9.0, 7.0, 5.0])
    np.testing.assert_array_equal(lines["Validation loss"].get_ydata(), [9.5, 8.0, 7.5])
    assert lines["Validation loss"].get_linestyle() == "-."
    assert ax1.get_xlabel() == "Epochs" and ax1.get_ylabel() == "Loss" and ax2.get_xlabel() == "Tokens seen"
    np.testing.assert_array_equal(ax2.get_lines()[0].get_xdata(), [0, 512, 1024])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss.png"]  # no temporary file left


def test_plot_metrics_skips_records_without_losses(tmp_path):
    records = [
        {"step": 1, "epochs_done": 0.1, "tokens_seen": 64, "train_loss": 9.0, "val_loss": 9.2},
        {"step": 6, "epochs_done": 0.6, "tokens_seen": 384, "train_loss": None, "val_loss": 8.0},  # NaN -> null
        {"step": 9, "epochs_done": 0.9, "tokens_seen": 576, "train_loss": 7.0, "val_loss": 7.9},
    ]
    fig = plot_metrics(records, tmp_path / "loss.png")
    train = fig.axes[0].get_lines()[0]
    np.testing.assert_array_equal(train.get_xdata(), [0.1, 0.9])
    np.testing.assert_array_equal(train.get_ydata(), [9.0, 7.0])
    assert (tmp_path / "loss.png").is_file()


def test_plot_losses_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        plot_losses([0.0, 1.0], [0], [1.0, 2.0], [1.0, 2.0])
