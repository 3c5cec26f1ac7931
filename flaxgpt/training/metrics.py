"""The run's evaluation log, ``metrics.jsonl``: one JSON object per evaluation."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flaxgpt.files import atomic_file

__all__ = ["METRICS_FILE", "append_metrics", "read_metrics", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def append_metrics(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Appends one record as a JSON line and flushes it to disk. On a write error (a full disk) the file
    is cut back to its previous length, so no half line stays behind; after a line torn by a crash, the
    record starts on a line of its own.

    Args:
      path: the metrics.jsonl file (created if missing).
      record: JSON-serialisable values.
    """
    line = json.dumps({k: _jsonable(v) for k, v in record.items()}, sort_keys=True)
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash: end it, keep this one whole
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:  # a short write (a nearly full disk) continues, and then raises
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:  # e.g. a full disk: take back the part of the line that was written
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads every complete record of a metrics.jsonl file (a torn last line is skipped).

    Args:
      path: the file; a missing file gives an empty list.

    Returns:
      The records, in file order.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return records


def truncate_metrics(path: str | os.PathLike[str], max_step: int) -> list[dict[str, Any]]:
    """Keeps only records with ``step <= max_step`` (used on resume: the steps after the checkpoint
    are trained, and evaluated, again).

    Args:
      path: the metrics.jsonl file.
      max_step: the checkpoint's step.

    Returns:
      The kept records.
    """
    path = Path(path)
    records = read_metrics(path)
    kept = [r for r in records if int(r.get("step", 0)) <= max_step]
    if path.is_file() and len(kept) != len(records):
        with atomic_file(path, "w") as f:
            for r in kept:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    return kept

