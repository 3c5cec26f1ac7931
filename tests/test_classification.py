"""Tests for flaxgpt.data.classification: the book's SpamDataset padding, loaders, labelled files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flaxgpt.data.classification import ClassificationDataset, classification_loaders, read_labeled_file
from flaxgpt.data.sms_spam import LabeledTexts, load_sms_spam
from flaxgpt.text.tokenizers import ByteTokenizer


def _data(texts: list[str], labels: list[int]) -> LabeledTexts:
    return LabeledTexts(tuple(texts), np.asarray(labels, np.int32))


def test_pads_right_to_the_longest_and_truncates() -> None:
    tok = ByteTokenizer()
    ds = ClassificationDataset(_data(["ab", "abcd", "a"], [0, 1, 0]), tok, pad_token_id=256)
    assert ds.max_length == 4
    np.testing.assert_array_equal(ds.input_ids[0], [97, 98, 256, 256])
    np.testing.assert_array_equal(ds.lengths, [2, 4, 1])
    short = ClassificationDataset(_data(["abcdef"], [1]), tok, max_length=3, pad_token_id=256)
    np.testing.assert_array_equal(short.input_ids, [[97, 98, 99]])
    assert short.lengths.tolist() == [3]
    batch = ds.get_batch([2, 0])
    assert batch["input_ids"].shape == (2, 4) and batch["labels"].tolist() == [0, 0]
    assert batch["lengths"].tolist() == [1, 2]


def test_bad_labels_and_empty_texts_are_named() -> None:
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"label 2 is outside \[0, 2\)"):
        ClassificationDataset(_data(["a", "b"], [0, 2]), tok, num_classes=2)
    with pytest.raises(ValueError, match="text 1 is empty"):
        ClassificationDataset(_data(["a", ""], [0, 1]), tok)


def test_book_loader_sizes(gpt2_tok) -> None:
    import os

    data_dir = os.environ.get("FLAXGPT_DATA_DIR")
    path = Path(data_dir or "") / "sms_spam_collection" / "SMSSpamCollection.tsv"
    if not data_dir or not path.is_file():
        pytest.skip("$FLAXGPT_DATA_DIR lacks sms_spam_collection/SMSSpamCollection.tsv")
    loaders = classification_loaders(load_sms_spam(path), gpt2_tok, batch_size=8)
    assert {k: len(v) for k, v in loaders.items()} == {"train": 130, "validation": 19, "test": 38}
    assert loaders["train"].dataset.max_length == 120  # the book's longest training text
    assert loaders["test"].dataset.input_ids.shape == (300, 120)
    # the book's SpamDataset on one text: encode, pad with 50256
    text = loaders_text = load_sms_spam(path)["validation"].texts[0]
    ids = gpt2_tok.encode(loaders_text)[:120]
    np.testing.assert_array_equal(
        loaders["validation"].dataset.input_ids[0], ids + [50256] * (120 - len(ids))
    )
    assert text
    first = [b["labels"].tolist() for b in loaders["train"].batches(0)][:3]
    again = [b["labels"].tolist() for b in loaders["train"].batches(0)][:3]
    assert first == again  # the order is a function of (seed, epoch)


def test_read_labeled_file_csv_and_tsv(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"hello, world",1\nbye,0\n', encoding="utf-8")
    d = read_labeled_file(csv_path)
    assert d.texts == ("hello, world", "bye") and d.labels.tolist() == [1, 0]
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text("label\ttext\n0\ta\tb\n", encoding="utf-8")
    with pytest.raises(ValueError):
        read_labeled_file(tsv_path)  # three fields in a two-column file
    tsv_path.write_text("label\ttext\n0\tab\n", encoding="utf-8")
    assert read_labeled_file(tsv_path).texts == ("ab",)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "is empty"),
        ("text,klass\na,0\n", "no column 'label'"),
        ("text,label\n", "no rows"),
        ("text,label\na,2\n", r"row 1: label '2' is not an int in \[0, 2\)"),
        ("text,label\na,spam\n", "label 'spam'"),
    ],
)
def test_read_labeled_file_errors(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "d.csv"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_labeled_file(p)
