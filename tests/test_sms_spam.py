"""Tests for flaxgpt.data.sms_spam: the checked download, the book's parsing, balancing and splits."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

import flaxgpt.data.sms_spam as sms
from flaxgpt.data.sms_spam import book_splits, load_sms_spam, read_sms_spam, sms_spam_path


@pytest.fixture(scope="module")
def spam_file() -> Path:
    """$FLAXGPT_DATA_DIR/sms_spam_collection/SMSSpamCollection.tsv."""
    import os

    value = os.environ.get("FLAXGPT_DATA_DIR")
    path = Path(value or "") / "sms_spam_collection" / "SMSSpamCollection.tsv"
    if not value or not path.is_file():
        pytest.skip("$FLAXGPT_DATA_DIR is not set or lacks sms_spam_collection/SMSSpamCollection.tsv")
    return path


def test_book_row_counts(spam_file: Path) -> None:
    texts, labels = read_sms_spam(spam_file)
    assert len(texts) == 5572  # 5,574 lines: one quoted field spans three lines
    assert labels.count("ham") == 4825 and labels.count("spam") == 747
    splits = book_splits(texts, labels)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1045, "validation": 149, "test": 300}
    for part in splits.values():
        assert set(np.unique(part.labels)) <= {0, 1}
    # balanced: 747 of each class over the three splits
    all_labels = np.concatenate([p.labels for p in splits.values()])
    assert (all_labels == 1).sum() == 747 and (all_labels == 0).sum() == 747


def test_splits_equal_the_books_pandas_code(spam_file: Path, tmp_path: Path) -> None:
    """The book's create_balanced_dataset + random_split + to_csv/read_csv, run with pandas."""
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(spam_file, sep="\t", header=None, names=["Label", "Text"])
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    shuffled = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(shuffled) * 0.7)
    val_end = train_end + int(len(shuffled) * 0.1)
    book = {"train": shuffled[:train_end], "validation": shuffled[train_end:val_end], "test": shuffled[val_end:]}
    ours = load_sms_spam(spam_file)
    for name, part in book.items():
        part.to_csv(tmp_path / f"{name}.csv", index=None)  # the book's files, read back as its SpamDataset does
        back = pd.read_csv(tmp_path / f"{name}.csv")
        assert list(back["Text"]) == list(ours[name].texts), name
        assert list(back["Label"]) == ours[name].labels.tolist(), name


def test_other_seed_gives_other_rows(spam_file: Path) -> None:
    a, b = load_sms_spam(spam_file, seed=123), load_sms_spam(spam_file, seed=7)
    assert a["train"].texts != b["train"].texts


def _zip_with(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return path


def test_download_extracts_checks_and_caches(spam_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path / "cache"))
    good = _zip_with(tmp_path / "good.zip", "SMSSpamCollection", spam_file.read_bytes())
    missing = (tmp_path / "nowhere.zip").as_uri()
    path = sms_spam_path((missing, good.as_uri()))  # the first URL fails, the backup works
    assert path == tmp_path / "cache" / "sms_spam_collection" / "SMSSpamCollection.tsv"
    assert path.read_bytes() == spam_file.read_bytes()
    assert not list(path.parent.glob("*.zip")) and not list(path.parent.glob(".*tmp"))
    good.unlink()  # cached now: no download needed
    assert sms_spam_path((missing,)) == path


def test_download_refuses_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path / "cache"))
    bad = _zip_with(tmp_path / "bad.zip", "SMSSpamCollection", b"ham\thello\n")
    with pytest.raises(ValueError, match="SHA-256"):
        sms_spam_path((bad.as_uri(),))


def test_download_reports_every_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path / "cache"))
    no_member = _zip_with(tmp_path / "other.zip", "README", b"x")
    with pytest.raises(ConnectionError, match="FLAXGPT_DATA_DIR") as e:
        sms_spam_path(((tmp_path / "nowhere.zip").as_uri(), no_member.as_uri()))
    assert "nowhere.zip" in str(e.value) and "other.zip" in str(e.value)


def test_default_urls_are_the_books() -> None:
    assert sms.SMS_SPAM_URLS[0] == "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
    assert "LLMs-from-scratch" in sms.SMS_SPAM_URLS[1]


def test_malformed_rows_are_named(tmp_path: Path) -> None:
    p = tmp_path / "x.tsv"
    p.write_text("ham\tfine\nmaybe\tnot a label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        read_sms_spam(p)
