"""Classification batches (book chapter 6): texts as right-padded token ids with a label and a true length.

:class:`ClassificationDataset` is the book's ``SpamDataset``: each text encoded, truncated to
``max_length`` when one is given, right-padded with ``pad_token_id`` (50256) to ``max_length`` (default:
the longest text). Its batches are dicts ``{"input_ids": (B, L), "labels": (B,), "lengths": (B,)}``, and
:class:`flaxgpt.data.windows.DataLoader` serves them (resumable, shuffled per epoch) as it serves
pretraining windows. :func:`read_labeled_file` reads any CSV/TSV with ``text`` and ``label`` columns.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxgpt.data.sms_spam import LabeledTexts
from flaxgpt.data.windows import DataLoader
from flaxgpt.validation import check_int

__all__ = ["ClassificationDataset", "classification_loaders", "read_labeled_file", "encode_texts"]

PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>, the book's padding


def encode_texts(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Encodes each text with ``tokenizer.encode`` (the book's ``tokenizer.encode(text)``).

    Args:
      texts: the texts.
      tokenizer: a tiktoken Encoding or any tokenizer with ``encode``.

    Returns:
      One id list per text.

    Raises:
      ValueError: a text is not a str or encodes to no tokens (named by its row).
    """
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i} is a {type(text).__name__}, expected a str")
        ids = list(tokenizer.encode(text))
        if not ids:
            raise ValueError(f"text {i} is empty (no tokens): every example needs at least one token")
        out.append(ids)
    return out


class ClassificationDataset:
    """Labelled texts as fixed-width token ids (the book's ``SpamDataset``).

    Attributes:
      input_ids: (N, L) int32, right-padded with ``pad_token_id``.
      labels: (N,) int32 class labels.
      lengths: (N,) int32 number of real tokens of each row (after truncation), >= 1.
      max_length: L.
    """

    def __init__(
        self,
        data: LabeledTexts,
        tokenizer: Any,
        max_length: int | None = None,
        pad_token_id: int = PAD_TOKEN_ID,
        num_classes: int | None = None,
    ) -> None:
        """Args:
        data: the texts and labels.
        tokenizer: encodes each text.
        max_length: truncate to and pad to this many tokens (None: the longest text, no truncation).
        pad_token_id: the padding id.
        num_classes: when given, every label must lie in [0, num_classes).
        """
        labels = np.asarray(data.labels)
        if labels.shape != (len(data.texts),):
            raise ValueError(f"{len(data.texts)} texts but labels of shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            bad = int(labels.min() if labels.min() < 0 else labels.max())
            raise ValueError(f"label {bad} is outside [0, {num_classes}) (num_classes={num_classes})")
        encoded = encode_texts(data.texts, tokenizer)
        if max_length is None:
            max_length = max((len(e) for e in encoded), default=1)
        else:
            max_length = check_int("max_length", max_length, 1)
            encoded = [e[:max_length] for e in encoded]
        self.max_length = max_length
        self.input_ids = np.full((len(encoded), max_length), pad_token_id, np.int32)  # (N, L)
        for row, ids in zip(self.input_ids, encoded):
            row[: len(ids)] = ids
        self.lengths = np.asarray([len(e) for e in encoded], np.int32)  # (N,)
        self.labels = labels.astype(np.int32)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The rows ``indices`` as ``{"input_ids": (B, L), "labels": (B,), "lengths": (B,)}``."""
        idx = np.asarray(indices, np.int64)
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx], "lengths": self.lengths[idx]}


def classification_loaders(
    splits: dict[str, LabeledTexts],
    tokenizer: Any,
    batch_size: int = 8,
    seed: int = 123,
    max_length: int | None = None,
    num_classes: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
) -> dict[str, DataLoader]:
    """The book's three loaders: train padded to its longest text (or ``max_length``), shuffled, ``drop_last``;
    validation and test truncated and padded to the same length, in order, keeping the last partial batch.

    Args:
      splits: ``{"train", "validation", "test"}`` -> texts and labels.
      tokenizer: encodes the texts.
      batch_size: examples per batch (the book: 8).
      seed: the training loader's shuffle seed.
      max_length: the token width (None: the longest training text).
      num_classes: checks every label.
      pad_token_id: the padding id (the book: 50256; a byte-level tokenizer's end-of-text is 256).

    Returns:
      ``{"train", "validation", "test"}`` -> :class:`DataLoader` (130 / 19 / 38 batches for SMS spam).
    """
    missing = [k for k in ("train", "validation", "test") if k not in splits]
    if missing:
        raise ValueError(f"splits lacks {missing}")
    train = ClassificationDataset(splits["train"], tokenizer, max_length, pad_token_id, num_classes)
    loaders = {"train": DataLoader(train, batch_size, shuffle=True, drop_last=True, seed=seed)}
    for name in ("validation", "test"):
        ds = ClassificationDataset(splits[name], tokenizer, train.max_length, pad_token_id, num_classes)
        loaders[name] = DataLoader(ds, batch_size, shuffle=False, drop_last=False, seed=seed)
    return loaders


def read_labeled_file(
    path: str | os.PathLike[str], text_column: str = "text", label_column: str = "label", num_classes: int = 2
) -> LabeledTexts:
    """Reads a CSV (or, for ``.tsv`` files, tab-separated) file with a header naming a text and a label column.

    Args:
      path: the file.
      text_column: the text column's header.
      label_column: the label column's header (integers in [0, num_classes)).
      num_classes: the number of classes.

    Returns:
      The texts and labels, in file order.

    Raises:
      ValueError: the file is empty, lacks a column, or holds a label that is not an int in range.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames
        if not header:
            raise ValueError(f"{path} is empty: expected a header with {text_column!r} and {label_column!r}")
        for col in (text_column, label_column):
            if col not in header:
                raise ValueError(f"{path} has no column {col!r} (its columns: {header})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    labels = []
    for i, row in enumerate(rows, start=2):  # i: 1-based row counting the header
        if None in row or None in row.values():
            raise ValueError(f"{path} row {i - 1} has {len(header)} columns in the header but not in the row")
        value = (row[label_column] or "").strip()
        try:
            label = int(value)
        except ValueError:
            label = None
        if label is None or not 0 <= label < num_classes:
            raise ValueError(f"{path} row {i - 1}: label {value!r} is not an int in [0, {num_classes})")
        labels.append(label)
    return LabeledTexts(tuple(row[text_column] or "" for row in rows), np.asarray(labels, np.int32))
