"""metrics.jsonl: append / read / truncate, torn lines skipped, NaN stored as null, atomic truncation."""

from __future__ import annotations

import json
import os

import pytest

import flaxgpt.files as files_module
from flaxgpt.training.metrics import append_metrics, read_metrics, truncate_metrics


def test_append_and_read_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # missing file
    records = [{"step": 1, "train_loss": 2.5, "val_loss": float("nan")}, {"step": 6, "train_loss": 2.0}]
    for r in records:
        append_metrics(path, r)
    assert read_metrics(path) == [{"step": 1, "train_loss": 2.5, "val_loss": None}, records[1]]
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"step": 1, "train_loss": 2.5, "val_loss": None}


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"step": 1, "train_loss": 2.5})
    append_metrics(path, {"step": 2, "train_loss": 2.4})
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n{"step": 3, "train_lo')  # an empty line and a torn last line
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    append_metrics(path, {"step": 4, "train_loss": 2.2})  # the torn line has its own line; later ones parse
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 4]


def test_truncate_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 6, 11, 16):
        append_metrics(path, {"step": step})
    before = path.stat().st_mtime_ns
    assert [r["step"] for r in truncate_metrics(path, 16)] == [1, 6, 11, 16]
    assert path.stat().st_mtime_ns == before  # nothing to drop: the file is not rewritten
    assert [r["step"] for r in truncate_metrics(path, 11)] == [1, 6, 11]
    assert [r["step"] for r in read_metrics(path)] == [1, 6, 11]
    assert truncate_metrics(tmp_path / "none.jsonl", 3) == [] and not (tmp_path / "none.jsonl").exists()


def test_truncate_is_atomic(tmp_path, monkeypatch):
    """A crash while the truncated file is written leaves the old file whole and no temporary file."""
    path = tmp_path / "metrics.jsonl"
    for step in (1, 6, 11):
        append_metrics(path, {"step": step})
    old = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(files_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        truncate_metrics(path, 6)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
